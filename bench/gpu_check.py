"""One script for a CUDA machine: compiled kernels, parity, graphs, guards, timings, peers, a table.

    python bench/gpu_check.py --quick          # <= 3 minutes, compiles included
    python bench/gpu_check.py                  # full: <= 8 minutes, peers side by side
    python bench/gpu_check.py --device cpu --tiny   # the same code on tiny shapes in Triton's
                                                    # interpreter (tests/test_gpu_check.py runs it)

Every row is printed the moment it is measured (a run cut short still reports), then all of them
again in a final table, and last the FAIL and MISS rows alone (the end of a long output is what a
remote runner returns). ``--out DIR`` (default: ``$OUT`` when set) keeps ``gpu_check.json`` (the rows,
rewritten after each one) and ``gpu_check.log`` (every printed line) there as the run goes; ``--json
PATH`` also writes the rows at the end. Each section runs under try/except: an
error prints its traceback, becomes a FAIL row, and the next section runs. Exit status 1 when a row
FAILs (a performance target not met is a MISS, not a failure), 2 when no CUDA device is present.

Sections: versions; kernel variants (registers, spills, shared memory: bench/kernel_variants.py in a
subprocess); attention (bench/gpu_attention.py); top-K (bench/gpu_topk.py); the engine: parity with
``ReaRec`` (float32; fp16/bf16 against float32), CUDA-graphed against eager calls bit for bit on
DIFFERENT inputs of one shape, the first call against a replay when the longest history changes,
two threads sharing one engine, and latency against depth with the targets (B=256: depth 2 / depth 0
<= 1.1; B=1 graph replay <= 1 ms), and guards written without a GPU (the session cache from a
thread on a side stream, CUDA item features given to a CPU model, the CE target check on CUDA's
PyTorch paths).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from gpu_common import Context, format_row, print_table  # noqa: E402
from rearec.runs import write_json  # noqa: E402

SECTION = "engine"


# ---------------------------------------------------------------------------------------------- versions

def versions(ctx: Context) -> None:
    import triton

    lines = [f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}  "
             f"CUDA (torch build) {torch.version.cuda}"]
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        driver = "unknown"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - no nvidia-smi: the driver line says unknown
            pass
        lines.append(f"GPU {props.name}  sm_{props.major}{props.minor}  {props.total_memory / 2 ** 30:.0f} GiB  "
                     f"{props.multi_processor_count} SMs  driver {driver}")
    else:
        lines.append(f"device {ctx.device} (no GPU: Triton interpreter, TRITON_INTERPRET="
                     f"{os.environ.get('TRITON_INTERPRET', '')})")
    lines.append(f"mode {ctx.mode}")
    for line in lines:
        ctx.out(line)


# ---------------------------------------------------------------------------------------------- variants

def kernel_variants(ctx: Context) -> None:
    """Registers, spills and shared memory of every compiled variant, for this GPU's architecture."""
    if ctx.tiny:
        ctx.emit("variants", op="compiled kernel variants",
                 check="skipped in --tiny: tests/test_gpu_compile.py compiles them for sm_90/sm_80")
        return
    major, minor = torch.cuda.get_device_capability(ctx.device)
    arch = str(major * 10 + minor)
    out = os.path.join(tempfile.mkdtemp(prefix="rearec-variants-"), "rows.json")
    flag = "--arch" if ctx.full else "--serving-arch"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "kernel_variants.py"), flag, arch, "--json", out],
                         env=env, capture_output=True, text=True, timeout=420 if ctx.full else 180)
    if not os.path.exists(out):
        raise RuntimeError(f"kernel_variants.py wrote no rows (exit {run.returncode}): {run.stderr[-600:]}")
    with open(out) as f:
        for row in json.load(f):
            cx = " ".join(f"{k}={v}" for k, v in row.get("constexprs", {}).items())
            ctx.emit("variants", op=f"{row['kernel'].lstrip('_')} {row['op']}", shape=row["shape"],
                     dtype=row["dtype"], vs=cx, check=f"{row['check']} regs={row.get('regs')} "
                     f"spills={row.get('spills')} B shared={row.get('shared')}/{row.get('shared_limit')} B "
                     f"w{row.get('warps')} s{row.get('stages')}")


