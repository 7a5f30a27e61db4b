"""Regenerate tests/golden/official_rearec_small.safetensors from the paper's public ReaRec code.

The golden file holds what the public code (TangJiakai/ReaRec, commit 7f46432) computes for one small,
randomly initialised model: its state_dict, a batch of histories, the reasoning states, the PRL and
ERL logits and top-20 lists, and the PRL and ERL losses. The parity tests (tests/test_model.py,
tests/test_engine.py) load our ReaRec from that state_dict and must reproduce every output.

Their code is never copied into this repository. Get it and check out the pinned commit somewhere
outside the repository, then point this script at its ``src`` folder:

    git clone https://github.com/TangJiakai/ReaRec /tmp/ReaRec
    git -C /tmp/ReaRec checkout 7f46432
    python scripts/make_golden.py /tmp/ReaRec/src            # writes tests/golden/...

Only their model code is imported (models/PRL.py, models/ERL.py, utils/layers.py). Their package
imports ``openai`` and ``requests`` at module level for unrelated helpers; when those are not
installed they are replaced by empty modules, since no model code touches them. Nothing from
``rearec`` is imported: the golden must come from their code alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import torch

PINNED_COMMIT = "7f46432"
REPOSITORY = "TangJiakai/ReaRec"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden",
                           "official_rearec_small.safetensors")

# The model: small enough for a file of a few hundred KB, big enough that every part matters.
CONFIG = dict(emb_size=64, num_layers=2, num_heads=2, inner_size=96, hidden_act="gelu", layer_norm_eps=1e-12,
              initializer_range=0.02, temperature=0.07, reason_step=3, pl_weight=1.0, temp_scale=5.0,
              noise_factor=0.01, cl_weight=1.0, kl_weight=0.05, warmup=2, dropout=0.5, n_items=300)
BATCH = 8


def import_public_code(src: str):
    """-> (PRL class, ERL class, their constants module), imported from ``src``."""
    if not os.path.isfile(os.path.join(src, "models", "PRL.py")):
        sys.exit(f"{src} does not look like the public code's src folder (no models/PRL.py)")
    for name in ("openai", "requests"):  # imported by their utils/utils.py, used only by their LLM helpers
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, os.path.abspath(src))
    from models.ERL import ERL  # noqa: E402  (their code)
    from models.PRL import PRL  # noqa: E402
    from utils import constants  # noqa: E402

    return PRL, ERL, constants


def checked_out_commit(src: str) -> str:
    """The commit of the checkout that holds ``src``; refuses any other than the pinned one."""
    try:
        commit = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"{src} is not inside a git checkout; check out {REPOSITORY} at {PINNED_COMMIT} with git")
    if not commit.startswith(PINNED_COMMIT):
        sys.exit(f"{src} is at commit {commit[:12]}, not the pinned {PINNED_COMMIT}: run "
                 f"'git -C {src} checkout {PINNED_COMMIT}' first")
    return commit


def build(cls, constants):
    args = types.SimpleNamespace(**CONFIG, device="cpu", model_path="", buffer=0, test_all=1, el_weight=0.0)
    corpus = types.SimpleNamespace(n_users=BATCH + 1, n_items=CONFIG["n_items"])
    return cls(args, corpus)


def histories(constants, generator):
    """Their batch layout: (B, 50) left-padded with the padding item (the table's last row)."""
    max_len, pad = constants.MAX_ITEM_SEQ_LEN, CONFIG["n_items"] - 1
    lengths = torch.randint(1, max_len + 1, (BATCH,), generator=generator)
    lengths[0], lengths[-1] = 1, max_len  # the shortest and the longest history
    seq = torch.full((BATCH, max_len), pad, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        seq[b, max_len - n:] = torch.randint(0, pad, (n,), generator=generator)
    return seq, lengths


def top20(logits):
    logits = logits.clone()
    logits[:, CONFIG["n_items"] - 1] = -float("inf")  # never recommend the padding item
    return logits.topk(20, dim=1).indices


@torch.no_grad()
def make(src: str, seed: int) -> tuple[dict, dict]:
    commit = checked_out_commit(src)
    PRL, ERL, constants = import_public_code(src)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    prl = build(PRL, constants)
    for name, p in prl.named_parameters():  # make LayerNorm affine parameters and biases matter
        if "LayerNorm" in name or name.endswith("bias"):
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    prl.eval()
    erl = build(ERL, constants)
    erl.load_state_dict(prl.state_dict())
    erl.eval()

    seq, lengths = histories(constants, generator)
    labels = torch.randint(0, CONFIG["n_items"] - 1, (BATCH,), generator=generator)
    feed = {constants.ITEM_SEQ: seq, constants.ITEM_SEQ_LEN: lengths, constants.ITEM_ID: labels}
    out = prl(feed, epoch=0, stage="test")
    erl_out = erl(feed, epoch=0, stage="test")
    prl.model.reason_step = 1
    one_step = prl(feed, epoch=0, stage="test")["model_output"]
    prl.model.reason_step = CONFIG["reason_step"]

    # Loss goldens on arbitrary states: rows 0..B-1 a clean batch, rows B..2B-1 its noisy copy.
    items = prl.item_emb.weight
    clean = 0.5 * torch.randn(BATCH, CONFIG["reason_step"] + 1, CONFIG["emb_size"], generator=generator)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=generator)
    hidden = torch.cat([clean, noisy])
    last_logits = clean[:, -1] @ items.T / CONFIG["temperature"]
    prl_loss = prl.loss({"prediction": last_logits, "model_output": hidden, "test_item_embs": items,
                         constants.ITEM_ID: labels})
    erl_loss = erl.loss({"prediction": None, "model_output": clean, "test_item_embs": items,
                         constants.ITEM_ID: labels})

    tensors = {f"state_dict.{name}": t.detach().clone().contiguous() for name, t in prl.state_dict().items()}
    tensors.update({
        "item_seq": seq, "item_seq_len": lengths, "labels": labels,
        "reasoning_states": out["model_output"], "reasoning_states_1step": one_step,
        "prl_logits": out["prediction"], "erl_logits": erl_out["prediction"],
        "prl_top20": top20(out["prediction"]), "erl_top20": top20(erl_out["prediction"]),
        "loss_hidden_states": hidden, "prl_loss": prl_loss.reshape(()), "erl_loss": erl_loss.reshape(()),
    })
    config = dict(CONFIG, pad_id=CONFIG["n_items"] - 1, max_len=constants.MAX_ITEM_SEQ_LEN,
                  input_dropout=prl.model.dropout.p)
    metadata = {
        "format": "rearec-golden/1",
        "config": json.dumps(config, sort_keys=True),
        "source": json.dumps({"repository": REPOSITORY, "commit": commit, "seed": seed,
                              "script": "scripts/make_golden.py", "torch": torch.__version__}),
    }
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help=f"the src folder of a checkout of {REPOSITORY} at commit {PINNED_COMMIT}")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the golden (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    tensors, metadata = make(args.src, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} KB, {len(tensors)} tensors) from "
          f"{REPOSITORY}@{json.loads(metadata['source'])['commit'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
