"""Compile every Triton kernel variant the dispatchers can choose, for a GPU that need not be here.

    python bench/kernel_variants.py [--arch 90] [--serving-arch 80] [--full] [--json PATH]

Triton compiles for the target its active driver reports. A stand-in driver reports
``GPUTarget("cuda", arch, 32)`` and every kernel launch becomes a compile-only warm-up
(``warmup=True``). The kernels' own launch functions (``attention_triton.prefill_attention`` /
``decode_attention``, ``topk_triton.fused_topk``), called on small CPU tensors, then compile
exactly the variants a real call would launch -- their config functions, constexprs and integer
specialisations -- and launch nothing. Triton's bundled ptxas builds each cubin; its log gives
registers and spill stores, the kernel's metadata its shared memory.

One row per compiled kernel, printed as it is compiled. Exit status 1 when a kernel fails to
compile, needs more shared memory than a block may have on the target, or spills on sm_90 or newer,
the serving GPUs (older targets: a note in the row), where a case must not spill: every attention
kernel (inference and training) at every head-dim width, 16 to 256 (the dispatchers take head dims
up to 256; the default ``small`` preset has 32), and at the ragged head dims of RAGGED_HEAD_DIMS; top-K and cross-entropy at their serving/trained
shapes (top-K d = 256; CE d = 64, 256). Runs with TRITON_INTERPRET unset
(the interpreter would replace the compiled kernels); ``tests/test_gpu_compile.py`` runs it in a
subprocess with a temporary Triton cache. Default: the CI set (every config branch, both serving
shapes, every dtype); ``--full`` sweeps more head dims and batch buckets.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton.jit decorates any kernel
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# Shared memory one block may use (the opt-in maximum): CUDA C Programming Guide, compute capabilities.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SERVING_HEAD_DIM = 128  # hidden 256 over 2 heads
SERVING_TOPK_D = 256
ATTENTION_WIDTHS = (16, 32, 64, 128, 256)  # every BLOCK_D the attention dispatchers can pick (CI set)
# Head dims that are not multiples of 16 ("ragged": element-wise masked loads, tiles of their own in
# attention_triton.prefill_config), one per width where those tiles differ; Triton specializes the
# head dim only on divisibility by 16, so one ragged head dim stands for every other of its width.
RAGGED_HEAD_DIMS = (40, 72, 136)
RAGGED_DTYPES = ("bf16", "fp32")  # fp16 compiles to the same registers as bf16


def install_stand_in_driver(arch: int) -> None:
    """Makes Triton compile for sm_<arch> whether or not a GPU is present."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver

    class StandInDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

        def get_benchmarker(self):
            raise RuntimeError("the stand-in driver compiles only; it cannot time kernels")

    driver.set_active(StandInDriver())


class CompileOnly:
    """Turns every ``kernel[grid](...)`` into a warm-up that compiles and returns the kernel; records
    (case, kernel) for each launch and the ptxas log for each distinct binary. Kernels compiled for an earlier target are forgotten when
    the target changes (``reset``)."""

    def __init__(self):
        from triton import knobs
        from triton.runtime import jit

        self.jit = jit
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed: captured per compile below
        self.case = {}
        self.case_index = 0
        self.seen = set()
        self.records = []
        self.logs = {}  # kernel hash -> ptxas log (an in-memory cache hit compiles nothing)
        self.functions = set()
        recorder = self

        def launch_compiles_only(kernel_fn, grid):
            def launch(*args, **kwargs):
                out = io.StringIO()
                start = time.perf_counter()
                with contextlib.redirect_stdout(out):
                    compiled = kernel_fn.run(*args, grid=grid, warmup=True, **kwargs)
                seconds = time.perf_counter() - start
                recorder.functions.add(kernel_fn)
                if compiled.hash not in recorder.logs:  # else an earlier case compiled this binary
                    recorder.logs[compiled.hash] = out.getvalue()
                key = (recorder.case_index, compiled.hash)  # one row per kernel per case
                if key not in recorder.seen:
                    recorder.seen.add(key)
                    recorder.records.append((dict(recorder.case), compiled, seconds))
                return compiled
            return launch

        jit.KernelInterface.__getitem__ = launch_compiles_only

    def reset(self):
        for fn in self.functions:
            fn.device_caches.clear()  # compiled for the previous target


def parse_ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return {"regs": int(regs[-1]) if regs else None, "spills": int(spills[-1]) if spills else None}


