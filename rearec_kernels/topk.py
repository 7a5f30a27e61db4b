"""Fused top-K scoring: the k best items of a whole item table per query, never the (B, N) scores.

``fused_topk(queries, item_table, k, *, scale=1.0, exclude=None, backend=None) -> (values, indices)``

* ``queries`` (B, d) and ``item_table`` (N, d): float32, float16, bfloat16 or float64, same device;
* ``values[b, j] = scale * (queries[b] . item_table[indices[b, j]])``, float32 (float64 when an input
  is float64; CPU and reference backends only), best first; of equal scores the LOWER index wins;
* NaN scores rank below every number, -inf included (ties again to the lower index), and come back
  as NaN: a NaN item appears only when fewer than ``k`` items with a real score remain, and a NaN
  query returns the lowest allowed ids with NaN values;
* ``exclude``: None, or a (B, M) integer tensor of item ids in [0, N) never to return for row b (a
  user's history, a padding item); -1 marks an empty slot, any other id is a ValueError;
* when fewer than ``k`` items remain (k > N, or exclusions), the row ends in index -1, value -inf;
* ``backend``: see :mod:`rearec_kernels.backend` (auto: Triton for CUDA tensors, the blocked CPU
  path for CPU tensors); ``REAREC_KERNEL_BACKEND`` sets the default.

The full contract, with the reference that implements it plainly, is in
:mod:`rearec_kernels.topk_reference`. Accumulation is float32 for 16-bit inputs; the Triton backend
rounds the queries to a 16-bit table's dtype (tensor-core dot), the CPU backend does not.

Range checks on ``exclude`` read its values, so the Triton backend on CUDA skips them (they would
cost a host sync); ids outside [0, N) are then simply ignored.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from rearec_kernels.backend import Backend, implementation, resolve, values_checkable
from rearec_kernels.checks import check_float_tensor
from rearec_kernels.topk_reference import compute_dtype

# What the Triton backend takes: 16/32-bit floats (tensor cores; no float64 dot), and item ids that
# fit the kernels' int32 column offsets.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_ITEMS = 2 ** 31 - 1


def _check(op, queries, item_table, k, exclude) -> int:
    for name, t in (("queries", queries), ("item_table", item_table)):
        check_float_tensor(op, name, t, 2, "2-D")
    if queries.shape[1] != item_table.shape[1]:
        raise ValueError(f"{op}: queries are (B, d) = {tuple(queries.shape)} but item_table is (N, d) = "
                         f"{tuple(item_table.shape)}: d differs")
    if queries.shape[1] == 0:
        raise ValueError(f"{op}: d must be at least 1")
    if queries.device != item_table.device:
        raise ValueError(f"{op}: queries on {queries.device} but item_table on {item_table.device}")
    if isinstance(k, bool):
        raise ValueError(f"{op}: k must be a positive integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"{op}: k must be a positive integer, got {k!r}") from None
    if k < 1:
        raise ValueError(f"{op}: k must be >= 1, got {k}")
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor):
            raise ValueError(f"{op}: exclude must be None or a (B, M) integer tensor, got {type(exclude).__name__}")
        if exclude.dtype.is_floating_point or exclude.dtype.is_complex or exclude.dtype == torch.bool:
            raise ValueError(f"{op}: exclude must hold integer item ids, got {exclude.dtype}")
        if exclude.dim() != 2 or exclude.shape[0] != queries.shape[0]:
            raise ValueError(f"{op}: exclude must be (B, M) = ({queries.shape[0]}, M), got {tuple(exclude.shape)}")
        if exclude.device != queries.device:
            raise ValueError(f"{op}: exclude on {exclude.device} but queries on {queries.device}")
    return k


def _check_exclude_ids(op, exclude: torch.Tensor, n_items: int) -> None:
    bad = (exclude < -1) | (exclude >= n_items)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: exclude[{row}, {col}] = {int(exclude[row, col])} is not an item id in "
                         f"[0, {n_items}); mark an empty slot with -1")


def _check_triton(op, queries, item_table) -> None:
    for name, t in (("queries", queries), ("item_table", item_table)):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"{op}: the Triton backend takes float32/float16/bfloat16 {name}, got {t.dtype}: "
                             "pass backend='reference' (or 'cpu' for CPU tensors) for float64")
    if item_table.shape[0] > TRITON_MAX_ITEMS:
        raise ValueError(f"{op}: the Triton backend takes up to {TRITON_MAX_ITEMS} items, got "
                         f"{item_table.shape[0]}: split the table and merge the results")


def fused_topk(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    scale: float = 1.0,
    exclude: Optional[torch.Tensor] = None,
    backend: "Backend | str | None" = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items of ``item_table`` for each query: ``(values, indices)``, both (B, k).
    See the module docstring."""
    op = "fused_topk"
    k = _check(op, queries, item_table, k, exclude)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: scale must be a real number, got {scale!r}") from None
    chosen = resolve(op, backend, queries.device)
    if chosen is Backend.TRITON:
        _check_triton(op, queries, item_table)
    B, N = queries.shape[0], item_table.shape[0]
    if exclude is not None and exclude.numel() > 0 and values_checkable(chosen, queries.device):
        _check_exclude_ids(op, exclude, N)

    out_dtype = compute_dtype(queries, item_table)
    if B == 0 or N == 0:
        return (torch.full((B, k), float("-inf"), dtype=out_dtype, device=queries.device),
                torch.full((B, k), -1, dtype=torch.int64, device=queries.device))
    queries = queries.contiguous()
    item_table = item_table.contiguous()
    if exclude is not None:
        exclude = exclude.to(torch.int64).contiguous()
    return implementation("topk", chosen).fused_topk(queries, item_table, k, scale=scale, exclude=exclude)
