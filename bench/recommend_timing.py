"""Shared by the recommend benchmarks (``test_engine_bench.py``, ``test_bert4rec_bench.py``,
``test_serving_bench.py``): the device, the serving target's model shape, the sgemm peak, full-history inputs, one pytest-benchmark timing of ``recommend``, and interleaved medians
(depths timed in turn, in an order that rotates every round, so that machine noise hits all alike)."""
import statistics
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: The serving target's model: a 50k-item table, hidden 256, K = 8 steps to time against depth.
SERVING_SHAPE = dict(n_items=50_000, hidden_size=256, n_layers=2, n_heads=2, inner_size=300, max_len=50, reason_steps=8)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def full_histories(batch, shape):
    """``batch`` random histories of ``shape["max_len"]`` items (seeded by the batch size) and their lengths."""
    g = torch.Generator().manual_seed(batch)
    histories = torch.randint(shape["n_items"], (batch, shape["max_len"]), generator=g)
    return histories.to(DEVICE), torch.full((batch,), shape["max_len"], device=DEVICE)


def recommend_call(recommender, histories, lengths, k):
    """``call(depth)``: one synchronised ``recommender.recommend`` of the batch."""
    def call(depth):
        recommender.recommend(histories, k=k, depth=depth, lengths=lengths)
        sync()
    return call


def bench_recommend(benchmark, recommender, shape, *, path, batch, depth, k, rounds):
    histories, lengths = full_histories(batch, shape)
    benchmark.extra_info.update(dict(shape, path=path, batch=batch, depth=depth, k=k, device=DEVICE))
    benchmark.pedantic(recommend_call(recommender, histories, lengths, k), args=(depth,), rounds=rounds,
                       warmup_rounds=1)


def interleaved_medians(call, depths, repeats=7, each_round=None):
    """Median seconds of ``call(depth)`` per depth, after one warm-up call each; ``each_round()``, if
    given, runs before every round of depths. Each round starts one depth later than the one before
    (the order rotates), so that what a round's start costs (``each_round``'s cache eviction, say)
    falls on every depth alike, not always on the first."""
    times = {depth: [] for depth in depths}
    order = list(times)
    for depth in order:
        call(depth)
    for r in range(repeats):
        if each_round is not None:
            each_round()
        for depth in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            call(depth)
            times[depth].append(time.perf_counter() - start)
    return {depth: statistics.median(t) for depth, t in times.items()}


def sgemm_peak_gflops(repeats=5, size=2048, dtype=torch.float32):
    """Best-of-``repeats`` matmul throughput on this machine, now (``dtype``: fp32, or bf16 for the
    rate of the engine's bf16 filter pass over the item table)."""
    a = torch.randn(size, size, device=DEVICE).to(dtype)
    b = torch.randn(size, size, device=DEVICE).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
