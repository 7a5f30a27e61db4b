"""Quality study on MovieLens-100K: does reasoning help, for whom, and how close to its ceiling?

``rearec study --out docs/study`` trains base SASRec, ReaRec-ERL and ReaRec-PRL (K=2) under the
paper's global temporal split, each with several seeds, plus PRL at K = 1 and 3, then writes
``docs/results.md`` with ``results.json`` and PNG plots beside it. Every run lives in its own folder
under ``--out``; finished runs are skipped and an interrupted one resumes, so the command can be
killed and started again (e.g. in the background with nohup). Each finished run is cached as JSON
(``RESULT_FILE`` in its folder); nothing the study reads is ever unpickled.

Report contents: NDCG/Recall@10/20 mean ± std per method; relative gain over base with a paired
sign-flip randomisation test on per-sample NDCG@10 (samples paired across methods, averaged over
seeds); metrics per reasoning step and the oracle (best step per sample after the fact); metrics by
history-length group and by target-popularity group; training seconds per epoch; recommend latency.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Dict, List

import numpy as np
import torch

from rearec.config import PRESETS, ReaRecConfig
from rearec.data import DataSpec
from rearec.evaluate import step_ranks
from rearec.metrics import per_sample_metrics, ranking_metrics
from rearec.model import ReaRec
from rearec.profile import time_calls
from rearec.runs import (MODEL_FILE, RESULT_FILE, RESUME, START, atomic_write, has_run, read_json, run_file,
                         write_json)
from rearec.train import TrainConfig, train_run

KS = (10, 20)
HEADLINE = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")
#: Where an earlier version cached each run as a pickle. Never loaded: such a file is reported and ignored.
OLD_PICKLE_CACHE = "result.pt"
RESULT_FORMAT = "rearec.study-run/1"


@dataclasses.dataclass
class StudyBudget:
    """The stated budget: sized for about two hours on a 2-core CPU (see ``rearec study --help``)."""

    seeds: int = 3  # for base, ERL and PRL (K=2)
    sweep_seeds: int = 1  # for PRL at K=1 and K=3
    model_size: dict = dataclasses.field(default_factory=lambda: dict(PRESETS["study"]))
    max_epochs: int = 30
    patience: int = 4
    batch_size: int = 256
    lr: float = 1e-3


def methods(budget: StudyBudget) -> Dict[str, dict]:
    """name -> ReaRecConfig overrides. PRL at K=2 is the paper's default; K=1 and 3 show the trend."""
    return {
        "base": dict(objective="base"),
        "erl": dict(objective="erl", reason_steps=2),
        "prl": dict(objective="prl", reason_steps=2),
        "prl-k1": dict(objective="prl", reason_steps=1),
        "prl-k3": dict(objective="prl", reason_steps=3),
    }


def run_folder(out_dir: str, name: str, seed: int) -> str:
    return os.path.join(out_dir, "runs", f"{name}-seed{seed}")


def read_record(folder: str, log=print):
    """The cached record of a finished run (JSON), or None. An old pickle cache is never loaded."""
    old = run_file(folder, OLD_PICKLE_CACHE)
    path = run_file(folder, RESULT_FILE)
    if os.path.exists(old):
        log(f"ignoring {old}: an old pickle cache, never loaded (pickles can run code); delete it")
    if not os.path.exists(path):
        return None
    record = read_json(path, "study record")
    if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path} is not a rearec study record (format {RESULT_FORMAT!r}); delete it to redo the run")
    record["ranks"] = {k: np.asarray(v, dtype=np.int64) for k, v in record["ranks"].items()}
    return record


def write_record(folder: str, record: dict) -> None:
    payload = dict(record, format=RESULT_FORMAT, ranks={k: v.tolist() for k, v in record["ranks"].items()})
    write_json(run_file(folder, RESULT_FILE), payload)


