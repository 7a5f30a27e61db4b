"""Differentiable causal prefill attention, and drop-in ``nn.Module``s for training a SASRec-style model.

``prefill_attention_autograd(q, k, v, lengths, *, sm_scale=None, backend=None) -> out``

* the contract of :func:`rearec_kernels.attention.prefill_attention` without a cache: q, k, v
  (B, L, H, Dh), one float dtype and device (strided views of one fused QKV projection are fine, see
  :func:`rearec_kernels.attention.split_qkv`); ``lengths`` (B,) integer, 1 <= lengths[b] <= L, each
  row right-padded; valid token t attends to valid tokens 0..t; padding rows are 0;
* differentiable with respect to q, k and v; padding rows pass no gradient;
* ``backend``: "auto" (Triton on CUDA, SDPA on CPU), "triton" (a forward kernel that keeps the
  log-sum-exp and FlashAttention-2 style backward kernels: ``attention_autograd_triton``), "cpu"
  (PyTorch's fused ``scaled_dot_product_attention`` and its autograd: ``attention_autograd_cpu``;
  it assumes finite padding tokens) or "reference" (``attention_autograd_reference``).

``dropout_p``: attention dropout on the softmax weights (kept ones scaled by 1 / (1 - p)), as
``F.scaled_dot_product_attention(dropout_p=)``. The Triton kernels draw the mask with Philox from a
seed taken from torch's CPU generator, the CPU path with SDPA's own generator: both follow
``torch.manual_seed``, but the masks differ between backends.

``CausalAttention(sm_scale=None, dropout=0.0, backend=None)``: the op as a module,
``forward(q, k, v, lengths)``; dropout only in training mode.
``CausalSelfAttention(hidden_size, n_heads, bias=True, dropout=0.0, backend=None)``: fused QKV
projection, causal attention over right-padded histories, output projection;
``forward(x (B, L, d), lengths)``.
"""
from __future__ import annotations

import math

from torch import nn

from rearec_kernels.backend import Backend, implementation, resolve, values_checkable
from rearec_kernels.checks import check_lengths, check_qkv, check_range, check_real, check_triton_attention

OP = "prefill_attention_autograd"


def prefill_attention_autograd(q, k, v, lengths, *, sm_scale=None, dropout_p=0.0, backend=None):
    check_qkv(OP, q, k, v, 4, "(B, L, H, Dh)")
    L = q.shape[1]
    check_lengths(OP, lengths, q.shape[0], q.device)
    if sm_scale is not None:
        sm_scale = check_real(OP, "sm_scale", sm_scale)
    try:
        dropout_p = float(dropout_p)
    except (TypeError, ValueError):
        dropout_p = float("nan")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    choice = resolve(OP, backend, q.device)
    if choice is Backend.TRITON:
        check_triton_attention(OP, q.dtype, q.shape[-1])
    if values_checkable(choice, lengths.device):  # (not on a GPU under Triton: a host sync)
        check_range(OP, "lengths", lengths, 1, L, "1 <= lengths[b] <= L")
    if choice is Backend.TRITON:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        lengths = lengths.contiguous()
    # rearec_kernels.attention_autograd_<backend>: one ``prefill_attention(q, k, v, lengths, sm_scale,
    # dropout_p)`` each.
    impl = implementation("attention_autograd", choice)
    out = impl.prefill_attention(q, k, v, lengths, scale, dropout_p)
    return out.to(q.dtype)  # CPU autocast: bfloat16 products, q's dtype back (itself when it is q's already)


class CausalAttention(nn.Module):
    """:func:`prefill_attention_autograd` as a module: ``forward(q, k, v, lengths)``, (B, L, H, Dh) each."""

    def __init__(self, sm_scale=None, dropout: float = 0.0, backend=None):
        super().__init__()
        self.sm_scale = sm_scale
        self.dropout = dropout
        self.backend = backend

    def forward(self, q, k, v, lengths):
        return prefill_attention_autograd(q, k, v, lengths, sm_scale=self.sm_scale, backend=self.backend,
                                          dropout_p=self.dropout if self.training else 0.0)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over right-padded histories, a SASRec block's attention.

    ``forward(x, lengths)``: x (B, L, hidden_size), lengths (B,) -> (B, L, hidden_size); padding rows
    hold the output projection's bias only (their attention output is 0)."""

    def __init__(self, hidden_size: int, n_heads: int, *, bias: bool = True, sm_scale=None, dropout: float = 0.0,
                 backend=None):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"CausalSelfAttention: hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.attention = CausalAttention(sm_scale, dropout, backend)

    def forward(self, x, lengths):
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).unbind(2)
        return self.out(self.attention(q, k, v, lengths).reshape(B, L, d))
