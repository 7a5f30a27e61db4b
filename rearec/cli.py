"""The ``rearec`` command line: ``train``, ``evaluate``, ``recommend`` and ``quickstart``.

Every subcommand is one row of :data:`COMMANDS` (name, help, add-arguments function, run function);
``rearec profile`` joins the table by itself when :mod:`rearec.profile` provides
``add_profile_arguments(parser)`` and ``run_profile(args)``.

Exit codes: 0 success; 1 training diverged (the best checkpoint is kept); 2 a mistake in the
options, the data or the files (one line on stderr: ``rearec: error: <problem>; <fix>``); 130
interrupted (Ctrl-C). Set ``REAREC_DEBUG=1`` to get tracebacks instead of one-line errors.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Callable, List, NamedTuple, Optional

PROG = "rearec"
DATA_FILE = "data.json"
DATA_FORMAT = "rearec.data/1"
TEST_METRICS_FILE = "test_metrics.json"
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Data options saved in data.json, with the defaults ``rearec train`` uses.
DATA_DEFAULTS = {
    "split": "temporal",
    "min_rating": "auto",
    "k_core": None,
    "min_history": None,
    "user_col": None,
    "item_col": None,
    "time_col": None,
    "rating_col": None,
    "sep": None,
}

#: What ``rearec quickstart`` trains: sized to finish within 10 minutes on a 2-core CPU.
QUICKSTART = {
    "hidden_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256, "max_len": 20,
    "lr": 1e-3, "batch_size": 256, "epochs": 20, "patience": 8, "seed": 2025,
    "reason_steps": 2, "users_shown": 3,
}


class CommandError(ValueError):
    """A mistake in the command's options or files; main prints it as one line, exit code 2."""


class _ArgumentError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Interrupted(Exception):
    """Ctrl-C, with the message to print (exit code 130)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rearec: error: <problem>; see 'rearec train --help'``."""

    def error(self, message):  # noqa: D401 - argparse API
        raise _ArgumentError(self.prog, message)


# ---------------------------------------------------------------------------------------------
# small helpers


