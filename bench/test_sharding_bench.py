"""Sharded top-K over 2 gloo ranks against the local top-K of half the table.

Run: ``pytest bench/test_sharding_bench.py --benchmark-only``. ``REAREC_BENCH_SMOKE=1`` shrinks the
shapes to seconds (a smoke run: the numbers then mean nothing).

* ``test_local_half_table``: ``fused_topk`` over N/2 rows in this process (what each rank does).
* ``test_merge``: ``merge_topk`` of two ranks' (B, k) lists (what each rank does after the gather).
* ``test_sharded_two_ranks``: two spawned processes (one torch thread each, as on a 2-core node)
  each time ``sharded_topk`` end to end, and its parts: the local top-K, the all-gather and the
  merge, median of the rounds (rank 0's clock; a barrier starts every round). ``extra_info`` holds
  ``ms_*`` for each part and ``ratio_vs_local_plus_gather`` = sharded / (local + gather); the
  target is <= 1.3.
"""
import json
import os
import statistics
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rearec.distributed import merge_topk, shard_range, sharded_topk
from rearec_kernels.topk import fused_topk

SMOKE = os.environ.get("REAREC_BENCH_SMOKE") == "1"
B, N, D, K = (8, 2_000, 16, 10) if SMOKE else (256, 1_000_000, 64, 100)
ROUNDS = 3 if SMOKE else 20


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(N, D, generator=g)


def test_local_half_table(benchmark):
    torch.set_num_threads(1)
    queries, table = _inputs()
    half = table[: N // 2].contiguous()
    benchmark.extra_info.update(B=B, N=N, d=D, k=K)
    benchmark.pedantic(fused_topk, args=(queries, half, K), rounds=ROUNDS, warmup_rounds=1)


def test_merge(benchmark):
    queries, table = _inputs()
    a = fused_topk(queries, table[: N // 2], K)
    b = fused_topk(queries, table[N // 2:], K)
    values = torch.cat([a[0], b[0]], dim=1)
    indices = torch.cat([a[1], b[1] + N // 2], dim=1)
    benchmark.pedantic(merge_topk, args=(values, indices, K), rounds=ROUNDS, warmup_rounds=1)


def _timed_interleaved(parts, rounds):
    """Median ms of each of ``parts`` (name -> call), timed in turn within every round (each call
    after a barrier), so that the machine's drift over the run hits all parts alike."""
    times = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    queries, table = _inputs()
    start, stop = shard_range(N, rank, world)
    local = table[start:stop].contiguous()
    del table
    values, indices = fused_topk(queries, local, K)
    gathered = ([torch.empty_like(values) for _ in range(world)],
                [torch.empty_like(indices) for _ in range(world)])

    def gather():
        dist.all_gather(gathered[0], values)
        dist.all_gather(gathered[1], indices)

    gather()
    merged = (torch.cat(gathered[0], 1), torch.cat(gathered[1], 1))
    result = _timed_interleaved({
        "ms_sharded": lambda: sharded_topk(queries, local, K, start),
        "ms_local": lambda: fused_topk(queries, local, K),
        "ms_gather": gather,
        "ms_merge": lambda: merge_topk(*merged, K),
    }, ROUNDS)
    dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(result, f)


def test_sharded_two_ranks(benchmark, tmp_path):
    out_file = tmp_path / "times.json"

    def run():
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
        (tmp_path / "init").unlink(missing_ok=True)

    benchmark.pedantic(run, rounds=1, iterations=1)  # the figures are the ranks' own clocks, below
    times = json.loads(out_file.read_text())
    times["ratio_vs_local_plus_gather"] = times["ms_sharded"] / (times["ms_local"] + times["ms_gather"])
    benchmark.extra_info.update(times, B=B, N=N, d=D, k=K, world=2)