def run_one(data, spec: DataSpec, name: str, overrides: dict, seed: int, budget: StudyBudget, out_dir: str,
            log) -> dict:
    """Train (or resume, or reuse) one run and evaluate it on test; returns its result record."""
    folder = run_folder(out_dir, name, seed)
    record = read_record(folder, log)
    if record is not None:
        return record
    started = time.perf_counter()
    config = ReaRecConfig(n_items=data.n_items, **budget.model_size, **overrides)
    train_cfg = TrainConfig(lr=budget.lr, batch_size=budget.batch_size, max_epochs=budget.max_epochs,
                            patience=budget.patience, seed=seed, progress=False)
    _, outcome = train_run(config, data, train_cfg, folder, mode=RESUME if has_run(folder) else START,
                           data_spec=spec, log=lambda line: log(f"[{name} seed {seed}] {line}"))
    model = ReaRec.load(run_file(folder, MODEL_FILE))
    ranks = step_ranks(model, data.test)
    record = {
        "name": name, "seed": seed, "config": config.to_dict(), "status": outcome.status,
        "best_epoch": outcome.best_epoch, "epochs": outcome.epochs_run,
        "seconds_per_epoch": statistics.fmean(h["seconds"] for h in outcome.history) if outcome.history else None,
        "ranks": {k: v.numpy() for k, v in ranks.items()},
        "latency_ms": recommend_latency(model, data),
    }
    record["wall_seconds"] = time.perf_counter() - started  # this invocation's share if it resumed
    write_record(folder, record)
    return record


def recommend_latency(model, data, batch=256, repeats=5) -> float:
    """Median ms of FastReaRec.recommend (k=20) on the first ``batch`` test histories."""
    from rearec.engine import FastReaRec

    engine = FastReaRec.from_model(model)
    batch_data = data.test.batch(torch.arange(min(batch, len(data.test))), model.config.max_len)
    call = lambda: engine.recommend(batch_data.histories, k=20, lengths=batch_data.lengths, raw_ids=False)  # noqa: E731
    return statistics.median(time_calls(call, repeats, warmup=1))