def _out(text: str = "") -> None:
    """Print a line to stdout without breaking an open tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stdout)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _min_rating(text: str):
    low = text.strip().lower()
    if low == "auto":
        return "auto"
    if low in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'auto' or 'none', got {text!r}") from None


def _k_core(text: str):
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K_USERS,K_ITEMS, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values
    raise argparse.ArgumentTypeError(f"expected K or K_USERS,K_ITEMS, got {text!r}")


def _sep(text: str) -> str:
    return {"\\t": "\t", "tab": "\t", "TAB": "\t", "space": " ", "comma": ","}.get(text, text)


def _rating_col(text: str):
    return False if text.strip().lower() == "none" else text


def _ks(text: str) -> List[int]:
    try:
        values = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cutoffs like 5,10,20,50, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive cutoffs like 5,10,20,50, got {text!r}")
    return values


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for PyTorch (default: all cores); use 1 when other "
                             "CPU-heavy processes share the machine: several threads competing "
                             "for busy cores can run many times slower")


def _device(name: Optional[str]) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _write_json(path: str, payload) -> None:
    """Write JSON atomically ('-' prints it to stdout)."""
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    from rearec.train import _atomic_write

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {path}: folder {folder} does not exist; create it or "
                           "choose another path")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        fix = ("check the path" if isinstance(error, (FileNotFoundError, IsADirectoryError,
                                                      NotADirectoryError))
               else "check the permissions, or choose another path")
        text = f"{error.strerror}:{where}; {fix}"
    else:
        text = str(error) or type(error).__name__
        if isinstance(error, KeyError):
            text = f"missing key {text}"
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# data options and data.json


def _add_data_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    g = parser.add_argument_group(
        "data" if required else "data (default: the data.json written beside the checkpoint by "
                                "'rearec train'; options given here override it)")
    g.add_argument("--data", required=required, metavar="PATH|ml-100k",
                   help="interaction log (.inter, .csv, .tsv, .parquet) or 'ml-100k' (MovieLens-100K "
                        "from the recbole wheel)")
    g.add_argument("--split", choices=("temporal", "loo"), default=None,
                   help="'temporal': global cut at the 0.8/0.9 time quantiles (the paper); 'loo': "
                        "leave-one-out per user (default: temporal)")
    g.add_argument("--min-rating", type=_min_rating, default=None, metavar="X",
                   help="keep ratings > X; 'auto' = 3 for ml-100k and no filter otherwise; 'none' "
                        "(default: auto)")
    g.add_argument("--k-core", type=_k_core, default=None, metavar="K",
                   help="repeatedly drop users and items with fewer than K interactions (K or "
                        "K_USERS,K_ITEMS)")
    g.add_argument("--min-history", type=_nonnegative_int, default=None, metavar="N",
                   help="drop users with fewer than N interactions")
    g.add_argument("--user-col", default=None, metavar="NAME", help="column of user ids")
    g.add_argument("--item-col", default=None, metavar="NAME", help="column of item ids")
    g.add_argument("--time-col", default=None, metavar="NAME", help="column of timestamps")
    g.add_argument("--rating-col", type=_rating_col, default=None, metavar="NAME",
                   help="column of ratings ('none': ignore ratings)")
    g.add_argument("--sep", type=_sep, default=None, metavar="SEP",
                   help="field separator of a text log (',', 'tab', ...; default from the suffix)")


_DATA_ARG_NAMES = tuple(DATA_DEFAULTS)


def _explicit_data_options(args) -> dict:
    return {name: getattr(args, name) for name in _DATA_ARG_NAMES if getattr(args, name) is not None}


def _resolve_source(source: str) -> str:
    from rearec.data import ML100K_NAME

    if source.strip().lower() == ML100K_NAME:
        return ML100K_NAME
    return os.path.abspath(os.path.expanduser(source))


def _spec_from_args(args) -> dict:
    """Data spec (source + every data option) from the command line, defaults filled in."""
    options = dict(DATA_DEFAULTS)
    options.update(_explicit_data_options(args))
    return {"source": _resolve_source(args.data), **options}


def _spec_for_checkpoint(args, checkpoint: str) -> dict:
    """The data spec of an existing run: data.json beside the checkpoint, overridden by options
    given on the command line (a new --data starts from the defaults instead)."""
    if args.data is not None:
        return _spec_from_args(args)
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), DATA_FILE)
    if not os.path.isfile(path):
        raise CommandError(f"no --data given and no {DATA_FILE} beside the checkpoint ({path}); "
                           "pass --data with the data options used for training")
    spec = read_data_file(path)
    spec.update(_explicit_data_options(args))
    return spec


def read_data_file(path: str) -> dict:
    """The data spec saved by ``rearec train`` (``source`` plus the data options)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} is not valid JSON ({error.msg}); restore it or pass --data") \
            from None
    if not isinstance(saved, dict) or saved.get("format") != DATA_FORMAT or "source" not in saved:
        raise CommandError(f"{path} is not a rearec data file (expected format {DATA_FORMAT!r}); "
                           "pass --data with the data options used for training")
    spec = {"source": saved["source"], **DATA_DEFAULTS}
    spec.update({k: v for k, v in saved.get("options", {}).items() if k in DATA_DEFAULTS})
    return spec


def write_data_file(folder: str, spec: dict, data) -> str:
    path = os.path.join(folder, DATA_FILE)
    payload = {
        "format": DATA_FORMAT,
        "source": spec["source"],
        "options": {k: spec[k] for k in DATA_DEFAULTS},
        "fingerprint": data.mapping.fingerprint(),
        "users": data.n_users,
        "items": data.n_items,
        "samples": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
    }
    _write_json(path, payload)
    return path


def _same_data_spec(a: dict, b: dict) -> bool:
    keys = ("source",) + _DATA_ARG_NAMES
    return all(json.dumps(a.get(k)) == json.dumps(b.get(k)) for k in keys)


def load_data(spec: dict):
    """``load_dataset`` with a data spec."""
    from rearec.data import load_dataset

    k_core = spec.get("k_core")
    if isinstance(k_core, list):
        k_core = tuple(k_core)
    return load_dataset(
        spec["source"], split=spec["split"], min_rating=spec["min_rating"], k_core=k_core,
        min_history=spec["min_history"], user_col=spec["user_col"], item_col=spec["item_col"],
        time_col=spec["time_col"], rating_col=spec["rating_col"], sep=spec["sep"])


def _print_data(data, spec: dict) -> None:
    _out(f"data: {spec['source']}")
    if data.filter_report is not None and data.filter_report.steps:
        _out(str(data.filter_report))
    _out(data.summary())


def _check_mapping(model, data, checkpoint: str) -> None:
    """DataError unless the checkpoint was trained on this data (same raw-id mapping)."""
    from rearec.data import IdMapping

    if model.id_mapping is not None:
        data.mapping.check_same(IdMapping.from_dict(model.id_mapping),
                                what=f"checkpoint {checkpoint}")
    elif model.config.n_items != data.n_items:
        raise CommandError(f"checkpoint {checkpoint} has {model.config.n_items:,} items but the data "
                           f"has {data.n_items:,}; use the data the model was trained on")


