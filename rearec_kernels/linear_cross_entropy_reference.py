"""Readable PyTorch ground truth for the fused linear cross-entropy: the whole (B, N) logits at once.

Contract (shared by every backend, checked by :mod:`rearec_kernels.linear_cross_entropy`):

* ``logits = scale * hidden @ item_table.T`` (B, N); ``loss[b] = logsumexp(logits[b]) - logits[b, targets[b]]``;
* rows whose target is ``ignore_index`` have loss 0 and no gradient;
* ``reduction``: "mean" over the rows not ignored (NaN when every row is ignored, as
  ``F.cross_entropy``), "sum", or "none" (a (B,) tensor);
* computed in float64 when either input is float64, otherwise float32 (16-bit inputs are upcast);
  the result has that dtype. ``product_dtype`` (tests of 16-bit paths): the product ``hidden @
  item_table.T`` runs in that dtype instead (bfloat16 on CPU: float32 accumulation, each logit
  rounded), and is widened before the scale and everything after it.

This file materialises the logits: it is for tests, not for training at scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(hidden: torch.Tensor, item_table: torch.Tensor) -> torch.dtype:
    """float64 when either input is float64, else float32 (float32 accumulation for 16-bit inputs)."""
    return torch.float64 if torch.float64 in (hidden.dtype, item_table.dtype) else torch.float32


def logits(hidden, item_table, scale=1.0, product_dtype=None):
    """``scale * hidden @ item_table.T`` in :func:`compute_dtype`, the product in ``product_dtype``
    when given."""
    work = compute_dtype(hidden, item_table)
    product = product_dtype or work
    return scale * (hidden.to(product) @ item_table.to(product).T).to(work)


def linear_cross_entropy(hidden, item_table, targets, scale=1.0, reduction="mean", ignore_index=-100,
                         chunk_size=None, product_dtype=None):
    """The whole logits, then ``F.cross_entropy``; ``chunk_size`` is the CPU path's (ignored)."""
    return F.cross_entropy(logits(hidden, item_table, scale, product_dtype), targets, reduction=reduction,
                           ignore_index=ignore_index)


def mean_pairwise_kl(states, item_table, scale=1.0, chunk_size=None, product_dtype=None):
    """ERL's diversity term: the mean over ordered pairs i != j of KL(p_j || stopgrad(p_i)), where
    p_s = softmax(scale * states[:, s] @ item_table.T), averaged over users too. states (B, S, d), S >= 2.
    Gradients flow through p_j only (the first argument), as in ERL."""
    log_p = F.log_softmax(logits(states, item_table, scale, product_dtype), dim=-1)  # (B, S, N)
    steps = states.shape[1]
    total = log_p.new_zeros(())
    for j in range(steps):
        for i in range(steps):
            if i != j:
                p_j = log_p[:, j].exp()
                total = total + (p_j * (log_p[:, j] - log_p[:, i].detach())).sum(-1).mean()
    return total / (steps * (steps - 1))