# ---------------------------------------------------------------------------------------------- engine

def make_engine(model, **options):
    """``FastReaRec.from_model`` with keyword options, or a clear error naming what it lacks."""
    from rearec.engine import FastReaRec

    try:
        return FastReaRec.from_model(model, **options)
    except TypeError as exc:
        raise RuntimeError(f"FastReaRec.from_model does not take {sorted(options)} ({exc}); "
                           "cuda_graphs= comes with the serving change to rearec/engine.py") from None


def engine_model(ctx: Context, serving: bool = False):
    from rearec import ReaRec, ReaRecConfig

    torch.manual_seed(0)
    if ctx.tiny:
        cfg = ReaRecConfig(n_items=60, hidden_size=32, n_heads=2, inner_size=40, max_len=8, reason_steps=2)
    elif serving:
        cfg = ReaRecConfig(n_items=50_000, hidden_size=256, n_heads=2, inner_size=300, max_len=50, reason_steps=8)
    else:
        cfg = ReaRecConfig(n_items=5000, hidden_size=128, n_heads=2, inner_size=160, max_len=50, reason_steps=4)
    return ReaRec(cfg).eval().to(ctx.device)


def histories(cfg, batch: int, seed: int, longest: int = None):
    """A ragged batch: lengths in 1..longest (default max_len), one user exactly ``longest``."""
    g = torch.Generator().manual_seed(seed)
    longest = longest or cfg.max_len
    lengths = torch.randint(1, longest + 1, (batch,), generator=g)
    lengths[0] = longest
    return [torch.randint(1, cfg.n_items, (int(n),), generator=g).tolist() for n in lengths]


def engine_parity(ctx: Context) -> None:
    model = engine_model(ctx)
    cfg = model.config
    batch = histories(cfg, 3 if ctx.tiny else 37, seed=1)
    backend = "triton"
    engine = make_engine(model, device=ctx.device, backend=backend)
    worst, same = 0.0, True
    for depth in range(cfg.reason_steps + 1):
        got = engine.reasoning_states(batch, depth=depth)
        worst = max(worst, float((got - model.reasoning_states(batch, depth=depth)).abs().max()))
        for readout in ("last", "mean"):
            mine = engine.recommend(batch, k=10, depth=depth, readout=readout).items.cpu()
            same &= torch.equal(mine, model.recommend(batch, k=10, depth=depth, readout=readout).items.cpu())
    ctx.emit(SECTION, op="parity with ReaRec, every depth", shape=f"B={len(batch)} ragged d={cfg.hidden_size}",
             dtype="fp32", check="ok" if worst < 1e-4 and same else f"FAIL max err {worst:.2e}, top-10 equal={same}")
    if not ctx.cuda:
        ctx.emit(SECTION, op="parity fp16/bf16 vs fp32", check="skipped: 16-bit engines need CUDA")
        return
    want = model.reasoning_states(batch)
    for name, dtype, tol in (("fp16", torch.float16, 5e-2), ("bf16", torch.bfloat16, 2e-1)):
        err = float((make_engine(model, device=ctx.device, dtype=dtype, backend=backend)
                     .reasoning_states(batch) - want).abs().max())
        ctx.emit(SECTION, op="parity vs fp32 ReaRec", shape=f"B={len(batch)} ragged", dtype=name,
                 check="ok" if err < tol else f"FAIL max err {err:.2e}")


def _timed(ctx: Context, fn):
    ctx.sync()
    start = time.perf_counter()
    out = fn()
    ctx.sync()
    return out, (time.perf_counter() - start) * 1e3


