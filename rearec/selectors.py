"""Adaptive reasoning depth: per sample, which state r_s (s = 0..K) should score the items?

Every selector is fitted on validation samples only and then applied to test samples. Inputs per set
(:class:`StepData`): the target's rank under each step (S = K+1 steps), the entropy of each step's
item distribution p_s, KL(p_s || p_{s-1}) for s >= 1, and each sample's history length.

- ``fixed``: the step with the best validation NDCG@20, for everyone.
- ``min-entropy``: the most confident step (lowest entropy).
- ``kl-halt``: compute steps 1, 2, ... and stop at the first s with KL(p_s || p_{s-1}) < eps (else K);
  eps chosen on validation among quantiles of the validation KLs.
- ``learned``: a softmax over steps, linear in per-step features (entropy, KL to the previous step, a
  per-step bias and a per-step weight on the log history length), trained on validation to maximise the expected NDCG@20 of the chosen step;
  at test the most probable step.
- ``random``: the placebo: a random step per sample, drawn from the step distribution that the best
  of the selectors above chose on test.

``steps computed``: how many reasoning steps a selector has to run per sample (its cost): s for a
fixed step, K for anything that compares all steps, the halting step for ``kl-halt``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

__all__ = ["StepData", "ndcg", "fit_selectors", "evaluate_selectors", "HaltingRule", "SELECTORS"]

SELECTORS = ("fixed", "min-entropy", "kl-halt", "learned", "random")


@dataclass
class StepData:
    """ranks (S, N) 1-based; entropy (S, N); kl (S-1, N), kl[j] = KL(p_{j+1} || p_j); history_length (N,)."""

    ranks: np.ndarray
    entropy: np.ndarray
    kl: np.ndarray
    history_length: np.ndarray

    def __post_init__(self):
        self.ranks = np.asarray(self.ranks, dtype=np.int64)
        self.entropy = np.asarray(self.entropy, dtype=np.float64)
        self.kl = np.asarray(self.kl, dtype=np.float64)
        if self.kl.ndim == 1:  # K = 1: one row of KLs, given flat
            self.kl = self.kl[None, :]
        self.history_length = np.asarray(self.history_length, dtype=np.float64)
        S, N = self.ranks.shape
        if S < 2:
            raise ValueError("adaptive depth needs at least two steps (K >= 1); base has only r0")
        if self.entropy.shape != (S, N) or self.kl.shape != (S - 1, N) or self.history_length.shape != (N,):
            raise ValueError(f"StepData shapes disagree: ranks {self.ranks.shape}, entropy {self.entropy.shape}, "
                             f"kl {self.kl.shape} (need ({S - 1}, {N})), history_length {self.history_length.shape}")

    @property
    def steps(self) -> int:
        return self.ranks.shape[0]

    def features(self) -> np.ndarray:
        """(N, S, 2 + 2S) per-step features: entropy, KL to the previous step (0 at r0), a one-hot of
        the step (a per-step bias) and the log history length in the step's own column (0 in the
        others). A softmax over steps ignores whatever all steps share, so a sample's history length
        tells one step from another only with a weight per step."""
        S, N = self.ranks.shape
        kl = np.concatenate([np.zeros((1, N)), self.kl])
        onehot = np.broadcast_to(np.eye(S)[:, None, :], (S, N, S))
        log_len = onehot * np.log1p(self.history_length)[None, :, None]
        return np.concatenate([np.stack([self.entropy, np.log1p(kl * 1e3)], -1), onehot, log_len], -1).transpose(1, 0, 2)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def pick(ranks: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """ranks (S, N), steps (N,) -> the rank at each sample's chosen step."""
    return np.take_along_axis(ranks, np.asarray(steps)[None, :], axis=0)[0]


@dataclass
class HaltingRule:
    """Stop at the first step s >= 1 whose KL(p_s || p_{s-1}) < eps; the last step otherwise."""

    eps: float

    def steps(self, kl: np.ndarray) -> np.ndarray:
        kl = np.asarray(kl)
        below = kl < self.eps  # (S-1, N)
        first = np.argmax(below, axis=0) + 1
        return np.where(below.any(axis=0), first, kl.shape[0])


