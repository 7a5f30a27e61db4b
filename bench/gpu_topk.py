"""GPU check of fused top-K scoring: parity of the compiled Triton kernels, then timings.

``run(rows)`` appends one dict per check or timing to ``rows`` (and returns it):
``{"op", "shape", "dtype", "ms", "vs", "vs_ms", "ratio", "check"}`` where ``check`` is "ok" or
"FAIL <reason>". Importable without a GPU; without CUDA, ``run`` returns ``rows`` unchanged.

Parity (``op="fused_topk parity"``), Triton backend vs the PyTorch reference on the same GPU:
* integer-valued inputs (every dot product exact in float32, whatever the summation order): indices
  AND values identical, for float32, float16 and bfloat16 tables, with exclusions, k = 1, k > N,
  k = 1024, N not a multiple of any tile, B = 257, and an all-equal table (ties, list overflow);
* Gaussian inputs: float32 values close and >= 99% of indices equal (float32 near-ties may flip
  between two summation orders); float16/bfloat16 tables: values close to the reference computed
  on the queries rounded to the table's dtype (what the kernel feeds its tensor-core dot).

Timings (``triton.testing.do_bench``, median ms), for each shape and table dtype:
* ``vs="torch mm+topk"``: ``torch.topk(queries @ table.T, k)`` in the table's dtype;
  ``ratio`` = vs_ms / ms (> 1: fused is faster);
* ``vs="table read floor"``: N * d * bytes / bandwidth, the bandwidth measured in the same run by a
  1 GiB device-to-device copy (2 bytes moved per byte copied); ``ratio`` = ms / floor_ms (>= 1).
"""
from __future__ import annotations

import random

SHAPES = [  # (B, N, d, k): the CPU benchmark's three, then small batches
    (1, 1_000_000, 256, 100),
    (256, 1_000_000, 256, 100),
    (256, 50_000, 256, 20),
    (16, 1_000_000, 256, 100),
    (64, 1_000_000, 256, 100),
]
PARITY = [  # (B, N, d, k, M exclusions per row)
    (3, 1_000, 32, 5, 0),
    (1, 5_003, 128, 1, 0),
    (4, 300, 32, 400, 3),            # k > N
    (257, 100_003, 64, 100, 20),     # B = 257, ragged N, exclusions
    (16, 1_000_003, 256, 1024, 50),  # k = 1024
    (8, 20_000, 256, 1000, 500),     # many exclusions: k_eff close to N / G
]
GAUSS_N = 1_000_000


def _grid(B, N, d, M, dtype, gen, device):
    import torch
    q = torch.randint(-3, 4, (B, d), generator=gen).to(device=device, dtype=dtype)
    e = torch.randint(-3, 4, (N, d), generator=gen).to(device=device, dtype=dtype)
    ex = torch.randint(-1, N, (B, M), generator=gen).to(device) if M else None
    return q, e, ex


