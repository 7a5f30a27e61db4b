"""CPU benchmarks for the fused linear cross-entropy against ``F.cross_entropy(h @ E.T)``.

Run: ``pytest bench/test_ce_bench.py --benchmark-only`` (add ``--benchmark-json=out.json`` to keep
the numbers). ``REAREC_BENCH_SMOKE=1`` shrinks every shape to a fraction of a second (a smoke run:
the numbers then mean nothing).

* ``test_cross_entropy``: forward + backward (gradients of hidden and item table) of the mean
  cross-entropy at scale 1/0.07, float32, at (B, N, d) = (256, 50k, 64), (256, 1M, 64) and
  (1024, 1M, 256); contenders ``dense`` (``F.cross_entropy(scale * h @ E.T)``) and ``fused``
  (``fused_linear_cross_entropy``, CPU path). Targets: fused time <= 1.0x dense at N = 50k and
  <= 1.2x at (256, 1M, 64), where its peak extra memory must stay <= 512 MB (dense: 2,930 MB measured).
* ``test_prl_step``: one whole PRL training step (ReaRec d = 64, 2 layers, K = 2, max_len 50,
  batch 256, the noisy copy and InfoNCE on, Adam) at N = 1M, with ``fused_ce`` on and off. Target
  (fused): <= 3 GB resident in total (``peak_rss_mb``).

* ``test_cross_entropy_cuda`` (only where a GPU is present; run with TRITON_INTERPRET=0): the same
  three shapes on CUDA, the Triton kernels against dense, with ``peak_mb`` = the largest
  ``torch.cuda.max_memory_allocated`` growth in a round.

``extra_info``: ``best_s``; ``extra_mb``, the largest resident-set growth during a round (before each
round ``malloc_trim(0)`` returns freed heap pages and writing 5 to /proc/self/clear_refs resets the
peak, VmHWM; extra = VmHWM - VmRSS at the reset), inputs not counted, gradients counted;
``peak_rss_mb``, VmHWM itself; for ``fused``, ``ratio_time_vs_dense`` = fused / dense time and
``ratio_extra_mb_vs_dense`` once ``dense`` has run for that shape (dense runs first). All cores
(torch's intra-op threads). The dense run at (1024, 1M, 256) needs ~13 GB and is skipped when
less memory is available.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from resident_memory import ResidentPeak, field_mb  # bench/ is on sys.path under pytest

from rearec_kernels.linear_cross_entropy import fused_linear_cross_entropy

SMOKE = os.environ.get("REAREC_BENCH_SMOKE") == "1"
SCALE = 1 / 0.07
SHAPES = [(16, 500, 8), (16, 2_000, 8), (32, 2_000, 16)] if SMOKE else [
    (256, 50_000, 64), (256, 1_000_000, 64), (1024, 1_000_000, 256)]
PRL_ITEMS, PRL_BATCH, PRL_LEN = (2_000, 32, 10) if SMOKE else (1_000_000, 256, 50)
CONTENDERS = ["dense", "fused"]  # dense first: fused reports its ratios to it

_RESULTS = {}  # (test, shape, contender) -> (best seconds, extra MB)


def _available_mb():
    return field_mb("MemAvailable", "/proc/meminfo")


def _record(benchmark, test, key, contender, mem, **info):
    best = benchmark.stats.stats.min
    _RESULTS[(test, key, contender)] = (best, mem.extra_mb)
    info.update(contender=contender, threads=torch.get_num_threads(), best_s=round(best, 4),
                extra_mb=round(mem.extra_mb, 1), peak_rss_mb=round(mem.peak_mb, 1), smoke=SMOKE,
                memory_method="VmHWM - VmRSS after malloc_trim + clear_refs reset, max over rounds")
    dense = _RESULTS.get((test, key, "dense"))
    if dense is not None and contender != "dense":
        info["ratio_time_vs_dense"] = round(best / dense[0], 3)
        info["ratio_extra_mb_vs_dense"] = round(mem.extra_mb / max(dense[1], 1e-9), 3)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-d{}".format(*s))
def test_cross_entropy(benchmark, contender, shape):
    B, N, d = shape
    if contender == "dense" and B * N * 4 * 3 / 2 ** 20 > _available_mb() - 1024:
        pytest.skip(f"dense cross-entropy at {shape} needs ~{B * N * 12 / 2 ** 30:.0f} GB; not available here")
    g = torch.Generator().manual_seed(N + d)
    hidden = torch.randn(B, d, generator=g).requires_grad_()
    table = (torch.randn(N, d, generator=g) * d ** -0.5).requires_grad_()
    targets = torch.randint(0, N, (B,), generator=g)

    def drop_grads():
        hidden.grad = table.grad = None

    if contender == "dense":
        def step():
            F.cross_entropy(SCALE * (hidden @ table.T), targets).backward()
    else:
        def step():
            fused_linear_cross_entropy(hidden, table, targets, scale=SCALE, backend="cpu").backward()

    mem = ResidentPeak(reset=drop_grads)
    rounds = 3 if B * N >= 10 ** 8 else 5
    benchmark.pedantic(step, setup=mem.setup, teardown=mem.teardown, rounds=rounds, warmup_rounds=1)
    flops = 4 * 2 * B * N * d if contender == "fused" else 3 * 2 * B * N * d  # GEMMs of the method
    _record(benchmark, "ce", shape, contender, mem, op="linear_cross_entropy", shape=dict(B=B, N=N, d=d),
            dtype="float32", gemm_gflop=round(flops / 1e9, 2))


@pytest.mark.parametrize("contender", CONTENDERS)
def test_prl_step(benchmark, contender):
    from rearec import ReaRec, ReaRecConfig
    from rearec.objectives import training_loss

    if contender == "dense" and PRL_BATCH * PRL_ITEMS * 4 * 10 / 2 ** 20 > _available_mb() - 1024:
        pytest.skip("the dense PRL step at N = 1M needs ~10 GB; not available here")
    torch.manual_seed(0)
    B, L = PRL_BATCH, PRL_LEN
    config = ReaRecConfig(n_items=PRL_ITEMS, objective="prl", reason_steps=2, hidden_size=64, n_layers=2,
                          n_heads=2, inner_size=128, max_len=L, warmup_epochs=0)
    model = ReaRec(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    histories = torch.randint(0, PRL_ITEMS, (B, L))
    lengths = torch.randint(5, L + 1, (B,))
    targets = torch.randint(0, PRL_ITEMS, (B,))
    fused = contender == "fused"

    def step():
        loss = training_loss(model, histories, lengths, targets, epoch=1, fused_ce=fused)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # Adam's state exists from here on, as in any step after the first
    mem = ResidentPeak(reset=lambda: optimizer.zero_grad(set_to_none=True))
    benchmark.pedantic(step, setup=mem.setup, teardown=mem.teardown, rounds=3, warmup_rounds=0)
    _record(benchmark, "prl", PRL_ITEMS, contender, mem, op="prl_training_step",
            shape=dict(B=B, N=PRL_ITEMS, d=64, K=2, L=L), fused_ce=fused)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-d{}".format(*s))
def test_cross_entropy_cuda(benchmark, contender, shape):
    B, N, d = shape
    g = torch.Generator().manual_seed(N + d)
    hidden = torch.randn(B, d, generator=g).cuda().requires_grad_()
    table = (torch.randn(N, d, generator=g) * d ** -0.5).cuda().requires_grad_()
    targets = torch.randint(0, N, (B,), generator=g).cuda()
    peak = {"extra_mb": 0.0}

    def setup():
        hidden.grad = table.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        peak["base"] = torch.cuda.memory_allocated()

    def step():
        if contender == "dense":
            F.cross_entropy(SCALE * (hidden @ table.T), targets).backward()
        else:
            fused_linear_cross_entropy(hidden, table, targets, scale=SCALE, backend="triton").backward()
        torch.cuda.synchronize()
        peak["extra_mb"] = max(peak["extra_mb"], (torch.cuda.max_memory_allocated() - peak["base"]) / 2 ** 20)

    benchmark.pedantic(step, setup=setup, rounds=10, warmup_rounds=2)
    best = benchmark.stats.stats.min
    _RESULTS[("ce_cuda", shape, contender)] = (best, peak["extra_mb"])
    info = dict(op="linear_cross_entropy", device=torch.cuda.get_device_name(), contender=contender,
                shape=dict(B=B, N=N, d=d), best_s=round(best, 5), peak_mb=round(peak["extra_mb"], 1))
    dense = _RESULTS.get(("ce_cuda", shape, "dense"))
    if dense is not None and contender != "dense":
        info["ratio_time_vs_dense"] = round(best / dense[0], 3)
        info["ratio_peak_mb_vs_dense"] = round(peak["extra_mb"] / max(dense[1], 1e-9), 3)
    benchmark.extra_info.update(info)
