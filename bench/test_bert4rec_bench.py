"""BERT4Rec-backbone recommend latency vs reasoning depth, FastReaRec, at the serving target shape.

Shape: full histories (L=50: 49 items + the mask token), d=256, 2 layers, 2 heads, inner 300,
N=50,000 items, k=20, K=8 trained steps; batch sizes 1 and 256; depth 0..8. The prefill is
bidirectional (computed once per call); each reasoning step is one decode token, as for SASRec.
``test_bert4rec_depth_ratio`` times depths 0 and 2 interleaved at B=256 and records their ratio.

    pytest bench/test_bert4rec_bench.py --benchmark-only
    REAREC_BENCH_SMOKE=1 pytest bench/test_bert4rec_bench.py --benchmark-disable   # a tiny shape, to check it runs
"""
import os

import pytest
import torch

from rearec import ReaRec, ReaRecConfig
from rearec.engine import FastReaRec
from recommend_timing import (DEVICE, SERVING_SHAPE, bench_recommend, full_histories,  # bench/ is on sys.path under pytest
                              interleaved_medians, recommend_call)

SHAPE = dict(SERVING_SHAPE, backbone="bert4rec")
BATCHES = [1, 256]
RATIO_BATCH = 256
if os.environ.get("REAREC_BENCH_SMOKE"):
    SHAPE.update(n_items=301, hidden_size=16, inner_size=24, max_len=9, reason_steps=2)
    BATCHES, RATIO_BATCH = [3], 3
K = 20
DEPTHS = list(range(SHAPE["reason_steps"] + 1))

@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(**SHAPE)).eval().to(DEVICE)
    return FastReaRec.from_model(model)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_bert4rec_recommend(benchmark, engine, batch, depth):
    bench_recommend(benchmark, engine, SHAPE, path="FastReaRec", batch=batch, depth=depth, k=K,
                    rounds=5 if batch > 64 else 10)


def test_bert4rec_depth_ratio(benchmark, engine):
    """Depths 0 and 2, interleaved so that machine noise hits both alike: the depth 2 / depth 0 ratio."""
    call = recommend_call(engine, *full_histories(RATIO_BATCH, SHAPE), K)
    median = interleaved_medians(call, [0, 2])
    benchmark.extra_info.update(dict(
        SHAPE, batch=RATIO_BATCH, k=K, device=DEVICE, ms_depth0=median[0] * 1e3, ms_depth2=median[2] * 1e3,
        ratio_depth2_over_depth0=median[2] / median[0],
    ))
    benchmark.pedantic(call, args=(2,), rounds=3, warmup_rounds=0)
