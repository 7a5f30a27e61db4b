"""``rearec study``: the quality study v2 (ML-100K and ML-1M) -> docs/results.md.

Without ``--run`` it only writes the report from the committed result files (fast, exact);
``--run`` first trains every planned run that has no result file yet (resumable; several such
processes share the plan, each taking the next run no other is training)."""
from __future__ import annotations

import argparse
import os

from rearec.cli.console import CommandError, check_output_file, check_output_folder, out
from rearec.cli.options import add_threads_argument
from rearec.config import BACKBONES
from rearec.study import DATASETS, Protocol, compute_plan, park_runs, parse_shard, run_plan
from rearec.train import emulated_bf16_note

NAME = "study"
HELP = "quality study v2 (ML-100K, ML-1M): report from committed results, or --run to train missing runs"
DESCRIPTION = ("Write docs/results.md from the committed per-run results under docs/study/runs (the default), or "
               "with --run first train every planned run without a result file (base, ERL, PRL at K=1..3, a "
               "learning-rate x dropout grid, PRL diagnoses, BERT4Rec base/ERL/PRL; patience 10). Killed runs resume; several --run "
               "processes on one --work folder share the plan (each takes the next run no other is training); --park copies unfinished runs' checkpoints where git keeps them.")


def shard(text: str):
    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="docs/study/runs",
                        help="committed per-run result files (default docs/study/runs)")
    parser.add_argument("--work", default="runs/study",
                        help="training folders with checkpoints, git-ignored (default runs/study)")
    parser.add_argument("--parked", default="docs/study/parked",
                        help="committed copies of unfinished runs' checkpoints, written by --park and resumed "
                             "from by --run when --work has none (default docs/study/parked)")
    parser.add_argument("--out", default="docs/study", help="results.json and plots (default docs/study)")
    parser.add_argument("--report", default="docs/results.md", help="the Markdown report (default docs/results.md)")
    parser.add_argument("--run", action="store_true", dest="train_runs", help="train the planned runs that have no result file first")
    parser.add_argument("--report-only", action="store_true",
                        help="no training, only the report (the default; kept for scripts)")
    parser.add_argument("--plan", action="store_true", help="print the planned runs and compute, then stop")
    parser.add_argument("--park", action="store_true",
                        help="copy every unfinished run's checkpoint folder from --work to --parked (commit them "
                             "before the machine goes; a folder whose epoch ends during its copy is copied again), "
                             "drop the parked copies of finished runs, then stop")
    parser.add_argument("--shard", type=shard, default=None, metavar="I/N",
                        help="with --run or --plan: only runs I, I+N, I+2N, ... of the plan (default 0/1; without "
                             "it, processes share the plan run by run)")
    parser.add_argument("--dataset", action="append", choices=DATASETS,
                        help="with --run or --plan: only these datasets (default: all)")
    parser.add_argument("--backbone", action="append", choices=BACKBONES,
                        help="with --run or --plan: only the runs of these backbones (default: all; the BERT4Rec arms, "
                             "bert4rec-base/-erl/-prl, use SASRec's grid choice and wait for it)")
    add_threads_argument(parser)


def selection(args) -> dict:
    """The --shard, --dataset and --backbone selection of runs, as run_plan and compute_plan take it."""
    return dict(shard=args.shard or (0, 1), datasets=tuple(args.dataset or DATASETS),
                backbones=tuple(args.backbone or BACKBONES))


def print_plan(protocol: Protocol, args) -> None:
    """The planned runs, their estimated compute, and a warning when runs to do train in bf16 where
    bf16 is slow (the estimates assume a CPU with native bf16)."""
    rows = compute_plan(protocol, args.results, args.work, args.parked, **selection(args))
    todo = [r for r in rows if not r["done"]]
    for r in rows:
        saved = f"  ({r['saved'][1]} epochs saved in --{r['saved'][0]})" if "saved" in r else ""
        saved += "  [training now]" if r.get("training") else ""
        out(f"  {'done' if r['done'] else 'todo'}  {r['dataset']:8s} {r['role']:12s} {r['name']:40s} "
            + ("" if r["done"] else f"~{r['minutes']:.0f} min{saved}"))
    minutes = sum(r["minutes"] for r in todo)
    out(f"planned compute: {len(rows)} runs, {len(rows) - len(todo)} done, {len(todo)} to go, "
        f"~{minutes / 60:.1f} h on one 1-thread process (runs x estimated minutes; a run with saved epochs "
        "needs fewer)")
    bf16_runs = [r for r in todo if r["bf16"]]
    note = emulated_bf16_note("cpu") if bf16_runs else None
    if note:
        out(f"note: {note}. {len(bf16_runs)} of the runs to do train in bf16 (the protocol's choice for "
            f"{', '.join(protocol.bf16_datasets)} and the bf16 twins)")


def run(args) -> int:
    protocol = Protocol()
    modes = [flag for flag, on in (("--run", args.train_runs), ("--plan", args.plan), ("--park", args.park),
                                   ("--report-only", args.report_only)) if on]
    if len(modes) > 1:
        raise CommandError(f"{' and '.join(modes)} are different things to do: pass one of them")
    chosen = [flag for flag, value in (("--shard", args.shard), ("--dataset", args.dataset),
                                       ("--backbone", args.backbone)) if value is not None]
    if chosen and not (args.train_runs or args.plan):
        one = len(chosen) == 1
        raise CommandError(f"{', '.join(chosen)} {'chooses' if one else 'choose'} the runs of --run or --plan: add "
                           f"one of them, or drop {'it' if one else 'them'}")
    out(f"rearec study: {args.threads_note}")
    if not (args.train_runs or args.plan or args.park) and not os.path.isdir(args.results):
        # Rewriting the report from a folder that is not there would replace it with an empty one.
        raise CommandError(f"no result folder {args.results}: run from the repository's root, pass --results "
                           "with the folder of per-run results, or train with --run")
    if args.train_runs:  # a result is written only once its run has trained: a bad folder is found first
        check_output_folder(args.results, "--results", "give the folder of the per-run result files")
        check_output_folder(args.work, "--work", "give a folder for the runs' checkpoints")
    if not (args.plan or args.park):  # the report's outputs, before any training or reading
        check_output_folder(args.out, "--out", "give a folder for results.json and the plots")
        into_out = os.path.dirname(os.path.abspath(args.report)) == os.path.abspath(args.out)
        if not into_out or os.path.isdir(args.report):  # a report inside --out: the folder is made with it
            check_output_file(args.report, "--report", "results.md")
    if args.plan or args.train_runs:
        print_plan(protocol, args)
    if args.plan:
        return 0
    if args.park:
        parked, removed = park_runs(protocol, args.results, args.work, args.parked, log=out)
        out(f"parked {parked} unfinished run(s) in {args.parked}, removed {removed} finished one(s)")
        return 0
    if args.train_runs:
        trained = run_plan(protocol, args.results, args.work, log=out, parked_dir=args.parked, **selection(args))
        out(f"trained {trained} run(s)")
    from rearec.study_report import write_study_report

    summary = write_study_report(protocol if args.train_runs else None, args.results, args.out, args.report, log=out)
    out(f"wrote {args.report} ({summary['finished_runs']} of {summary['planned_runs']} planned runs finished)")
    return 0
