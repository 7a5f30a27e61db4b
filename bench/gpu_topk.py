"""GPU check of fused top-K scoring: compiled parity, a CUDA-graph capture, N = 10**7, timings, peers.

``run(ctx)`` emits rows through ``ctx`` (bench/gpu_common.py) as it measures them:

* parity against the PyTorch reference on integer-valued inputs (every dot product exact in float32
  whatever the order): indices AND values identical, per table dtype, with exclusions, k = 1, k > N,
  k = 1024, ragged N, B = 257, and an all-equal table (every item ties: the fallback kernel);
* Gaussian inputs: values close and >= 99% of indices equal (near-ties may flip between two orders);
* capture: ``fused_topk`` captured in one CUDA graph, replayed on different queries, bit for bit
  against eager calls (the op makes no host sync);
* N = 10**7, B = 4, d = 256 bf16 (N * d > 2**31: int64 offsets), the best items at the table's end;
* timings (vs ``torch.mm`` + ``torch.topk`` in the table's dtype, and the table-read floor); target:
  (256, 1M, 256, 100) bf16 >= 3x faster than mm + topk. Full mode: more shapes and FAISS GPU
  ``IndexFlatIP`` (skipped when faiss is not importable).

With ``ctx.tiny`` (CPU, TRITON_INTERPRET=1) every shape is tiny and runs in the interpreter.
"""
from __future__ import annotations

import random

import torch

SECTION = "topk"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGET_SHAPE = (256, 1_000_000, 256, 100)


def parity_cases(ctx):  # (B, N, d, k, M exclusions per row)
    if ctx.tiny:
        return [(3, 500, 16, 5, 2), (2, 90, 8, 100, 0)]
    cases = [(3, 1_000, 32, 5, 0), (1, 5_003, 128, 1, 0), (4, 300, 32, 400, 3), (257, 100_003, 64, 100, 20)]
    if ctx.full:
        cases += [(16, 1_000_003, 256, 1024, 50), (8, 20_000, 256, 1000, 500)]
    return cases


def timing_shapes(ctx):
    if ctx.tiny:
        return [(2, 300, 16, 5)]
    shapes = [TARGET_SHAPE, (1, 1_000_000, 256, 100)]
    if ctx.full:
        shapes += [(256, 50_000, 256, 20), (16, 1_000_000, 256, 100), (64, 1_000_000, 256, 100)]
    return shapes


def _ints(shape, gen, device, dtype):
    return torch.randint(-3, 4, shape, generator=gen).to(device=device, dtype=dtype)


def reference(q, e, k, **options):
    """The plain PyTorch implementation of the op, through the dispatcher (checks included)."""
    from rearec_kernels.topk import fused_topk

    return fused_topk(q, e, k, backend="reference", **options)


def _same(v, i, rv, ri) -> str:
    bad = int((i != ri).any(dim=1).sum())
    if bad:
        return f"FAIL {bad}/{i.shape[0]} rows with different indices"
    return "ok" if torch.equal(v, rv) else "FAIL values differ"


