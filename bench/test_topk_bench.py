"""CPU benchmarks for fused top-K scoring: ``fused_topk`` vs ``torch.mm`` + ``torch.topk`` vs FAISS.

Run: ``pytest bench/test_topk_bench.py --benchmark-only`` (add ``--benchmark-json=out.json`` to keep
the numbers). Shapes (B, N, d, k): (1, 1M, 256, 100), (256, 1M, 256, 100), (256, 50k, 256, 20),
float32 Gaussian queries and tables, all cores (torch's intra-op threads; FAISS gets as many).
``REAREC_BENCH_SMOKE=1`` runs one tiny shape instead (to check that the benchmarks run, not to time).

``test_topk_bf16_table`` (``-k bf16``), at (256, 50k, 256, 20) and (256, 1M, 256, 100): bf16 queries
and table through the bf16 filter pass and through the float32 pass, against float32 queries and
table, all cores; ``x_vs_fp32_table`` / ``x_vs_bf16_float32_pass`` are the speed-ups, and
``native_bf16`` says whether the CPU has the bf16 dot products the filter pass needs.

``fused_prepared`` scores a table prepared once as FastReaRec holds it (``prepare_table``: the bf16
filter pass where the CPU has native bf16 dot products), the production path; ``fused`` the raw table.

``fused_2threads`` serves the same batch as two halves from two Python threads at once, as a shared
engine does: the CPU path changes no process-wide setting, so both halves run on torch's threads.

Floor: ``test_sgemm_peak`` measures float32 GEMM throughput (2048^3, best round) in the same run;
each contender's ``extra_info`` holds ``floor_s = 2 B N d / peak`` and ``x_floor = time / floor``,
and ``x_vs_mm_topk`` (mm+topk time / this time) once mm+topk has run for that shape.

Peak extra memory (``extra_mb``, ``bench/resident_memory.py``): the largest resident growth during
the call, whoever allocated it (torch, MKL, FAISS). Inputs and the FAISS index are built beforehand and are
not counted; the returned (B, k) results are.
"""
import os
import threading
import time

import pytest
import torch

from rearec_kernels import fused_topk
from rearec_kernels.topk import prepare_table
from resident_memory import ResidentPeak  # bench/ is on sys.path under pytest

SHAPES = [  # (B, N, d, k)
    (1, 1_000_000, 256, 100),
    (256, 1_000_000, 256, 100),
    (256, 50_000, 256, 20),
]
if os.environ.get("REAREC_BENCH_SMOKE"):
    SHAPES = [(8, 5_000, 32, 10)]
# mm_topk first: the others report their speedup over it. fused_prepared: the table as FastReaRec holds
# it (rearec_kernels.topk.prepare_table: the per-table work done once, with the bf16 filter where the
# CPU has native bf16 dot products): what a float32 engine runs.
CONTENDERS = ["mm_topk", "fused", "fused_prepared", "fused_2threads", "faiss"]

_RESULTS = {}  # (shape, contender) -> best seconds, this run
_PEAK = {}
_TABLES = {}


def _data(B, N, d):
    if (N, d) not in _TABLES:
        _TABLES.clear()  # one big table at a time
        g = torch.Generator().manual_seed(N + d)
        _TABLES[(N, d)] = torch.randn(N, d, generator=g)
    g = torch.Generator().manual_seed(B)
    return torch.randn(B, d, generator=g), _TABLES[(N, d)]


def _sgemm_peak():
    if "flops" not in _PEAK:  # when this test runs alone (-k): measure the peak quietly first
        a, b, c = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t)
        _PEAK["flops"] = 2 * 2048 ** 3 / best
    return _PEAK["flops"]


def test_sgemm_peak(benchmark):
    n = 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    benchmark.pedantic(torch.mm, args=(a, b), kwargs=dict(out=c), rounds=7, warmup_rounds=1)
    peak = 2 * n ** 3 / benchmark.stats.stats.min
    _PEAK["flops"] = max(peak, _PEAK.get("flops", 0.0))
    benchmark.extra_info.update(op="sgemm", shape=[n, n, n], gflops=round(peak / 1e9, 1),
                                threads=torch.get_num_threads())


