"""Dropout for CPU training, with a mask drawn from 16 random bits per element.

``dropout(x, p, training)`` is ``F.dropout(x, p, training)`` in distribution: each element is kept
with probability 1 - p and scaled by 1 / (1 - p). On CPU tensors, ``F.dropout``'s mask costs
``bernoulli_``, about 15 ns per element here: on MovieLens-1M at batch 256 the seven dropouts of a
training step took 41 ms of its 137. This draws the mask from ``random_()`` on int64 words (three
16-bit draws per word, several times cheaper), keeping an element when its draw is at least
``round(p * 2^16)``: p is honoured to within 2^-17. The mask comes from torch's default generator, so
``torch.manual_seed`` makes it reproducible (it differs from ``F.dropout``'s mask for the same seed).
float32 and float64 tensors are multiplied by a 0 or 1 / (1 - p) multiplier built from the same
draws (:func:`keep_scale`), so that the dropout and its gradient are one multiplication each; lower
precisions multiply by an exact 0 or 1 and then by the float 1 / (1 - p). Other devices use ``F.dropout``.

``softmax_dropout_attention(q, [(k, v, allowed)], p)``: attention with dropout on the weights, the
arithmetic of ``F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)`` (on CPU it
falls back to the same explicit softmax for dropout), with this mask; over several segments of keys,
attention over their concatenation without concatenating them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BITS = 16


def _draws(shape, device):
    """16 uniform random bits per element of ``shape``, as signed int16 (flat, possibly a strided view)."""
    n = math.prod(shape)
    # random_() fills int64 with uniform values in [0, 2^63): the top bit is always 0, so only the
    # three low 16-bit pieces of each word are used (little-endian views; a test checks the rate).
    words = torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_()
    return words.view(torch.int16).view(-1, 4)[:, :3], n


def _cut(p: float) -> int:
    """The int16 threshold: draw + 2^15 < round(p 2^16)  <=>  dropped. For p within 2^-17 of 1 it is
    2^15, which int16 cannot hold (a comparison with it wraps to -2^15: nothing dropped); those p are
    not drawn here (:func:`drawable`)."""
    return round(p * 2 ** _BITS) - 2 ** (_BITS - 1)


def drawable(p: float) -> bool:
    """Whether 16-bit draws can honour p: 0 <= p and round(p 2^16) < 2^16."""
    return 0.0 <= p and _cut(p) < 2 ** (_BITS - 1)


def _checked_cut(p: float) -> int:
    if not drawable(p):
        raise ValueError(f"dropout p={p!r} is outside what 16-bit draws honour ([0, 1 - 2^-17)); use F.dropout")
    return _cut(p)


def drop_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool tensor of ``shape``, each element True (dropped) with probability p (to within 2^-17)."""
    draws, n = _draws(shape, device)
    return (draws < _checked_cut(p)).view(-1)[:n].view(shape)


def keep_ones(shape, p: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """0 where :func:`drop_mask` (same random draws) is True, else 1, in ``dtype``."""
    draws, n = _draws(shape, device)
    kept = torch.empty(draws.shape, dtype=dtype, device=device)
    torch.ge(draws, _checked_cut(p), out=kept)  # the comparison writes dtype directly: no bool tensor and copy
    return kept.view(-1)[:n].view(shape)


def keep_scale(shape, p: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The multiplier of dropout: 0 where :func:`drop_mask` (same random draws) is True, else
    1 / (1 - p). ``x * keep_scale`` is the dropout in one pass, and its gradient ``grad * keep_scale``
    in one more (a bool mask costs a copy, a fill and a scale in each direction)."""
    # bool -> 0/1 -> 0/scale: two vectorised passes, faster here than torch.where with scalar tensors
    return keep_ones(shape, p, dtype, device).mul_(1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a cheaper mask on CPU; see the module docstring."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0 or not drawable(p):
        return F.dropout(x, p, training)
    if x.dtype in (torch.float32, torch.float64):
        return x * keep_scale(x.shape, p, x.dtype, x.device)  # autograd's mul keeps the multiplier only
    # Lower precision (bf16 autocast): 1 / (1 - p) may not be representable; multiply by an exact 0 or 1
    # in x's dtype, then scale by the float (masked_fill with a bool mask is several times slower here).
    # Autograd keeps the 0/1 multiplier only, and the gradient is the same two products.
    return (x * keep_ones(x.shape, p, x.dtype, x.device)).mul_(1.0 / (1.0 - p))


def softmax_dropout_attention(q, segments, p: float) -> torch.Tensor:
    """q (B, H, T, Dh); ``segments`` a sequence of (k, v, allowed): k, v (B, H, S_i, Dh), allowed bool
    broadcastable to (B, 1, T, S_i), or None for every key (each query must allow some key) ->
    softmax(q kᵀ / sqrt(Dh) where allowed) over all the segments' keys together, with dropout p on the
    weights, times the values: (B, H, T, Dh). The segments' keys and values are never concatenated:
    scores are computed per segment and joined, and each segment's weights multiply its own values
    (one segment is plain attention; a reasoning step's token reads step 0's keys in place as one
    segment and the reasoning tokens' as another)."""
    scores = []
    for k, _, allowed in segments:
        segment = torch.matmul(q, k.transpose(-1, -2))
        scores.append(segment if allowed is None else segment.masked_fill(~allowed, float("-inf")))
    joined = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    weights = dropout(torch.softmax(joined * (1.0 / math.sqrt(q.shape[-1])), dim=-1), p)
    context, start = None, 0
    for k, v, _ in segments:
        part = torch.matmul(weights[..., start:start + k.shape[2]] if len(segments) > 1 else weights, v)
        context, start = part if context is None else context + part, start + k.shape[2]
    return context
