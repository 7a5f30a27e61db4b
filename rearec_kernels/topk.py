"""Fused top-K scoring: the k best items of a whole item table per query, never the (B, N) scores.

``fused_topk(queries, item_table, k, *, scale=1.0, exclude=None, backend=None) -> (values, indices)``

* ``queries`` (B, d) and ``item_table`` (N, d): float32, float16, bfloat16 or float64, same device;
* ``values[b, j] = scale * (queries[b] . item_table[indices[b, j]])``, float32 (float64 when an input
  is float64; CPU and reference backends only), best first; of equal scores the LOWER index wins;
* ``exclude``: None, or a (B, M) integer tensor of item ids never to return for row b (a user's
  history, a padding item); -1 (any negative) marks an empty slot, ids >= N are ignored;
* when fewer than ``k`` items remain (k > N, or exclusions), the row ends in index -1, value -inf;
* ``backend``: "auto" (Triton on CUDA, the blocked CPU path on CPU), "triton", "cpu" or
  "reference"; ``REAREC_KERNEL_BACKEND`` sets the default (see :mod:`rearec_kernels.backend`).

A row with a NaN score (NaN/inf inputs) has an unspecified result. Accumulation is float32 for
16-bit inputs; the Triton backend rounds the queries to a 16-bit table's dtype (tensor-core dot),
the CPU backend does not.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from rearec_kernels.backend import Backend, resolve
from rearec_kernels.topk_reference import compute_dtype

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(queries, item_table, k, exclude) -> int:
    for name, t in (("queries", queries), ("item_table", item_table)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if queries.shape[1] != item_table.shape[1]:
        raise ValueError(f"queries are (B, d) = {tuple(queries.shape)} but item_table is (N, d) = "
                         f"{tuple(item_table.shape)}: d differs")
    if queries.shape[1] == 0:
        raise ValueError("d must be at least 1")
    if queries.device != item_table.device:
        raise ValueError(f"queries on {queries.device} but item_table on {item_table.device}")
    if isinstance(k, bool):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be a positive integer, got {k!r}") from None
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor):
            raise ValueError(f"exclude must be None or a (B, M) integer tensor, got {type(exclude).__name__}")
        if exclude.dtype.is_floating_point or exclude.dtype.is_complex or exclude.dtype == torch.bool:
            raise ValueError(f"exclude must hold integer item ids, got {exclude.dtype}")
        if exclude.dim() != 2 or exclude.shape[0] != queries.shape[0]:
            raise ValueError(f"exclude must be (B, M) = ({queries.shape[0]}, M), got {tuple(exclude.shape)}")
        if exclude.device != queries.device:
            raise ValueError(f"exclude on {exclude.device} but queries on {queries.device}")
    return k


def fused_topk(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    scale: float = 1.0,
    exclude: Optional[torch.Tensor] = None,
    backend: "Backend | str | None" = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    k = _check(queries, item_table, k, exclude)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a real number, got {scale!r}") from None
    choice = resolve(backend, queries.device)

    B, N = queries.shape[0], item_table.shape[0]
    out_dtype = compute_dtype(queries, item_table)
    if B == 0 or N == 0:
        return (torch.full((B, k), float("-inf"), dtype=out_dtype, device=queries.device),
                torch.full((B, k), -1, dtype=torch.int64, device=queries.device))
    queries = queries.contiguous()
    item_table = item_table.contiguous()
    if exclude is not None:
        exclude = exclude.to(torch.int64).contiguous()

    if choice is Backend.REFERENCE:
        from rearec_kernels.topk_reference import fused_topk_reference
        return fused_topk_reference(queries, item_table, k, scale, exclude)
    if choice is Backend.TRITON:
        from rearec_kernels import topk_triton
        if torch.float64 in (queries.dtype, item_table.dtype):
            raise ValueError("the triton backend takes float32/float16/bfloat16 inputs, not float64: "
                             "pass backend='cpu' or 'reference'")
        return topk_triton.fused_topk(queries, item_table, k, scale=scale, exclude=exclude)
    if queries.device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {queries.device}")
    from rearec_kernels.topk_cpu import fused_topk_cpu
    return fused_topk_cpu(queries, item_table, k, scale, exclude)
