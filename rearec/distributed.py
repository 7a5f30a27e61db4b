"""More than one process: torch.distributed helpers for sharded serving and DDP training.

Everything here works unchanged in one process (no process group: world 1, rank 0), so callers need
no separate code path for "distributed mode".

* :func:`shard_range` -- the contiguous slice of ``n`` rows one rank owns (sizes differ by <= 1).
* :func:`sharded_topk` -- the exact global top-k of an item table whose rows are split across ranks:
  each rank takes ``fused_topk`` of its own rows, the (B, k) candidates are all-gathered and merged.
* :class:`ItemShard` -- one rank's rows of an item table, with the two operations an engine needs
  on it: embedding lookup (all-reduced) and top-k scoring (:func:`sharded_topk`).
* Training (DDP under torchrun): :func:`init_from_env` starts the process group from torchrun's
  environment, :func:`batch_shards` splits every global batch of one shuffled order across ranks,
  :func:`gather_rows` all-gathers a batch's rows with gradients (PRL's in-batch negatives),
  :func:`gather_cat` and :func:`sum_across` combine evaluation results and losses, and
  :func:`on_rank0` runs one rank's file work with the outcome shared by all, and
  :func:`check_same_everywhere` refuses a run whose ranks read different data or resume states.
"""
from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rearec.inputs import as_integer
from rearec_kernels.checks import check_float_tensor
from rearec_kernels.topk import check_exclude_ids, check_exclude_layout, fused_topk

__all__ = ["world_size", "rank", "shard_range", "sharded_topk", "merge_topk", "ItemShard",
           "init_from_env", "shutdown", "RankFailure", "is_collective_failure", "guarded", "barrier",
           "batch_shards", "gather_rows", "gather_cat", "sum_across", "on_rank0", "check_same_everywhere"]

#: How long a rank waits in a collective for the others (a dead peer usually fails faster: its
#: sockets close).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class RankFailure(RuntimeError):
    """Another process of the run failed (or this one was told to stop): the run cannot go on."""


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

    Order (the ``fused_topk`` contract): score descending, then index ascending; NaN scores below
    every number, -inf included; empty slots (index -1) after every real item. Exact: three stable
    sorts, no tolerance.
    """
    empty = indices < 0
    key = torch.where(empty, torch.full_like(indices, torch.iinfo(torch.int64).max), indices)
    order = torch.sort(key, dim=1, stable=True).indices
    # +0.0 turns -0.0 into +0.0, so that the two zeros tie and fall back to the index order; NaN sorts
    # as -inf here and behind every number in the last sort.
    ordered = values.gather(1, order) + 0.0
    nan = torch.isnan(ordered)
    by_value = torch.sort(ordered.masked_fill(nan, float("-inf")), dim=1, descending=True, stable=True).indices
    order = order.gather(1, by_value)
    rank = torch.where(empty.gather(1, order), 2, nan.gather(1, by_value).long())  # numbers, NaN, empty
    order = order.gather(1, torch.sort(rank, dim=1, stable=True).indices)[:, :k]
    values, indices = values.gather(1, order), indices.gather(1, order)
    if order.shape[1] < k:  # fewer candidates than k: pad with empty slots
        pad = k - order.shape[1]
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], dim=1)
        indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), -1)], dim=1)
    return values, indices


OP = "sharded_topk"


def _local_exclusions(exclude: Optional[torch.Tensor], item_offset: int, n_local: int):
    """Global item ids -> this shard's ids; ids of other shards (and empty slots) become -1."""
    if exclude is None:
        return None
    local = exclude.to(torch.int64) - item_offset
    return torch.where((exclude >= 0) & (local >= 0) & (local < n_local), local, torch.full_like(local, -1))


