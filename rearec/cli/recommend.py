"""``rearec recommend``: top-k items through FastReaRec for users of the data or for histories in a file."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Callable, List, Optional

from tqdm.auto import tqdm

from rearec.cli.console import CommandError, check_not_empty, pick_device, show_progress
from rearec.cli.options import (add_checkpoint_backbone_argument, add_data_arguments, add_device_argument, add_threads_argument, check_mapping,
                                check_backbone, checkpoint_path, data_option_flag, data_spec_for_checkpoint,
                                given_data_options, nonnegative_int, positive_float, positive_int, refuse_sample_filter_options)
from rearec.data import IdMapping
from rearec.config import CALL_READOUTS
from rearec.engine import FastReaRec
from rearec.model import ReaRec

NAME = "recommend"
HELP = "top-k items for users or histories (raw ids)"
DESCRIPTION = "Recommend through FastReaRec; ids in and out are the data's raw ids."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="model.safetensors written by 'rearec train' (or its folder)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", metavar="RAW_ID",
                     help="a user of the data (repeatable); their whole history in the data, after its filters, "
                          "is used (events on items the filters removed are not; pass those in --histories)")
    who.add_argument("--histories", metavar="FILE",
                     help="UTF-8 text file, one history per line, oldest item first: raw item ids separated by "
                          "spaces or commas, or by tabs when an id holds a space or comma (a line with a tab is "
                          "split on tabs only, e.g. 'Toy Story (1995)<TAB>Heat (1995)')")
    parser.add_argument("-k", type=positive_int, default=10, help="items per user (default 10)")
    parser.add_argument("--depth", type=nonnegative_int, default=None, help="reasoning steps to run, 0..K (default K)")
    parser.add_argument("--readout", choices=CALL_READOUTS, default=None,
                        help="(default: the model's); 'adaptive' stops each user at its halting step (needs --halt-kl "
                             "or a checkpoint with halt_kl)")
    parser.add_argument("--halt-kl", type=positive_float, default=None, metavar="EPS",
                        help="with --readout adaptive: halt at the first step whose item distribution moved less than "
                             "EPS nats (rearec study's kl-halt eps; default: the checkpoint's)")
    parser.add_argument("--exclude-seen", action="store_true", help="never recommend an item of the user's history")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=positive_int, default=1024, metavar="B",
                        help="histories per engine call (default 1024): memory grows with it, not with the file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only when stderr is a "
                        "terminal and there is more than one batch)")
    add_checkpoint_backbone_argument(parser)
    add_device_argument(parser)
    add_threads_argument(parser)
    add_data_arguments(parser, required=False)


def read_histories(path: str, is_item: Optional[Callable[[str], bool]] = None) -> List[List[str]]:
    """One history per line (lines end at a newline only); a blank line is an error. A line with a tab is
    split on tabs only (each field one id, stripped: ids may hold spaces and commas, as ML-1M's movie
    titles do); any other line on spaces/commas, unless the whole line is one id (``is_item``): a
    one-item history "Heat (1995)" needs no tab."""
    check_not_empty(path, "--histories", "histories.txt")  # --histories "$FILE" with FILE unset
    try:
        with open(path, encoding="utf-8-sig") as f:
            # Only newlines end lines (open() already reads \r\n and \r as \n): splitlines() also cut at
            # \f, \x1c-\x1e, U+0085 and U+2028, which an id may hold.
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the last line's newline
    except UnicodeDecodeError as error:
        raise CommandError(f"{path}: not UTF-8 text (byte {error.start}); save the histories file as UTF-8") from None
    histories = []
    for number, line in enumerate(lines, 1):
        if "\t" in line:
            ids = [t.strip() for t in line.split("\t")]
            ids = [t for t in ids if t]
        elif is_item is not None and line.strip() and is_item(line.strip()):
            ids = [line.strip()]
        else:
            ids = [t for t in re.split(r"[\s,]+", line.strip()) if t]
        if not ids:
            raise CommandError(f"{path}: line {number} is empty; every line needs at least one item id "
                               "(remove blank lines)")
        histories.append(ids)
    if not histories:
        raise CommandError(f"{path}: no histories; write one history per line (item ids, oldest first)")
    return histories


def histories_from_file(path: str, model) -> list:
    """Raw ids checked against the model's mapping, or dense ids when the model has none."""
    known = IdMapping.from_dict(model.id_mapping) if model.id_mapping is not None else None
    raw = read_histories(path, known.has_item if known is not None else None)
    if known is None:
        try:
            return [[int(t) for t in row] for row in raw]
        except ValueError:
            raise CommandError(f"{path}: this checkpoint has no raw-id mapping, so items must be dense integer "
                               f"ids 0..{model.config.n_items - 1}") from None
    for number, row in enumerate(raw, 1):
        for item in row:
            if not known.has_item(item):
                raise CommandError(f"{path}: line {number}: item {item!r} is unknown to the model (not seen in "
                                   "training); remove it, or, where ids hold spaces or commas, separate the ids "
                                   "with tabs")
    return raw


