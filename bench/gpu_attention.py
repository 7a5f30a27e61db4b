"""GPU check of the attention kernels: compiled parity against float64, and timings.

``run(rows)`` appends one dict per check or timing to ``rows`` (bench/gpu_check.py prints them):

    {"op", "shape", "dtype", "ms", "vs", "vs_ms", "ratio", "check"}

* parity, per dtype (float32 / float16 / bfloat16) and shape: the Triton prefill (with cache write)
  and DEPTH decode steps against the float64 reference; outputs and cache NaN-poisoned first, so the
  check also fails on anything left unwritten or written where it must not be. ``check`` is "ok" or
  "FAIL max err ...".
* timings at the serving shape (triton.testing.do_bench, so L2 is flushed between runs): prefill and
  decode against torch SDPA (``ratio`` = ours / SDPA) and against the bytes-moved floor (``ratio`` =
  ours / floor; floor = bytes the op must move / device bandwidth, the bandwidth measured here with a
  1 GiB device-to-device copy). Decode is also timed under a CUDA graph, which leaves out the
  Python launch cost that dominates a microsecond kernel.
* a small sweep over launch configs at the serving shape, to check the defaults in
  ``rearec_kernels/attention_triton.py`` (``ratio`` = config / default).

Importable without a GPU (nothing CUDA-specific runs at import); on a machine without CUDA ``run``
appends one row saying so.
"""
from __future__ import annotations

import os
import traceback

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}  # atol, rtol
SERVING = (256, 50, 2, 128)  # B, L, H, Dh
PARITY_SHAPES = [SERVING, (33, 37, 3, 80), (4, 200, 2, 256), (5, 130, 1, 16)]
DEPTH = 4  # decode steps per parity check


def _shape(B, L, H, D) -> str:
    return f"B={B} L={L} H={H} Dh={D}"


def _inputs(B, L, H, D, dtype, device, seed, mixed=True):
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B, L, 3 * H * D, device=device, dtype=torch.float32, generator=gen).to(dtype)
    if mixed:
        lengths = torch.randint(1, L + 1, (B,), device=device, generator=gen, dtype=torch.int32)
        lengths[0] = 1
        lengths[-1] = L
    else:
        lengths = torch.full((B,), L, device=device, dtype=torch.int32)
    return qkv, lengths


def _max_excess(got: torch.Tensor, want: torch.Tensor, dtype) -> tuple[bool, float]:
    """(within tolerance everywhere, max abs error); NaN anywhere fails."""
    atol, rtol = TOL[dtype]
    got = got.double()
    err = (got - want).abs()
    ok = bool(torch.isfinite(got).all()) and bool((err <= atol + rtol * want.abs()).all())
    return ok, float(err.nan_to_num(float("inf")).max()) if err.numel() else 0.0


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _parity(rows, B, L, H, D, dtype_name, dtype, device):
    from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv
    from rearec_kernels.kv_cache import KVCache

    shape = _shape(B, L, H, D)
    qkv, lengths = _inputs(B, L, H, D, dtype, device, seed=B * 1000 + L)
    q, k, v = split_qkv(qkv, H)
    cache = KVCache.allocate(2, B, H, L + DEPTH, D, dtype=dtype, device=device)
    cache.keys.fill_(float("nan"))
    cache.values.fill_(float("nan"))
    ref_cache = KVCache(cache.keys.double(), cache.values.double(), cache.lengths.clone())

    out = torch.full((B, L, H, D), float("nan"), dtype=dtype, device=device)
    prefill_attention(q, k, v, lengths, cache, 1, backend="triton", out=out)
    want = prefill_attention(q.double(), k.double(), v.double(), lengths, ref_cache, 1, backend="reference")
    torch.cuda.synchronize()
    ok, err = _max_excess(out, want, dtype)
    padding = torch.arange(L, device=device)[None, :] >= lengths[:, None]
    ok = ok and bool((out[padding] == 0).all())
    cache_ok = _same_bits(cache.keys, ref_cache.keys) and _same_bits(cache.values, ref_cache.values)
    rows.append({"op": "prefill parity", "shape": shape, "dtype": dtype_name,
                 "check": "ok" if ok and cache_ok else
                 f"FAIL max err {err:.3g}" + ("" if cache_ok else " (cache differs)")})

    cache.set_lengths(lengths)
    ref_cache.set_lengths(lengths)
    gen = torch.Generator(device=device).manual_seed(7)
    worst, ok = 0.0, True
    for _ in range(DEPTH):
        qd, kd, vd = (torch.randn(B, H, D, device=device, generator=gen).to(dtype) for _ in range(3))
        got = torch.full((B, H, D), float("nan"), dtype=dtype, device=device)
        decode_attention(qd, kd, vd, cache, 1, backend="triton", out=got)
        want = decode_attention(qd.double(), kd.double(), vd.double(), ref_cache, 1, backend="reference")
        step_ok, err = _max_excess(got, want, dtype)
        ok, worst = ok and step_ok, max(worst, err)
        cache.advance()
        ref_cache.advance()
    torch.cuda.synchronize()
    cache_ok = _same_bits(cache.keys, ref_cache.keys) and _same_bits(cache.values, ref_cache.values)
    rows.append({"op": f"decode parity ({DEPTH} steps)", "shape": shape, "dtype": dtype_name,
                 "check": "ok" if ok and cache_ok else
                 f"FAIL max err {worst:.3g}" + ("" if cache_ok else " (cache differs)")})