class LearnedSelector:
    """Softmax over steps, linear in standardised per-step features; fitted by gradient ascent on the
    expected NDCG@20 (plus a small L2 penalty)."""

    def __init__(self, l2: float = 1e-3, iterations: int = 600, lr: float = 2.0):
        self.l2, self.iterations, self.lr = l2, iterations, lr

    def fit(self, data: StepData, target_k: int = 20) -> "LearnedSelector":
        x = data.features()  # (N, S, F)
        self.mean = x.reshape(-1, x.shape[-1]).mean(0)
        self.std = x.reshape(-1, x.shape[-1]).std(0) + 1e-9
        x = (x - self.mean) / self.std
        gain = ndcg(data.ranks, target_k).T  # (N, S)
        w = np.zeros(x.shape[-1])
        for _ in range(self.iterations):
            logits = x @ w
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            expected = (p * gain).sum(1, keepdims=True)
            # d E[gain] / d logits_s = p_s (gain_s - E[gain])
            grad = np.einsum("ns,nsf->f", p * (gain - expected), x) / len(x) - self.l2 * w
            w += self.lr * grad
        self.w = w
        return self

    def steps(self, data: StepData) -> np.ndarray:
        x = (data.features() - self.mean) / self.std
        return np.argmax(x @ self.w, axis=1)


def fit_selectors(valid: StepData, k: int = 20) -> Dict[str, object]:
    """Fitted selectors (validation only): fixed step, eps of kl-halt, the learned model."""
    fixed = int(np.argmax(ndcg(valid.ranks, k).mean(axis=1)))
    candidates = np.unique(np.quantile(valid.kl, np.linspace(0.0, 1.0, 41)))
    candidates = np.concatenate([candidates, [candidates[-1] * 2 + 1e-12]])
    scores = [ndcg(pick(valid.ranks, HaltingRule(e).steps(valid.kl)), k).mean() for e in candidates]
    eps = float(candidates[int(np.argmax(scores))])
    return {"fixed": fixed, "kl-halt": HaltingRule(eps), "learned": LearnedSelector().fit(valid, k)}


def choose_steps(fitted: Dict[str, object], data: StepData) -> Dict[str, np.ndarray]:
    n = data.ranks.shape[1]
    return {"fixed": np.full(n, fitted["fixed"]), "min-entropy": np.argmin(data.entropy, axis=0),
            "kl-halt": fitted["kl-halt"].steps(data.kl), "learned": fitted["learned"].steps(data)}


def evaluate_selectors(valid: StepData, test: StepData, readout_ranks: Optional[np.ndarray] = None,
                       seed: int = 0, placebo_draws: int = 20) -> Dict[str, dict]:
    """Fit on ``valid``, score on ``test``. Per selector: ndcg@10, ndcg@20 (means), per-sample
    ndcg@20 (for the bootstrap), gap_closed (share of the readout-to-step-oracle NDCG@20 gap),
    mean_step (the chosen step) and steps_computed. ``readout_ranks``: the model's own readout
    (default: the last step). Also 'readout' and 'oracle' rows."""
    fitted = fit_selectors(valid)
    chosen = choose_steps(fitted, test)
    K = test.steps - 1
    readout = test.ranks[-1] if readout_ranks is None else np.asarray(readout_ranks)
    oracle = test.ranks.min(axis=0)
    base20, top20 = ndcg(readout, 20).mean(), ndcg(oracle, 20).mean()

    def row(ranks, mean_step, computed):
        n20 = ndcg(ranks, 20)
        gap = top20 - base20
        return {"ndcg@10": float(ndcg(ranks, 10).mean()), "ndcg@20": float(n20.mean()), "per_sample_ndcg@20": n20,
                "gap_closed": float((n20.mean() - base20) / gap) if gap > 0 else float("nan"),
                "mean_step": float(mean_step), "steps_computed": float(computed)}

    out = {"readout": row(readout, K, K), "oracle": row(oracle, float("nan"), K)}
    computed = {"fixed": fitted["fixed"], "min-entropy": K, "learned": K}
    for name, steps in chosen.items():
        out[name] = row(pick(test.ranks, steps), steps.mean(), computed.get(name, steps.mean()))
    out["fixed"]["step"] = int(fitted["fixed"])
    out["kl-halt"]["eps"] = fitted["kl-halt"].eps
    best = max(("min-entropy", "kl-halt", "learned"), key=lambda n: out[n]["ndcg@20"])
    rng = np.random.default_rng(seed)
    draws = [pick(test.ranks, rng.permutation(chosen[best])) for _ in range(placebo_draws)]
    n20 = np.mean([ndcg(d, 20) for d in draws], axis=0)
    out["random"] = row(draws[0], chosen[best].mean(), out[best]["steps_computed"])
    out["random"].update({"ndcg@10": float(np.mean([ndcg(d, 10).mean() for d in draws])),
                          "ndcg@20": float(n20.mean()), "per_sample_ndcg@20": n20,
                          "gap_closed": float((n20.mean() - base20) / (top20 - base20)) if top20 > base20 else float("nan"),
                          "like": best})
    return out