def format_recommendations(items, scores) -> str:
    width = max([len(str(i)) for i in items] + [4])
    return "\n".join(f"  {rank:>3}. {str(item):<{width}}  {score:9.4f}"
                     for rank, (item, score) in enumerate(zip(items, scores), 1))


def run(args) -> int:
    device = pick_device(args.device)
    checkpoint = checkpoint_path(args.checkpoint)
    model = ReaRec.load(checkpoint)
    check_backbone(args, model, checkpoint)
    if args.depth is not None and args.depth > model.config.reason_steps:  # before any data is read
        raise CommandError(f"--depth {args.depth} is more than this checkpoint's {model.config.reason_steps} reasoning "
                           f"steps; pass --depth 0..{model.config.reason_steps} (or leave it out: all of them)")
    has_mapping = model.id_mapping is not None
    if args.user:
        if not has_mapping:
            raise CommandError(f"checkpoint {checkpoint} has no raw-id mapping, so the data's users and items "
                               "cannot be matched with its rows; use a checkpoint written by 'rearec train', or "
                               "pass --histories with dense item ids")
        # a user's history is the filtered log's whichever evaluation samples are kept
        refuse_sample_filter_options(given_data_options(args), "evaluation samples, which recommend does not use")
        spec = data_spec_for_checkpoint(args, checkpoint, model.config.max_len)
        data = spec.load()
        check_mapping(model, data, checkpoint)
        labels = [str(u) for u in args.user]
        histories = [data.mapping.items_to_raw(data.user_history(u)) for u in args.user]
    else:
        given = ["--data"] * (args.data is not None) + [data_option_flag(name) for name in given_data_options(args)]
        if given:
            raise CommandError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --user only (the data "
                               "it reads the users' histories from); drop them or use --user")
        histories = histories_from_file(args.histories, model)
        labels = [f"line {i}" for i in range(1, len(histories) + 1)]
    if args.halt_kl is not None:
        if args.readout != "adaptive":
            raise CommandError("--halt-kl applies to --readout adaptive only; add --readout adaptive or drop --halt-kl")
        model.config.halt_kl = args.halt_kl
    if args.readout == "adaptive" and model.config.halt_kl is None:
        raise CommandError("--readout adaptive needs --halt-kl EPS (this checkpoint has no halt_kl); the study's "
                           "report gives the kl-halt eps fitted on validation")
    engine = FastReaRec.from_model(model, device=device)
    chunks = range(0, len(histories), args.batch_size)
    results = []  # one batch of histories per engine call: its memory (the K/V cache) follows the batch
    with tqdm(total=len(histories), desc="recommend", unit="history", leave=False,
              disable=not show_progress(args.no_progress) or len(chunks) < 2) as bar:
        for start in chunks:
            results.append(engine.recommend(histories[start:start + args.batch_size], k=args.k, depth=args.depth,
                                            readout=args.readout, exclude_seen=args.exclude_seen,
                                            raw_ids=has_mapping))
            bar.update(min(args.batch_size, len(histories) - start))
    depth = model.config.reason_steps if args.depth is None else args.depth
    readout = args.readout or model.config.readout
    ids = "raw" if has_mapping else "dense (this checkpoint has no raw-id mapping)"
    rows = []
    for b, label in enumerate(labels):
        recs, row = results[b // args.batch_size], b % args.batch_size
        items = recs.raw_items[row] if has_mapping else recs.items[row].tolist()
        scores = recs.scores[row].tolist()
        kept = [(i, s) for i, s in zip(items, scores) if i is not None and i != -1 and math.isfinite(s)]
        rows.append({"user" if args.user else "history": label, "history_length": len(histories[b]),
                     "items": [i for i, _ in kept], "scores": [round(s, 6) for _, s in kept]})
    if args.json:
        print(json.dumps({"checkpoint": os.path.abspath(checkpoint), "depth": depth, "readout": readout,
                          "k": args.k, "exclude_seen": args.exclude_seen, "item_ids": ids.split()[0],
                          "recommendations": rows}, indent=2, ensure_ascii=False))
        return 0
    fewest = min(len(row["items"]) for row in rows)
    short = f"; a row holds fewer when fewer items are left (here {fewest} at least)" if fewest < args.k else ""
    print(f"top-{args.k} by FastReaRec (depth {depth}, readout {readout}"
          + (", seen items excluded" if args.exclude_seen else "") + f"; {ids} item ids{short})")
    for row in rows:
        who = f"user {row['user']}" if args.user else row["history"]
        print(f"{who} (history of {row['history_length']} items):")
        print(format_recommendations(row["items"], row["scores"]))
    return 0