def _bandwidth_bytes_per_s(device) -> float:
    from triton.testing import do_bench

    n = 1 << 28  # 1 GiB of float32
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / (ms * 1e-3)  # read + write


def _timings(rows, dtype_name, dtype, device, bandwidth):
    import torch.nn.functional as F
    from triton.testing import do_bench, do_bench_cudagraph

    from rearec_kernels import attention_triton
    from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv
    from rearec_kernels.kv_cache import KVCache

    B, L, H, D = SERVING
    shape = _shape(B, L, H, D) + " full histories"
    es = torch.tensor([], dtype=dtype).element_size()
    qkv, lengths = _inputs(B, L, H, D, dtype, device, seed=1, mixed=False)
    q, k, v = split_qkv(qkv, H)
    cache = KVCache.allocate(1, B, H, L + DEPTH, D, dtype=dtype, device=device)

    def row(op, ms, vs, vs_ms, check="ok"):
        rows.append({"op": op, "shape": shape, "dtype": dtype_name, "ms": round(ms, 5), "vs": vs,
                     "vs_ms": round(vs_ms, 5), "ratio": round(ms / vs_ms, 3), "check": check})

    # prefill: ours (with cache write) vs SDPA (without) vs the bytes floor
    ours = do_bench(lambda: prefill_attention(q, k, v, lengths, cache, 0, backend="triton"))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sdpa = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    moved = (3 + 1 + 2) * B * L * H * D * es  # read q, k, v; write out and the cache's K, V
    row("prefill (triton, cache write)", ours, "torch sdpa causal (no cache write)", sdpa)
    row("prefill (triton, cache write)", ours, f"bytes floor {moved / 1e6:.1f} MB", moved / bandwidth * 1e3)

    # decode: first reasoning step, 51 slots per user
    cache.set_lengths(lengths)
    qd, kd, vd = (torch.randn(B, H, D, device=device).to(dtype) for _ in range(3))
    out = torch.empty(B, H, D, dtype=dtype, device=device)
    step = lambda: decode_attention(qd, kd, vd, cache, 0, backend="triton", out=out)  # noqa: E731
    ours = do_bench(step)
    n = L + 1
    keys, values = cache.keys[0, :, :, :n], cache.values[0, :, :, :n]
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool, device=device)
    sdpa_step = lambda: F.scaled_dot_product_attention(qd[:, :, None], keys, values, attn_mask=mask)  # noqa: E731
    sdpa = do_bench(sdpa_step)
    moved = (2 * B * H * L * D + 3 * B * H * D + 2 * B * H * D + B * H * D) * es  # K/V history; q,k,v; k,v; out
    floor_ms = moved / bandwidth * 1e3
    row("decode (triton, eager)", ours, "torch sdpa masked (no cache write)", sdpa)
    row("decode (triton, eager)", ours, f"bytes floor {moved / 1e6:.2f} MB", floor_ms)
    try:
        graphed = do_bench_cudagraph(step)
        row("decode (triton, cuda graph)", graphed, f"bytes floor {moved / 1e6:.2f} MB", floor_ms)
        row("decode (triton, cuda graph)", graphed, "torch sdpa masked, cuda graph", do_bench_cudagraph(sdpa_step))
    except Exception as exc:  # noqa: BLE001 - a capture problem is worth a row, not a crash
        rows.append({"op": "decode (cuda graph)", "shape": shape, "dtype": dtype_name,
                     "check": f"FAIL {type(exc).__name__}: {exc}"[:300]})

    # launch-config sweep against the defaults
    default_pre = attention_triton.prefill_config(D, dtype)
    pre_ms = do_bench(lambda: attention_triton.prefill_attention(q, k, v, lengths, cache, 0, config=default_pre))
    for bm, bn, warps, stages in [(32, 32, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2),
                                  (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3)]:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        _sweep_row(rows, f"prefill config {bm}x{bn} w{warps} s{stages}", shape, dtype_name, pre_ms, lambda: do_bench(
            lambda: attention_triton.prefill_attention(q, k, v, lengths, cache, 0, config=cfg)), default_pre)
    default_dec = attention_triton.decode_config(D, dtype)
    dec_ms = do_bench(lambda: attention_triton.decode_attention(qd, kd, vd, cache, 0, out=out, config=default_dec))
    for bn, warps, stages in [(16, 4, 2), (32, 4, 2), (64, 2, 2), (64, 4, 1), (64, 4, 3), (64, 8, 2), (128, 4, 2),
                              (128, 8, 2)]:
        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
        _sweep_row(rows, f"decode config {bn} w{warps} s{stages}", shape, dtype_name, dec_ms, lambda: do_bench(
            lambda: attention_triton.decode_attention(qd, kd, vd, cache, 0, out=out, config=cfg)), default_dec)