def sign_flip_test(differences: np.ndarray, rounds: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of a paired randomisation test: is the mean difference zero?"""
    rng = np.random.default_rng(seed)
    observed = abs(differences.mean())
    flips = rng.choice([-1.0, 1.0], size=(rounds, differences.size))
    means = np.abs((flips * differences).mean(axis=1))
    return float((1 + (means >= observed - 1e-15).sum()) / (rounds + 1))


def _mean_std(values: List[float]) -> tuple:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: List[dict], data) -> dict:
    by_method: Dict[str, List[dict]] = {}
    for record in records:
        by_method.setdefault(record["name"], []).append(record)
    lengths = data.test.history_lengths.numpy()
    train_popularity = np.bincount(data.train.targets.numpy(), minlength=data.n_items)
    head_items = np.argsort(-train_popularity)[: max(1, int(0.2 * data.n_items))]
    targets = data.test.targets.numpy()
    is_head = np.isin(targets, head_items)
    cuts = np.quantile(lengths, [1 / 3, 2 / 3])
    length_groups = {
        f"short (≤{int(cuts[0])})": lengths <= cuts[0],
        f"medium ({int(cuts[0]) + 1}–{int(cuts[1])})": (lengths > cuts[0]) & (lengths <= cuts[1]),
        f"long (>{int(cuts[1])})": lengths > cuts[1],
    }
    popularity_groups = {"popular targets (top 20% items)": is_head, "long-tail targets": ~is_head}

    summary = {"methods": {}, "n_test_samples": int(len(targets)), "groups": {}}
    per_sample_ndcg = {}
    for name, runs in by_method.items():
        entry = {"seeds": [r["seed"] for r in runs], "status": [r["status"] for r in runs]}
        metrics = [ranking_metrics(torch.as_tensor(r["ranks"]["readout"]), KS) for r in runs]
        entry["metrics"] = {m: _mean_std([x[m] for x in metrics]) for m in HEADLINE}
        steps = sorted(k for k in runs[0]["ranks"] if k.startswith("r") and k[1:].isdigit())
        entry["steps"] = {}
        for step in steps + ["oracle"]:
            if step == "oracle":
                ranks_per_run = [np.min(np.stack([r["ranks"][s] for s in steps]), axis=0) for r in runs]
            else:
                ranks_per_run = [r["ranks"][step] for r in runs]
            values = [ranking_metrics(torch.as_tensor(x), KS) for x in ranks_per_run]
            entry["steps"][step] = {m: _mean_std([v[m] for v in values]) for m in HEADLINE}
        entry["by_group"] = {}
        for group_name, mask in {**length_groups, **popularity_groups}.items():
            values = [ranking_metrics(torch.as_tensor(r["ranks"]["readout"][mask]), KS) for r in runs]
            entry["by_group"][group_name] = {m: _mean_std([v[m] for v in values]) for m in ("ndcg@10", "recall@10")}
        entry["seconds_per_epoch"] = _mean_std([r["seconds_per_epoch"] for r in runs if r["seconds_per_epoch"]])
        entry["latency_ms"] = _mean_std([r["latency_ms"] for r in runs])
        entry["epochs"] = [r["epochs"] for r in runs]
        per_sample_ndcg[name] = np.mean(
            [per_sample_metrics(torch.as_tensor(r["ranks"]["readout"]), (10,))["ndcg@10"].numpy() for r in runs], axis=0)
        summary["methods"][name] = entry
    if "base" in per_sample_ndcg:
        base = per_sample_ndcg["base"]
        for name, entry in summary["methods"].items():
            if name == "base":
                continue
            gains = {m: (entry["metrics"][m][0] / summary["methods"]["base"]["metrics"][m][0] - 1) * 100
                     for m in HEADLINE}
            entry["gain_over_base_pct"] = gains
            entry["p_value_ndcg10"] = sign_flip_test(per_sample_ndcg[name] - base)
    summary["groups"] = {name: int(mask.sum()) for name, mask in {**length_groups, **popularity_groups}.items()}
    return summary


def save_figure(fig, path: str) -> str:
    """Lay out, write atomically, close; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot(summary: dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, metric in enumerate(("ndcg@10", "recall@10")):
        means = [summary["methods"][n]["metrics"][metric][0] for n in names]
        stds = [summary["methods"][n]["metrics"][metric][1] for n in names]
        ax.bar(np.arange(len(names)) + 0.4 * i, means, 0.4, yerr=stds, label=metric, capsize=3)
    ax.set_xticks(np.arange(len(names)) + 0.2, names)
    ax.set_title("MovieLens-100K, temporal split: test metrics (mean ± std over seeds)")
    ax.legend()
    paths.append(save_figure(fig, os.path.join(out_dir, "methods.png")))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        steps = summary["methods"][name]["steps"]
        labels = [s for s in steps if s != "oracle"]
        positions = [int(s[1:]) for s in labels]
        line = ax.errorbar(positions, [steps[s]["ndcg@20"][0] for s in labels],
                           yerr=[steps[s]["ndcg@20"][1] for s in labels], marker="o", capsize=3,
                           label=f"{name} ({len(summary['methods'][name]['seeds'])} seed(s))")
        ax.errorbar([positions[-1] + 0.15], [steps["oracle"]["ndcg@20"][0]], yerr=[steps["oracle"]["ndcg@20"][1]],
                    marker="*", markersize=11, capsize=3, color=line[0].get_color(), linestyle="none")
    ax.set_xticks(range(max(int(s[1:]) for n in names for s in summary["methods"][n]["steps"] if s != "oracle") + 1))
    ax.set_xticklabels([f"r{i}" for i in ax.get_xticks()])
    ax.set_xlabel("reasoning state used alone (stars: oracle, best step per sample)")
    ax.set_ylabel("NDCG@20")
    ax.set_title("Test NDCG@20 per reasoning step (mean ± std over seeds)")
    ax.legend()
    paths.append(save_figure(fig, os.path.join(out_dir, "steps.png")))

    fig, ax = plt.subplots(figsize=(8, 4))
    groups = list(next(iter(summary["methods"].values()))["by_group"])
    for i, name in enumerate(names):
        vals = [summary["methods"][name]["by_group"][g]["ndcg@10"][0] for g in groups]
        ax.bar(np.arange(len(groups)) + i * 0.8 / len(names), vals, 0.8 / len(names), label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4, groups, rotation=15, fontsize=8)
    ax.set_ylabel("NDCG@10")
    ax.set_title("by history length and by target popularity")
    ax.legend()
    paths.append(save_figure(fig, os.path.join(out_dir, "groups.png")))
    return paths


def _fmt(pair) -> str:
    return f"{pair[0]:.4f} ± {pair[1]:.4f}"


def write_report(summary: dict, budget: StudyBudget, data, report_path: str, figures: List[str], wall: float) -> None:
    out = os.path.dirname(report_path)
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    lines = ["# Quality study: ReaRec on MovieLens-100K", "",
             "Regenerate with `rearec study` (see the README). Data: MovieLens-100K from the recbole wheel, "
             "ratings > 3, the paper's global temporal split at the 0.8/0.9 time quantiles; "
             f"{len(data.train)} training, {len(data.valid)} validation and {summary['n_test_samples']} test "
             "samples; full ranking over every item.", "",
             f"Budget: hidden size {budget.model_size['hidden_size']}, {budget.model_size['n_layers']} layers, "
             f"{budget.model_size['n_heads']} heads, inner {budget.model_size['inner_size']}, "
             f"max_len {budget.model_size['max_len']}, "
             f"Adam lr {budget.lr}, batch {budget.batch_size}, at most {budget.max_epochs} epochs with early "
             f"stopping on validation NDCG@20 (patience {budget.patience}); seeds 0..{budget.seeds - 1} for "
             f"base, ERL and PRL (K=2), {budget.sweep_seeds} seed(s) for PRL at K=1 and K=3. "
             f"Training and evaluation time of all runs here: {wall / 60:.0f} min (2-core CPU, no GPU).", "",
             "## Test metrics (mean ± std over seeds)", "",
             "| method | NDCG@10 | NDCG@20 | Recall@10 | Recall@20 | gain NDCG@10 | p (paired, NDCG@10) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in summary["methods"].items():
        gain = entry.get("gain_over_base_pct", {}).get("ndcg@10")
        p = entry.get("p_value_ndcg10")
        lines.append(f"| {name} | " + " | ".join(_fmt(entry["metrics"][m]) for m in HEADLINE)
                     + f" | {'' if gain is None else f'{gain:+.1f}%'} | {'' if p is None else f'{p:.3g}'} |")
    lines += ["", "Gain: relative to base on the seed-mean. p: two-sided sign-flip randomisation test on per-sample "
              "NDCG@10 differences from base (each sample's NDCG averaged over seeds).", "",
              "## Per reasoning step and the oracle (NDCG@20)", "",
              "Each state r_s used alone as the user vector; the oracle takes, per test sample, the best step "
              "after the fact — a ceiling no deployable readout reaches.", "",
              "| method | " + " | ".join(f"r{s}" for s in range(4)) + " | readout | oracle | oracle vs base |",
              "|---|---|---|---|---|---|---|---|"]
    base_ndcg20 = summary["methods"].get("base", {}).get("metrics", {}).get("ndcg@20", (float("nan"),))[0]
    for name, entry in summary["methods"].items():
        steps = entry["steps"]
        cells = [(_fmt(steps[f"r{s}"]["ndcg@20"]) if f"r{s}" in steps else "") for s in range(4)]
        oracle = steps["oracle"]["ndcg@20"][0]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['metrics']['ndcg@20'][0]:.4f} | {oracle:.4f} | "
                     f"{(oracle / base_ndcg20 - 1) * 100:+.1f}% |")
    groups = summary["groups"]
    lines += ["", "## By history length and by target popularity (NDCG@10)", "",
              "| method | " + " | ".join(f"{g} (n={n})" for g, n in groups.items()) + " |",
              "|---|" + "---|" * len(groups)]
    for name, entry in summary["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{entry['by_group'][g]['ndcg@10'][0]:.4f}" for g in groups) + " |")
    lines += ["", "## Cost", "", "| method | epochs run | s / epoch | recommend ms (B=256, k=20, FastReaRec, CPU) |",
              "|---|---|---|---|"]
    for name, entry in summary["methods"].items():
        lines.append(f"| {name} | {entry['epochs']} | {entry['seconds_per_epoch'][0]:.1f} | {entry['latency_ms'][0]:.1f} |")
    lines += ["", "## Figures", ""] + [f"![{os.path.basename(p)}]({rel(p)})" for p in figures] + [""]
    text = "\n".join(lines)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(report_path, write)


