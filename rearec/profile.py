"""Latency vs reasoning depth: how much does each extra step cost, per batch size?

``profile_latency(engine, depths, batch_sizes)`` times ``engine.recommend`` on random full-length
histories and returns one row per (batch size, depth): median and p90 latency, the marginal cost of
a step (the slope of a least-squares line through the medians), and users per second.
``write_profile`` saves the rows as JSON and draws latency vs depth per batch size as a PNG.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Iterable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm


def parse_range(text: str) -> List[int]:
    """'0-8' -> [0..8]; '1,64,256' -> [1, 64, 256]; '0-2,8' -> [0, 1, 2, 8]."""
    values: List[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                values.extend(range(low, high + 1))
            elif part:
                values.append(int(part))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as integers: write e.g. 0-8 or 1,64,256") from None
    if not values:
        raise ValueError(f"{text!r} holds no integers: write e.g. 0-8 or 1,64,256")
    return values


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def profile_latency(engine, depths: Iterable[int] = range(9), batch_sizes: Iterable[int] = (1, 64, 256), *,
                    k: int = 20, history_len: Optional[int] = None, repeats: int = 10, warmup: int = 2,
                    seed: int = 0, progress: bool = True) -> List[dict]:
    """Time ``engine.recommend`` for every (batch size, depth); rows sorted by batch then depth."""
    cfg = engine.config
    depths, batch_sizes = list(depths), list(batch_sizes)
    for depth in depths:
        engine.inputs.depth(depth)  # same validation and message as recommend
    history_len = history_len or cfg.max_len
    g = torch.Generator().manual_seed(seed)
    rows: List[dict] = []
    total = len(depths) * len(batch_sizes)
    bar = tqdm(total=total, desc="profile", disable=not progress, leave=False)
    for batch in batch_sizes:
        histories = torch.randint(cfg.n_items, (batch, history_len), generator=g)
        if cfg.pad_item is not None:
            histories[histories == cfg.pad_item] = 0
        lengths = torch.full((batch,), history_len)
        medians = []
        for depth in depths:
            def call():
                engine.recommend(histories, k=k, depth=depth, lengths=lengths, raw_ids=False)
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)

            for _ in range(warmup):
                call()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append((time.perf_counter() - start) * 1e3)
            median = statistics.median(times)
            medians.append(median)
            rows.append({"batch_size": batch, "depth": depth, "median_ms": median,
                         "p90_ms": _percentile(times, 0.9), "users_per_s": batch / (median / 1e3)})
            bar.update(1)
        slope = _slope(depths, medians)
        for row in rows[-len(depths):]:
            row["marginal_ms_per_step"] = slope
    bar.close()
    return rows


def format_profile(rows: List[dict]) -> str:
    header = f"{'batch':>6} {'depth':>5} {'median ms':>10} {'p90 ms':>9} {'ms/step':>8} {'users/s':>10} {'vs depth 0':>10}"
    lines = [header]
    base = {}
    for row in rows:
        base.setdefault(row["batch_size"], row["median_ms"] if row["depth"] == 0 else None)
        ratio = row["median_ms"] / base[row["batch_size"]] if base[row["batch_size"]] else float("nan")
        lines.append(f"{row['batch_size']:>6} {row['depth']:>5} {row['median_ms']:>10.2f} {row['p90_ms']:>9.2f} "
                     f"{row['marginal_ms_per_step']:>8.2f} {row['users_per_s']:>10.0f} {ratio:>10.3f}")
    return "\n".join(lines)


def write_profile(rows: List[dict], out_dir: str, meta: Optional[dict] = None) -> dict:
    """Writes latency_vs_depth.json and latency_vs_depth.png in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "latency_vs_depth.json")
    png_path = os.path.join(out_dir, "latency_vs_depth.png")
    tmp = json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f, indent=2)
    os.replace(tmp, json_path)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for batch in sorted({r["batch_size"] for r in rows}):
        part = [r for r in rows if r["batch_size"] == batch]
        ax.plot([r["depth"] for r in part], [r["median_ms"] for r in part], marker="o", label=f"batch {batch}")
        ax.fill_between([r["depth"] for r in part], [r["median_ms"] for r in part], [r["p90_ms"] for r in part],
                        alpha=0.15)
    ax.set_xlabel("reasoning depth (steps)")
    ax.set_ylabel("recommend latency, ms (median; band to p90)")
    ax.set_yscale("log")
    title = "FastReaRec latency vs reasoning depth"
    if meta and meta.get("device"):
        title += f" ({meta['device']})"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)
    return {"json": json_path, "png": png_path}


# ---------------------------------------------------------------------------- command line
def add_profile_arguments(parser) -> None:
    parser.add_argument("--checkpoint", help="a rearec checkpoint (default: a random model of the size below)")
    parser.add_argument("--official", action="store_true", help="--checkpoint is a state_dict of the public code")
    parser.add_argument("--depths", default="0-8", help="reasoning depths, e.g. 0-8 or 0,2,8 (default 0-8)")
    parser.add_argument("--batch-sizes", default="1,64,256", help="batch sizes (default 1,64,256)")
    parser.add_argument("-k", type=int, default=20, help="items returned per user (default 20)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per point (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default="runs/profile", help="folder for the JSON and PNG (default runs/profile)")
    random = parser.add_argument_group("random model (without --checkpoint)")
    random.add_argument("--n-items", type=int, default=50_000)
    random.add_argument("--hidden-size", type=int, default=256)
    random.add_argument("--layers", type=int, default=2)
    random.add_argument("--heads", type=int, default=2)
    random.add_argument("--inner-size", type=int, default=300)
    random.add_argument("--max-len", type=int, default=50)
    random.add_argument("--reason-steps", type=int, default=8)
    parser.add_argument("--no-progress", action="store_true")


def run_profile(args) -> int:
    from rearec.config import ReaRecConfig
    from rearec.engine import FastReaRec
    from rearec.model import ReaRec

    depths, batches = parse_range(args.depths), parse_range(args.batch_sizes)
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"checkpoint {args.checkpoint} does not exist: give the path of a model.safetensors")
        model = (ReaRec.from_official_checkpoint(args.checkpoint) if args.official else ReaRec.load(args.checkpoint))
        source = args.checkpoint
    else:
        torch.manual_seed(0)
        model = ReaRec(ReaRecConfig(n_items=args.n_items, hidden_size=args.hidden_size, n_layers=args.layers,
                                    n_heads=args.heads, inner_size=args.inner_size, max_len=args.max_len,
                                    reason_steps=args.reason_steps)).eval()
        source = "random model"
    too_deep = [d for d in depths if d > model.config.reason_steps]
    if too_deep:
        raise ValueError(f"depths {too_deep} exceed the model's K={model.config.reason_steps}: "
                         f"use --depths 0-{model.config.reason_steps}")
    engine = FastReaRec.from_model(model.to(args.device), device=args.device)
    rows = profile_latency(engine, depths, batches, k=args.k, repeats=args.repeats, progress=not args.no_progress)
    cfg = model.config
    meta = {"source": source, "device": str(engine.device), "threads": torch.get_num_threads(),
            "n_items": cfg.n_items, "hidden_size": cfg.hidden_size, "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "inner_size": cfg.inner_size, "history_len": cfg.max_len, "k": args.k}
    print(f"FastReaRec on {engine.device}: N={cfg.n_items}, d={cfg.hidden_size}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, full histories of {cfg.max_len}, k={args.k}")
    print(format_profile(rows))
    paths = write_profile(rows, args.out, meta)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0