def _checkpoint_path(path: str) -> str:
    from rearec.train import MODEL_FILE

    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise CommandError(f"checkpoint {path} does not exist; pass the model.safetensors written "
                           "by 'rearec train' (or its folder)")
    return path


# ---------------------------------------------------------------------------------------------
# train


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("--objective", choices=("base", "erl", "prl"), required=True,
                   help="base: plain SASRec; erl: ensemble reasoning; prl: progressive reasoning")
    m.add_argument("--reason-steps", type=_nonnegative_int, default=None, metavar="K",
                   help="reasoning steps K (default 2; 0 for base)")
    m.add_argument("--readout", choices=("last", "mean"), default=None,
                   help="user vector: r_K ('last') or mean of r_0..r_K (default: mean for erl, last "
                        "otherwise)")
    m.add_argument("--hidden-size", type=_positive_int, default=64, metavar="D", help="(default 64)")
    m.add_argument("--layers", type=_positive_int, default=2, metavar="N", help="transformer layers (default 2)")
    m.add_argument("--heads", type=_positive_int, default=2, metavar="N", help="attention heads (default 2)")
    m.add_argument("--inner-size", type=_positive_int, default=None, metavar="N",
                   help="feed-forward size (default 4 x hidden size)")
    m.add_argument("--max-len", type=_positive_int, default=50, metavar="L",
                   help="history items kept, newest first (default 50)")
    m.add_argument("--dropout", type=float, metavar="X", default=None, help="hidden dropout (default 0.5)")
    m.add_argument("--input-dropout", type=float, metavar="X", default=None, help="input dropout (default 0.2)")
    m.add_argument("--temperature", type=float, metavar="X", default=None, help="softmax temperature (default 0.07)")
    m.add_argument("--kl-weight", type=float, metavar="X", default=None, help="ERL: KL diversity weight (default 0.05)")
    m.add_argument("--pl-weight", type=float, metavar="X", default=None,
                   help="PRL: weight of the earlier steps' losses (default 1.0)")
    m.add_argument("--temp-scale", type=float, metavar="X", default=None,
                   help="PRL: temperature growth per step back (default 5.0)")
    m.add_argument("--noise-std", type=float, metavar="X", default=None, help="PRL: noise of the contrastive copy (default 0.01)")
    m.add_argument("--cl-weight", type=float, metavar="X", default=None, help="PRL: contrastive weight (default 1.0)")
    m.add_argument("--warmup-epochs", type=_nonnegative_int, default=None, metavar="N",
                   help="PRL: epochs before the contrastive term starts (default 2)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group("training")
    t.add_argument("--lr", type=float, metavar="X", default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--batch-size", type=_positive_int, default=256, metavar="B", help="(default 256)")
    t.add_argument("--epochs", type=_positive_int, default=200, metavar="N", help="most epochs (default 200)")
    t.add_argument("--patience", type=_positive_int, default=10, metavar="N",
                   help="stop after this many epochs without a better validation NDCG@20 (default 10)")
    t.add_argument("--seed", type=int, default=2025, metavar="S", help="(default 2025)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_arguments(parser, required=True)
    _add_model_arguments(parser)
    _add_training_arguments(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="folder for model.safetensors (best weights), train_state.pt, train.log, "
                        "data.json and test_metrics.json")
    o.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (same options)")
    o.add_argument("--overwrite", action="store_true", help="start over when --out holds a run")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_argument(parser)


def _model_config(args, n_items: int):
    from rearec.config import ReaRecConfig

    values = {
        "n_items": n_items, "objective": args.objective, "hidden_size": args.hidden_size,
        "n_layers": args.layers, "n_heads": args.heads,
        "inner_size": args.inner_size or 4 * args.hidden_size, "max_len": args.max_len,
    }
    optional = {"reason_steps": "reason_steps", "readout": "readout", "dropout": "dropout",
                "input_dropout": "input_dropout", "temperature": "temperature",
                "kl_weight": "kl_weight", "pl_weight": "pl_weight", "temp_scale": "temp_scale",
                "noise_std": "noise_std", "cl_weight": "cl_weight", "warmup_epochs": "warmup_epochs"}
    values.update({field: getattr(args, arg) for field, arg in optional.items()
                   if getattr(args, arg) is not None})
    return ReaRecConfig(**values)


def _check_sets(data) -> None:
    from rearec.data import DataError

    fix = ("adjust the split (try --split loo) or use more data" if data.split == "temporal"
           else "use more data or --min-history 3")
    for name in ("train", "valid", "test"):
        if len(getattr(data, name)) == 0:
            raise DataError(f"the {name} set is empty after filtering and splitting; {fix}")


_RUN_FILES = ("model.safetensors", "train_state.pt", "train.log", DATA_FILE, TEST_METRICS_FILE)

#: Training options that must not change when a run is resumed (they change the result).
_RESUME_FIXED = ("lr", "batch_size", "seed", "weight_decay", "metric")


def _check_resume_options(out_dir: str, spec: dict, train_config) -> None:
    import dataclasses

    import torch

    from rearec.train import STATE_FILE, TrainingError

    data_path = os.path.join(out_dir, DATA_FILE)
    if os.path.isfile(data_path) and not _same_data_spec(read_data_file(data_path), spec):
        raise TrainingError(f"{out_dir} was trained with other data options (see {data_path}); "
                            "resume with the same --data and data options, or choose a new --out")
    state_path = os.path.join(out_dir, STATE_FILE)
    if not os.path.isfile(state_path):
        return  # Trainer.resume reports it
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    saved, now = state.get("train_config", {}), dataclasses.asdict(train_config)
    changed = [k for k in _RESUME_FIXED if k in saved and saved[k] != now[k]]
    if changed:
        what = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in changed)
        raise TrainingError(f"{out_dir} was trained with {what}; resume with the same options, "
                            "or choose a new --out")


def train_run(data, spec: dict, model_config, train_config, out_dir: str, *, resume: bool = False,
              overwrite: bool = False):
    """Train one model into ``out_dir``; returns ``(model, result)``.

    Raises TrainingError for an unusable folder, _Interrupted on Ctrl-C (progress so far is saved).
    """
    import torch

    from rearec.model import ReaRec
    from rearec.train import STATE_FILE, Trainer, TrainingError, prepare_output_folder

    prepare_output_folder(out_dir)
    state_path = os.path.join(out_dir, STATE_FILE)
    if overwrite and not resume:
        for name in _RUN_FILES:
            if os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    elif os.path.isfile(state_path) and not resume:
        raise TrainingError(f"{out_dir} already holds a training run ({STATE_FILE}); pass --resume to "
                            "continue it, --overwrite to start over, or choose another --out")
    if resume:
        _check_resume_options(out_dir, spec, train_config)
    write_data_file(out_dir, spec, data)

    torch.manual_seed(train_config.seed)  # initial weights
    model = ReaRec(model_config)
    model.id_mapping = data.mapping.to_dict()  # as in the saved checkpoint: raw ids for FastReaRec
    trainer = Trainer(model, data, train_config, out_dir, log=_out)
    if resume:
        trainer.resume()
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        done = trainer.epoch  # epochs finished and saved
        saved = (f"epochs 0..{done - 1} are saved in {out_dir}" if done
                 else "no epoch had finished, nothing was saved")
        raise _Interrupted(f"training interrupted in epoch {done}; {saved}; resume with --resume "
                           "(and the same options)") from None
    return model, result


def _summary(result, metric: str) -> str:
    if result.best_epoch < 0:
        return "no epoch finished"
    why = {"converged": result.message or "early stop", "max_epochs": "reached --epochs"}.get(
        result.status, result.status)
    return (f"best valid {metric} {result.best_score:.4f} at epoch {result.best_epoch} "
            f"({result.epochs_run} epochs, {result.seconds:.0f}s; {why})")


def _evaluate_and_save(model, data, out_dir: str, *, ks=(5, 10, 20, 50), progress: bool = True):
    from rearec.evaluate import evaluate

    report = evaluate(model, data.test, ks=ks, progress=progress)
    _write_json(os.path.join(out_dir, TEST_METRICS_FILE),
                {"part": "test", "ks": list(ks), "metrics": report})
    return report


def _model_line(cfg) -> str:
    return (f"model: {cfg.objective}  K={cfg.reason_steps}  readout={cfg.readout}  hidden "
            f"{cfg.hidden_size}  layers {cfg.n_layers}  heads {cfg.n_heads}  inner {cfg.inner_size}  "
            f"max_len {cfg.max_len}  items {cfg.n_items:,}")


def run_train(args) -> int:
    from rearec.evaluate import format_report
    from rearec.train import TrainConfig

    spec = _spec_from_args(args)
    device = _device(args.device)
    data = load_data(spec)
    _print_data(data, spec)
    _check_sets(data)
    config = _model_config(args, data.n_items)
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise CommandError(f"--lr must be a positive number, got {args.lr}")
    train_config = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.epochs,
                               patience=args.patience, seed=args.seed, device=device,
                               progress=not args.no_progress)
    _out(_model_line(config))
    _out(f"training: lr {args.lr:g}  batch {args.batch_size}  up to {args.epochs} epochs  patience "
         f"{args.patience}  seed {args.seed}  device {device}  -> {args.out}")
    model, result = train_run(data, spec, config, train_config, args.out, resume=args.resume,
                              overwrite=args.overwrite)
    checkpoint = os.path.join(args.out, "model.safetensors")
    if result.status == "diverged":
        where = (f"; the best checkpoint is {checkpoint}" if result.best_epoch >= 0 else "")
        print(f"{PROG}: error: {result.message}{where}", file=sys.stderr)
        return EXIT_DIVERGED
    _out(_summary(result, train_config.metric))
    report = _evaluate_and_save(model, data, args.out, progress=not args.no_progress)
    _out(f"test ({report['n_samples']:,} samples, full ranking):")
    _out(format_report(report, ks=(10, 20)))
    _out(f"checkpoint: {checkpoint}  (test metrics: {os.path.join(args.out, TEST_METRICS_FILE)})")
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="model.safetensors written by 'rearec train' (or its folder)")
    _add_data_arguments(parser, required=False)
    parser.add_argument("--part", choices=("test", "valid"), default="test", help="(default test)")
    parser.add_argument("--exclude-history", action="store_true",
                        help="never rank items of the sample's own history")
    parser.add_argument("--ks", type=_ks, default=[5, 10, 20, 50], metavar="K,K,...",
                        help="cutoffs (default 5,10,20,50)")
    parser.add_argument("--readout", choices=("last", "mean"), default=None,
                        help="readout to report (default: the model's)")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="also write the metrics as JSON to OUT ('-' for stdout)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--batch-size", type=_positive_int, default=512, help="(default 512)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_threads_argument(parser)


