"""Full-ranking metrics with one target item per sample.

The rank of the target is ``1 + (number of candidate items whose score is strictly greater than the
target's)``; ties therefore count in the target's favour. Excluded items (e.g. items already in the
history, when the caller wants that) are not candidates; the target itself is never excluded.
An item with a NaN score never outranks the target; a target with a NaN score gets the worst rank
(1 + every other non-excluded item).

With rank r and cutoff k, per sample:

* ``recall@k`` = 1 if r <= k else 0 (equal to hit rate with one target),
* ``ndcg@k``   = 1 / log2(r + 1) if r <= k else 0,
* ``mrr@k``    = 1 / r if r <= k else 0.

:func:`ranking_metrics` averages these over samples; :func:`per_sample_metrics` returns them per
sample (e.g. to pick the best reasoning step per user after the fact).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["target_ranks", "per_sample_metrics", "ranking_metrics", "DEFAULT_KS", "METRICS"]

DEFAULT_KS = (5, 10, 20, 50)
METRICS = ("recall", "ndcg", "mrr")


def _exclusion_mask(exclude: torch.Tensor, batch: int, n_items: int,
                    device: torch.device) -> torch.Tensor:
    if exclude.dtype == torch.bool:
        if exclude.shape != (batch, n_items):
            raise ValueError(f"a boolean exclude mask must have shape ({batch}, {n_items}), got "
                             f"{tuple(exclude.shape)}")
        return exclude.to(device)
    if exclude.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"exclude must be an integer id tensor or a bool mask, got {exclude.dtype}")
    if exclude.dim() != 2 or exclude.shape[0] != batch:
        raise ValueError(f"exclude ids must have shape ({batch}, M), got {tuple(exclude.shape)}")
    ids = exclude.to(device=device, dtype=torch.int64)
    if ids.numel() and int(ids.max()) >= n_items:
        raise ValueError(f"exclude holds item id {int(ids.max())} >= n_items={n_items}")
    # Empty slots (negative ids) go to a spare column that is dropped afterwards.
    ids = torch.where(ids < 0, n_items, ids)
    mask = torch.zeros(batch, n_items + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, ids, True)
    return mask[:, :n_items]


@torch.no_grad()
def target_ranks(scores: torch.Tensor, targets: torch.Tensor,
                 exclude: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each target among all items.

    ``scores``: (B, N) float scores over the N items. ``targets``: (B,) int item ids.
    ``exclude``: ``None``, a (B, M) int tensor of item ids padded with -1, or a (B, N) bool mask;
    excluded items are not counted (the target never is excluded). Returns (B,) int64 ranks on
    the scores' device.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (batch, n_items), got shape {tuple(scores.shape)}")
    batch, n_items = scores.shape
    targets = torch.as_tensor(targets, device=scores.device).reshape(-1)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer item ids, got {targets.dtype}")
    targets = targets.to(torch.int64)
    if targets.shape[0] != batch:
        raise ValueError(f"{targets.shape[0]} targets for {batch} rows of scores")
    if batch and (int(targets.min()) < 0 or int(targets.max()) >= n_items):
        raise ValueError(f"target ids must be in 0..{n_items - 1}")
    target_scores = scores.gather(1, targets.unsqueeze(1))
    above = scores > target_scores  # NaN compares False on either side
    nan_target = torch.isnan(target_scores).squeeze(1)
    if exclude is not None:
        keep = ~_exclusion_mask(exclude, batch, n_items, scores.device)
        above &= keep
    if nan_target.any():
        candidates = (keep if exclude is not None
                      else torch.ones_like(above)).clone()
        candidates.scatter_(1, targets.unsqueeze(1), False)
        worst = candidates.sum(dim=1)
        above_count = torch.where(nan_target, worst, above.sum(dim=1))
    else:
        above_count = above.sum(dim=1)
    return above_count.to(torch.int64) + 1


def _check_ks(ks) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (numbers.Number, str)) or not hasattr(ks, "__iter__") else tuple(ks)
    if not ks or any(isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def parse_metric(name) -> tuple[str, int]:
    """``'ndcg@20'`` -> ``('ndcg', 20)``; a ValueError naming the valid forms for anything else."""
    metric, at, k = name.partition("@") if isinstance(name, str) else ("", "", "")
    # K as ranking_metrics names it: ASCII digits without a leading zero ('ndcg@020' would name no metric)
    if metric not in METRICS or not at or not (k.isascii() and k.isdigit()) or int(k) < 1 or k != str(int(k)):
        raise ValueError(f"metric {name!r} is not one of {', '.join(m + '@K' for m in METRICS)} (K a positive "
                         "integer without leading zeros, e.g. ndcg@20)")
    return metric, int(k)


def per_sample_metrics(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per-sample metrics from ranks: ``{"recall@k": (B,) float, "ndcg@k": ..., "mrr@k": ...}``
    for every k (keys grouped by metric, then k in the given order)."""
    ks = _check_ks(ks)
    r = torch.as_tensor(ranks).reshape(-1)
    # float64 for exact averages; MPS has no float64, so float32 there.
    r = r.to(torch.float32 if r.device.type == "mps" else torch.float64)
    if r.numel() and bool(torch.isnan(r).any()):
        raise ValueError("ranks hold NaN; ranks are whole numbers >= 1 (see target_ranks)")
    if r.numel() and float(r.min()) < 1:
        raise ValueError("ranks are 1-based; got a rank below 1")
    out: dict[str, torch.Tensor] = {}
    ndcg_all = 1.0 / torch.log2(r + 1.0)
    mrr_all = 1.0 / r
    hits = {k: r <= k for k in ks}
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    for k in ks:
        out[f"recall@{k}"] = hits[k].to(r.dtype)
    for k in ks:
        out[f"ndcg@{k}"] = torch.where(hits[k], ndcg_all, zero)
    for k in ks:
        out[f"mrr@{k}"] = torch.where(hits[k], mrr_all, zero)
    return out


def ranking_metrics(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, float]:
    """Metrics averaged over samples: ``{"recall@10": 0.12, "ndcg@10": ..., "mrr@10": ...}``.

    Raises ValueError for an empty set of ranks (an average over nothing is undefined).
    """
    r = torch.as_tensor(ranks).reshape(-1)
    if r.numel() == 0:
        raise ValueError("no ranks to average: the evaluation set is empty")
    return {name: float(v.mean()) for name, v in per_sample_metrics(r, ks).items()}
