"""Right-hand sides packed once for oneDNN's bf16 GEMM on CPU: ``x @ W^T`` for a fixed ``W``.

``torch.mm`` / ``F.linear`` with a bfloat16 operand on CPU hand it to oneDNN, which first reorders
("packs") ``W`` into its blocked layout, on every call. For a fixed ``W`` scored often (the top-K's
item table, :class:`rearec_kernels.topk_cpu.PackedTable`) that work can be done once. Measured on a
2-core AVX512-BF16 CPU: the (50,000 x 256) table against 16 queries 2.5 -> 1.3 ms, against one or
two 1.5-1.8 -> 0.45-0.55 ms. (An engine's bf16 weights gain too in isolation, a (768 x 256) weight
against 256 rows 0.34 -> 0.24 ms, but a whole bf16 ``recommend`` at B=256 did not measure faster:
the packed product cannot write into a reused output, and fresh prefill outputs cost page faults.)

The packed product is the same computation: bf16 inputs, float32 accumulation, the output rounded
to bf16, bit for bit equal to ``torch.mm`` / ``F.linear`` on this CPU (tested). The ops are the ones
PyTorch's own CPU compiler uses for frozen linear layers (``torch.ops.mkldnn._reorder_linear_weight``
and ``_linear_pointwise``); :func:`available` checks that they exist and agree with ``torch.mm`` on a
small product, and every caller keeps the plain path for when they do not. Only bfloat16 is packed:
float32 GEMMs run in MKL, where oneDNN's packed float32 product would round differently.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["available", "native_bf16", "pack", "product"]


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU runs bf16 dot products natively (AVX512-BF16 or AMX) through oneDNN."""
    try:
        return torch.backends.mkldnn.is_available() and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether bf16 right-hand sides can be packed here: a CPU with native bf16 dot products, the
    oneDNN ops present, and their product equal to ``torch.mm``'s on a small case."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not native_bf16() or ops is None or not all(
            hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        rows = torch.randn(64, 40, generator=g).to(torch.bfloat16)
        x = torch.randn(3, 40, generator=g).to(torch.bfloat16)
        return torch.equal(product(x, pack(rows)), torch.mm(x, rows.t()))
    except (RuntimeError, NotImplementedError):
        return False


def pack(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (n, d) bfloat16, contiguous, on CPU -> an opaque packed tensor for :func:`product`."""
    return torch.ops.mkldnn._reorder_linear_weight(rows, None)


def product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x`` (m, d) bfloat16 -> ``x @ rows^T`` (m, n) bfloat16, fresh."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
