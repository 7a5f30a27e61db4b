"""Statistics of the quality study: a user-clustered, hierarchical (seeds x users) paired bootstrap,
Holm's correction, and user-averaged metrics.

Why clustered: the test samples of one user are not independent (ML-100K's 4k test samples come
from ~150 users, and a tenth of the users supply half of them), so the resampling unit is the user,
with all of that user's samples. Why hierarchical: seeds vary too, so every replicate also resamples
each arm's seeds. Why paired: both arms are scored on the same resampled users.

One replicate: draw U users with replacement (U = number of users); for each arm draw its seeds
with replacement (or one shared draw when the runs of the two arms are paired seed by seed, e.g. two
readouts of the same runs); an arm's metric is the mean over its drawn seeds of the sample-weighted
mean over the drawn users' samples (exactly the headline metric on the resampled data); the gain is
``metric_a / metric_b - 1`` (``relative``) or ``metric_a - metric_b``.

Few seeds: S seeds drawn with replacement vary their mean by (S - 1) / S of what S fresh seeds would
(half at S = 2), so before the seed draw each arm's per-seed metrics are spread from their mean by
sqrt(S / (S - 1)) (:func:`spread_seeds`): the seed draw's variance is then the usual s^2 / S, with
s^2 the seeds' unbiased variance. One seed gives no spread to correct (and none is estimated).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["user_sums", "spread_seeds", "bootstrap_gain", "gain_summary", "holm", "user_averaged"]


def user_sums(values: np.ndarray, users: np.ndarray):
    """values (S, N) per seed and sample, users (N,) ids -> (sums (S, U), counts (U,), user ids (U,))."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    users = np.asarray(users)
    if values.shape[1] != users.shape[0]:
        raise ValueError(f"values have {values.shape[1]} samples but users has {users.shape[0]}; pass one user id "
                         "per sample")
    ids, index = np.unique(users, return_inverse=True)
    sums = np.zeros((values.shape[0], ids.size))
    for s in range(values.shape[0]):
        sums[s] = np.bincount(index, weights=values[s], minlength=ids.size)
    return sums, np.bincount(index, minlength=ids.size).astype(np.float64), ids


def spread_seeds(per_seed: np.ndarray) -> np.ndarray:
    """(r, S) per-seed metrics, each row's deviations from its mean scaled by sqrt(S / (S - 1)) (S >= 2;
    one seed is returned as it is): see the module docstring."""
    n_seeds = per_seed.shape[1]
    if n_seeds < 2:
        return per_seed
    center = per_seed.mean(axis=1, keepdims=True)
    return center + (per_seed - center) * math.sqrt(n_seeds / (n_seeds - 1))


def _check(values, name):
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if values.shape[0] < 1 or values.shape[1] < 1 or not np.isfinite(values).all():
        raise ValueError(f"{name} must be a finite (seeds, samples) array with at least one of each")
    return values


def bootstrap_gain(a, b, users, rounds: int = 2000, seed: int = 0, relative: bool = True,
                   paired_seeds: bool = False, chunk: int = 500) -> np.ndarray:
    """Bootstrap replicates (rounds,) of the gain of arm ``a`` over arm ``b``.

    a (Sa, N) and b (Sb, N): a per-sample metric per seed, the same N samples in the same order;
    users (N,): each sample's user. ``paired_seeds``: a and b come from the same runs (Sa == Sb) and
    one seed draw serves both.
    """
    a, b = _check(a, "a"), _check(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must score the same samples: {a.shape[1]} vs {b.shape[1]}")
    if paired_seeds and a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_seeds needs as many seeds in a as in b ({a.shape[0]} vs {b.shape[0]})")
    sums_a, counts, _ = user_sums(a, users)
    sums_b, _, _ = user_sums(b, users)
    n_users = counts.size
    rng = np.random.default_rng(seed)
    out = np.empty(rounds)
    for start in range(0, rounds, chunk):
        r = min(chunk, rounds - start)
        weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=r).astype(np.float64)  # (r, U)
        total = weights @ counts  # (r,)
        per_seed_a = spread_seeds(weights @ sums_a.T / total[:, None])  # (r, Sa)
        per_seed_b = spread_seeds(weights @ sums_b.T / total[:, None])
        pick_a = rng.integers(0, a.shape[0], size=(r, a.shape[0]))
        pick_b = pick_a if paired_seeds else rng.integers(0, b.shape[0], size=(r, b.shape[0]))
        mean_a = np.take_along_axis(per_seed_a, pick_a, axis=1).mean(axis=1)
        mean_b = np.take_along_axis(per_seed_b, pick_b, axis=1).mean(axis=1)
        if relative:  # a spread-out seed mean at or below zero has no relative gain: NaN (undefined)
            out[start:start + r] = np.where(mean_b > 0, mean_a / np.where(mean_b > 0, mean_b, 1.0) - 1.0, np.nan)
        else:
            out[start:start + r] = mean_a - mean_b
    return out


def gain_summary(a, b, users, rounds: int = 2000, seed: int = 0, relative: bool = True,
                 paired_seeds: bool = False) -> Dict[str, float]:
    """Observed gain, 95% percentile interval and a two-sided bootstrap p-value (the share of
    replicates on the other side of zero, counting the observed one, doubled: at least 2/(rounds+1)).
    ``p_at_floor``: no replicate fell on the other side, so ``p`` is that floor, a bound (the true p
    may be smaller), not an estimate. A relative gain over a mean of 0 or below (observed, or on some
    resamples) is undefined: then the interval and p are NaN, never a p-value from the replicates that
    happen to be finite."""
    a, b = _check(a, "a"), _check(b, "b")
    mean_a, mean_b = a.mean(), b.mean()  # every seed scores every sample: the seed-mean of sample means
    with np.errstate(divide="ignore", invalid="ignore"):
        if relative:
            observed = mean_a / mean_b - 1.0 if mean_b > 0 else math.nan
        else:
            observed = mean_a - mean_b
        reps = bootstrap_gain(a, b, users, rounds, seed, relative, paired_seeds)
    if not (np.isfinite(observed) and np.isfinite(reps).all()):
        return {"gain": float(observed), "low": math.nan, "high": math.nan, "p": math.nan, "p_at_floor": False}
    low, high = np.percentile(reps, [2.5, 97.5])
    tail = min((reps <= 0).sum(), (reps >= 0).sum())
    p = min(1.0, 2.0 * (tail + 1) / (rounds + 1))
    return {"gain": float(observed), "low": float(low), "high": float(high), "p": float(p),
            "p_at_floor": bool(tail == 0)}


def holm(p_values: Sequence[Optional[float]]) -> list:
    """Holm-Bonferroni adjusted p-values (same order). None stays None and NaN (an undefined test, see
    :func:`gain_summary`) stays NaN; neither counts among the tests the others are corrected for. Where
    a test's p is at :func:`gain_summary`'s floor, so is every p ranked before it, and its adjusted p
    is a bound too."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    m = len(present)
    adjusted = [None if p is None else math.nan for p in p_values]
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def user_averaged(values, users) -> float:
    """Mean over users of each user's mean over their samples, averaged over seeds (values (S, N))."""
    sums, counts, _ = user_sums(values, users)
    return float((sums / counts).mean())