def constexpr_names(compiled) -> dict:
    """The kernel's named (upper-case) constexprs, e.g. BLOCK_M, as {name: value}."""
    src = getattr(compiled, "src", None)
    names = getattr(getattr(src, "fn", None), "arg_names", None)
    if names is None:
        return {}
    out = {}
    for key, value in src.constants.items():
        index = key[0] if isinstance(key, tuple) and len(key) == 1 else None
        if index is not None and names[index].isupper() and names[index] != "UPCAST":
            out[names[index]] = getattr(value, "value", value)
    return out


def attention_cases(full: bool):
    from rearec_kernels import attention_triton
    from rearec_kernels.kv_cache import KVCache

    head_dims = (16, 32, 48, 64, 80, 96, 128, 160, 256) if full else ATTENTION_WIDTHS
    for dtype_name, dtype in DTYPES.items():
        ragged = RAGGED_HEAD_DIMS if full or dtype_name in RAGGED_DTYPES else ()
        for hd in head_dims + ragged:
            B, L, H = 2, 50, 2

            def run(hd=hd, dtype=dtype, dtype_name=dtype_name):
                qkv = torch.zeros(B, L, 3, H, hd, dtype=dtype)
                lengths = torch.full((B,), L, dtype=torch.int32)
                cache = KVCache.allocate(2, B, H, L + 8, hd, dtype=dtype)
                q, k, v = qkv.unbind(2)
                attention_triton.prefill_attention(q, k, v, lengths, cache, 1)
                if full or dtype_name == "fp32" or hd % 16:  # BERT4Rec's bidirectional prefill; fp32 is the tightest
                    attention_triton.prefill_attention(q, k, v, lengths, cache, 1, causal=False)
                attention_triton.decode_attention(q[:, 0], k[:, 0], v[:, 0], cache, 1)

            yield dict(op="attention", dtype=dtype_name, shape=f"head_dim={hd}",
                       serving=hd == SERVING_HEAD_DIM, spill_free=True), run


def topk_cases(full: bool):
    from rearec_kernels import topk_triton

    # (B, d, N, k, M): the batch buckets pick BLOCK_B/BLOCK_B2, d picks BLOCK_D, N and k + M the group
    # size G and the fallback's K_SEL; (*, 256, 20000, 100, 50) is the serving call (K_SEL = 256).
    if full:
        shapes = [(B, d, 20_000, 100, 50) for B in (1, 16, 32, 64, 128, 256, 1024) for d in (32, 64, 128, 256)]
        shapes += [(64, 256, 4_000, 100, 50), (64, 256, 9_000, 100, 50), (8, 256, 200_000, 1000, 200)]
    else:
        shapes = [(1, 32, 20_000, 100, 50), (32, 64, 20_000, 100, 50), (64, 128, 4_000, 100, 50),
                  (256, SERVING_TOPK_D, 20_000, 100, 50), (1024, SERVING_TOPK_D, 20_000, 100, 50)]
    for dtype_name, dtype in DTYPES.items():
        for B, d, N, k, M in shapes:
            def run(B=B, d=d, N=N, k=k, M=M, dtype=dtype):
                q = torch.zeros(B, d, dtype=dtype)
                table = torch.zeros(N, d, dtype=dtype)
                exclude = torch.full((B, M), -1, dtype=torch.int64)
                topk_triton.fused_topk(q, table, k, scale=1.0, exclude=exclude)

            yield dict(op="topk", dtype=dtype_name, shape=f"B={B} d={d} N={N} k={k} M={M}",
                       serving=d == SERVING_TOPK_D), run


def training_cases(full: bool):
    """The training kernels (fused item-table cross-entropy, attention with autograd): forward and
    backward, dropout on for attention, for the full target only. The CE's "serving" shapes (spills
    fail there) are the model sizes trained in practice, d = 64 and 256; attention must not spill at
    any width."""
    from rearec_kernels import attention_autograd_triton, linear_cross_entropy_triton

    dims = (16, 32, 48, 64, 96, 128, 256) if full else ATTENTION_WIDTHS
    for dtype_name, dtype in DTYPES.items():
        ragged = RAGGED_HEAD_DIMS if full or dtype_name in RAGGED_DTYPES else ()
        for d in dims + ragged:
            ce = d in dims and (full or d in (64, 256))  # CI: the trained CE sizes; attention at every width
            def run_ce(d=d, dtype=dtype):
                B, N = 8, 1000
                hidden, table = torch.zeros(B, d, dtype=dtype), torch.zeros(N, d, dtype=dtype)
                targets = torch.zeros(B, dtype=torch.int64)
                lse2 = linear_cross_entropy_triton.log2_sum_exp(hidden, table, 1.0)
                linear_cross_entropy_triton.gradients(hidden, table, targets, lse2, torch.ones(B), 1.0, True, True)

            if ce:
                yield dict(op="cross_entropy", dtype=dtype_name, shape=f"d={d}", serving=d in (64, 256),
                           training=True), run_ce

            def run_attention(hd=d, dtype=dtype):
                B, L, H = 2, 50, 2
                q = torch.zeros(B, L, H, hd, dtype=dtype)
                lengths = torch.full((B,), L, dtype=torch.int32)
                out, lse2 = attention_autograd_triton.attention_forward(q, q, q, lengths, 1.0, dropout_p=0.1)
                attention_autograd_triton.attention_backward(q, q, q, out, q, lse2, lengths, 1.0, dropout_p=0.1)

            yield dict(op="attention_autograd", dtype=dtype_name, shape=f"head_dim={d}",
                       serving=d in (64, SERVING_HEAD_DIM), spill_free=True, training=True), run_attention


