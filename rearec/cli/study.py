"""``rearec study``: the quality study on MovieLens-100K (base, ERL, PRL, several seeds) -> docs/results.md."""
from __future__ import annotations

import argparse

from rearec.cli.console import out
from rearec.cli.options import add_size_arguments, add_threads_argument, positive_int, size_from_args
from rearec.study import StudyBudget, methods, run_study

NAME = "study"
HELP = "quality study on MovieLens-100K (base, ERL, PRL, several seeds) -> docs/results.md"
DESCRIPTION = ("Train base SASRec, ReaRec-ERL and ReaRec-PRL (K=2) with several seeds and PRL at K=1 and 3 under the "
               "paper's temporal split, then write docs/results.md with JSON and plots. Finished runs are kept "
               "(as JSON) and an interrupted run resumes: start it again to continue.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    budget = StudyBudget()
    parser.add_argument("--out", default="docs/study", help="runs, results.json and plots (default docs/study)")
    parser.add_argument("--report", default="docs/results.md", help="the Markdown report (default docs/results.md)")
    parser.add_argument("--seeds", type=positive_int, default=budget.seeds,
                        help=f"seeds for base/ERL/PRL (default {budget.seeds})")
    parser.add_argument("--sweep-seeds", type=positive_int, default=budget.sweep_seeds,
                        help=f"seeds for PRL at K=1 and K=3 (default {budget.sweep_seeds})")
    parser.add_argument("--epochs", type=positive_int, default=budget.max_epochs,
                        help=f"most epochs per run (default {budget.max_epochs})")
    parser.add_argument("--patience", type=positive_int, default=budget.patience,
                        help=f"early-stopping patience (default {budget.patience})")
    parser.add_argument("--only", action="append", choices=list(methods(budget)), help="run only these methods")
    parser.add_argument("--report-only", action="store_true", help="no training: report the runs finished so far")
    add_threads_argument(parser)
    add_size_arguments(parser, default_preset="study")


def run(args) -> int:
    budget = StudyBudget(seeds=args.seeds, sweep_seeds=args.sweep_seeds, max_epochs=args.epochs,
                         patience=args.patience, model_size=size_from_args(args))
    out(f"rearec study: {args.threads_note}")
    summary = run_study(args.out, args.report, budget, only=args.only, report_only=args.report_only, log=out)
    for name, entry in summary["methods"].items():
        gain = entry.get("gain_over_base_pct", {}).get("ndcg@10")
        out(f"{name:8s} NDCG@10 {entry['metrics']['ndcg@10'][0]:.4f}  Recall@10 {entry['metrics']['recall@10'][0]:.4f}"
            + ("" if gain is None else f"  ({gain:+.1f}% vs base, p={entry['p_value_ndcg10']:.3g})"))
    out(f"wrote {args.report}")
    return 0