def _sweep_row(rows, op, shape, dtype_name, default_ms, time_it, default_cfg):
    try:
        ms = time_it()
        rows.append({"op": op, "shape": shape, "dtype": dtype_name, "ms": round(ms, 5),
                     "vs": f"default {default_cfg}", "vs_ms": round(default_ms, 5),
                     "ratio": round(ms / default_ms, 3), "check": "ok"})
    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a large tile: not a bug
        rows.append({"op": op, "shape": shape, "dtype": dtype_name,
                     "check": f"skipped: {type(exc).__name__}: {str(exc)[:200]}"})


def run(rows: list) -> None:
    """Appends the attention parity checks and timings to ``rows``; see the module docstring."""
    if not torch.cuda.is_available():
        rows.append({"op": "attention", "check": "skipped: no CUDA device"})
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        rows.append({"op": "attention", "check": "skipped: TRITON_INTERPRET is set (unset it for compiled kernels)"})
        return
    device = torch.device("cuda")
    for dtype_name, dtype in DTYPES.items():
        for B, L, H, D in PARITY_SHAPES:
            try:
                _parity(rows, B, L, H, D, dtype_name, dtype, device)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other checks
                rows.append({"op": "parity", "shape": _shape(B, L, H, D), "dtype": dtype_name,
                             "check": f"FAIL {type(exc).__name__}: {exc}"[:300],
                             "trace": traceback.format_exc()[-1500:]})
    try:
        bandwidth = _bandwidth_bytes_per_s(device)
        rows.append({"op": "device-to-device copy (bandwidth)", "shape": "1 GiB", "dtype": "fp32",
                     "check": f"{bandwidth / 1e9:.0f} GB/s (read + write)"})
    except Exception as exc:  # noqa: BLE001
        rows.append({"op": "bandwidth", "check": f"FAIL {type(exc).__name__}: {exc}"[:300]})
        return
    for dtype_name, dtype in DTYPES.items():
        try:
            _timings(rows, dtype_name, dtype, device, bandwidth)
        except Exception as exc:  # noqa: BLE001
            rows.append({"op": "timings", "shape": _shape(*SERVING), "dtype": dtype_name,
                         "check": f"FAIL {type(exc).__name__}: {exc}"[:300],
                         "trace": traceback.format_exc()[-1500:]})