def _local_topk(queries, local_items, k, item_offset, exclude, scale, backend, n_items):
    """This rank's part of :func:`sharded_topk`: its (B, k) best rows, as global ids (int64)."""
    if not isinstance(local_items, torch.Tensor) or local_items.dim() != 2:
        raise ValueError("local_items must be this rank's (N_r, d) rows of the item table")
    if exclude is not None:  # ids of other shards are dropped below: a bad one would vanish unnoticed
        check_float_tensor(OP, "queries", queries, 2, "(B, d)")
        check_exclude_layout(OP, exclude, queries)
        if exclude.numel() > 0:
            check_exclude_ids(OP, exclude, torch.iinfo(torch.int64).max if n_items is None else n_items)
    n_local = local_items.shape[0]
    local_exclude = _local_exclusions(exclude, item_offset, n_local)
    values, indices = fused_topk(queries, local_items, min(k, max(n_local, 1)), scale=scale,
                                 exclude=local_exclude, backend=backend)
    indices = torch.where(indices >= 0, indices + item_offset, indices).to(torch.int64)
    return merge_topk(values, indices, k)  # pads a small shard's list to k


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
    n_items: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over an item table split by rows across the ranks of ``group``.

    Every rank calls it with the same ``queries`` (B, d) and ``exclude`` (B, M) global item ids
    (-1 = empty slot; below -1, or at least ``n_items`` when given, a ValueError as in ``fused_topk``),
    and its own rows ``local_items`` (N_r, d), whose first row is global item ``item_offset``; rank
    shards must not overlap. Returns the global ``(values, indices)``
    (B, k) on every rank: the same result as ``fused_topk`` over the whole table (ties to the lower
    global index; -1 / -inf where fewer than k items remain). Without a process group it is
    ``fused_topk`` with the indices shifted by ``item_offset``.

    Cost: one local ``fused_topk`` of ``min(k, N_r)`` plus an all-gather of (world, B, k) values and
    indices and a merge of world·k candidates per row.
    """
    given_k, given_offset = k, item_offset
    k, item_offset = as_integer(k), as_integer(item_offset)  # numpy and torch integers too, never a bool
    if k is None or k < 1:
        raise ValueError(f"k must be a positive integer, got {given_k!r}")
    if item_offset is None or item_offset < 0:
        raise ValueError(f"item_offset must be a non-negative integer (this shard's first global item id), "
                         f"got {given_offset!r}")
    world = world_size(group)
    if world > 1:  # the same queries fail alike on every rank; a failure's sentinel needs their B
        check_float_tensor(OP, "queries", queries, 2, "(B, d)")
    try:
        values, indices = _local_topk(queries, local_items, k, item_offset, exclude, scale, backend, n_items)
        failure = None
    except (ValueError, TypeError, IndexError, RuntimeError) as error:
        if world == 1:
            raise
        # One rank's own mistake (its rows, its device, its memory) must not leave the others waiting in the
        # all-gather: it sends indices of -2, which no rank ever returns, and every rank raises after it.
        failure, indices = error, torch.full((queries.shape[0], k), -2, dtype=torch.int64, device=queries.device)
    if world == 1:
        return values, indices
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(all_indices, indices.contiguous(), group=group)
    failed = [r for r, part in enumerate(all_indices) if part.numel() > 0 and bool((part == -2).all())]
    if failure is not None:
        raise failure
    if failed:
        raise ValueError(f"{OP}: rank(s) {', '.join(map(str, failed))} could not score their rows (their error says "
                         "why); no rank returns a result")
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_values, values.contiguous(), group=group)
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
        return cls(table[start:stop].detach().clone(), start, table.shape[0], group)  # no graph back to table

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``F.embedding(ids, full_table)``: each rank fills the rows it owns, zeros elsewhere, and a
        sum all-reduce completes them (exact: every element is one row's value plus zeros). An id outside
        [0, n_items) is an IndexError, as there (no rank owns it: it would come back a row of zeros)."""
        if ids.numel() > 0 and bool(((ids < 0) | (ids >= self.n_items)).any()):
            bad = ids[(ids < 0) | (ids >= self.n_items)][0]
            raise IndexError(f"item id {int(bad)} is outside the sharded table's [0, {self.n_items})")
        if self.local.shape[0] == 0:  # more ranks than items: this rank owns none, but joins the sum
            out = self.local.new_zeros(*ids.shape, self.local.shape[1])
        else:
            local = ids - self.offset
            owned = (local >= 0) & (local < self.local.shape[0])
            out = F.embedding(torch.where(owned, local, torch.zeros_like(local)), self.local)
            out = torch.where(owned.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        if world_size(self.group) > 1:
            dist.all_reduce(out, group=self.group)
        return out

    def topk(self, queries, k: int, *, scale: float = 1.0, exclude=None, backend=None):
        """:func:`sharded_topk` over this shard: global ``(values, indices)`` on every rank."""
        return sharded_topk(queries, self.local, k, self.offset, self.group, exclude, scale=scale, backend=backend,
                            n_items=self.n_items)


# ---------------------------------------------------------------------------------------------
# training with more than one process


def init_from_env(device: str = "cpu") -> str:
    """Start the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``); returns the device this rank uses.

    Without ``WORLD_SIZE`` > 1, or with a group already started, nothing happens. gloo on the CPU,
    nccl on CUDA (each rank on ``cuda:LOCAL_RANK``). SIGTERM (torchrun stopping the survivors of a
    failed rank, or a scheduler stopping the job) becomes :class:`RankFailure`, so that no temporary
    checkpoint file is left behind (``rearec train`` exits with 3 then, not 143).
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; unset it or "
                         "launch with torchrun") from None
    if world <= 1 or dist.is_initialized():
        return device
    cuda = str(device).startswith("cuda")
    # On CUDA, LOCAL_RANK picks the GPU: a launcher that sets no LOCAL_RANK would put every rank on cuda:0
    needed = ("RANK", "MASTER_ADDR", "MASTER_PORT") + (("LOCAL_RANK",) if cuda else ())
    missing = [v for v in needed if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} unset; launch with torchrun "
                         "(torchrun --nproc_per_node N -m rearec train ...)")
    if cuda:
        try:
            local = int(os.environ["LOCAL_RANK"])
        except ValueError:
            raise ValueError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not a number; launch with torchrun") from None
        gpus = torch.cuda.device_count()
        if local >= gpus:  # torch.cuda.set_device's own error is a traceback on every rank
            raise ValueError(f"LOCAL_RANK={local} but this machine has {gpus} GPU(s): start at most {gpus} "
                             f"process(es) per machine (torchrun --nproc_per_node {max(gpus, 1)}), or train with "
                             "--device cpu")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)

    def stop(signum, frame):
        raise RankFailure(f"rank {rank()}: stopped by signal {signum} (from torchrun, which stops every rank when one "
                          "fails, or from a scheduler)")

    signal.signal(signal.SIGTERM, stop)
    return device


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed (a peer died or hung), not a bug of this rank.
    gloo raises plain RuntimeErrors, so its message is what tells."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        mark in text for mark in ("gloo", "NCCL", "c10d", "Connection reset", "Connection closed"))


def shutdown() -> None:
    """Leave the process group (after the last collective of a run), and stop taking SIGTERM for a
    peer's failure: the run has said how it ended, and torchrun's SIGTERM to a rank that is already
    finishing must not print a traceback over that message."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def guarded(collective: Callable, *args, what: str = "another process of this run failed", **options):
    """``collective(*args, **options)``; when it fails because a peer died (:func:`is_collective_failure`), a
    one-line :class:`RankFailure` instead of gloo's or NCCL's error."""
    try:
        return collective(*args, **options)
    except RuntimeError as error:
        if world_size() == 1 or not is_collective_failure(error):
            raise
        cause = " ".join(str(error).split())[:160]
        raise RankFailure(f"rank {rank()}: {what} ({cause})") from None


def barrier() -> None:
    """Wait for every rank (a dead rank: :class:`RankFailure`)."""
    if world_size() > 1:
        guarded(dist.barrier)


def batch_shards(n: int, batch_size: int, generator: torch.Generator, rank: int,
                 world: int) -> Iterator[Tuple[torch.Tensor, int]]:
    """One epoch of ``(this rank's sample positions, global batch size)``.

    Every rank draws the same permutation of ``n`` samples from ``generator`` (seeded alike), cuts
    it into global batches of ``batch_size`` (the last may be smaller) and takes its
    :func:`shard_range` of each: the ranks' shards are disjoint and together are exactly the batch a
    single process trains on. A final batch smaller than ``world`` is skipped (some rank would get
    no sample).
    """
    if batch_size < world:
        raise ValueError(f"--batch-size {batch_size} is smaller than the {world} processes: every process needs "
                         f"a sample of each batch; use --batch-size {world} or more (it is the global batch)")
    if 0 < n < world:  # every batch would be skipped: an epoch of no step, its loss reported as 0
        raise ValueError(f"the training set has {n} sample(s), fewer than the {world} processes: every process "
                         f"needs a sample of each batch; train with at most {n} processes")
    order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < world:
            return
        lo, hi = shard_range(len(batch), rank, world)
        yield batch[lo:hi], len(batch)


def gather_rows(x: torch.Tensor, group=None) -> Tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` (n_r, ...) concatenated in rank order, WITH gradients flowing back to
    the rank that owns each row; and the position of this rank's first row.

    The distributed form of an in-batch contrastive loss: every rank scores its own rows against the
    whole global batch, and the gradient of a row used by another rank as a negative comes back here
    (``torch.distributed.nn.functional.all_gather``). Shards may differ in size. One process: ``x``.
    """
    world = world_size(group)
    if world == 1:
        return x, 0
    sizes = torch.tensor([x.shape[0]], dtype=torch.int64, device=_collective_device())
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    sizes = [int(s) for s in all_sizes]
    most = max(sizes)
    padded = F.pad(x, (0,) * (2 * (x.dim() - 1)) + (0, most - x.shape[0]))
    parts = _AllGatherWithGrad.apply(padded, group).split(most)
    rows = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    return rows, sum(sizes[:rank(group)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: every rank's (n, ...) tensor stacked in rank order, (world·n, ...). Backward: each
    rank's loss has a gradient for every rank's rows; the sum over ranks of the gradients of this
    rank's rows is this rank's gradient (so the ranks' losses add up as one loss would)."""

    @staticmethod
    def forward(ctx, x, group):
        parts = [torch.empty_like(x) for _ in range(world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rows = group, slice(rank(group) * x.shape[0], (rank(group) + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rows], None


def gather_cat(x: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' 1-D ``x`` (lengths may differ) concatenated in rank order, on every rank (no grad)."""
    world = world_size(group)
    if world == 1:
        return x
    dev = _collective_device()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=dev)
    padded[:x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def sum_across(values: List[float], group=None) -> List[float]:
    """Element-wise sum of a few numbers over all ranks (float64), the same list on every rank."""
    if world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, group=group)
    return t.tolist()


def on_rank0(action: Callable[[], None], what: str) -> None:
    """``action()`` on rank 0 only (files: one writer); every rank raises when it failed there, so
    that no rank goes on alone. ``what`` completes "rank 0 could not ..." for the other ranks."""
    error = None
    if rank() == 0:
        try:
            action()
        except Exception as e:  # re-raised below, after the other ranks know
            error = e
    if world_size() > 1:
        failed = guarded(sum_across, [0.0 if error is None else 1.0],
                         what=f"another process of this run failed while rank 0 was to {what}")[0] > 0
        if failed and error is None:
            raise RankFailure(f"rank {rank()}: rank 0 could not {what} (its message says why)")
    if error is not None:
        raise error


def check_same_everywhere(value: str, what: str, fix: str) -> None:
    """Raise on every rank (one line) unless every rank passes the same ``value`` (a short text, e.g.
    a fingerprint; compared by a 60-bit digest). ``what`` names it, ``fix`` says what to do. Ranks that
    read different logs, or resume from different states, would otherwise train on silently with a
    wrong gradient average, or wait in mismatched collectives until the timeout."""
    world = world_size()
    if world == 1:
        return
    digest = torch.tensor([int(hashlib.sha256(value.encode()).hexdigest()[:15], 16)], dtype=torch.int64,
                          device=_collective_device())
    parts = [torch.empty_like(digest) for _ in range(world)]
    guarded(dist.all_gather, parts, digest, what=f"another process of this run failed while the ranks compared {what}")
    differ = [r for r, part in enumerate(parts) if int(part) != int(parts[0])]
    if differ:
        ranks = ", ".join(map(str, differ))
        raise RankFailure(f"rank {rank()}: {what} differs between the processes (rank(s) {ranks} against rank 0): {fix}")
