"""Readable PyTorch attention with a KV cache: the ground truth for the Triton and CPU paths.

Written for clarity, not speed: explicit masks, an explicit softmax, a loop over users where that
reads more plainly. Computes in float32 at least (float64 stays float64) and returns the input dtype.
Padding tokens and unused cache slots may hold anything, NaN included: they are never read.
Called through :mod:`rearec_kernels.attention`, which checks shapes; see there for the contract.
"""
from __future__ import annotations

import math

import torch


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """softmax(q k^T * sm_scale, keys not ``allowed`` removed) v, per head.

    q: (H, M, Dh); k, v: (H, N, Dh); allowed: (M, N) bool, every row allowing at least one key.
    """
    scores = (q @ k.transpose(-1, -2)) * sm_scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v


def prefill_attention(q, k, v, lengths, cache=None, layer=0, *, sm_scale=None, out=None, causal=True):
    """Causal (or bidirectional) attention among each user's first ``lengths[b]`` tokens; rows past
    that are 0.

    q, k, v: (B, L, H, Dh). Writes the valid tokens' K/V into ``cache.keys/values[layer, b, :, :n_b]``.
    """
    B, L, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    work = _work_dtype(q.dtype)
    result = torch.zeros(B, L, H, Dh, dtype=work, device=q.device)
    visible = torch.ones(L, L, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()  # query i sees keys j <= i
    for b in range(B):
        n = int(lengths[b])
        heads_first = [x[b, :n].transpose(0, 1).to(work) for x in (q, k, v)]  # (H, n, Dh) each
        result[b, :n] = masked_softmax_attention(*heads_first, visible[:n, :n], scale).transpose(0, 1)
        if cache is not None:
            cache.keys[layer, b, :, :n] = k[b, :n].transpose(0, 1).to(cache.keys.dtype)
            cache.values[layer, b, :, :n] = v[b, :n].transpose(0, 1).to(cache.values.dtype)
    result = result.to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def decode_attention(q, k, v, cache, layer, *, sm_scale=None, out=None):
    """One new token per user: stored in slot ``n_b = cache.lengths[b]``, attending over slots 0..n_b.

    q, k, v: (B, H, Dh). Does not change ``cache.lengths``.
    """
    B, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    work = _work_dtype(q.dtype)
    result = torch.zeros(B, H, Dh, dtype=work, device=q.device)
    for b in range(B):
        n = int(cache.lengths[b])
        cache.keys[layer, b, :, n] = k[b].to(cache.keys.dtype)
        cache.values[layer, b, :, n] = v[b].to(cache.values.dtype)
        keys = cache.keys[layer, b, :, : n + 1].to(work)  # (H, n+1, Dh): history + itself
        values = cache.values[layer, b, :, : n + 1].to(work)
        allowed = torch.ones(1, n + 1, dtype=torch.bool, device=q.device)
        result[b] = masked_softmax_attention(q[b, :, None].to(work), keys, values, allowed, scale)[:, 0]
    result = result.to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
