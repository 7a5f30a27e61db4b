"""Latency vs reasoning depth: how much does each extra step cost, per batch size?

``profile_latency(engine, depths, batch_sizes)`` times ``engine.recommend`` on random full-length
histories and returns one row per (batch size, depth): median and p90 latency, the marginal cost of
a step (the slope of a least-squares line through the medians), and users per second.
``write_profile`` saves the rows as JSON and draws latency vs depth per batch size as a PNG.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Iterable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from rearec.runs import atomic_write, write_json

JSON_FILE = "latency_vs_depth.json"
PNG_FILE = "latency_vs_depth.png"


def time_calls(call, repeats: int, warmup: int = 1) -> List[float]:
    """Milliseconds of each of ``repeats`` calls of ``call()``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of ys over xs; None with fewer than two xs (JSON has no NaN)."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def profile_latency(engine, depths: Iterable[int] = range(9), batch_sizes: Iterable[int] = (1, 64, 256), *,
                    k: int = 20, history_len: Optional[int] = None, repeats: int = 10, warmup: int = 2,
                    seed: int = 0, progress: bool = True) -> List[dict]:
    """Time ``engine.recommend`` for every (batch size, depth); rows sorted by batch then depth
    (each batch size's depths are timed in that order too)."""
    cfg = engine.config
    depths, batch_sizes = sorted(set(depths)), sorted(set(batch_sizes))
    for depth in depths:
        engine.inputs.depth(depth)  # same validation and message as recommend
    history_len = history_len or cfg.max_len
    g = torch.Generator().manual_seed(seed)
    rows: List[dict] = []
    total = len(depths) * len(batch_sizes)
    bar = tqdm(total=total, desc="profile", disable=not progress, leave=False)
    for batch in batch_sizes:
        if cfg.pad_item is None:
            histories = torch.randint(cfg.n_items, (batch, history_len), generator=g)
        else:  # real items only: ids past the padding item shift up by one (any pad_item, 0 included)
            histories = torch.randint(cfg.n_items - 1, (batch, history_len), generator=g)
            histories += (histories >= cfg.pad_item).long()
        lengths = torch.full((batch,), history_len)
        medians = []
        for depth in depths:
            def call():
                engine.recommend(histories, k=k, depth=depth, lengths=lengths, raw_ids=False)
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)

            times = time_calls(call, repeats, warmup)
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
    base = {row["batch_size"]: row["median_ms"] for row in rows if row["depth"] == 0}  # each batch's depth 0
    for row in rows:  # '-': one depth only (no slope), or no depth 0 to compare with
        step = row["marginal_ms_per_step"]
        ratio = f"{row['median_ms'] / base[row['batch_size']]:.3f}" if base.get(row["batch_size"]) else "-"
        lines.append(f"{row['batch_size']:>6} {row['depth']:>5} {row['median_ms']:>10.2f} {row['p90_ms']:>9.2f} "
                     f"{'-' if step is None else f'{step:.2f}':>8} {row['users_per_s']:>10.0f} {ratio:>10}")
    return "\n".join(lines)


def write_profile(rows: List[dict], out_dir: str, meta: Optional[dict] = None) -> dict:
    """Writes JSON_FILE and PNG_FILE in ``out_dir``; returns their paths. The plot first: a plot that
    fails (matplotlib, a full disk) leaves the folder's earlier pair as it was, never a new JSON beside
    an old PNG."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, JSON_FILE)
    png_path = os.path.join(out_dir, PNG_FILE)
    plot_profile(rows, png_path, meta)
    write_json(json_path, {"meta": meta or {}, "rows": rows})
    return {"json": json_path, "png": png_path}


def plot_profile(rows: List[dict], png_path: str, meta: Optional[dict] = None) -> None:
    """Median latency (band to p90) vs depth, one line per batch size; log-scale y with plain
    millisecond ticks, whole-number depths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for batch in sorted({r["batch_size"] for r in rows}):
        part = sorted((r for r in rows if r["batch_size"] == batch), key=lambda r: r["depth"])
        depths = [r["depth"] for r in part]
        ax.plot(depths, [r["median_ms"] for r in part], marker="o", label=f"batch {batch}")
        ax.fill_between(depths, [r["median_ms"] for r in part], [r["p90_ms"] for r in part], alpha=0.15)
    ax.set_xlabel("reasoning depth (steps)")
    ax.set_ylabel("latency, ms (median; band to p90)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = "FastReaRec latency vs reasoning depth"
    if meta and meta.get("device"):
        title += f" ({meta['device']})"
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
