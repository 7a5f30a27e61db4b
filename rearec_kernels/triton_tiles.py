"""Small pieces shared by the training kernels (:mod:`rearec_kernels.linear_cross_entropy_triton`,
:mod:`rearec_kernels.attention_autograd_triton`; widths and precision also
:mod:`rearec_kernels.attention_triton`): tile loads, dot operands, dot precision, tile widths, scratch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rearec_kernels.backend import scratch_poisoned


@triton.jit
def load_tile(Ptr, offs_r, offs_d, stride_r, stride_d, n_r, dim, UPCAST: tl.constexpr):
    """Rows ``offs_r`` of a (n_r, dim) matrix as (rows, BLOCK_D), zero past its edges; upcast to
    float32 under the interpreter (its 16-bit dots are wrong). Row offsets in int64: an item table
    may hold more than 2**31 elements."""
    tile = tl.load(Ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_d[None, :] * stride_d,
                   mask=(offs_r < n_r)[:, None] & (offs_d < dim)[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def dot_operand(x, dtype, UPCAST: tl.constexpr):
    """``x`` rounded to ``dtype`` for a tl.dot (as the GPU's tensor cores take it), then upcast to
    float32 under the interpreter (its 16-bit dots are wrong)."""
    x = x.to(dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


def block_d(dim: int) -> int:
    """The tile width holding a whole row of ``dim`` features: a power of two >= 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(dim))


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 dots for float32 inputs (no TF32); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def scratch(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if scratch_poisoned():
        t.fill_(float("nan"))
    return t