def compile_all(archs, full: bool, serving_archs=(), emit=print) -> list:
    """Compiles every case for ``archs`` and the serving-shape cases for ``serving_archs``; returns one
    row per compiled kernel (and per failed case)."""
    recorder = CompileOnly()
    rows = []
    header = (f"{'arch':6} {'kernel':18} {'op':9} {'dtype':5} {'shape':34} {'constexprs':44} "
              f"{'warps':>5} {'stages':>6} {'regs':>4} {'spills':>6} {'shared':>7} {'limit':>7} {'s':>5}  check")
    emit(header)
    for arch, serving_only in [(a, False) for a in archs] + [(a, True) for a in serving_archs]:
        install_stand_in_driver(arch)
        recorder.reset()
        limit = SHARED_LIMIT.get(arch, 101376)
        for case, run in list(attention_cases(full)) + list(topk_cases(full)) + list(training_cases(full)):
            if serving_only and (not case["serving"] or case.get("training")):
                continue  # the older target: the serving kernels at the serving shapes only
            recorder.case = dict(case, arch=arch)
            recorder.case_index += 1
            first = len(recorder.records)
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a failed compile is a row, then the next case
                row = dict(case, arch=f"sm_{arch}", kernel="-", check=f"FAIL {type(exc).__name__}: {str(exc)[:300]}")
                rows.append(row)
                emit(f"sm_{arch:<3} {'-':18} {case['op']:9} {case['dtype']:5} {case['shape']:34} {row['check']}")
                continue
            for rec_case, compiled, seconds in recorder.records[first:]:
                meta = compiled.metadata
                info = parse_ptxas(recorder.logs[compiled.hash])
                constexprs = constexpr_names(compiled)
                problems, notes = [], []
                if meta.shared > limit:
                    problems.append(f"shared {meta.shared} > {limit}")
                if rec_case.get("spill_free", rec_case["serving"]) and info["spills"]:  # fails on sm_90+ only
                    (problems if arch >= 90 else notes).append(f"spills {info['spills']} B")
                row = dict(rec_case, arch=f"sm_{arch}", kernel=meta.name, warps=meta.num_warps,
                           stages=meta.num_stages, regs=info["regs"], spills=info["spills"], shared=meta.shared,
                           shared_limit=limit, seconds=round(seconds, 2), constexprs=constexprs,
                           check="FAIL " + "; ".join(problems) if problems else "; ".join(["ok"] + notes))
                rows.append(row)
                cx = " ".join(f"{k}={v}" for k, v in constexprs.items())
                emit(f"sm_{arch:<3} {meta.name.lstrip('_'):18} {rec_case['op']:9} {rec_case['dtype']:5} "
                     f"{rec_case['shape']:34} {cx[:44]:44} {meta.num_warps:5} {meta.num_stages:6} "
                     f"{str(info['regs']):>4} {str(info['spills']):>6} {meta.shared:7} {limit:7} {seconds:5.1f}  "
                     f"{row['check']}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x 10, e.g. 90 (repeatable)")
    parser.add_argument("--serving-arch", type=int, action="append", default=[],
                        help="also compile the serving shapes only for this target (repeatable)")
    parser.add_argument("--full", action="store_true", help="every head dim and batch bucket (minutes)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    archs = args.arch if args.arch is not None else ([] if args.serving_arch else [90])
    if "TRITON_CACHE_DIR" not in os.environ:  # a fresh cache: every kernel compiles, so ptxas logs exist
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rearec-triton-")
    rows = compile_all(archs, args.full, args.serving_arch, emit=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    failed = [r for r in rows if not r["check"].startswith("ok")]
    print(f"{len(rows)} kernels, {len(failed)} failing", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