def run_evaluate(args) -> int:
    from rearec.data import DataError
    from rearec.evaluate import evaluate, format_report
    from rearec.model import ReaRec

    checkpoint = _checkpoint_path(args.checkpoint)
    model = ReaRec.load(checkpoint, map_location=_device(args.device))
    spec = _spec_for_checkpoint(args, checkpoint)
    data = load_data(spec)
    _check_mapping(model, data, checkpoint)
    samples = getattr(data, args.part)
    if len(samples) == 0:
        raise DataError(f"the {args.part} set of this data is empty; evaluate another --part or "
                        "check the data options")
    report = evaluate(model, samples, ks=args.ks, batch_size=args.batch_size,
                      exclude_history=args.exclude_history, readout=args.readout,
                      progress=not args.no_progress)
    cfg = model.config
    out = (lambda text: print(text, file=sys.stderr)) if args.json == "-" else _out
    out(f"checkpoint: {checkpoint}")
    out(_model_line(cfg))
    out(f"{args.part}: {report['n_samples']:,} samples, full ranking over {cfg.n_items:,} items"
        + (", history excluded" if args.exclude_history else "")
        + f"; readout = {args.readout or cfg.readout}, r0..r{cfg.reason_steps} = single steps, "
          "oracle = best step per sample")
    for metric in ("recall", "ndcg", "mrr"):
        out(format_report(report, ks=args.ks, names=(metric,)))
    if args.json:
        _write_json(args.json, {
            "checkpoint": os.path.abspath(checkpoint), "data": spec, "part": args.part,
            "exclude_history": args.exclude_history, "readout": args.readout or cfg.readout,
            "ks": args.ks, "n_samples": report["n_samples"], "metrics": report})
        if args.json != "-":
            out(f"metrics written to {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# recommend


def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="model.safetensors written by 'rearec train' (or its folder)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", metavar="RAW_ID",
                     help="a user of the data (repeatable); their whole history is used")
    who.add_argument("--histories", metavar="FILE",
                     help="text file, one history per line: raw item ids separated by spaces or "
                          "commas, oldest first")
    parser.add_argument("-k", type=_positive_int, default=10, help="items per user (default 10)")
    parser.add_argument("--depth", type=_nonnegative_int, default=None,
                        help="reasoning steps to run, 0..K (default K)")
    parser.add_argument("--readout", choices=("last", "mean"), default=None,
                        help="(default: the model's)")
    parser.add_argument("--exclude-seen", action="store_true",
                        help="never recommend an item of the user's history")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    _add_threads_argument(parser)
    _add_data_arguments(parser, required=False)


