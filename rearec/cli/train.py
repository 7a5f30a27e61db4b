"""``rearec train``: train SASRec or ReaRec on an interaction log into a run folder."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

from rearec.cli.console import (CommandError, Diverged, check_output_folder, one_line, out, pick_device, print_error,
                                show_progress)
from rearec.cli.options import (add_data_arguments, add_device_argument, add_size_arguments, add_threads_argument,
                                check_sample_filter_options, check_sets, config_from_options, data_spec_from_args,
                                given_data_options, model_line, nonnegative_int, positive_int, print_data,
                                size_from_args)
from rearec import distributed
from rearec.config import ReaRecConfig
from rearec.data import DataSpec
from rearec.data.item_features import features_for_data, item_file_for, read_item_file
from rearec.evaluate import format_report
from rearec.metrics import DEFAULT_KS
from rearec.runs import DATA_FILE, MODEL_FILE, OVERWRITE, RESUME, START, TEST_METRICS_FILE, check_start, run_file, write_json
from rearec.train import MAX_SEED, TrainConfig, evaluate_sharded, emulated_bf16_note, train_run

NAME = "train"
HELP = "train a model on an interaction log"
#: ``rearec train`` runs under torchrun (DDP); the other commands refuse WORLD_SIZE > 1.
DISTRIBUTED = True
#: Exit code when another process of a torchrun job failed (or torchrun stopped this one).
EXIT_RANK_FAILURE = 3
DESCRIPTION = ("Train SASRec (--objective base) or ReaRec (erl, prl) with early stopping on validation NDCG@20, "
               "then evaluate on test. The best weights are in OUT/model.safetensors; OUT/data.json records the "
               "data options for 'evaluate' and 'recommend'.")

#: Options of the objectives: (flag, ReaRecConfig field, type, help). Defaults are ReaRecConfig's.
OBJECTIVE_OPTIONS = (
    ("--dropout", "dropout", float, "hidden dropout"),
    ("--input-dropout", "input_dropout", float, "input dropout"),
    ("--temperature", "temperature", float, "softmax temperature"),
    ("--kl-weight", "kl_weight", float, "ERL: KL diversity weight"),
    ("--pl-weight", "pl_weight", float, "PRL: weight of the earlier steps' losses"),
    ("--temp-scale", "temp_scale", float, "PRL: temperature growth per step back"),
    ("--noise-std", "noise_std", float, "PRL: noise of the contrastive copy"),
    ("--cl-weight", "cl_weight", float, "PRL: contrastive weight"),
    ("--warmup-epochs", "warmup_epochs", nonnegative_int, "PRL: epochs before the contrastive term starts"),
)


def seed_value(text: str) -> int:
    value = nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ReaRecConfig(n_items=1)
    m = parser.add_argument_group("model")
    m.add_argument("--objective", choices=("base", "erl", "prl"), required=True,
                   help="base: plain SASRec; erl: ensemble reasoning; prl: progressive reasoning")
    m.add_argument("--reason-steps", type=nonnegative_int, default=None, metavar="K",
                   help="reasoning steps K (default 2; 0 for base)")
    m.add_argument("--readout", choices=("last", "mean"), default=None,
                   help="user vector: r_K ('last') or mean of r_0..r_K (default: mean for erl, last otherwise)")
    for flag, field, kind, text in OBJECTIVE_OPTIONS:
        m.add_argument(flag, type=kind, default=None, metavar="N" if kind is nonnegative_int else "X", dest=field,
                       help=f"{text} (default {getattr(defaults, field)})")
    m.add_argument("--item-features", default=None, metavar="PATH|auto",
                   help="add item features to the id embeddings, from a RecBole .item file (auto: the one beside "
                        "--data; ML-100K's ships with recbole): genres, release decade, hashed title words. Items "
                        "in the file without interactions become recommendable cold items")
    add_size_arguments(parser)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    t = parser.add_argument_group("training")
    t.add_argument("--lr", type=float, metavar="X", default=defaults.lr, help=f"Adam learning rate (default {defaults.lr:g})")
    t.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, metavar="B",
                   help=f"(default {defaults.batch_size})")
    t.add_argument("--epochs", type=positive_int, default=defaults.max_epochs, metavar="N",
                   help=f"most epochs (default {defaults.max_epochs})")
    t.add_argument("--patience", type=positive_int, default=defaults.patience, metavar="N",
                   help=f"stop after this many epochs without a better validation NDCG@20 (default {defaults.patience})")
    t.add_argument("--seed", type=seed_value, default=defaults.seed, metavar="S",
                   help=f"0..{MAX_SEED} (default {defaults.seed})")
    t.add_argument("--fused-ce", action=argparse.BooleanOptionalAction, default=defaults.fused_ce,
                   help="item-table cross-entropy without materialising its batch x items logits "
                        "(--no-fused-ce: the dense F.cross_entropy path; same results)")
    t.add_argument("--bf16", action="store_true",
                   help="mixed precision: the forward's matrix products in bfloat16 (torch.autocast), weights, "
                        "optimizer and losses in float32; faster on CPUs with AVX512-BF16 or AMX and on GPUs; "
                        "on other CPUs its products run as float32 ones, at about float32's speed (a note says "
                        "so); not bit-comparable with float32 runs")
    add_device_argument(t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, required=True)
    add_model_arguments(parser)
    add_training_arguments(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="folder for model.safetensors (best weights), train_state.pt, train.log, data.json and "
                        "test_metrics.json")
    o.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (same options)")
    o.add_argument("--overwrite", action="store_true", help="start over when --out holds a run")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (drawn only when stderr is a terminal)")
    add_threads_argument(parser)


def check_objective_options(args) -> None:
    """An option of one objective given with another (--kl-weight with prl, say) would be ignored:
    refused instead, naming the objective that reads it."""
    for flag, field, _, text in OBJECTIVE_OPTIONS:
        owner = text.split(":")[0].lower() if ":" in text else None
        if owner is not None and getattr(args, field, None) is not None and args.objective != owner:
            raise CommandError(f"{flag} is read by --objective {owner} only, and this run is {args.objective}; "
                               f"drop {flag} or train {owner}")


def model_config_from_args(args, n_items: int, item_feature_dim=None, cold_items: int = 0) -> ReaRecConfig:
    values = {"n_items": n_items, "objective": args.objective, "item_feature_dim": item_feature_dim,
              "cold_items": cold_items, **size_from_args(args)}
    fields = ["reason_steps", "readout"] + [field for _, field, _, _ in OBJECTIVE_OPTIONS]
    values.update({field: getattr(args, field) for field in fields if getattr(args, field) is not None})
    options = {"reason_steps": "--reason-steps", "readout": "--readout"}
    options.update({field: flag for flag, field, _, _ in OBJECTIVE_OPTIONS})
    return config_from_options(options, **values)


def summary(result, metric: str) -> str:
    if result.best_epoch < 0:
        return "no epoch finished"
    why = {"converged": result.message or "early stop", "max_epochs": "reached --epochs",
           "time_budget": result.message}.get(result.status, result.status)
    return (f"best valid {metric} {result.best_score:.4f} at epoch {result.best_epoch} "
            f"({result.epochs_run} epochs, {result.seconds:.0f}s; {why})")


def evaluate_and_save(model, data, out_dir: str, *, ks=DEFAULT_KS, progress: bool = True) -> dict:
    """Test metrics of ``model``, also written to the run's TEST_METRICS_FILE. Under torchrun every rank
    calls it: each ranks its share of the test samples, and rank 0 writes the file."""
    report = evaluate_sharded(model, data.test, ks, progress=progress)
    path = run_file(out_dir, TEST_METRICS_FILE)
    distributed.on_rank0(lambda: write_json(path, {"part": "test", "ks": list(ks), "metrics": report}),
                         f"write the test metrics to {path} (training had finished and is saved)")
    return report


def diverged_error(result, out_dir: str) -> Diverged:
    checkpoint = run_file(out_dir, MODEL_FILE)
    where = f"; the best checkpoint is {checkpoint}" if result.best_epoch >= 0 else ""
    return Diverged(result.message + where)


def run(args) -> int:
    """Train; under torchrun every rank runs this, rank 0 alone prints and writes files."""
    device = distributed.init_from_env(pick_device(args.device))
    quiet = open(os.devnull, "w") if distributed.rank() > 0 else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            return train_command(args, device)
    except distributed.RankFailure as error:
        message = one_line(error)
        if "stopped by signal" in message:  # torchrun stopped it outside a collective
            message += "; the epochs finished before are saved: start the same torchrun command with --resume"
        print_error(message)
        return EXIT_RANK_FAILURE
    finally:
        if quiet:
            quiet.close()
        distributed.shutdown()


def train_command(args, device: str) -> int:
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise CommandError(f"--lr must be a positive number, got {args.lr}")
    if args.resume and args.overwrite:
        raise CommandError("--resume and --overwrite contradict each other; pass one")
    check_objective_options(args)
    spec = data_spec_from_args(args)
    check_sample_filter_options(spec, given_data_options(args))
    max_len = size_from_args(args).get("max_len", ReaRecConfig.__dataclass_fields__["max_len"].default)
    if spec.split == "temporal" and spec.sample_filter == "window":
        # The window rule keeps a sample whose items past the window are unseen in training: the window
        # must cover what the model reads (the public protocol: its max_len).
        saved = run_file(args.out, DATA_FILE)
        if "filter_window" not in given_data_options(args) and args.resume and os.path.isfile(saved):
            # the run's own window: a changed --max-len is then named as what changed (the model's
            # max_len), not as a filter_window the user never gave
            spec = spec.replace(filter_window=DataSpec.read(saved).filter_window)
        elif "filter_window" not in given_data_options(args):
            spec = spec.replace(filter_window=max_len)
        elif spec.filter_window < max_len:
            raise CommandError(f"--filter-window {spec.filter_window} is shorter than the model's max_len {max_len}: "
                               "kept samples could hold items unseen in training inside the window the model "
                               f"reads; pass --filter-window {max_len} or more (or leave it out: it follows max_len)")
    mode = RESUME if args.resume else OVERWRITE if args.overwrite else START
    check_output_folder(args.out, "--out", "give a folder for the run, e.g. --out runs/base")  # before the data
    distributed.on_rank0(lambda: check_start(args.out, mode), f"use the run folder {args.out}")
    data = spec.load()
    distributed.check_same_everywhere(data.content_fingerprint(), "the data (--data's users, items and interactions)",
                                      "give every process the same log and data options")
    print_data(data, spec)
    check_sets(data)
    features = None
    if args.item_features is not None:
        path = item_file_for(spec.source) if args.item_features == "auto" else args.item_features
        features = features_for_data(read_item_file(path), data.mapping)
        out(f"item features: {features.matrix.shape[1]} columns from {path}; {features.n_cold:,} cold items "
            "(features, no interactions) join the item table")
    config = (model_config_from_args(args, data.n_items) if features is None else
              model_config_from_args(args, features.mapping.n_items, features.matrix.shape[1], features.n_cold))
    train_config = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.epochs,
                               patience=args.patience, seed=args.seed, device=device,
                               progress=show_progress(args.no_progress), fused_ce=args.fused_ce, bf16=args.bf16)
    note = emulated_bf16_note(device) if args.bf16 else None
    if note:
        out(f"note: {note}")
    out(model_line(config) + f"  (preset {args.preset})")
    out(f"training: lr {args.lr:g}  batch {args.batch_size}  up to {args.epochs} epochs  patience "
        f"{args.patience}  seed {args.seed}  device {device}  {args.threads_note}  -> {args.out}")
    tested = {}

    def test(model, result):  # inside train_run: the folder stays locked until the test metrics are written
        if result.status == "diverged":
            raise diverged_error(result, args.out)
        out(summary(result, train_config.metric))
        try:  # every rank ranks its share of the test samples; rank 0 writes the metrics
            tested["report"] = evaluate_and_save(model, data, args.out, progress=show_progress(args.no_progress))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted during the test evaluation; training had finished and is saved in "
                                    f"{args.out}: 'rearec evaluate --checkpoint {args.out}' computes the test "
                                    "metrics") from None

    train_run(config, data, train_config, args.out, mode=mode, data_spec=spec, log=out, item_features=features,
              then=test)
    report = tested["report"]
    if distributed.rank() > 0:
        return 0
    out(f"test ({report['n_samples']:,} samples, full ranking):")
    out(format_report(report, ks=(10, 20)))
    out(f"checkpoint: {run_file(args.out, MODEL_FILE)}  (test metrics: {run_file(args.out, TEST_METRICS_FILE)})")
    return 0