def _rounds(B, N):
    return 2 if B * N >= 10 ** 8 else 5


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-d{}-k{}".format(*s))
def test_topk(benchmark, contender, shape):
    B, N, d, k = shape
    q, e = _data(B, N, d)
    threads = torch.get_num_threads()
    if contender == "fused":
        def run():
            return fused_topk(q, e, k, backend="cpu")
    elif contender == "fused_prepared":
        prepared = prepare_table(e)  # once, outside the timing, as the engine does when it loads

        def run():
            return fused_topk(q, prepared, k, backend="cpu")
    elif contender == "fused_2threads":
        if B < 2:
            pytest.skip("one query cannot be split between two threads")

        def run():
            halves = [None, None]

            def serve(j):
                part = q[: B // 2] if j == 0 else q[B // 2:]
                halves[j] = fused_topk(part, e, k, backend="cpu")

            threads_ = [threading.Thread(target=serve, args=(j,)) for j in range(2)]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join()
            return torch.cat([halves[0][0], halves[1][0]]), torch.cat([halves[0][1], halves[1][1]])
    elif contender == "mm_topk":
        def run():
            return torch.topk(torch.mm(q, e.t()), k, dim=1)
    else:
        faiss = pytest.importorskip("faiss")
        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(d)
        index.add(e.numpy())
        qn = q.numpy()

        def run():
            return index.search(qn, k)

    slow = contender == "faiss" and B * N >= 10 ** 8  # ~10 s a call here: one round, no warm-up
    mem = ResidentPeak()
    result = benchmark.pedantic(run, setup=mem.setup, teardown=mem.teardown,
                                rounds=1 if slow else _rounds(B, N), warmup_rounds=0 if slow else 1)
    # sanity: the same top-k scores as mm+topk (indices may differ on float32 near-ties)
    vals = torch.as_tensor(result[0]).float()
    ref = torch.topk(q @ e.t(), k, dim=1).values if B * N <= 2 * 10 ** 7 else None
    if ref is not None:
        torch.testing.assert_close(vals, ref, rtol=1e-4, atol=1e-3)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    best = benchmark.stats.stats.min
    _RESULTS[(shape, contender)] = best

    floor = 2 * B * N * d / _sgemm_peak()
    info = dict(op="topk", contender=contender, shape=dict(B=B, N=N, d=d, k=k), dtype="float32",
                bf16_filter=contender == "fused_prepared" and prepared.filter_table is not None, threads=threads,
                best_s=round(best, 4), floor_s=round(floor, 4),
                x_floor=round(best / floor, 2), sgemm_gflops=round(_sgemm_peak() / 1e9, 1),
                extra_mb=round(mem.extra_mb, 1) if mem.ok else None,
                memory_method="VmHWM - VmRSS after malloc_trim + clear_refs reset, max over rounds")
    base = _RESULTS.get((shape, "mm_topk"))
    if base is not None and contender != "mm_topk":
        info["x_vs_mm_topk"] = round(base / best, 2)
    benchmark.extra_info.update(info)


# ---------------------------------------------------------------------------- bfloat16 item tables

BF16_SHAPES = [(256, 50_000, 256, 20), (256, 1_000_000, 256, 100)]
if os.environ.get("REAREC_BENCH_SMOKE"):
    BF16_SHAPES = [(8, 5_000, 32, 10)]
# fp32_table first: the others report their speedup over it. bf16_float32_pass: the bf16 table
# converted block by block and scored by the float32 GEMM (the path before the bf16 filter).
BF16_CONTENDERS = ["fp32_table", "bf16_float32_pass", "bf16_filter"]


@pytest.mark.parametrize("contender", BF16_CONTENDERS)
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: "B{}-N{}-d{}-k{}".format(*s))
def test_topk_bf16_table(benchmark, contender, shape):
    """The serving engine's bf16 top-K: bf16 queries (its states) against a bf16 item table, by the
    bf16 filter pass (``bf16_filter``, the default on CPUs with native bf16 dot products) and by
    the float32 pass, against float32 queries and table. ``x_vs_fp32_table``: the speed-up."""
    from rearec_kernels import topk_cpu

    B, N, d, k = shape
    q, e = _data(B, N, d)
    if contender != "fp32_table":
        q, e = q.to(torch.bfloat16), e.to(torch.bfloat16)  # a copy per test: the fp32 table stays cached
    if contender == "bf16_filter" and not topk_cpu.native_bf16():
        pytest.skip("this CPU has no native bf16 dot products (AVX512-BF16 / AMX): the filter pass is off")
    scan = {"fp32_table": None, "bf16_float32_pass": False, "bf16_filter": True}[contender]

    def run():
        return topk_cpu.fused_topk(q, e, k, bf16_scan=scan)

    mem = ResidentPeak()
    result = benchmark.pedantic(run, setup=mem.setup, teardown=mem.teardown, rounds=_rounds(B, N), warmup_rounds=1)
    if B * N <= 2 * 10 ** 7:  # sanity: the exact top-k of the float32-accumulated scores
        ref = torch.topk(q.float() @ e.float().t(), k, dim=1).values
        torch.testing.assert_close(result[0], ref, rtol=1e-4, atol=1e-3)
    if benchmark.stats is None:
        return
    best = benchmark.stats.stats.min
    _RESULTS[(shape, "bf16:" + contender)] = best
    info = dict(op="topk", contender=contender, shape=dict(B=B, N=N, d=d, k=k),
                dtype="float32" if contender == "fp32_table" else "bfloat16", threads=torch.get_num_threads(),
                best_s=round(best, 4), native_bf16=topk_cpu.native_bf16(),
                extra_mb=round(mem.extra_mb, 1) if mem.ok else None)
    for base in ("fp32_table", "bf16_float32_pass"):
        other = _RESULTS.get((shape, "bf16:" + base))
        if other is not None and base != contender:
            info[f"x_vs_{base}"] = round(other / best, 2)
    benchmark.extra_info.update(info)
