"""Readable PyTorch ground truth for fused top-K scoring: one matmul, a mask, a lexicographic sort.

Contract (shared by every backend, checked by :mod:`rearec_kernels.topk`):

* ``scores[b, n] = scale * (queries[b] . item_table[n])``, computed in float64 when either input is
  float64, otherwise in float32 (float16/bfloat16 inputs are upcast first). One exception: the Triton
  backend rounds float32 queries to a 16-bit table's dtype before its tensor-core dots (the products
  are exact, the queries are not), so there a 16-bit table scores the rounded queries. And the CPU
  backend folds a power-of-two scale into the queries (exact while the products and sums stay normal
  float32 numbers), so only a score whose unscaled dot product overflows float32 or falls below its
  smallest normal number (|q . e| > 3.4e38 or < 1.2e-38) can differ from this file's;
* row ``b`` returns the ``k`` best items, best first, ordered by (score descending, item index
  ascending): of two equal scores the LOWER item index wins (+0.0 and -0.0 are equal);
* NaN is the lowest score: below every number, -inf included, NaN items again by ascending index,
  and their values are returned as NaN. So one NaN item (a NaN row of the table, say) never hides
  another, and a NaN query returns its lowest allowed ids with NaN values rather than nothing;
* ids in ``exclude[b]`` (a padded (B, M) integer tensor of ids in [0, N); -1 marks an empty slot)
  never appear; when fewer than ``k`` items remain (k > N, or exclusions), the tail of the row is
  index -1 with value -inf.

Every backend module defines ``fused_topk(queries, item_table, k, *, scale=1.0, exclude=None)``
with this contract; :func:`rearec_kernels.topk.fused_topk` checks the inputs and picks one.
This file materialises the (B, N) score matrix: it is for tests (and ``ReaRec.recommend``'s plain
PyTorch path, which ranks its scores with :func:`top_k_of_scores`), not for serving.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def compute_dtype(queries: torch.Tensor, item_table: torch.Tensor) -> torch.dtype:
    """float64 when either input is float64, else float32 (float32 accumulation for 16-bit inputs)."""
    return torch.float64 if torch.float64 in (queries.dtype, item_table.dtype) else torch.float32


def fused_topk(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    scale: float = 1.0,
    exclude: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(queries, item_table)
    B, N = queries.shape[0], item_table.shape[0]
    device = queries.device
    scores = (queries.to(dtype) @ item_table.to(dtype).t()) * scale  # (B, N)

    allowed = torch.ones(B, N, dtype=torch.bool, device=device)
    if exclude is not None and exclude.numel() > 0:
        ex = exclude.to(device=device, dtype=torch.int64)
        ok = (ex >= 0) & (ex < N)  # the dispatcher rejects ids >= N, except where it cannot read them
        rows = torch.arange(B, device=device)[:, None].expand_as(ex)
        allowed[rows[ok], ex[ok]] = False

    return top_k_of_scores(scores, k, allowed)


def top_k_of_scores(scores: torch.Tensor, k: int, allowed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The contract's ranking of a (B, N) score matrix: ``(values, indices)``, each (B, k), of the ``k``
    best allowed items (``allowed`` (B, N) bool), ties to the lower index, NaN lowest, a tail of -1 / -inf."""
    B, N = scores.shape
    # Lexicographic order by stable sorts, least significant key first. The candidates start in
    # item-index order, so equal scores keep ascending indices; then NaN scores go after every number
    # (sorted as -inf first: among themselves they stay in index order); then allowed items go before
    # excluded ones whatever their scores (an allowed item scoring -inf or NaN beats an excluded one).
    nan = scores.isnan()
    order = torch.sort(scores.masked_fill(nan, float("-inf")), dim=1, descending=True, stable=True).indices
    for last_if_true in (nan, ~allowed):
        after = last_if_true.gather(1, order).to(torch.int8)
        order = order.gather(1, torch.sort(after, dim=1, stable=True).indices)

    take = min(k, N)
    idx = order[:, :take]
    vals = scores.gather(1, idx)
    ok = allowed.gather(1, idx)
    vals = torch.where(ok, vals, torch.full_like(vals, float("-inf")))
    idx = torch.where(ok, idx, torch.full_like(idx, -1))
    if take < k:
        vals = torch.cat([vals, vals.new_full((B, k - take), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((B, k - take), -1)], dim=1)
    return vals, idx
