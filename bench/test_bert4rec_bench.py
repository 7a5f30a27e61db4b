"""BERT4Rec-backbone recommend latency vs reasoning depth, FastReaRec, at the serving target shape.

Shape: full histories (L=50: 49 items + the mask token), d=256, 2 layers, 2 heads, inner 300,
N=50,000 items, k=20, K=8 trained steps; batch sizes 1 and 256; depth 0..8. The prefill is
bidirectional (computed once per call); each reasoning step is one decode token, as for SASRec.
``test_bert4rec_depth_ratio`` times depths 0 and 2 interleaved at B=256 and records their ratio.

    pytest bench/test_bert4rec_bench.py --benchmark-only
    REAREC_BENCH_SMOKE=1 pytest bench/test_bert4rec_bench.py --benchmark-disable   # a tiny shape, to check it runs
"""
import os
import statistics
import time

import pytest
import torch

from rearec import ReaRec, ReaRecConfig
from rearec.engine import FastReaRec

SHAPE = dict(n_items=50_000, hidden_size=256, n_layers=2, n_heads=2, inner_size=300, max_len=50, reason_steps=8,
             backbone="bert4rec")
BATCHES = [1, 256]
RATIO_BATCH = 256
if os.environ.get("REAREC_BENCH_SMOKE"):
    SHAPE.update(n_items=301, hidden_size=16, inner_size=24, max_len=9, reason_steps=2)
    BATCHES, RATIO_BATCH = [3], 3
K = 20
DEPTHS = list(range(SHAPE["reason_steps"] + 1))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(**SHAPE)).eval().to(DEVICE)
    return FastReaRec.from_model(model)


def _batch(batch):
    g = torch.Generator().manual_seed(batch)
    histories = torch.randint(SHAPE["n_items"], (batch, SHAPE["max_len"]), generator=g)
    return histories.to(DEVICE), torch.full((batch,), SHAPE["max_len"], device=DEVICE)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_bert4rec_recommend(benchmark, engine, batch, depth):
    histories, lengths = _batch(batch)
    benchmark.extra_info.update(dict(SHAPE, path="FastReaRec", batch=batch, depth=depth, k=K, device=DEVICE))

    def call():
        engine.recommend(histories, k=K, depth=depth, lengths=lengths)
        _sync()

    benchmark.pedantic(call, rounds=5 if batch > 64 else 10, warmup_rounds=1)


def test_bert4rec_depth_ratio(benchmark, engine):
    """Depths 0 and 2, interleaved so that machine noise hits both alike: the depth 2 / depth 0 ratio."""
    histories, lengths = _batch(RATIO_BATCH)
    times = {0: [], 2: []}

    def call(depth):
        engine.recommend(histories, k=K, depth=depth, lengths=lengths)
        _sync()

    for depth in times:
        call(depth)
    for _ in range(7):
        for depth in times:
            start = time.perf_counter()
            call(depth)
            times[depth].append(time.perf_counter() - start)
    median = {d: statistics.median(t) for d, t in times.items()}
    benchmark.extra_info.update(dict(
        SHAPE, batch=RATIO_BATCH, k=K, device=DEVICE, ms_depth0=median[0] * 1e3, ms_depth2=median[2] * 1e3,
        ratio_depth2_over_depth0=median[2] / median[0],
    ))
    benchmark.pedantic(call, args=(2,), rounds=3, warmup_rounds=0)