def parity(ctx, seed):
    from rearec_kernels import topk_triton
    from rearec_kernels.topk import fused_topk
    gen = torch.Generator().manual_seed(seed)
    fallback = 0
    for B, N, d, k, M in parity_cases(ctx):
        for name, dtype in DTYPES.items():
            if dtype != torch.float32 and N > 200_000:
                continue
            shape = f"B={B} N={N} d={d} k={k} M={M}"
            try:
                q, e = _ints((B, d), gen, ctx.device, dtype), _ints((N, d), gen, ctx.device, dtype)
                ex = torch.randint(-1, N, (B, M), generator=gen).to(ctx.device) if M else None
                v, i = fused_topk(q, e, k, exclude=ex, backend="triton")
                rows = topk_triton.diagnostics["fallback_rows"]
                fallback += int(rows) if rows is not None else 0
                ctx.emit(SECTION, op="parity vs reference (exact)", shape=shape, dtype=name,
                         check=_same(v, i, *reference(q, e, k, exclude=ex)) + f" seed={seed}")
            except Exception as exc:  # noqa: BLE001 - a failure is a row, the other cases still run
                ctx.failure(SECTION, "parity vs reference (exact)", exc, shape=shape, dtype=name)

    B, N = (1, 400) if ctx.tiny else (5, 10_000)  # the interpreter: seconds per fallback row (N=400: one)
    e = torch.ones(N, 64, device=ctx.device)
    q = torch.randint(1, 4, (B, 64), generator=gen).float().to(ctx.device)  # every score exactly equal
    _, i = fused_topk(q, e, 50, backend="triton")
    took = topk_triton.diagnostics["fallback_rows"]
    ok = torch.equal(i.cpu(), torch.arange(50).expand(B, 50))
    ctx.emit(SECTION, op="all-equal table: items 0..k-1", shape=f"B={B} N={N} d=64 k=50", dtype="fp32",
             check=("ok" if ok else "FAIL tie order") + f" (fallback rows {int(took) if took is not None else 0}, "
                   f"parity cases before: {fallback})")

    B, N, d, k = (3, 600, 16, 10) if ctx.tiny else (64, 1_000_000, 256, 100)
    for name, dtype in DTYPES.items():
        q = torch.randn(B, d, generator=gen).to(ctx.device)
        e = torch.randn(N, d, generator=gen).to(ctx.device).to(dtype)
        ex = torch.randint(-1, N, (B, 10), generator=gen).to(ctx.device)
        v, i = fused_topk(q, e, k, scale=0.125, exclude=ex, backend="triton")
        rv, ri = reference(q.to(dtype), e, k, scale=0.125, exclude=ex)  # the kernel's query rounding
        close = torch.allclose(v, rv, rtol=1e-4, atol=1e-4)
        agree = float((i == ri).float().mean())
        ctx.emit(SECTION, op="parity vs reference (gaussian)", shape=f"B={B} N={N} d={d} k={k} M=10", dtype=name,
                 check="ok" if close and agree >= 0.99 else f"FAIL values close={close}, indices agree {agree:.3f}")


def graph_capture(ctx):
    """fused_topk inside one CUDA graph, replayed on new queries: bit for bit against eager calls."""
    from rearec_kernels.topk import fused_topk

    if not ctx.cuda:
        ctx.emit(SECTION, op="CUDA graph capture + replay", check="skipped: needs CUDA (tests/test_topk_triton.py "
                                                                  "checks the op reads nothing back)")
        return
    B, N, d, k = 64, 200_000, 256, 100
    gen = torch.Generator(device=ctx.device).manual_seed(5)
    e = torch.randn(N, d, device=ctx.device, generator=gen).to(torch.bfloat16)
    ex = torch.randint(-1, N, (B, 20), device=ctx.device, generator=gen)
    static_q = torch.randn(B, d, device=ctx.device, generator=gen)
    fused_topk(static_q, e, k, exclude=ex, backend="triton")  # compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_topk(static_q, e, k, exclude=ex, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_v, out_i = fused_topk(static_q, e, k, exclude=ex, backend="triton")
    same = True
    for _ in range(3):
        static_q.copy_(torch.randn(B, d, device=ctx.device, generator=gen))
        graph.replay()
        v, i = fused_topk(static_q, e, k, exclude=ex, backend="triton")
        same &= torch.equal(v, out_v) and torch.equal(i, out_i)
    replay_ms = ctx.ms(graph.replay)
    eager_ms = ctx.ms(lambda: fused_topk(static_q, e, k, exclude=ex, backend="triton"))
    ctx.emit(SECTION, op="CUDA graph replay, 3 new query sets", shape=f"B={B} N={N} d={d} k={k} M=20", dtype="bf16",
             ms=replay_ms, vs="eager call", vs_ms=eager_ms, ratio=replay_ms / eager_ms,
             check="ok (bit for bit)" if same else "FAIL replay differs from eager")