class CaptureCounter:
    """Counts CUDA-graph captures begun while active (wraps ``torch.cuda.CUDAGraph.capture_begin``)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.original = torch.cuda.CUDAGraph.capture_begin
        counter = self

        def counting(graph, *args, **kwargs):
            counter.count += 1
            return counter.original(graph, *args, **kwargs)

        torch.cuda.CUDAGraph.capture_begin = counting
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph.capture_begin = self.original


def engine_graphs(ctx: Context) -> None:
    """Graphed vs eager on DIFFERENT inputs of one shape, bit for bit; first call vs replay when the
    longest history changes (a fixed-capacity cache must not recapture)."""
    if not ctx.cuda:
        ctx.emit(SECTION, op="CUDA graphs vs eager", check="skipped: needs CUDA")
        return
    model = engine_model(ctx)
    cfg = model.config
    graphed = make_engine(model, device=ctx.device, backend="triton", cuda_graphs=True)
    eager = make_engine(model, device=ctx.device, backend="triton", cuda_graphs=False)
    B = 37
    same, items_same, state_diff, score_diff, calls = True, True, 0.0, 0.0, []
    for seed, longest in ((10, 30), (11, 30), (12, 30), (13, cfg.max_len), (14, 17)):
        batch = histories(cfg, B, seed=seed, longest=longest)
        with CaptureCounter() as captures:
            got, ms = _timed(ctx, lambda: graphed.recommend(batch, k=10, depth=cfg.reason_steps))
        want = eager.recommend(batch, k=10, depth=cfg.reason_steps)
        states, eager_states = graphed.reasoning_states(batch, depth=2), eager.reasoning_states(batch, depth=2)
        same &= torch.equal(got.items, want.items) and torch.equal(got.scores, want.scores)
        same &= torch.equal(states, eager_states)
        items_same &= torch.equal(got.items, want.items)
        state_diff = max(state_diff, float((states - eager_states).abs().max() / eager_states.abs().max()))
        score_diff = max(score_diff, float((got.scores - want.scores).abs().max() / want.scores.abs().max()))
        calls.append((longest, ms, captures.count))
    # The graphed engine pads B=37 to its bucket of 64 rows; cuBLAS may pick another kernel for another
    # row count, so the last bits may differ without any defect: within 1e-5 (relative) it passes.
    if same:
        check = "ok (bit for bit)"
    elif items_same and max(state_diff, score_diff) <= 1e-5:
        check = (f"ok (same items; states within {state_diff:.1e}, scores within {score_diff:.1e} relative: "
                 "the graphs' padded row count rounds differently)")
    else:
        check = (f"FAIL graphed results differ from eager (items {'same' if items_same else 'differ'}, states "
                 f"{state_diff:.1e}, scores {score_diff:.1e} relative)")
    ctx.emit(SECTION, op="graphed vs eager, 5 different batches", shape=f"B={B} ragged, longest 30/30/30/50/17",
             dtype="fp32", check=check)
    first, replay = calls[0], calls[2][1]
    for (longest, ms, captured), label in zip(calls[3:], ("longest history 30 -> 50", "longest history 50 -> 17")):
        ctx.emit(SECTION, op=f"call after {label}", shape=f"B={B}", dtype="fp32", ms=ms, vs="replay (same shape)",
                 vs_ms=replay, ratio=ms / replay, target="no recapture",
                 check=("ok" if captured == 0 else f"MISS {captured} graph captures") +
                 f" (first call {first[1]:.1f} ms, {first[2]} captures)")


def engine_threads(ctx: Context) -> None:
    """Two threads share one engine, each its own batches; results equal single-thread ones."""
    model = engine_model(ctx)
    cfg = model.config
    # Triton's interpreter is not thread-safe: on CPU the engine's own CPU kernels serve the threads.
    engine = make_engine(model, device=ctx.device, backend="triton" if ctx.cuda else "cpu")
    batches = [histories(cfg, 4 if ctx.tiny else 33, seed=20 + t) for t in range(2)]
    want = [engine.recommend(b, k=10).items.cpu() for b in batches]
    errors, results = [], [None, None]

    def work(t):
        try:
            for _ in range(2 if ctx.tiny else 10):
                results[t] = engine.recommend(batches[t], k=10).items.cpu()
                if not torch.equal(results[t], want[t]):
                    errors.append(f"thread {t}: results differ")
                    return
        except Exception as exc:  # noqa: BLE001 - reported in the row
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    if any(th.is_alive() for th in threads):  # a hang must not use up the whole run
        errors.append("a thread did not finish within 300 s")
    ctx.emit(SECTION, op="two threads, one engine", shape=f"B={len(batches[0])} each", dtype="fp32",
             check="ok" if not errors else "FAIL " + "; ".join(errors)[:200])


def engine_latency(ctx: Context) -> None:
    """recommend latency against depth at the serving shape, graphs on where the engine has them."""
    model = engine_model(ctx, serving=True)
    cfg = model.config
    batches = (3,) if ctx.tiny else ((1, 256) if not ctx.full else (1, 64, 256))
    dtypes = (("fp32", torch.float32),) if not ctx.cuda else \
        ((("bf16", torch.bfloat16),) if not ctx.full else (("fp32", torch.float32), ("bf16", torch.bfloat16)))
    depths = sorted({0, min(2, cfg.reason_steps), cfg.reason_steps})
    for name, dtype in dtypes:
        options = dict(device=ctx.device, dtype=dtype, backend="triton")
        try:
            engine = make_engine(model, **options, **({"cuda_graphs": True} if ctx.cuda else {}))
        except RuntimeError as exc:  # no cuda_graphs= yet: say so, then time the engine's default
            ctx.emit(SECTION, op="engine with cuda_graphs=True", dtype=name, check=f"FAIL {exc}"[:300])
            engine = make_engine(model, **options)
        for batch in batches:
            h = torch.randint(1, cfg.n_items, (batch, cfg.max_len), device=ctx.device)
            lens = torch.full((batch,), cfg.max_len, device=ctx.device)
            base = None
            for depth in depths:
                ms = ctx.ms(lambda: engine.recommend(h, k=20, depth=depth, lengths=lens))
                base = base or ms
                target, check = None, "measured"
                if batch == 256 and depth == 2:
                    target, check = "depth2/depth0 <= 1.1", "ok" if ms / base <= 1.1 else "MISS"
                elif batch == 1 and ctx.cuda:
                    target, check = "<= 1 ms", "ok" if ms <= 1.0 else "MISS"
                ctx.emit(SECTION, op=f"recommend depth {depth}", shape=f"B={batch} L={cfg.max_len} "
                         f"d={cfg.hidden_size} N={cfg.n_items} k=20", dtype=name, ms=ms, vs="depth 0", vs_ms=base,
                         ratio=ms / base, target=target, check=check)
    if ctx.full:
        h = torch.randint(1, cfg.n_items, (256, cfg.max_len), device=ctx.device)
        lens = torch.full((256,), cfg.max_len, device=ctx.device)
        ms = ctx.ms(lambda: model.recommend(h, k=20, depth=cfg.reason_steps, lengths=lens))
        ctx.emit(SECTION, op=f"reference ReaRec.recommend depth {cfg.reason_steps}", shape="B=256 L=50 d=256",
                 dtype="fp32", ms=ms, check="measured")


def engine_cuda_only(ctx: Context) -> None:
    """Changes made without a GPU, checked where one is: the session cache from a thread on a side
    stream, CUDA item features given to a CPU model, and the CE target check on CUDA's PyTorch path."""
    if not ctx.cuda:
        ctx.emit(SECTION, op="CUDA-only guards", check="skipped: needs CUDA")
        return
    from rearec import ReaRec, ReaRecConfig
    from rearec_kernels.linear_cross_entropy import fused_linear_cross_entropy

    model = engine_model(ctx)
    cfg = model.config
    engine = make_engine(model, device=ctx.device, backend="triton")
    batch = histories(cfg, 8, seed=40)
    want = engine.recommend(batch, k=10).items.cpu()
    got, errors = [None], []

    def on_side_stream():
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(3):  # miss, then hits on the cached histories
                    got[0] = engine.recommend(batch, k=10, users=list(range(len(batch)))).items.cpu()
        except Exception as exc:  # noqa: BLE001 - reported in the row
            errors.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=on_side_stream)
    thread.start()
    thread.join(timeout=120)
    ok = not errors and not thread.is_alive() and got[0] is not None and torch.equal(got[0], want)
    ctx.emit(SECTION, op="session cache from a side-stream thread", shape=f"B={len(batch)}", dtype="fp32",
             check="ok" if ok else "FAIL " + ("; ".join(errors) or "results differ or thread hung")[:200])
    small = ReaRecConfig(n_items=40, hidden_size=16, n_heads=2, inner_size=16, max_len=6, item_feature_dim=3)
    try:
        cpu_model = ReaRec(small, item_features=torch.randn(40, 3, device=ctx.device)).eval()
        cpu_model.recommend([[1, 2, 3]], k=5)
        check = "ok" if cpu_model.item_features.device.type == "cpu" else "FAIL features left on the GPU"
    except Exception as exc:  # noqa: BLE001
        check = f"FAIL {type(exc).__name__}: {exc}"[:200]
    ctx.emit(SECTION, op="CUDA item features, CPU model", check=check)
    # d = 300 > the Triton kernel's 256: the automatic choice runs the chunked PyTorch path on the GPU
    hidden, table = torch.randn(4, 300, device=ctx.device), torch.randn(50, 300, device=ctx.device)
    bad = torch.tensor([1, 2, 50, 3], device=ctx.device)
    for backend in (None, "reference"):
        try:
            fused_linear_cross_entropy(hidden, table, bad, backend=backend)
            check = "FAIL a target outside the table was accepted"
        except ValueError as exc:
            check = "ok" if "targets must be item ids in [0, 50)" in str(exc) else f"FAIL {exc}"[:200]
        except Exception as exc:  # noqa: BLE001
            check = f"FAIL {type(exc).__name__}: {exc}"[:200]
        ctx.emit(SECTION, op=f"CE target id check on CUDA, backend {backend or 'auto (d=300)'}", check=check)


