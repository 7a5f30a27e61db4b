"""Full-ranking evaluation: every item is ranked for every sample (the padding item never is).

For a ReaRec model the report holds the configured readout, each reasoning step r_0..r_K alone, and
the oracle ceiling: per sample the best step chosen after the fact (the paper's post-hoc analysis).
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from rearec.data.errors import DataError
from rearec.inputs import as_integer, exclusion_ids
from rearec.metrics import DEFAULT_KS, ranking_metrics, target_ranks


@torch.no_grad()
def step_ranks(model, samples, *, max_len=None, batch_size=512, exclude_history=False, readout=None,
               all_steps=True, progress=False, dropout=False):
    """Target ranks for every sample: dict name -> (S,) long tensor, names 'readout' and 'r0'..'rK'.
    ``exclude_history``: no item of a sample's whole history is ranked (also those older than the
    model's window). ``dropout=True`` leaves the model in training mode (one Monte-Carlo dropout
    pass); the caller switches it back."""
    size = as_integer(batch_size)
    if size is None or size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = size
    if not isinstance(exclude_history, bool):
        raise ValueError(f"exclude_history must be True or False, got {exclude_history!r}")
    if max_len is not None:
        window = as_integer(max_len)
        if window is None or not 1 <= window <= model.config.max_len:
            raise ValueError(f"max_len must be None or an integer in 1..{model.config.max_len} (the model's "
                             f"window), got {max_len!r}")
        max_len = window
    model.train(dropout)
    max_len = max_len or model.config.max_len
    out: Dict[str, torch.Tensor] = {}
    starts = range(0, len(samples), batch_size)
    if progress:
        starts = tqdm(starts, desc="evaluate", leave=False)
    device = model.item_embedding.weight.device
    whole_lengths = samples.history_lengths if exclude_history else None
    done = 0
    for start in starts:
        index = torch.arange(start, min(start + batch_size, len(samples)))
        _, histories, lengths, targets = samples.batch(index, max_len)
        if (histories < 0).any():  # an item unseen in training, which the split keeps beyond its filter window
            raise DataError(f"a {samples.name} history holds an item unseen in training within the model's "
                            f"{max_len} newest items: split with a filter window of at least max_len "
                            f"(--filter-window {max_len}, DataSpec/load_dataset filter_window={max_len})")
        largest = max(int(histories.max()), int(targets.max()))
        if largest >= model.config.n_items:
            raise ValueError(f"the {samples.name} samples hold item id {largest} but the model's table has "
                             f"{model.config.n_items} rows: the model was trained on other data")
        states = model(histories.to(device), lengths.to(device))  # (B, K+1, d)
        if exclude_history:  # the whole histories, for the exclusion only
            _, seen, seen_lengths, _ = samples.batch(index, max(1, int(whole_lengths[index].max())))
            exclude = exclusion_ids(seen.to(device), seen_lengths.to(device), model.config.pad_item, True)
        else:
            exclude = exclusion_ids(histories.to(device), lengths.to(device), model.config.pad_item, False)
        targets = targets.to(device)
        vectors = {"readout": model.readout(states, readout)}
        if all_steps:
            vectors.update({f"r{s}": states[:, s] for s in range(states.shape[1])})
        for name, vector in vectors.items():
            # Into one tensor allocated up front: a small tensor kept per batch, allocated after the
            # batch's (B, N) scores, pins the top of the heap, and glibc then cannot give the scores'
            # memory back (on ML-1M validation grew the process by 1.3 GB).
            if name not in out:
                out[name] = torch.empty(len(samples), dtype=torch.int64)
            out[name][done:done + len(targets)] = target_ranks(model.scores(vector).float(), targets, exclude)
        done += len(targets)
    if not out:
        raise ValueError("no samples to evaluate")
    if done != len(samples):
        raise RuntimeError(f"the batches held {done} of {len(samples)} samples")
    return out


def evaluate(model, samples, *, ks: Sequence[int] = DEFAULT_KS, batch_size=512, exclude_history=False,
             readout=None, progress=False) -> dict:
    """Metrics for the readout, every step and the oracle: {'readout': {...}, 'r0': {...}, ..., 'oracle': {...}}."""
    was_training = model.training
    try:
        ranks = step_ranks(model, samples, batch_size=batch_size, exclude_history=exclude_history,
                           readout=readout, progress=progress)
    finally:
        model.train(was_training)
    return report_of_ranks(ranks, ks)


def report_of_ranks(ranks: Dict[str, torch.Tensor], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """:func:`evaluate`'s report from :func:`step_ranks`' output (e.g. gathered from several processes):
    metrics of each entry and of the oracle (per sample the best step), and ``n_samples``."""
    steps = [name for name in ranks if name.startswith("r") and name[1:].isdigit()]
    ranks = dict(ranks, oracle=torch.stack([ranks[name] for name in steps]).min(dim=0).values)
    report = {name: ranking_metrics(r, ks) for name, r in ranks.items()}
    report["n_samples"] = len(ranks["oracle"])
    return report


def format_report(report: dict, ks: Iterable[int] = (10, 20), names=("recall", "ndcg", "mrr")) -> str:
    """A plain-text table: one row per readout/step/oracle, one column per metric."""
    rows = [name for name in report if isinstance(report[name], dict)]
    columns = [f"{n}@{k}" for k in ks for n in names]
    width = max(len(r) for r in rows) + 2
    lines = ["".ljust(width) + "".join(c.rjust(11) for c in columns)]
    for row in rows:
        lines.append(row.ljust(width) + "".join(f"{report[row].get(c, float('nan')):11.4f}" for c in columns))
    return "\n".join(lines)


__all__ = ["evaluate", "step_ranks", "report_of_ranks", "format_report"]
