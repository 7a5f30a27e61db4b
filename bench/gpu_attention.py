"""GPU check of the attention kernels: compiled parity against float64, guard regions, timings, peers.

``run(ctx)`` emits rows through ``ctx`` (bench/gpu_common.py) as it measures them:

* parity, per dtype and shape: the Triton prefill (with cache write) and DEPTH decode steps against
  the float64 reference; outputs and cache NaN-poisoned first, so unwritten or stray slots show;
* guard regions: the cache is a view into a larger buffer whose guard slots (before and after each
  user's slots, and around the whole buffer) must be untouched after prefill and decode steps that
  fill the cache to the last slot -- and, on CUDA where the op checks no lengths, after decode steps
  given out-of-range lengths (negative, = capacity, past capacity);
* timings at the serving shape (B=256, L=50, H=2, Dh=128): decode (eager and CUDA graph) against the
  bytes-moved floor and a measured launch floor -- target: >= 50% of the measured bandwidth, or
  within 2x of the launch floor -- and prefill against torch SDPA (flash backend for 16-bit);
* peer in the full mode: FlashInfer batch decode over the same cache (skipped when not installed).

With ``ctx.tiny`` (CPU, TRITON_INTERPRET=1) everything runs on tiny shapes in the interpreter, so the
script cannot rot; its timings mean nothing.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}  # atol, rtol
SERVING = (256, 50, 2, 128)  # B, L, H, Dh
DEPTH = 4  # decode steps per parity check
SECTION = "attention"


def _shape(B, L, H, D) -> str:
    return f"B={B} L={L} H={H} Dh={D}"


def parity_shapes(ctx):
    if ctx.tiny:
        return [(3, 9, 2, 16), (2, 17, 1, 32)]
    if ctx.full:
        return [SERVING, (33, 37, 3, 80), (4, 200, 2, 256), (5, 130, 1, 16)]
    return [SERVING, (33, 37, 3, 80)]


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


def _within(got: torch.Tensor, want: torch.Tensor, dtype) -> tuple:
    """(within tolerance everywhere, max abs error); NaN anywhere fails."""
    atol, rtol = TOL[dtype]
    got = got.double()
    err = (got - want).abs()
    ok = bool(torch.isfinite(got).all()) and bool((err <= atol + rtol * want.abs()).all())
    return ok, float(err.nan_to_num(float("inf")).max()) if err.numel() else 0.0


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def parity(ctx, B, L, H, D, dtype_name, dtype):
    from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv
    from rearec_kernels.kv_cache import KVCache

    device, shape = ctx.device, _shape(B, L, H, D)
    qkv, lengths = _inputs(B, L, H, D, dtype, device, seed=B * 1000 + L)
    q, k, v = split_qkv(qkv, H)
    cache = KVCache.allocate(2, B, H, L + DEPTH, D, dtype=dtype, device=device)
    cache.keys.fill_(float("nan"))
    cache.values.fill_(float("nan"))
    ref_cache = KVCache(cache.keys.double(), cache.values.double(), cache.lengths.clone())

    out = torch.full((B, L, H, D), float("nan"), dtype=dtype, device=device)
    prefill_attention(q, k, v, lengths, cache, 1, backend="triton", out=out)
    want = prefill_attention(q.double(), k.double(), v.double(), lengths, ref_cache, 1, backend="reference")
    ctx.sync()
    ok, err = _within(out, want, dtype)
    padding = torch.arange(L, device=device)[None, :] >= lengths[:, None]
    ok = ok and bool((out[padding] == 0).all())
    cache_ok = _same_bits(cache.keys, ref_cache.keys) and _same_bits(cache.values, ref_cache.values)
    ctx.emit(SECTION, op="prefill parity vs float64", shape=shape, dtype=dtype_name,
             check="ok" if ok and cache_ok else f"FAIL max err {err:.3g}" + ("" if cache_ok else " (cache differs)"))

    cache.set_lengths(lengths)
    ref_cache.set_lengths(lengths)
    gen = torch.Generator(device=device).manual_seed(7)
    worst, ok = 0.0, True
    for _ in range(DEPTH):
        qd, kd, vd = (torch.randn(B, H, D, device=device, generator=gen).to(dtype) for _ in range(3))
        got = torch.full((B, H, D), float("nan"), dtype=dtype, device=device)
        decode_attention(qd, kd, vd, cache, 1, backend="triton", out=got)
        want = decode_attention(qd.double(), kd.double(), vd.double(), ref_cache, 1, backend="reference")
        step_ok, err = _within(got, want, dtype)
        ok, worst = ok and step_ok, max(worst, err)
        cache.advance()
        ref_cache.advance()
    ctx.sync()
    cache_ok = _same_bits(cache.keys, ref_cache.keys) and _same_bits(cache.values, ref_cache.values)
    ctx.emit(SECTION, op=f"decode parity vs float64 ({DEPTH} steps)", shape=shape, dtype=dtype_name,
             check="ok" if ok and cache_ok else f"FAIL max err {worst:.3g}" + ("" if cache_ok else " (cache differs)"))


def guarded_cache(n_layers, B, H, capacity, D, dtype, device, guard=8, fill=1234.5):
    """A KVCache whose keys/values are views into buffers with ``guard`` extra slots before and after
    each user's slots and ``guard`` rows of slots around each whole buffer; returns (cache, check) where
    ``check()`` says whether every guard slot still holds ``fill``."""
    from rearec_kernels.kv_cache import KVCache

    def buffer():
        rows = n_layers * B * H * (capacity + 2 * guard) * D
        flat = torch.full((rows + 2 * guard * D,), fill, dtype=dtype, device=device)
        inner = flat[guard * D: guard * D + rows].view(n_layers, B, H, capacity + 2 * guard, D)
        return flat, inner

    (kflat, kin), (vflat, vin) = buffer(), buffer()
    cache = KVCache(kin[:, :, :, guard:guard + capacity], vin[:, :, :, guard:guard + capacity],
                    torch.zeros(B, dtype=torch.int32, device=device))

    def untouched() -> bool:
        for flat, inner in ((kflat, kin), (vflat, vin)):
            if not bool((flat[:guard * D] == fill).all() and (flat[-guard * D:] == fill).all()):
                return False
            if not bool((inner[:, :, :, :guard] == fill).all() and (inner[:, :, :, guard + capacity:] == fill).all()):
                return False
        return True

    return cache, untouched


def guard_regions(ctx, dtype_name, dtype):
    from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv

    B, L, H, D = (3, 9, 2, 16) if ctx.tiny else (37, 50, 2, 128)
    capacity = L + 3
    qkv, lengths = _inputs(B, L, H, D, dtype, ctx.device, seed=11)
    q, k, v = split_qkv(qkv, H)
    cache, untouched = guarded_cache(2, B, H, capacity, D, dtype, ctx.device)
    for layer in range(2):
        prefill_attention(q, k, v, lengths, cache, layer, backend="triton")
    cache.set_lengths(lengths)
    cache.lengths[-1] = capacity - 1  # one user's last free slot
    step = torch.randn(3, B, H, D, device=ctx.device).to(dtype)
    decode_attention(step[0], step[1], step[2], cache, 1, backend="triton")
    ctx.sync()
    ok = untouched()
    ctx.emit(SECTION, op="guard regions: prefill + decode to the last slot", shape=_shape(B, L, H, D),
             dtype=dtype_name, check="ok" if ok else "FAIL a write landed outside the cache")
    if not ctx.cuda:
        ctx.emit(SECTION, op="guard regions: out-of-range lengths", dtype=dtype_name,
                 check="skipped: on CPU tensors the op rejects them (ValueError)")
        return
    bad = torch.tensor([-1, -5, capacity, capacity + 3, 0], dtype=torch.int32, device=ctx.device)
    cache.lengths.copy_(bad.repeat(B // len(bad) + 1)[:B])
    out = torch.zeros(B, H, D, dtype=dtype, device=ctx.device)
    decode_attention(step[0], step[1], step[2], cache, 1, backend="triton", out=out)
    ctx.sync()
    ok = untouched()
    ctx.emit(SECTION, op="guard regions: decode, lengths -1/-5/C/C+3", shape=_shape(B, L, H, D), dtype=dtype_name,
             check="ok" if ok else "FAIL an out-of-range length wrote outside the cache")


def timings(ctx, dtype_name, dtype, bandwidth, launch_ms):
    import torch.nn.functional as F

    from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv
    from rearec_kernels.kv_cache import KVCache

    B, L, H, D = (3, 9, 2, 16) if ctx.tiny else SERVING
    shape = _shape(B, L, H, D)
    es = torch.tensor([], dtype=dtype).element_size()
    qkv, lengths = _inputs(B, L, H, D, dtype, ctx.device, seed=1, mixed=False)
    q, k, v = split_qkv(qkv, H)
    cache = KVCache.allocate(1, B, H, L + DEPTH, D, dtype=dtype, device=ctx.device)

    def row(op, ms, vs=None, vs_ms=None, ratio=None, target=None, check="ok"):
        ctx.emit(SECTION, op=op, shape=shape, dtype=dtype_name, ms=ms, vs=vs, vs_ms=vs_ms, ratio=ratio,
                 target=target, check=check)

    prefill = lambda: prefill_attention(q, k, v, lengths, cache, 0, backend="triton")  # noqa: E731
    ours = ctx.ms(prefill)
    moved = 6 * B * L * H * D * es  # read q, k, v; write out and the cache's K, V
    row("prefill (triton, writes cache)", ours, f"bytes floor {moved / 1e6:.1f} MB", moved / bandwidth * 1e3,
        ratio=ours / (moved / bandwidth * 1e3))
    if ctx.cuda and dtype != torch.float32:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        sdpa_ms = ctx.ms(flash)
        row("prefill (triton, writes cache)", ours, "torch SDPA flash (no cache)", sdpa_ms, ratio=ours / sdpa_ms)
    else:
        row("prefill vs torch SDPA flash", None, check="skipped: flash SDPA needs CUDA and fp16/bf16")

    cache.set_lengths(lengths)
    qd, kd, vd = (torch.randn(B, H, D, device=ctx.device).to(dtype) for _ in range(3))
    out = torch.empty(B, H, D, dtype=dtype, device=ctx.device)
    step = lambda: decode_attention(qd, kd, vd, cache, 0, backend="triton", out=out)  # noqa: E731
    moved = (2 * B * H * L * D + 6 * B * H * D) * es  # K/V history; q, k, v in; k, v, out written
    floor_ms = moved / bandwidth * 1e3
    eager = ctx.ms(step)
    row("decode (triton, eager)", eager, f"bytes floor {moved / 1e6:.2f} MB", floor_ms, ratio=eager / floor_ms)
    graphed = ctx.ms(step, graph=ctx.cuda)
    meets = floor_ms / graphed >= 0.5 or graphed <= 2 * launch_ms
    row("decode (triton, CUDA graph)" if ctx.cuda else "decode (triton)", graphed,
        f"bytes floor {moved / 1e6:.2f} MB; launch floor", floor_ms, ratio=graphed / floor_ms,
        target=">=50% BW or <=2x launch", check=("ok" if meets else "MISS") +
        f" ({100 * floor_ms / graphed:.0f}% of BW, {graphed / launch_ms:.1f}x launch floor)")
    if ctx.full:
        flashinfer_decode(ctx, cache, qd, kd, vd, graphed, row)


def flashinfer_decode(ctx, cache, qd, kd, vd, ours_ms, row):
    """FlashInfer batch decode over the same cache: one page of ``capacity`` slots per user."""
    try:
        import flashinfer
    except Exception as exc:  # noqa: BLE001 - absent or broken: a skipped row
        row("FlashInfer decode", None, check=f"skipped: flashinfer not importable ({type(exc).__name__}); "
                                             "pip install flashinfer-python")
        return
    B, H, D = qd.shape
    C = cache.capacity
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=ctx.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
    indptr = torch.arange(B + 1, dtype=torch.int32, device=ctx.device)
    indices = torch.arange(B, dtype=torch.int32, device=ctx.device)
    last = (cache.lengths + 1).to(torch.int32)  # history + the new token (ours writes it first)
    wrapper.plan(indptr, indices, last, H, H, D, C, data_type=qd.dtype, q_data_type=qd.dtype)
    kv = (cache.keys[0], cache.values[0])  # (B, H, C, D) each: one page per user
    peer_ms = ctx.ms(lambda: wrapper.run(qd, kv), graph=False)
    row("decode (triton, CUDA graph)", ours_ms, "FlashInfer batch decode (eager)", peer_ms, ratio=ours_ms / peer_ms)


def run(ctx) -> None:
    """Every attention row: parity per dtype and shape, guard regions, timings (see the docstring)."""
    for dtype_name, dtype in DTYPES.items():
        for B, L, H, D in parity_shapes(ctx):
            ctx.guarded(SECTION, "parity", parity, ctx, B, L, H, D, dtype_name, dtype,
                        shape=_shape(B, L, H, D), dtype=dtype_name)
        ctx.guarded(SECTION, "guard regions", guard_regions, ctx, dtype_name, dtype, dtype=dtype_name)
    from gpu_common import bandwidth_bytes_per_s, launch_floor_ms

    bandwidth = bandwidth_bytes_per_s(ctx)
    launch_ms = launch_floor_ms(ctx)
    ctx.emit(SECTION, op="device copy bandwidth", shape="1 GiB" if ctx.cuda else "tiny",
             check=f"{bandwidth / 1e9:.0f} GB/s (read + write)")
    ctx.emit(SECTION, op="launch floor (graph of one tiny kernel)", ms=launch_ms, check="measured")
    for dtype_name in (DTYPES if ctx.full else ("fp32", "bf16")):
        ctx.guarded(SECTION, "timings", timings, ctx, dtype_name, DTYPES[dtype_name], bandwidth, launch_ms,
                    shape=_shape(*SERVING), dtype=dtype_name)