def engine(ctx: Context) -> None:
    for name, part in (("parity", engine_parity), ("graphs", engine_graphs), ("threads", engine_threads),
                       ("latency", engine_latency), ("cuda-only", engine_cuda_only)):
        ctx.guarded(SECTION, name, part, ctx)


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes, no peers (<= 3 min)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu: the interpreter)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--only", choices=["variants", "attention", "topk", "engine"], action="append")
    parser.add_argument("--json", help="also write the rows here at the end")
    parser.add_argument("--out", default=os.environ.get("OUT") or None,
                        help="folder for gpu_check.json (the rows so far, after each row) and gpu_check.log "
                             "(every printed line) while the run goes (default: $OUT when set)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        if not args.tiny:
            print("gpu_check: --device cpu runs only with --tiny (Triton's interpreter is slow)")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu --tiny)")
        return 2
    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    ctx = Context(device=torch.device(args.device), mode=mode)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        ctx.rows_file = os.path.join(args.out, "gpu_check.json")
        log = open(os.path.join(args.out, "gpu_check.log"), "a", buffering=1)

        def out(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")

        ctx.out = out
    start = time.perf_counter()
    try:
        versions(ctx)
    except Exception as exc:  # noqa: BLE001
        ctx.failure("versions", "versions", exc)
    from gpu_attention import run as attention
    from gpu_topk import run as topk

    sections = [("variants", kernel_variants), ("attention", attention), ("topk", topk), ("engine", engine)]
    for name, section in sections:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        ctx.guarded(name, f"{name} section", section, ctx)
        ctx.out(f"[{name}] done in {time.perf_counter() - t0:.1f}s")
    print_table(ctx.rows, out=ctx.out)
    failed = [r for r in ctx.rows if str(r.get("check", "")).startswith("FAIL")]
    missed = [r for r in ctx.rows if str(r.get("check", "")).startswith("MISS")]
    if failed or missed:
        ctx.out("")
        ctx.out("== FAIL and MISS rows ==")
        for row in failed + missed:
            ctx.out(format_row(row))
    ctx.out(f"{len(ctx.rows)} rows, {len(failed)} FAIL, {len(missed)} MISS, {time.perf_counter() - start:.0f}s")
    if args.json:  # after the table: a path that cannot be written must not cost the table
        write_json(args.json, ctx.rows, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
