"""``rearec quickstart``: train plain SASRec and ReaRec-PRL on MovieLens-100K within a few minutes, compare
them on test, and serve recommendations through FastReaRec."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time

from rearec.cli.console import CommandError, check_output_folder, out, pick_device, show_progress
from rearec.cli.options import add_threads_argument, check_sets, describe_preset, model_line, positive_int, print_data
from rearec.cli.train import diverged_error, evaluate_and_save, summary
from rearec.config import BACKBONES, PRESETS, ReaRecConfig
from rearec.data import DataSpec
from rearec.engine import FastReaRec
from rearec.profile import format_profile, profile_latency, write_profile
from rearec.runs import OVERWRITE, replace_folder
from rearec.train import TrainConfig, TrainingInterrupted, train_run

NAME = "quickstart"
HELP = "train and compare SASRec and ReaRec-PRL on MovieLens-100K (a few minutes)"


@dataclasses.dataclass(frozen=True)
class QuickstartBudget:
    """What the quickstart trains: sized to finish within 5 minutes on a 2-core CPU."""

    preset: str = "quickstart"
    lr: float = 2e-3
    batch_size: int = 256
    max_epochs: int = 20
    patience: int = 3
    #: Seconds of training per model: a PRL epoch costs about three base epochs (K+1 steps, and a noisy
    #: copy for the contrastive term). Training stops before an epoch that would pass its budget.
    seconds: tuple = (("base", 75.0), ("prl", 165.0))
    seed: int = 2025
    reason_steps: int = 2
    users_shown: int = 3


BUDGET = QuickstartBudget()
#: MovieLens-100K as the paper uses it: ratings > 3, temporal split at the 0.8/0.9 time quantiles.
DATA = DataSpec.for_source("ml-100k")


def describe(budget: QuickstartBudget = BUDGET, backbone: str = "sasrec") -> str:
    name = {"sasrec": "SASRec", "bert4rec": "BERT4Rec"}.get(backbone, backbone)
    return (f"Train plain {name} (base) and ReaRec-PRL (K={budget.reason_steps}) on MovieLens-100K (ratings > 3, "
            "temporal split at the 0.8/0.9 time quantiles), evaluate both on test with full ranking, compare them, "
            "and show top-10 recommendations through FastReaRec. A small budget, to finish within 5 minutes on a "
            f"2-core CPU: model preset '{budget.preset}' ({describe_preset(budget.preset)}), Adam lr {budget.lr:g}, "
            f"batch {budget.batch_size}, per model at most {budget.max_epochs} epochs and "
            + " / ".join(f"{seconds:g} s ({name})" for name, seconds in budget.seconds)
            + f" of training, early stop after {budget.patience} epochs without a better validation NDCG@20, seed "
            f"{budget.seed}. One seed of a small model says little about which model is better: the quality study "
            "(docs/results.md, 'rearec study') has the real comparison; 'rearec train' trains larger models.")


DESCRIPTION = describe()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.path.join("runs", "quickstart"), metavar="DIR",
                        help="folder for the two runs (base/, prl/) and the latency plot (default runs/quickstart), "
                             "replaced whole each time; a folder holding anything else is refused")
    parser.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                        help=f"most epochs per model (default {BUDGET.max_epochs})")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (drawn only when stderr is a terminal)")
    parser.add_argument("--backbone", choices=BACKBONES, default="sasrec",
                        help="sequence encoder of both models (default sasrec)")
    add_threads_argument(parser)


def run(args) -> int:
    started = time.perf_counter()
    budget = BUDGET if args.epochs is None else dataclasses.replace(BUDGET, max_epochs=args.epochs)
    device = pick_device(args.device)
    progress = show_progress(args.no_progress)
    check_own_folder(args.out)
    out("rearec quickstart: " + describe(budget, args.backbone))
    out(f"device: {device}  {args.threads_note}  output: {args.out}")
    data = DATA.load()
    print_data(data, DATA)
    check_sets(data)
    # Everything is written to a staging folder beside --out, which replaces --out once all of it is
    # done: an interrupted quickstart leaves the previous results whole, never a mix of two runs.
    final = args.out
    staging = os.path.normpath(final) + ".partial"
    shutil.rmtree(staging, ignore_errors=True)

    reports, models, results = {}, {}, {}
    for name, objective, steps in (("base", "base", 0), ("prl", "prl", budget.reason_steps)):
        config = ReaRecConfig(n_items=data.n_items, objective=objective, reason_steps=steps, backbone=args.backbone,
                              **PRESETS[budget.preset])
        train_config = TrainConfig(lr=budget.lr, batch_size=budget.batch_size, max_epochs=budget.max_epochs,
                                   patience=budget.patience, seed=budget.seed, device=device, progress=progress,
                                   time_budget_s=dict(budget.seconds)[name])
        out_dir = os.path.join(staging, name)
        out(f"\n== {name}: {model_line(config)}")
        try:
            model, result = train_run(config, data, train_config, out_dir, mode=OVERWRITE, data_spec=DATA, log=out)
        except TrainingInterrupted:  # train's advice (--resume) is not quickstart's: it starts over
            raise KeyboardInterrupt(f"quickstart interrupted while training {name}; {final} keeps what it held "
                                    f"(this run's part is in {staging}): run 'rearec quickstart' again, it starts "
                                    "over") from None
        if result.status == "diverged":
            raise diverged_error(result, out_dir)
        out(summary(result, train_config.metric))
        reports[name] = evaluate_and_save(model, data, out_dir, progress=progress)
        models[name], results[name] = model, result

    columns = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")
    base_name = {"sasrec": "SASRec", "bert4rec": "BERT4Rec"}[args.backbone]
    rows = [(f"{base_name} (base)", reports["base"]["readout"]),
            (f"ReaRec-PRL (K={budget.reason_steps})", reports["prl"]["readout"]),
            ("ReaRec-PRL oracle", reports["prl"]["oracle"])]
    width = max(len(r[0]) for r in rows) + 2
    out(f"\nMovieLens-100K test ({reports['prl']['n_samples']:,} samples, full ranking over {data.n_items:,} items):")
    out("".ljust(width) + "".join(c.rjust(11) for c in columns))
    for label, metrics in rows:
        out(label.ljust(width) + "".join(f"{metrics[c]:11.4f}" for c in columns))
    gain = reports["prl"]["readout"]["ndcg@10"] / max(reports["base"]["readout"]["ndcg@10"], 1e-12) - 1
    why = {"converged": "early stop", "max_epochs": "epoch cap", "time_budget": "time budget"}
    trained = "; ".join(f"{name}: {r.epochs_run} epochs in {r.seconds:.0f}s, stopped by its {why.get(r.status, r.status)}"
                        for name, r in results.items())
    out(f"PRL vs base, NDCG@10: {gain:+.1%} ({trained}).")
    out("This is one seed of a small model trained for a few minutes: not evidence either way. docs/results.md "
        "('rearec study') compares the methods over several seeds with a paired test. The oracle (best reasoning "
        "step per sample, chosen after the fact) is a ceiling, not a deployable model.")

    engine = FastReaRec.from_model(models["prl"], device=device)
    users = data.mapping.users_to_raw(sorted(set(data.test.users.tolist()))[:budget.users_shown])
    histories = [data.mapping.items_to_raw(data.user_history(u)) for u in users]
    recs = engine.recommend(histories, k=10, exclude_seen=True)
    out(f"\ntop-10 for {len(users)} users by ReaRec-PRL through FastReaRec (raw MovieLens item ids, seen items "
        "excluded):")
    for b, user in enumerate(users):
        items = [i for i in recs.raw_items[b] if i is not None]
        out(f"user {user} (history of {len(histories[b])} items): {' '.join(items)}")

    rows = profile_latency(engine, depths=range(budget.reason_steps + 1), batch_sizes=(1, 64), repeats=5,
                           progress=False)
    out("\nlatency vs reasoning depth (FastReaRec, ReaRec-PRL; a rough look, 'rearec profile' measures properly):")
    out(format_profile(rows))
    paths = write_profile(rows, staging, meta={"device": device, "model": "quickstart prl"})
    replace_folder(staging, final)
    out(f"latency plot: {os.path.join(final, os.path.basename(paths['png']))}")
    out(f"\nquickstart finished in {time.perf_counter() - started:.0f}s; checkpoints in "
        f"{os.path.join(final, 'base')} and {os.path.join(final, 'prl')}")
    return 0


#: What a quickstart writes into --out; a folder holding anything else is not replaced.
OWN_ENTRIES = frozenset({"base", "prl", "latency_vs_depth.json", "latency_vs_depth.png"})


def check_own_folder(folder: str) -> None:
    """CommandError unless ``folder`` is new, empty or a previous quickstart's output: the quickstart
    replaces it as a whole, and must not take other runs or files with it. The same for the staging and
    the set-aside folders beside it (``.partial``, ``.old``), which it removes."""
    check_output_folder(folder, "--out", "give a folder for the quickstart's runs")
    here, target = os.path.abspath(os.getcwd()), os.path.abspath(folder)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):  # '.' staged as '..partial', renamed
        raise CommandError(f"--out {folder} is the current folder or holds it, and the quickstart replaces its --out "
                           "as a whole (renames it): give a folder of its own, e.g. --out runs/quickstart")
    base = os.path.normpath(folder)
    for path, option in ((folder, f"--out {folder}"), (base + ".partial", f"{base}.partial (its staging folder)"),
                         (base + ".old", f"{base}.old (where it sets the old output aside)")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise CommandError(f"{option} is a file the quickstart would replace: move it, or choose another --out")
        if not os.path.isdir(path):
            continue
        others = sorted(set(os.listdir(path)) - OWN_ENTRIES)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise CommandError(f"{option} holds other files ({shown}) and the quickstart replaces that folder "
                               "whole: choose a new or empty folder with --out")



