"""Recommend latency vs reasoning depth: FastReaRec and ReaRec's reference path.

Shape (the serving target): full histories L=50, d=256, 2 layers, 2 heads, inner 300, N=50,000
items, k=20, K=8 trained steps; batch sizes 1, 64, 256; depth 0..8. ``test_overhead_and_floor``
times depths 0, 2, 8 and an sgemm interleaved in one test, and records the overhead ratios and the
ratio to the FLOP floor at this machine's measured sgemm peak.

    pytest bench/test_engine_bench.py --benchmark-only
"""

import pytest
import torch

from rearec import ReaRec, ReaRecConfig
from rearec.engine import FastReaRec
from rearec.flops import recommend_flops
from recommend_timing import (DEVICE, SERVING_SHAPE, bench_recommend, full_histories,  # bench/ is on sys.path under pytest
                              interleaved_medians, recommend_call, sgemm_peak_gflops, sync)

SHAPE = SERVING_SHAPE
K = 20
DEPTHS = list(range(9))
BATCHES = [1, 64, 256]

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReaRec(ReaRecConfig(**SHAPE)).eval().to(DEVICE)


@pytest.fixture(scope="module")
def engine(model):
    return FastReaRec.from_model(model)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_fast_recommend(benchmark, engine, batch, depth):
    bench_recommend(benchmark, engine, SHAPE, path="FastReaRec", batch=batch, depth=depth, k=K,
                    rounds=5 if batch == 256 else 10)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_reference_recommend(benchmark, model, batch, depth):
    bench_recommend(benchmark, model, SHAPE, path="ReaRec.recommend (reference)", batch=batch, depth=depth, k=K,
                    rounds=3)


def test_overhead_and_floor(benchmark, engine):
    """Depths 0, 2, 8 at B=256 and the sgemm peak, interleaved so that machine noise hits all alike."""
    batch = 256
    call = recommend_call(engine, *full_histories(batch, SHAPE), K)
    peaks = []
    median = interleaved_medians(call, [0, 2, 8], each_round=lambda: peaks.append(sgemm_peak_gflops(repeats=2)))
    peak = max(peaks)
    flops = recommend_flops(batch, SHAPE["max_len"], 2, SHAPE["hidden_size"], SHAPE["inner_size"],
                            SHAPE["n_layers"], SHAPE["n_items"])
    # The table pass runs in bf16 where the engine's bf16 filter is on: priced at the bf16 rate then.
    bf16_filter = engine.scoring_index.filter_table is not None
    scoring_peak = sgemm_peak_gflops(dtype=torch.bfloat16) if bf16_filter else peak
    floor = flops["layers"] / (peak * 1e9) + flops["scoring"] / (scoring_peak * 1e9)
    benchmark.extra_info.update(dict(
        SHAPE, batch=batch, k=K, device=DEVICE, bf16_filter=bf16_filter,
        ms_depth0=median[0] * 1e3, ms_depth2=median[2] * 1e3, ms_depth8=median[8] * 1e3,
        sgemm_peak_gflops=peak, sgemm_peak_gflops_scoring=scoring_peak, floor_ms_depth2=floor * 1e3,
        ratio_depth2_over_depth0=median[2] / median[0],
        ratio_depth8_over_depth0=median[8] / median[0],
        ratio_depth2_over_floor=median[2] / floor,
    ))
    benchmark.pedantic(call, args=(2,), rounds=3, warmup_rounds=0)


@pytest.fixture(scope="module")
def moving_model():
    """The serving shape with weights whose reasoning steps move the score distribution by about as
    much as a trained model's do. At the default init (std 0.02) a step changes the state so little
    that KL(p_1 || p_0) is ~1e-14 nats, and halting decisions would be float noise. Here the layers'
    matrices are drawn at unit gain (std 1/sqrt(fan_in)), the item table at std 0.04 (per-user score
    spread ~9 nats) and the reasoning position embeddings at std 0.3: on random full histories the
    KL between steps 1 and 0 then has median ~2 nats and q10..q90 of 5e-5..48 (ML-1M PRL, d=64, at
    epoch 39 of training: median 11, q10..q90 1.7..25). Only the adaptive benchmark uses it; costs
    do not depend on the weights' values."""
    torch.manual_seed(0)
    moving = ReaRec(ReaRecConfig(**SHAPE)).eval()
    with torch.no_grad():
        for name, weight in moving.named_parameters():
            if name.startswith("layers.") and weight.dim() == 2:
                weight.normal_(0, weight.shape[1] ** -0.5)
        moving.item_embedding.weight.normal_(0, 0.04)
        moving.reasoning_position_embedding.weight.normal_(0, 0.3)
    return moving.to(DEVICE)


def test_adaptive_readout_cost(benchmark, moving_model):
    """``readout="adaptive"`` at B=256, depth up to 2, with ``halt_kl`` at the median KL(p_1 || p_0)
    of the batch, so that about half the users halt after step 1: its time against fixed depths 1 and 2
    (interleaved), and the mean depth it used. Each halting decision costs a streamed pass over the
    item table (two GEMMs per chunk) on top of the steps themselves. The model's steps move its
    distribution by a trained model's amount (``moving_model``), so the users who halt are the ones
    whose scores settled, not the ones float noise picked."""
    model = moving_model
    batch = 256
    histories, lengths = full_histories(batch, SHAPE)
    states = model.reasoning_states(histories, depth=2, lengths=lengths)
    with torch.no_grad():
        log_p = torch.log_softmax(model.scores(states[:, :2]).double(), dim=-1)
    kl = (log_p[:, 1].exp() * (log_p[:, 1] - log_p[:, 0])).sum(-1)
    model.config.halt_kl = float(kl.median())
    try:
        engine = FastReaRec.from_model(model)
        steps = engine.adaptive_states(histories, depth=2, lengths=lengths)[1]

        def call(mode):
            depth, readout = mode
            engine.recommend(histories, k=K, depth=depth, readout=readout, lengths=lengths)
            sync()

        modes = [(1, "last"), (2, "last"), (2, "adaptive")]
        median = interleaved_medians(call, modes, repeats=5)
        benchmark.extra_info.update(dict(
            SHAPE, batch=batch, k=K, device=DEVICE, halt_kl=model.config.halt_kl,
            x_kl_step1_q10=float(kl.quantile(0.1)), x_kl_step1_q90=float(kl.quantile(0.9)),
            x_mean_depth_adaptive=float(steps.float().mean()),
            ms_depth1=median[(1, "last")] * 1e3, ms_depth2=median[(2, "last")] * 1e3,
            ms_adaptive=median[(2, "adaptive")] * 1e3,
            ratio_adaptive_over_depth2=median[(2, "adaptive")] / median[(2, "last")],
        ))
        benchmark.pedantic(call, args=((2, "adaptive"),), rounds=1, warmup_rounds=0)
    finally:
        model.config.halt_kl = None
