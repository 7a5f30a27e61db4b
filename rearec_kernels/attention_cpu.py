"""The fast CPU path: PyTorch's fused SDPA and batched matrix products, straight on the cache.

No loop over users. Called through :mod:`rearec_kernels.attention`, which checks shapes; see there
for the contract. What this path assumes beyond it (documented in :mod:`rearec_kernels.kv_cache`):

* prefill: the padding tokens' q/k/v are finite. Causal attention alone already keeps a valid
  query away from every padding key (padding sits after the last valid token), so no padding mask
  is built; the padding keys still enter the fused kernel with weight 0, and ``0 * nan`` is nan.
  Bidirectional prefill (``causal=False``) needs a padding mask: one boolean (B, 1, 1, L) key mask.
* decode: the unused cache slots ``lengths[b] < slot <= max(lengths)`` are finite, for the same
  reason: all users are scored over the same ``max(lengths) + 1`` slots, the unused ones given a
  -inf bias. The step streams every cached K/V once, so it runs at memory bandwidth.

bfloat16 takes another route (:func:`_attention_by_matmuls`): in our profiles PyTorch's fused CPU
SDPA ran *slower* in bfloat16 than in float32, while oneDNN's bf16 batched matmuls (AVX512-BF16 /
AMX, float32 accumulation) are fast. So bf16 runs two batched matmuls with a float32 softmax between
them. float32 keeps the fused SDPA call (the matmul route was no faster there), and so does float16:
without AVX512-FP16, fp16 matmuls are slow (its prefill by matmuls profiled several times slower).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Dtypes whose attention runs as matmul -> float32 softmax -> matmul instead of the fused SDPA.
MATMUL_DTYPES = (torch.bfloat16,)


def _attention_by_matmuls(q, k, v, blocked, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, blocked keys removed) v for bfloat16 (B, H, M, Dh) q, (B, H, N, Dh) k
    and (B, H, N', Dh) v, N' <= N: v covers the first N' keys, every key past them must be blocked.
    blocked: None or bool broadcastable to (B, H, M, N), True where a query must not see a key,
    never a whole row. Returns (B, H, M, Dh) in q's dtype.

    Precision: each product accumulates in float32 inside oneDNN and is rounded to bf16 once (the
    scores, then the output); the scaling, masking and softmax run in float32 and the weights are
    rounded to bf16 for the second product, as the fused kernels do. masked_fill (not an added -inf
    bias) so that whatever a blocked key holds, NaN included, never reaches the weights.
    oneDNN takes dense (or dense transposed) batches of matrices only: matmul copies other strided
    views first, which still costs far less than the bf16 SDPA this replaces.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    weights = torch.softmax(scores, dim=-1)[..., : v.shape[-2]].to(q.dtype)
    return torch.matmul(weights, v)


def causal_sdpa_mask(length: int, scale: float, device) -> dict:
    """The causal-masking arguments of ``F.scaled_dot_product_attention`` over ``length`` tokens at
    ``scale``: ``is_causal=True``, except for a scale that is not positive (0, negative, NaN), with which
    PyTorch's fused CPU kernel returns NaN rows (torch 2.13): there an explicit lower-triangular mask."""
    if scale > 0:
        return dict(is_causal=True)
    return dict(attn_mask=torch.ones(length, length, dtype=torch.bool, device=device).tril_())