def run_study(out_dir: str = "docs/study", report: str = "docs/results.md", budget: StudyBudget = None,
              only: List[str] = None, log=print, report_only: bool = False) -> dict:
    """Train every (method, seed) not yet done, then write the report. ``report_only``: no training,
    report the runs that have finished (e.g. while the study is still running)."""
    budget = budget or StudyBudget()
    spec = DataSpec.for_source("ml-100k", split="temporal")
    data = spec.load()
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for name, overrides in methods(budget).items():
        if only and name not in only:
            continue
        for seed in range(budget.sweep_seeds if name.startswith("prl-k") else budget.seeds):
            if report_only:
                record = read_record(run_folder(out_dir, name, seed), log)
                if record is not None:
                    records.append(record)
                continue
            records.append(run_one(data, spec, name, overrides, seed, budget, out_dir, log))
            log(f"done: {name} seed {seed}")
    if not records:
        raise ValueError(f"no finished runs under {out_dir}/runs: run 'rearec study' first")
    summary = summarise(records, data)
    summary["budget"] = dataclasses.asdict(budget)
    wall = sum(r.get("wall_seconds", 0.0) for r in records)
    summary["wall_seconds_all_runs"] = wall
    write_json(os.path.join(out_dir, "results.json"), summary)
    figures = plot(summary, out_dir)
    write_report(summary, budget, data, report, figures, wall)
    return summary
