"""One script for a CUDA machine: kernel parity (compiled, not interpreted) and timings, then a table.

    python bench/gpu_check.py            # prints the table last; --json PATH also writes the rows

Sections: attention (bench/gpu_attention.py), fused top-K (bench/gpu_topk.py), and the engine:
FastReaRec against ReaRec's reference path on the GPU (float32, with and without CUDA graphs; fp16
and bf16 against fp32) and its latency vs depth at the serving shape.
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def engine_rows(rows):
    from rearec import ReaRec, ReaRecConfig
    from rearec.engine import FastReaRec
    from triton.testing import do_bench

    dev = "cuda"
    # Parity: ragged batch, every depth, both readouts.
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(n_items=5000, hidden_size=128, n_heads=2, inner_size=160, max_len=50,
                                reason_steps=4)).eval().to(dev)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 51, (37,), generator=g)
    histories = [torch.randint(5000, (int(n),), generator=g).tolist() for n in lengths]
    for graphs in (False, True):
        engine = FastReaRec.from_model(model, cuda_graphs=graphs)
        worst, same = 0.0, True
        for depth in range(5):
            for _ in range(2):  # the second call replays the captured graph
                got = engine.reasoning_states(histories, depth=depth)
            worst = max(worst, (got - model.reasoning_states(histories, depth=depth)).abs().max().item())
            for readout in ("last", "mean"):
                same &= torch.equal(engine.recommend(histories, k=20, depth=depth, readout=readout).items.cpu(),
                                    model.recommend(histories, k=20, depth=depth, readout=readout).items.cpu())
        ok = worst < 1e-4 and same
        rows.append(dict(op="engine parity fp32" + (" +graphs" if graphs else ""), shape="B=37 ragged, d=128, K=4",
                         dtype="float32", check="ok" if ok else f"FAIL max err {worst:.2e}, top20 equal={same}"))
    for dtype in (torch.float16, torch.bfloat16):
        engine = FastReaRec.from_model(model, dtype=dtype)
        got = engine.reasoning_states(histories)
        err = (got - model.reasoning_states(histories)).abs().max().item()
        ok = err < (5e-2 if dtype == torch.float16 else 2e-1)
        rows.append(dict(op="engine parity", shape="B=37 ragged, d=128, K=4", dtype=str(dtype).split(".")[-1],
                         check="ok" if ok else f"FAIL max err {err:.2e}"))

    # Latency vs depth at the serving shape.
    torch.manual_seed(0)
    big = ReaRec(ReaRecConfig(n_items=50_000, hidden_size=256, n_heads=2, inner_size=300, max_len=50,
                              reason_steps=8)).eval().to(dev)
    for dtype in (torch.float32, torch.bfloat16):
        engine = FastReaRec.from_model(big, dtype=dtype)
        for batch in (1, 64, 256):
            h = torch.randint(50_000, (batch, 50), device=dev)
            lens = torch.full((batch,), 50, device=dev)
            base = None
            for depth in (0, 2, 8):
                ms = do_bench(lambda: engine.recommend(h, k=20, depth=depth, lengths=lens), warmup=50, rep=200)
                base = base or ms
                rows.append(dict(op=f"engine recommend depth {depth}", shape=f"B={batch} L=50 d=256 N=50k k=20",
                                 dtype=str(dtype).split(".")[-1], ms=ms, vs="depth 0", ratio=ms / base, check="timed"))
        ref_ms = do_bench(lambda: big.recommend(h, k=20, depth=8, lengths=lens), warmup=5, rep=50)
        rows.append(dict(op="reference ReaRec.recommend depth 8", shape="B=256 L=50 d=256 N=50k k=20",
                         dtype="float32", ms=ref_ms, check="timed"))


def print_table(rows):
    columns = ["op", "shape", "dtype", "ms", "vs", "ratio", "check"]
    text = [[("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))) for c in columns]
            for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--only", choices=["attention", "topk", "engine"], action="append")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine")
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows, failed = [], False
    sections = [("attention", lambda r: __import__("gpu_attention").run(r)),
                ("topk", lambda r: __import__("gpu_topk").run(r)),
                ("engine", engine_rows)]
    for name, section in sections:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            section(rows)
        except Exception:
            failed = True
            traceback.print_exc()
            rows.append(dict(op=f"{name} section", check="FAIL (exception, see above)"))
        print(f"[{name}] done in {time.perf_counter() - start:.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print_table(rows)
    failed |= any(str(r.get("check", "")).startswith("FAIL") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
