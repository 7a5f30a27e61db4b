"""Shared by the recommend benchmarks (``test_engine_bench.py``, ``test_bert4rec_bench.py``): the
device, full-history inputs, one pytest-benchmark timing of ``recommend``, and interleaved medians
(depths timed in turn, in an order that rotates every round, so that machine noise hits all alike)."""
import statistics
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
