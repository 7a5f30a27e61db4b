"""More than one process: torch.distributed helpers for sharded serving and DDP training.

Everything here works unchanged in one process (no process group: world 1, rank 0), so callers need
no separate code path for "distributed mode".

* :func:`shard_range` -- the contiguous slice of ``n`` rows one rank owns (sizes differ by <= 1).
* :func:`sharded_topk` -- the exact global top-k of an item table whose rows are split across ranks:
  each rank takes ``fused_topk`` of its own rows, the (B, k) candidates are all-gathered and merged.
* :class:`ItemShard` -- one rank's rows of an item table, with the two operations an engine needs
  on it: embedding lookup (all-reduced) and top-k scoring (:func:`sharded_topk`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rearec_kernels.topk import fused_topk

__all__ = ["world_size", "rank", "shard_range", "sharded_topk", "merge_topk", "ItemShard"]


def world_size(group=None) -> int:
    """Processes in ``group`` (the default group when None); 1 without a process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group``; 0 without a process group."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank's contiguous share of ``n`` rows; shares differ by at most one row."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes; rank must be in 0..world-1")
    return n * rank // world, n * (rank + 1) // world


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best of candidate lists: ``values``/``indices`` (B, C) -> (B, k), best first.

    Order: score descending, then index ascending; empty slots (index -1) after every real item,
    even one scoring -inf (the ``fused_topk`` contract). Exact: two stable sorts, no tolerance.
    """
    empty = indices < 0
    key = torch.where(empty, torch.full_like(indices, torch.iinfo(torch.int64).max), indices)
    order = torch.sort(key, dim=1, stable=True).indices
    # +0.0 turns -0.0 into +0.0, so that the two zeros tie and fall back to the index order.
    by_value = torch.sort(values.gather(1, order) + 0.0, dim=1, descending=True, stable=True).indices
    order = order.gather(1, by_value)[:, :k]
    values, indices = values.gather(1, order), indices.gather(1, order)
    if order.shape[1] < k:  # fewer candidates than k: pad with empty slots
        pad = k - order.shape[1]
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], dim=1)
        indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), -1)], dim=1)
    return values, indices


def _local_exclusions(exclude: Optional[torch.Tensor], item_offset: int, n_local: int):
    """Global item ids -> this shard's ids; ids of other shards (and empty slots) become -1."""
    if exclude is None:
        return None
    local = exclude.to(torch.int64) - item_offset
    return torch.where((exclude >= 0) & (local >= 0) & (local < n_local), local, torch.full_like(local, -1))


def sharded_topk(
    queries: torch.Tensor,
    local_items: torch.Tensor,
    k: int,
    item_offset: int,
    group=None,
    exclude: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
    backend=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over an item table split by rows across the ranks of ``group``.

    Every rank calls it with the same ``queries`` (B, d) and ``exclude`` (B, M) global item ids
    (negative = empty slot), and its own rows ``local_items`` (N_r, d), whose first row is global
    item ``item_offset``; rank shards must not overlap. Returns the global ``(values, indices)``
    (B, k) on every rank: the same result as ``fused_topk`` over the whole table (ties to the lower
    global index; -1 / -inf where fewer than k items remain). Without a process group it is
    ``fused_topk`` with the indices shifted by ``item_offset``.

    Cost: one local ``fused_topk`` of ``min(k, N_r)`` plus an all-gather of (world, B, k) values and
    indices and a merge of world·k candidates per row.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(item_offset, bool) or not isinstance(item_offset, int) or item_offset < 0:
        raise ValueError(f"item_offset must be a non-negative integer (this shard's first global item id), "
                         f"got {item_offset!r}")
    if not isinstance(local_items, torch.Tensor) or local_items.dim() != 2:
        raise ValueError("local_items must be this rank's (N_r, d) rows of the item table")
    n_local = local_items.shape[0]
    local_exclude = _local_exclusions(exclude, item_offset, n_local)
    values, indices = fused_topk(queries, local_items, min(k, max(n_local, 1)), scale=scale,
                                 exclude=local_exclude, backend=backend)
    indices = torch.where(indices >= 0, indices + item_offset, indices)
    values, indices = merge_topk(values, indices, k)  # pads a small shard's list to k
    world = world_size(group)
    if world == 1:
        return values, indices
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_indices, indices.contiguous(), group=group)
    return merge_topk(torch.cat(all_values, dim=1), torch.cat(all_indices, dim=1), k)


@dataclass
class ItemShard:
    """This rank's rows ``[offset, offset + len(local))`` of an item table of ``n_items`` rows.

    Every rank must call :meth:`embed` and :meth:`topk` together, with the same inputs.
    """

    local: torch.Tensor  # (N_r, d)
    offset: int
    n_items: int
    group: object = None

    @classmethod
    def of(cls, table: torch.Tensor, group=None) -> "ItemShard":
        """Keep this rank's :func:`shard_range` of ``table`` (a copy; the full table can be freed)."""
        start, stop = shard_range(table.shape[0], rank(group), world_size(group))
        return cls(table[start:stop].clone(), start, table.shape[0], group)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``F.embedding(ids, full_table)``: each rank fills the rows it owns, zeros elsewhere, and a
        sum all-reduce completes them (exact: every element is one row's value plus zeros)."""
        local = ids - self.offset
        owned = (local >= 0) & (local < self.local.shape[0])
        out = F.embedding(torch.where(owned, local, torch.zeros_like(local)), self.local)
        out = torch.where(owned.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        if world_size(self.group) > 1:
            dist.all_reduce(out, group=self.group)
        return out

    def topk(self, queries, k: int, *, scale: float = 1.0, exclude=None, backend=None):
        """:func:`sharded_topk` over this shard: global ``(values, indices)`` on every rank."""
        return sharded_topk(queries, self.local, k, self.offset, self.group, exclude, scale=scale, backend=backend)
