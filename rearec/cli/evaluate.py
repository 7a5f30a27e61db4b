"""``rearec evaluate``: full-ranking metrics of a checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import sys

from rearec.cli.console import CommandError, check_output_file, out, pick_device, show_progress
from rearec.cli.options import (add_checkpoint_backbone_argument, add_data_arguments, add_device_argument, add_threads_argument, check_log_unchanged, check_mapping,
                                check_backbone, checkpoint_path, cutoffs, data_spec_for_checkpoint, model_line, positive_int)
from rearec.data import DataError
from rearec.evaluate import evaluate, format_report
from rearec.metrics import DEFAULT_KS
from rearec.model import ReaRec
from rearec.runs import LOCK_FILE, RUN_FILES, TEST_METRICS_FILE, run_file, write_json

NAME = "evaluate"
HELP = "full-ranking metrics of a checkpoint"
DESCRIPTION = ("Recall, NDCG and MRR at every cutoff for the readout, each reasoning step r_0..r_K alone, and the "
               "oracle (best step per sample).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="model.safetensors written by 'rearec train' (or its folder)")
    add_data_arguments(parser, required=False)
    parser.add_argument("--part", choices=("test", "valid"), default="test", help="(default test)")
    parser.add_argument("--exclude-history", action="store_true", help="never rank an item of the sample's whole history (also those older than the model's window)")
    parser.add_argument("--ks", type=cutoffs, default=list(DEFAULT_KS), metavar="K,K,...",
                        help="cutoffs (default " + ",".join(map(str, DEFAULT_KS)) + ")")
    parser.add_argument("--readout", choices=("last", "mean"), default=None, help="readout to report (default: the model's)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the metrics as JSON to OUT ('-' for stdout)")
    add_device_argument(parser)
    add_checkpoint_backbone_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=512, help="(default 512)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (drawn only when stderr is a terminal)")
    add_threads_argument(parser)


def run(args) -> int:
    device = pick_device(args.device)
    checkpoint = checkpoint_path(args.checkpoint)
    if args.json not in (None, "-"):
        check_output_file(args.json, "--json", "metrics.json")
    model = ReaRec.load(checkpoint, map_location=device)
    check_backbone(args, model, checkpoint)
    spec = data_spec_for_checkpoint(args, checkpoint, model.config.max_len)
    if args.json not in (None, "-"):
        folder = os.path.dirname(os.path.abspath(checkpoint))
        # real paths: the metrics are written through a symbolic link, so a link to an input is that input
        inputs = {os.path.realpath(checkpoint), os.path.realpath(spec.source),
                  *(os.path.realpath(run_file(folder, name)) for name in RUN_FILES if name != TEST_METRICS_FILE),
                  os.path.realpath(run_file(folder, LOCK_FILE))}  # replacing the lock would let a second trainer in
        if os.path.realpath(args.json) == os.path.realpath(run_file(folder, TEST_METRICS_FILE)) and (
                args.part != "test" or args.exclude_history):
            raise CommandError(f"--json {args.json} holds the run's test metrics, and this evaluation is "
                               f"{'of --part valid' if args.part != 'test' else 'with --exclude-history'}: write it "
                               f"elsewhere, e.g. {os.path.join(folder, 'eval.json')}")
        if os.path.realpath(args.json) in inputs:
            raise CommandError(f"--json {args.json} is a file this evaluation reads (the run's or the data's) or the run's lock: "
                               f"write the metrics elsewhere, e.g. {os.path.join(folder, 'eval.json')}")
    data = spec.load()
    check_mapping(model, data, checkpoint)
    check_log_unchanged(args, checkpoint, spec, data)
    samples = getattr(data, args.part)
    if len(samples) == 0:
        raise DataError(f"the {args.part} set of this data is empty; evaluate another --part or check the data options")
    say = (lambda text: print(text, file=sys.stderr)) if args.json == "-" else out
    say(f"checkpoint: {checkpoint}  ({args.threads_note})")
    report = evaluate(model, samples, ks=args.ks, batch_size=args.batch_size, exclude_history=args.exclude_history,
                      readout=args.readout, progress=show_progress(args.no_progress))
    cfg = model.config
    say(model_line(cfg))
    say(f"{args.part}: {report['n_samples']:,} samples, full ranking over {cfg.n_items:,} items"
        + (", history excluded" if args.exclude_history else "")
        + f"; readout = {args.readout or cfg.readout}, r0..r{cfg.reason_steps} = single steps, "
          "oracle = best step per sample")
    for metric in ("recall", "ndcg", "mrr"):
        say(format_report(report, ks=args.ks, names=(metric,)))
    if args.json:
        payload = {"checkpoint": os.path.abspath(checkpoint), "data": {"source": spec.source, **spec.options()},
                   "part": args.part, "exclude_history": args.exclude_history,
                   "readout": args.readout or cfg.readout, "ks": args.ks, "n_samples": report["n_samples"],
                   "metrics": report}
        if args.json == "-":
            print(json.dumps(payload, indent=2, ensure_ascii=False))
        else:
            write_json(args.json, payload)
            say(f"metrics written to {args.json}")
    return 0