def read_histories(path: str) -> List[List[str]]:
    """One history per line, raw ids separated by spaces/commas; a blank line is an error."""
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    histories = []
    for number, line in enumerate(lines, 1):
        ids = [t for t in re.split(r"[\s,]+", line.strip()) if t]
        if not ids:
            raise CommandError(f"{path}: line {number} is empty; every line needs at least one item "
                               "id (remove blank lines)")
        histories.append(ids)
    if not histories:
        raise CommandError(f"{path}: no histories; write one history per line (item ids, oldest first)")
    return histories


def run_recommend(args) -> int:
    from rearec.data import IdMapping
    from rearec.engine import FastReaRec
    from rearec.model import ReaRec

    checkpoint = _checkpoint_path(args.checkpoint)
    model = ReaRec.load(checkpoint)
    has_mapping = model.id_mapping is not None
    if args.user:
        spec = _spec_for_checkpoint(args, checkpoint)
        data = load_data(spec)
        _check_mapping(model, data, checkpoint)
        labels = [str(u) for u in args.user]
        dense = [data.user_history(u) for u in args.user]
        histories = ([data.mapping.items_to_raw(h) for h in dense] if has_mapping else dense)
    else:
        if args.data is not None:
            raise CommandError("--data applies to --user only; drop it or use --user")
        raw = read_histories(args.histories)
        labels = [f"line {i}" for i in range(1, len(raw) + 1)]
        if has_mapping:
            known = IdMapping.from_dict(model.id_mapping)
            for number, row in enumerate(raw, 1):
                for item in row:
                    if not known.has_item(item):
                        raise CommandError(
                            f"{args.histories}: line {number}: item {item!r} is unknown to the model "
                            "(not seen in training); remove it")
            histories = raw
        else:
            try:
                histories = [[int(t) for t in row] for row in raw]
            except ValueError:
                raise CommandError(f"{args.histories}: this checkpoint has no raw-id mapping, so items "
                                   "must be dense integer ids") from None
    engine = FastReaRec.from_model(model, device=_device(args.device))
    recs = engine.recommend(histories, k=args.k, depth=args.depth, readout=args.readout,
                            exclude_seen=args.exclude_seen, raw_ids=has_mapping)
    depth = model.config.reason_steps if args.depth is None else args.depth
    readout = args.readout or model.config.readout
    rows = []
    for b, label in enumerate(labels):
        items = recs.raw_items[b] if has_mapping else recs.items[b].tolist()
        scores = recs.scores[b].tolist()
        kept = [(i, s) for i, s in zip(items, scores) if i is not None and i != -1 and math.isfinite(s)]
        rows.append({"user" if args.user else "history": label, "history_length": len(histories[b]),
                     "items": [i for i, _ in kept], "scores": [round(s, 6) for _, s in kept]})
    if args.json:
        print(json.dumps({"checkpoint": os.path.abspath(checkpoint), "depth": depth,
                          "readout": readout, "k": args.k, "exclude_seen": args.exclude_seen,
                          "recommendations": rows}, indent=2, ensure_ascii=False))
        return 0
    print(f"top-{args.k} by FastReaRec (depth {depth}, readout {readout}"
          + (", seen items excluded" if args.exclude_seen else "") + ")")
    for row in rows:
        who = f"user {row['user']}" if args.user else row["history"]
        print(f"{who} (history of {row['history_length']} items):")
        print(_format_recommendations(row["items"], row["scores"]))
    return 0