def prefill_attention(q, k, v, lengths, cache=None, layer=0, *, sm_scale=None, out=None, causal=True):
    B, L, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    lengths = lengths.to(device=q.device, dtype=torch.long)
    shortest, longest = int(lengths.min()), int(lengths.max())  # past `longest`: nothing to do

    key_mask = None
    if not causal and shortest < longest:  # only bidirectional attention could reach a padding key
        valid = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]
        key_mask = valid[:, None, None, :]  # (B, 1, 1, longest)
    # Both routes take (B, H, L, Dh): transposed views, no copies.
    heads_first = [t[:, :longest].transpose(1, 2) for t in (q, k, v)]
    if q.dtype in MATMUL_DTYPES:
        blocked = None if key_mask is None else ~key_mask
        if causal:  # query i sees keys j <= i
            blocked = torch.ones(longest, longest, dtype=torch.bool, device=q.device).triu_(1)
        attended = _attention_by_matmuls(*heads_first, blocked, scale).transpose(1, 2)
    else:
        # SDPA's CPU kernel allocates the result as (B, L, H, Dh) memory: transposing back is free.
        masking = causal_sdpa_mask(longest, scale, q.device) if causal else dict(attn_mask=key_mask)
        attended = F.scaled_dot_product_attention(
            *heads_first, **masking, scale=scale
        ).transpose(1, 2)  # (B, longest, H, Dh)

    if out is None and longest == L and attended.is_contiguous():
        out = attended  # the usual case: no copy
    else:
        if out is None:
            out = torch.empty(B, L, H, Dh, dtype=q.dtype, device=q.device)
        out[:, :longest] = attended
        out[:, longest:] = 0
    if shortest < longest:  # padding rows inside [0, longest) attended to padding keys: zero them
        padding = torch.arange(longest, device=q.device)[None, :] >= lengths[:, None]
        out[:, :longest].masked_fill_(padding[:, :, None, None], 0)

    if cache is not None:
        # cache.keys[layer] is (B, H, C, Dh); seen as (B, C, H, Dh), token t of user b is [b, t].
        keys, values = cache.keys[layer].transpose(1, 2), cache.values[layer].transpose(1, 2)
        # Slots every user fills: one strided copy. The rest: only the valid (user, token) pairs.
        keys[:, :shortest] = k[:, :shortest]
        values[:, :shortest] = v[:, :shortest]
        if shortest < longest:
            positions = torch.arange(shortest, longest, device=q.device)
            users, offsets = (positions[None, :] < lengths[:, None]).nonzero(as_tuple=True)
            slots = offsets + shortest
            keys.index_put_((users, slots), k[users, slots])
            values.index_put_((users, slots), v[users, slots])
    return out


def decode_attention(q, k, v, cache, layer, *, sm_scale=None, out=None):
    B, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    slot = cache.lengths.to(device=q.device, dtype=torch.long)  # (B,): where each new token goes
    users = torch.arange(B, device=q.device)
    keys, values = cache.keys[layer], cache.values[layer]  # (B, H, C, Dh)

    # Advanced indices on dims 0 and 2 pick (B, H, Dh): one (H, Dh) row per user.
    keys[users, :, slot] = k
    values[users, :, slot] = v

    n = int(slot.max()) + 1  # slots any user attends to
    if q.dtype in MATMUL_DTYPES:
        attended = _decode_by_matmuls(q, keys, values, slot, n, scale)
    else:
        attended = _decode_by_sdpa(q, keys, values, slot, n, scale)
    if out is None:
        return attended
    out.copy_(attended)
    return out


def _decode_by_sdpa(q, keys, values, slot, n: int, scale: float) -> torch.Tensor:
    B, H, Dh = q.shape
    unused = torch.arange(n, device=q.device)[None, :] > slot[:, None]  # (B, n)
    bias = torch.zeros(B, 1, 1, n, dtype=q.dtype, device=q.device)
    bias.masked_fill_(unused[:, None, None], float("-inf"))
    # One fused SDPA call over (B, H, n, Dh) views of the cache: several times faster here than
    # baddbmm + softmax + bmm, whose (1 x Dh) @ (Dh x n) products MKL runs as slow batched GEMVs.
    attended = F.scaled_dot_product_attention(
        q[:, :, None, :], keys[:, :, :n], values[:, :, :n], attn_mask=bias, scale=scale
    ).view(B, H, Dh)
    return attended


def _decode_by_matmuls(q, keys, values, slot, n: int, scale: float) -> torch.Tensor:
    """bf16 decode over the (B, H, capacity, Dh) cache of one layer -> (B, H, Dh)."""
    B, H, Dh = q.shape
    capacity = keys.shape[2]
    # A slice of the slots is not dense, so matmul copies it; all of them it reads in place. Keys:
    # score every slot unless that is over twice the work, the unused ones masked (whatever they
    # hold). Values: the slice only, as a weight of 0 times a NaN past max(lengths) would be NaN.
    scored = capacity if 2 * n >= capacity else n
    blocked = torch.arange(scored, device=q.device)[None, :] > slot[:, None]  # (B, scored)
    attended = _attention_by_matmuls(q[:, :, None, :], keys[:, :, :scored], values[:, :, :n],
                                     blocked[:, None, None, :], scale)
    return attended.view(B, H, Dh)
