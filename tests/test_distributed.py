"""rearec.distributed with real gloo process groups on the CPU (2 and 3 processes, spawned).

Each spawned group runs a whole list of cases, drawn here from a fresh seed, so that process start-up
(a second or two) is paid once per group. Ranks never stop early on a wrong result: every rank runs
every collective, then raises if anything differed (a rank that stopped would leave the others
waiting in a collective).
"""
import os
import random
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rearec.distributed import ItemShard, merge_topk, shard_range, sharded_topk
from rearec_kernels.topk import fused_topk
from rearec_kernels.topk_reference import fused_topk_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# harness


def init_gloo(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def run_group(worker, world: int, tmp_path, *args) -> None:
    """Run ``worker(rank, world, init_file, *args)`` in ``world`` spawned processes; raise on failure."""
    init_file = str(tmp_path / f"gloo-init-{world}")
    mp.spawn(worker, args=(world, init_file, *args), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------------
# sharded top-k


def draw_topk_cases(seed: int, world: int):
    """Cases (queries, table, k, shard bounds, exclude). Small integer-valued embeddings make exact
    scores and many ties, so the tie rule across shard borders is tested on every case."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(24):
        n = rng.choice([world, 7, 31, 47, 123])
        d = rng.choice([1, 3, 5])
        b = rng.choice([1, 2, 9])
        if i % 3 == 0:  # uneven shards, some of them empty
            cuts = sorted(rng.randint(0, n) for _ in range(world - 1))
        else:
            cuts = [shard_range(n, r, world)[0] for r in range(1, world)]
        bounds = [0, *cuts, n]
        smallest = min(bounds[r + 1] - bounds[r] for r in range(world))
        k = rng.choice([1, 5, smallest + 1, n, n + 3])  # often larger than a shard
        k = max(k, 1)
        span = rng.choice([1, 2, 4])  # small values: many equal scores
        queries = torch.randint(-span, span + 1, (b, d), generator=g).float()
        table = torch.randint(-span, span + 1, (n, d), generator=g).float()
        exclude = None
        if i % 2 == 1:
            m = rng.choice([1, 4, n])
            exclude = torch.randint(-1, n + 2, (b, m), generator=g)  # empty slots and ids >= n too
        cases.append((queries, table, k, bounds, exclude))
    # Float64 scores with no ties: the values must match too.
    for n in (47, 123):
        bounds = [shard_range(n, r, world)[0] for r in range(world)] + [n]
        cases.append((torch.randn(3, 8, generator=g, dtype=torch.float64),
                      torch.randn(n, 8, generator=g, dtype=torch.float64), 10, bounds, None))
    return cases


def topk_worker(rank, world, init_file, seed):
    init_gloo(rank, world, init_file)
    failures = []
    for i, (queries, table, k, bounds, exclude) in enumerate(draw_topk_cases(seed, world)):
        start, stop = bounds[rank], bounds[rank + 1]
        values, indices = sharded_topk(queries, table[start:stop], k, start, exclude=exclude)
        whole = fused_topk(queries, table, k, exclude=exclude)
        reference = fused_topk_reference(queries, table, k, 1.0, exclude)
        for name, (ref_values, ref_indices) in (("fused_topk", whole), ("reference", reference)):
            if not torch.equal(indices, ref_indices) or not torch.allclose(values, ref_values, rtol=1e-12,
                                                                          atol=0):
                failures.append(f"case {i} (n={table.shape[0]}, k={k}, bounds={bounds}): differs from {name}")
    # Embedding lookups through an ItemShard equal F.embedding of the whole table.
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(31, 6, generator=g)
    table[3, 0] = float("inf")  # a non-finite row must not leak into the other rows
    ids = torch.randint(0, 31, (4, 9), generator=g)
    shard = ItemShard.of(table)
    if not torch.equal(shard.embed(ids), torch.nn.functional.embedding(ids, table)):
        failures.append("ItemShard.embed differs from F.embedding over the whole table")
    q = torch.randn(5, 6, generator=g)
    table[3, 0] = 0.0
    shard = ItemShard.of(table)
    if not torch.equal(shard.topk(q, 40)[1], fused_topk(q, table, 40)[1]):
        failures.append("ItemShard.topk differs from fused_topk over the whole table")
    dist.destroy_process_group()
    assert not failures, f"rank {rank}, seed {seed}: " + "; ".join(failures)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_topk_equals_whole_table(world, tmp_path):
    run_group(topk_worker, world, tmp_path, random.randrange(2**31))


def test_sharded_topk_without_a_group_is_the_shard_shifted():
    g = torch.Generator().manual_seed(1)
    q, table = torch.randn(4, 5, generator=g), torch.randn(47, 5, generator=g)
    values, indices = sharded_topk(q, table[10:30], 7, 10)
    ref_values, ref_indices = fused_topk(q, table[10:30], 7)
    assert torch.equal(indices, ref_indices + 10) and torch.equal(values, ref_values)


def test_merge_topk_orders_by_value_then_lower_index_and_pads():
    values = torch.tensor([[1.0, 2.0, -0.0, float("-inf"), 2.0, 0.0, float("-inf")]])
    indices = torch.tensor([[9, 8, 4, 6, 3, 2, -1]])
    v, i = merge_topk(values, indices, 9)
    assert i.tolist() == [[3, 8, 9, 2, 4, 6, -1, -1, -1]]
    assert v[0, :6].tolist() == [2.0, 2.0, 1.0, 0.0, 0.0, float("-inf")]
    assert torch.isinf(v[0, 6:]).all()


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "k must be a positive integer"),
    (dict(k=True), "k must be a positive integer"),
    (dict(item_offset=-1), "item_offset must be a non-negative integer"),
    (dict(item_offset=2.0), "item_offset must be a non-negative integer"),
    (dict(local_items=torch.zeros(5)), "local_items must be"),
])
def test_sharded_topk_rejects_bad_input(bad, match):
    args = dict(queries=torch.zeros(2, 3), local_items=torch.zeros(5, 3), k=2, item_offset=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sharded_topk(**args)


def test_shard_range_covers_every_row_once():
    for n in (0, 1, 7, 31, 123):
        for world in (1, 2, 3, 5):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        shard_range(10, 3, 3)