def ten_million(ctx):
    """N * d > 2**31 elements: int64 offsets; the winners sit at the end of the table."""
    from rearec_kernels.topk import fused_topk

    B, N, d, k = (4, 1_500, 16, 20) if ctx.tiny else (4, 10_000_000, 256, 100)
    gen = torch.Generator(device=ctx.device).manual_seed(3)
    e = torch.randint(-2, 3, (N, d), device=ctx.device, generator=gen, dtype=torch.int8).to(torch.bfloat16)
    q = torch.randint(-2, 3, (B, d), device=ctx.device, generator=gen, dtype=torch.int8).to(torch.bfloat16)
    e[-7:] = q[0].sign().repeat(7, 1) * 2  # row 0's best items: the last 7 of the table
    v, i = fused_topk(q, e, k, backend="triton")
    # Reference in slices (exact: small integers; ties by index within each), merged by (value, -index).
    best_v, best_i = [], []
    for n0 in range(0, N, 1_000_000):
        sv, si = reference(q, e[n0:n0 + 1_000_000], k)
        best_v.append(sv)
        best_i.append(si + n0)
    vals, idx = torch.cat(best_v, 1), torch.cat(best_i, 1)  # slices in index order: a stable sort keeps it
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    rv, ri = vals.gather(1, order), idx.gather(1, order)
    check = _same(v, i, rv, ri)
    tail = bool((i[0, :7] >= N - 7).all())
    ms = ctx.ms(lambda: fused_topk(q, e, k, backend="triton"))
    ctx.emit(SECTION, op="N=10^7 (int64 offsets)", shape=f"B={B} N={N} d={d} k={k}", dtype="bf16", ms=ms,
             check=check if tail or not check.startswith("ok") else "FAIL the table's last items were missed")


def timings(ctx, bandwidth):
    from rearec_kernels.topk import fused_topk

    for B, N, d, k in timing_shapes(ctx):
        for name in (DTYPES if ctx.full else ("fp32", "bf16")):
            dtype = DTYPES[name]
            shape = f"B={B} N={N} d={d} k={k}"
            try:
                g = torch.Generator(device=ctx.device).manual_seed(B + N)
                q = torch.randn(B, d, device=ctx.device, generator=g).to(dtype)
                e = torch.randn(N, d, device=ctx.device, generator=g).to(dtype)
                ms = ctx.ms(lambda: fused_topk(q, e, k, backend="triton"))
                mm_ms = ctx.ms(lambda: torch.topk(q @ e.t(), k, dim=1))
                floor_ms = N * d * e.element_size() / bandwidth * 1e3
                is_target = (B, N, d, k) == TARGET_SHAPE and name == "bf16"
                speedup = mm_ms / ms
                ctx.emit(SECTION, op="fused_topk", shape=shape, dtype=name, ms=ms, vs="torch mm + topk", vs_ms=mm_ms,
                         ratio=speedup, target=">=3x faster" if is_target else None,
                         check=("ok" if speedup >= 3 else "MISS") if is_target else "measured")
                ctx.emit(SECTION, op="fused_topk", shape=shape, dtype=name, ms=ms, vs="table read floor",
                         vs_ms=floor_ms, ratio=ms / floor_ms, check="measured")
                if ctx.full and name == "fp32":
                    faiss_row(ctx, q, e, k, ms, shape)
                del q, e
                if ctx.cuda:
                    torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                ctx.failure(SECTION, "fused_topk timing", exc, shape=shape, dtype=name)


def faiss_row(ctx, q, e, k, ours_ms, shape):
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401 - lets faiss take torch CUDA tensors
    except Exception as exc:  # noqa: BLE001
        ctx.emit(SECTION, op="FAISS GPU IndexFlatIP", shape=shape, dtype="fp32",
                 check=f"skipped: faiss not importable ({type(exc).__name__}); pip install faiss-gpu-cuvs")
        return
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatIP(res, e.shape[1])
    index.add(e)
    peer_ms = ctx.ms(lambda: index.search(q, k))
    ctx.emit(SECTION, op="fused_topk", shape=shape, dtype="fp32", ms=ours_ms, vs="FAISS GPU IndexFlatIP",
             vs_ms=peer_ms, ratio=peer_ms / ours_ms, check="measured")


def run(ctx) -> None:
    """Every top-K row (see the module docstring)."""
    seed = random.randrange(2 ** 31)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be IEEE float32 too
    try:
        ctx.guarded(SECTION, "parity", parity, ctx, seed)
        ctx.guarded(SECTION, "CUDA graph capture", graph_capture, ctx)
        ctx.guarded(SECTION, "N=10^7", ten_million, ctx)
        from gpu_common import bandwidth_bytes_per_s

        bandwidth = bandwidth_bytes_per_s(ctx)
        ctx.guarded(SECTION, "timings", timings, ctx, bandwidth)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
