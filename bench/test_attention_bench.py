"""CPU attention at ReaRec's serving shape: one prefill (with cache write) vs one decode step.

    .venv/bin/python -m pytest bench/test_attention_bench.py --benchmark-only

Shape: B=256 users, L=50 history tokens, H=2 heads of Dh=128 (d=256), float32, one layer; every
user has a full history (the most work for both ops). The decode step is the first reasoning step:
it writes slot 50 and attends over 51 slots. Target: decode <= 1/20 of prefill; the decode test
records both ops' min and median and their ratios in extra_info (and prints them with -s).

Each op runs with 1 torch thread and with torch's default. On a shared machine the multi-threaded
numbers swing widely (a parallel region waits for its slowest thread's time slice); the 1-thread
numbers and the minimums are the steadier ones.
"""
from __future__ import annotations

import pytest
import torch

from rearec_kernels import KVCache, decode_attention, prefill_attention, split_qkv

B, L, H, DH, DEPTH = 256, 50, 2, 128, 8
SHAPE = dict(B=B, L=L, H=H, Dh=DH, d=H * DH, capacity=L + DEPTH, dtype="float32", backend="cpu")
TARGET_RATIO = 1 / 20
THREADS = sorted({1, torch.get_num_threads()})
_stats: dict = {}  # threads -> {"prefill": (min, median)}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, L, 3 * H * DH, generator=gen)  # one fused projection, as the model makes it
    q, k, v = split_qkv(qkv, H)
    lengths = torch.full((B,), L, dtype=torch.int32)
    step = torch.randn(3, B, H, DH, generator=gen).unbind(0)
    return q, k, v, lengths, step


@pytest.fixture(params=THREADS, ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _extra(benchmark, op, threads):
    benchmark.extra_info.update(SHAPE, op=op, torch_threads=threads)


def _min_median(benchmark) -> tuple[float, float]:
    return benchmark.stats.stats.min, benchmark.stats.stats.median


def test_prefill_cpu(benchmark, inputs, threads):
    q, k, v, lengths, _ = inputs
    cache = KVCache.allocate(1, B, H, L + DEPTH, DH)
    _extra(benchmark, "prefill_attention (with cache write)", threads)
    benchmark(prefill_attention, q, k, v, lengths, cache, 0, backend="cpu")
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    _stats.setdefault(threads, {})["prefill"] = _min_median(benchmark)


def test_decode_cpu(benchmark, inputs, threads):
    q, k, v, lengths, (qd, kd, vd) = inputs
    cache = KVCache.allocate(1, B, H, L + DEPTH, DH)
    prefill_attention(q, k, v, lengths, cache, 0, backend="cpu")
    cache.set_lengths(lengths)  # never advanced: every round rewrites slot L and reads 0..L
    _extra(benchmark, "decode_attention (one reasoning step)", threads)
    benchmark(decode_attention, qd, kd, vd, cache, 0, backend="cpu")
    if benchmark.stats is None:
        return
    decode = _min_median(benchmark)
    prefill = _stats.get(threads, {}).get("prefill")
    if prefill is None:  # prefill not run in this session
        return
    ratios = [d / p for d, p in zip(decode, prefill)]
    benchmark.extra_info.update(
        prefill_min_ms=prefill[0] * 1e3, prefill_median_ms=prefill[1] * 1e3,
        decode_min_ms=decode[0] * 1e3, decode_median_ms=decode[1] * 1e3,
        decode_over_prefill_min=ratios[0], decode_over_prefill_median=ratios[1],
        target=TARGET_RATIO, meets_target_median=ratios[1] <= TARGET_RATIO,
    )
    print(f"\n{threads} thread(s): prefill min {prefill[0] * 1e3:.3f} / median {prefill[1] * 1e3:.3f} ms, "
          f"decode min {decode[0] * 1e3:.3f} / median {decode[1] * 1e3:.3f} ms, decode/prefill "
          f"1/{1 / ratios[0]:.1f} (min) 1/{1 / ratios[1]:.1f} (median); target <= 1/{1 / TARGET_RATIO:.0f}")