def _format_recommendations(items, scores) -> str:
    width = max([len(str(i)) for i in items] + [4])
    return "\n".join(f"  {rank:>3}. {str(item):<{width}}  {score:9.4f}"
                     for rank, (item, score) in enumerate(zip(items, scores), 1))


# ---------------------------------------------------------------------------------------------
# quickstart


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    q = QUICKSTART
    parser.add_argument("--out", default=os.path.join("runs", "quickstart"), metavar="DIR",
                        help="folder for the two runs (base/, prl/) and the plot "
                             "(default runs/quickstart; runs there are started over)")
    parser.add_argument("--epochs", type=_positive_int, default=q["epochs"], metavar="N",
                        help=f"most epochs per model (default {q['epochs']}, early stop after "
                             f"{q['patience']} epochs without a better validation NDCG@20)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_argument(parser)


def _quickstart_description() -> str:
    q = QUICKSTART
    return (
        "Train plain SASRec (base) and ReaRec-PRL (K={rs}) on MovieLens-100K (ratings > 3, "
        "temporal split at the 0.8/0.9 time quantiles), evaluate both on test with full ranking, "
        "compare them, and show top-10 recommendations through FastReaRec. Settings, chosen to "
        "finish within 10 minutes on a 2-core CPU: hidden size {h}, {l} layers, {hd} heads, "
        "feed-forward {i}, max_len {m}, Adam lr {lr:g}, batch {b}, at most {e} epochs per model with "
        "early stopping after {p} epochs without a better validation NDCG@20, seed {s}; about 6-7 "
        "minutes on an otherwise idle 2-core CPU (on a shared machine pass --threads 1). The "
        "paper's numbers need larger models and longer training (use 'rearec train')."
    ).format(rs=q["reason_steps"], h=q["hidden_size"], l=q["n_layers"], hd=q["n_heads"],
             i=q["inner_size"], m=q["max_len"], lr=q["lr"], b=q["batch_size"], e=q["epochs"],
             p=q["patience"], s=q["seed"])


def _profile_module():
    """rearec.profile when it provides profile_latency, else None."""
    if importlib.util.find_spec("rearec.profile") is None:
        return None
    try:
        module = importlib.import_module("rearec.profile")
    except Exception:  # a half-written module must not break the quickstart
        return None
    return module if hasattr(module, "profile_latency") else None


def run_quickstart(args) -> int:
    from rearec.config import ReaRecConfig
    from rearec.data import ML100K_NAME
    from rearec.engine import FastReaRec
    from rearec.train import TrainConfig

    started = time.perf_counter()
    q = QUICKSTART
    device = _device(args.device)
    progress = not args.no_progress
    _out("rearec quickstart: " + _quickstart_description())
    _out(f"device: {device}  epochs: up to {args.epochs}  output: {args.out}")
    spec = {"source": ML100K_NAME, **DATA_DEFAULTS}
    data = load_data(spec)
    _print_data(data, spec)
    _check_sets(data)

    reports, models = {}, {}
    for name, objective, steps in (("base", "base", 0), ("prl", "prl", q["reason_steps"])):
        config = ReaRecConfig(n_items=data.n_items, objective=objective, reason_steps=steps,
                              hidden_size=q["hidden_size"], n_layers=q["n_layers"],
                              n_heads=q["n_heads"], inner_size=q["inner_size"], max_len=q["max_len"])
        train_config = TrainConfig(lr=q["lr"], batch_size=q["batch_size"], max_epochs=args.epochs,
                                   patience=q["patience"], seed=q["seed"], device=device,
                                   progress=progress)
        out_dir = os.path.join(args.out, name)
        _out(f"\n== {name}: {_model_line(config)}")
        model, result = train_run(data, spec, config, train_config, out_dir, overwrite=True)
        if result.status == "diverged":
            print(f"{PROG}: error: {result.message}", file=sys.stderr)
            return EXIT_DIVERGED
        _out(_summary(result, train_config.metric))
        reports[name] = _evaluate_and_save(model, data, out_dir, progress=progress)
        models[name] = model

    columns = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")
    rows = [("SASRec (base)", reports["base"]["readout"]),
            (f"ReaRec-PRL (K={q['reason_steps']})", reports["prl"]["readout"]),
            ("ReaRec-PRL oracle", reports["prl"]["oracle"])]
    width = max(len(r[0]) for r in rows) + 2
    _out(f"\nMovieLens-100K test ({reports['prl']['n_samples']:,} samples, full ranking over "
         f"{data.n_items:,} items):")
    _out("".ljust(width) + "".join(c.rjust(11) for c in columns))
    for label, metrics in rows:
        _out(label.ljust(width) + "".join(f"{metrics[c]:11.4f}" for c in columns))
    gain = reports["prl"]["readout"]["ndcg@10"] / max(reports["base"]["readout"]["ndcg@10"], 1e-12) - 1
    _out(f"PRL vs base, NDCG@10: {gain:+.1%} (oracle = best reasoning step per sample, chosen after "
         "the fact: a ceiling, not a deployable model)")

    engine = FastReaRec.from_model(models["prl"], device=device)
    users = data.mapping.users_to_raw(sorted(set(data.test.users.tolist()))[:q["users_shown"]])
    histories = [data.mapping.items_to_raw(data.user_history(u)) for u in users]
    recs = engine.recommend(histories, k=10, exclude_seen=True)
    _out(f"\ntop-10 for {len(users)} users by ReaRec-PRL through FastReaRec (raw MovieLens item ids, "
         "seen items excluded):")
    for b, user in enumerate(users):
        items = [i for i in recs.raw_items[b] if i is not None]
        _out(f"user {user} (history of {len(histories[b])} items): {' '.join(items)}")

    profile = _profile_module()
    if profile is not None:
        try:
            rows = profile.profile_latency(engine, depths=range(engine.config.reason_steps + 1),
                                           batch_sizes=(1, 64), repeats=5, progress=False)
            if hasattr(profile, "format_profile"):
                _out("\nlatency vs reasoning depth (FastReaRec, ReaRec-PRL):")
                _out(profile.format_profile(rows))
            if hasattr(profile, "write_profile"):
                paths = profile.write_profile(rows, args.out, meta={"device": device,
                                                                    "model": "quickstart prl"})
                _out(f"latency plot: {paths.get('png')}")
        except KeyboardInterrupt:
            raise
        except Exception as error:  # the profile is a bonus, never a failure of the quickstart
            _out(f"latency profile skipped ({_one_line(error)})")
    _out(f"\nquickstart finished in {time.perf_counter() - started:.0f}s; checkpoints in "
         f"{os.path.join(args.out, 'base')} and {os.path.join(args.out, 'prl')}")
    return 0


# ---------------------------------------------------------------------------------------------
# the subcommand table and main


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: Optional[str] = None


COMMANDS: List[Command] = [
    Command("train", "train a model on an interaction log", add_train_arguments, run_train,
            "Train SASRec (--objective base) or ReaRec (erl, prl) with early stopping on validation "
            "NDCG@20, then evaluate on test. The best weights are in OUT/model.safetensors; OUT/data.json "
            "records the data options for 'evaluate' and 'recommend'."),
    Command("evaluate", "full-ranking metrics of a checkpoint", add_evaluate_arguments, run_evaluate,
            "Recall, NDCG and MRR at every cutoff for the readout, each reasoning step r_0..r_K alone, "
            "and the oracle (best step per sample)."),
    Command("recommend", "top-k items for users or histories (raw ids)", add_recommend_arguments,
            run_recommend, "Recommend through FastReaRec; ids in and out are the data's raw ids."),
    Command("quickstart", "train and compare SASRec and ReaRec-PRL on MovieLens-100K",
            add_quickstart_arguments, run_quickstart, _quickstart_description()),
    Command("study", "quality study on MovieLens-100K (base, ERL, PRL, several seeds) -> docs/results.md",
            lambda parser: importlib.import_module("rearec.study").add_study_arguments(parser),
            lambda args: importlib.import_module("rearec.study").run_study_command(args),
            "Train base SASRec, ReaRec-ERL and ReaRec-PRL (K=2) with several seeds and PRL at K=1 and 3 "
            "under the paper's temporal split, then write docs/results.md with JSON and plots. Finished "
            "runs are kept and an interrupted run resumes: start it again to continue."),
]


def _optional_commands() -> List[Command]:
    """Subcommands provided by optional modules (``rearec profile``)."""
    found = []
    if importlib.util.find_spec("rearec.profile") is not None:
        try:
            module = importlib.import_module("rearec.profile")
        except Exception:
            module = None
        if module is not None and hasattr(module, "add_profile_arguments") and hasattr(module, "run_profile"):
            found.append(Command("profile", "latency of FastReaRec vs reasoning depth",
                                 module.add_profile_arguments, module.run_profile,
                                 (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ReaRec (Think Before Recommend): train, evaluate and "
                                            "serve sequential recommenders that reason before they "
                                            "recommend.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    names = {command.name for command in COMMANDS}
    for command in COMMANDS + [c for c in _optional_commands() if c.name not in names]:
        p = sub.add_parser(command.name, help=command.help,
                           description=command.description or command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


_USER_ERRORS = (ValueError, OSError)  # DataError and CommandError are ValueErrors


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    from rearec.train import TrainingError

    debug = os.environ.get("REAREC_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except _ArgumentError as error:
            print(f"{PROG}: error: {' '.join(str(error).split())}; see '{error.prog} --help'",
                  file=sys.stderr)
            return EXIT_USAGE
        except SystemExit as done:  # --help
            return done.code if isinstance(done.code, int) else 0
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return args._run(args)
    except _Interrupted as interrupted:
        print(f"{PROG}: error: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (TrainingError,) + _USER_ERRORS as error:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