def _parity(rows, torch, fused_topk, reference, topk_triton, dev="cuda"):
    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)

    def record(shape, dtype, check):
        rows.append(dict(op="fused_topk parity", shape=shape, dtype=str(dtype).replace("torch.", ""),
                         ms=None, vs="reference", vs_ms=None, ratio=None, check=check))

    for B, N, d, k, M in PARITY:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if dtype != torch.float32 and N > 200_000:
                continue
            shape = f"B={B} N={N} d={d} k={k} M={M}"
            try:
                q, e, ex = _grid(B, N, d, M, dtype, gen, dev)
                v, i = fused_topk(q, e, k, exclude=ex, backend="triton")
                rv, ri = reference(q, e, k, 1.0, ex)
                if q.is_cuda:
                    torch.cuda.synchronize()
                bad = (i != ri).any(dim=1).sum().item()
                if bad:
                    check = f"FAIL seed={seed}: {bad}/{B} rows with different indices"
                elif not torch.equal(v, rv):
                    check = f"FAIL seed={seed}: values differ"
                else:
                    check = "ok"
            except Exception as exc:  # a failure is a row, not a crash of the whole check
                check = f"FAIL seed={seed}: {type(exc).__name__}: {exc}"
            record(shape, dtype, check)

    # Ties everywhere: items 0..k-1 must come back, in order.
    try:
        e = torch.ones(10_000, 64, device=dev)
        q = torch.randint(1, 4, (5, 64), device=dev).float()  # integers: every score exactly equal
        _, i = fused_topk(q, e, 50, backend="triton")
        ok = torch.equal(i.cpu(), torch.arange(50).expand(5, 50))
        record("all-equal table N=10000 d=64 k=50", torch.float32, "ok" if ok else "FAIL tie order")
    except Exception as exc:
        record("all-equal table", torch.float32, f"FAIL {type(exc).__name__}: {exc}")

    # Gaussian inputs.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        shape = f"B=64 N={GAUSS_N} d=256 k=100 M=10, scale=0.125"
        try:
            q = torch.randn(64, 256, device=dev)
            e = torch.randn(GAUSS_N, 256, device=dev).to(dtype)
            ex = torch.randint(-1, GAUSS_N, (64, 10), device=dev)
            v, i = fused_topk(q, e, 100, scale=0.125, exclude=ex, backend="triton")
            rv, ri = reference(q.to(dtype), e, 100, 0.125, ex)  # the kernel's query rounding
            torch.testing.assert_close(v, rv, rtol=1e-4, atol=1e-4)
            agree = (i == ri).float().mean().item()
            check = "ok" if agree >= 0.99 else f"FAIL seed={seed}: only {agree:.3f} of indices agree"
        except Exception as exc:
            check = f"FAIL seed={seed}: {type(exc).__name__}: {str(exc)[:300]}"
        record(shape, dtype, check)

    slow = dict(topk_triton.stats)
    rows.append(dict(op="fused_topk slow paths", shape="all parity calls", dtype="-", ms=None, vs=None,
                     vs_ms=None, ratio=None,
                     check=f"ok (capacity reruns={slow['capacity_reruns']}, "
                           f"certificate rows={slow['certificate_rows']})"))


def _bandwidth(torch, do_bench):
    """Device bytes/s from a 1 GiB device-to-device copy (read + write)."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").fill_(1.0)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)
    del x, y
    return bw


def _timings(rows, torch, fused_topk, do_bench):
    bw = _bandwidth(torch, do_bench)
    rows.append(dict(op="d2d copy bandwidth", shape="1 GiB", dtype="float32", ms=None, vs=None, vs_ms=None,
                     ratio=None, check=f"ok ({bw / 1e9:.0f} GB/s)"))
    for B, N, d, k in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            shape = f"B={B} N={N} d={d} k={k}"
            name = str(dtype).replace("torch.", "")
            try:
                g = torch.Generator(device="cuda").manual_seed(B + N)
                q = torch.randn(B, d, device="cuda", generator=g).to(dtype)
                e = torch.randn(N, d, device="cuda", generator=g).to(dtype)
                v, _ = fused_topk(q, e, k, backend="triton")
                rv = torch.topk((q.float() @ e.float().t()), k, dim=1).values
                close = torch.allclose(v, rv, rtol=2e-2, atol=2e-2)  # loose: sanity only
                ms = do_bench(lambda: fused_topk(q, e, k, backend="triton"), warmup=10, rep=100)
                mm_ms = do_bench(lambda: torch.topk(q @ e.t(), k, dim=1), warmup=10, rep=100)
                floor_ms = N * d * e.element_size() / bw * 1e3
                check = "ok" if close else "FAIL values differ from mm+topk"
                rows.append(dict(op="fused_topk", shape=shape, dtype=name, ms=round(ms, 4), vs="torch mm+topk",
                                 vs_ms=round(mm_ms, 4), ratio=round(mm_ms / ms, 2), check=check))
                rows.append(dict(op="fused_topk", shape=shape, dtype=name, ms=round(ms, 4), vs="table read floor",
                                 vs_ms=round(floor_ms, 4), ratio=round(ms / floor_ms, 2), check=check))
                del q, e
                torch.cuda.empty_cache()
            except Exception as exc:
                rows.append(dict(op="fused_topk", shape=shape, dtype=name, ms=None, vs=None, vs_ms=None,
                                 ratio=None, check=f"FAIL {type(exc).__name__}: {str(exc)[:300]}"))


def run(rows: list) -> list:
    import torch
    if not torch.cuda.is_available():
        return rows
    from triton.testing import do_bench

    from rearec_kernels import topk_triton
    from rearec_kernels.topk import fused_topk
    from rearec_kernels.topk_reference import fused_topk_reference

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be IEEE float32 too
    try:
        _parity(rows, torch, fused_topk, fused_topk_reference, topk_triton)
        _timings(rows, torch, fused_topk, do_bench)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows


if __name__ == "__main__":
    for row in run([]):
        print(row)
