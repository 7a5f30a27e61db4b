"""``rearec profile``: latency of FastReaRec vs reasoning depth, as a table, JSON and a plot."""
from __future__ import annotations

import argparse
import os

import torch

from rearec.cli.console import CommandError, check_output_folder, out, pick_device, show_progress
from rearec.cli.options import (SIZE_OPTIONS, add_size_arguments, add_threads_argument, check_backbone, checkpoint_path,
                                config_from_options, int_range, positive_int, size_from_args)
from rearec.engine import FastReaRec
from rearec.model import ReaRec
from rearec.profile import JSON_FILE, PNG_FILE, format_profile, profile_latency, write_profile

NAME = "profile"
HELP = "latency of FastReaRec vs reasoning depth"
DESCRIPTION = ("Time FastReaRec.recommend on random full-length histories for every (batch size, depth) and write "
               "the rows as JSON and a latency-vs-depth plot. Without --checkpoint the model is a random one of "
               "the preset's size.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="PATH", help="a rearec checkpoint (model.safetensors or its run folder; default: a random model of the size below)")
    parser.add_argument("--official", action="store_true", help="--checkpoint is a state_dict of the public code")
    parser.add_argument("--depths", type=int_range, default=None, metavar="RANGE",
                        help="reasoning depths, e.g. 0-8 or 0,2,8 (default 0..K, every depth the model has)")
    parser.add_argument("--batch-sizes", type=int_range, default=int_range("1,64,256"), metavar="B,B,...",
                        help="batch sizes (default 1,64,256)")
    parser.add_argument("-k", type=positive_int, default=20, help="items returned per user (default 20)")
    parser.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed calls per point (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default=os.path.join("runs", "profile"), metavar="DIR",
                        help=f"folder for {JSON_FILE} and {PNG_FILE}, created if needed; an existing folder is "
                             "reused and those two files in it replaced (default runs/profile)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (drawn only when stderr is a terminal)")
    add_threads_argument(parser)
    random = parser.add_argument_group("random model (without --checkpoint)")
    random.add_argument("--n-items", type=positive_int, default=None, metavar="N", help=f"(default {RANDOM_MODEL['n_items']})")
    random.add_argument("--reason-steps", type=positive_int, default=None, metavar="K",
                        help=f"reasoning steps K (default {RANDOM_MODEL['reason_steps']})")
    add_size_arguments(parser, default_preset=RANDOM_MODEL["preset"])
    # Left unset unless given, so that a checkpoint (which has its own size) can refuse them.
    parser.set_defaults(preset=None, backbone=None)


#: The random model's defaults (without --checkpoint).
RANDOM_MODEL = {"n_items": 50_000, "reason_steps": 8, "preset": "paper", "backbone": "sasrec"}


def run(args) -> int:
    if 0 in args.batch_sizes:
        raise CommandError("--batch-sizes must be >= 1: e.g. --batch-sizes 1,64,256")
    device = pick_device(args.device)
    check_output_folder(args.out, "--out", f"give a folder (profile writes {JSON_FILE} and {PNG_FILE} into it, "
                                           "replacing earlier ones) or remove the file")
    random_options = [flag for flag, field in (("--n-items", "n_items"), ("--reason-steps", "reason_steps"),
                                               ("--preset", "preset"), *((f, d) for f, d, _ in SIZE_OPTIONS))
                      if getattr(args, field) is not None and not (args.official and field == "n_heads")]
    if args.official and not args.checkpoint:
        raise CommandError("--official says that --checkpoint is a state_dict of the public code: pass --checkpoint")
    if args.checkpoint and random_options:
        raise CommandError(f"{', '.join(random_options)} describe the random model, and a checkpoint has its own "
                           "size: drop them, or drop --checkpoint")
    if args.checkpoint:
        if args.official:
            if not os.path.isfile(args.checkpoint):
                state = "is a folder" if os.path.isdir(args.checkpoint) else \
                    "is not a file" if os.path.exists(args.checkpoint) else "does not exist"
                raise CommandError(f"checkpoint {args.checkpoint} {state}: with --official, give the path of the "
                                   "public code's saved state_dict (a .pth file)")
            source = args.checkpoint
            model = ReaRec.from_official_checkpoint(source, n_heads=args.n_heads or 2)  # heads: not in a state_dict
        else:
            source = checkpoint_path(args.checkpoint)  # a model.safetensors or its run folder
            model = ReaRec.load(source)
        check_backbone(args, model, source)
    else:
        for name, default in RANDOM_MODEL.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        torch.manual_seed(0)
        config = config_from_options({"n_items": "--n-items", "reason_steps": "--reason-steps"}, n_items=args.n_items,
                                     reason_steps=args.reason_steps, **size_from_args(args))
        model = ReaRec(config).eval()
        source = f"random model (preset {args.preset})"
    if args.depths is None:
        args.depths = list(range(model.config.reason_steps + 1))
    too_deep = [d for d in args.depths if d > model.config.reason_steps]
    if too_deep:
        shown = (", ".join(map(str, too_deep)) if len(too_deep) <= 4 else
                 f"{min(too_deep)}..{max(too_deep)} ({len(too_deep)} of them)")
        raise CommandError(f"depths {shown} exceed the model's K={model.config.reason_steps}: "
                           f"use --depths 0-{model.config.reason_steps}")
    engine = FastReaRec.from_model(model.to(device), device=device)
    cfg = model.config
    k = min(args.k, cfg.n_items)  # what a call returns: k is capped at the table's size
    out(f"FastReaRec on {engine.device}: {cfg.backbone}, K={cfg.reason_steps}, N={cfg.n_items}, d={cfg.hidden_size}, "
        f"{cfg.n_layers} layers, {cfg.n_heads} heads, full histories of {cfg.max_len}, k={k}; {args.threads_note}")
    rows = profile_latency(engine, args.depths, args.batch_sizes, k=k, repeats=args.repeats,
                           progress=show_progress(args.no_progress))
    meta = {"source": source, "device": str(engine.device), "threads": torch.get_num_threads(),
            "n_items": cfg.n_items, "hidden_size": cfg.hidden_size, "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "inner_size": cfg.inner_size, "history_len": cfg.max_len, "k": k,
            "backbone": cfg.backbone, "reason_steps": cfg.reason_steps}
    out(format_profile(rows))
    paths = write_profile(rows, args.out, meta)
    out(f"wrote {paths['json']} and {paths['png']}")
    return 0
