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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prefill_attention(q, k, v, lengths, cache=None, layer=0, *, sm_scale=None, out=None, causal=True):
    B, L, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    lengths = lengths.to(device=q.device, dtype=torch.long)
    shortest, longest = int(lengths.min()), int(lengths.max())  # past `longest`: nothing to do

    key_mask = None
    if not causal and shortest < longest:  # only bidirectional attention could reach a padding key
        valid = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]
        key_mask = valid[:, None, None, :]  # (B, 1, 1, longest)
    # SDPA takes (B, H, L, Dh): transposed views, no copies. Its CPU kernel allocates the result as
    # (B, L, H, Dh) memory, so transposing back is free too.
    attended = F.scaled_dot_product_attention(
        q[:, :longest].transpose(1, 2),
        k[:, :longest].transpose(1, 2),
        v[:, :longest].transpose(1, 2),
        attn_mask=key_mask,
        is_causal=causal,
        scale=scale,
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
    unused = torch.arange(n, device=q.device)[None, :] > slot[:, None]  # (B, n)
    bias = torch.zeros(B, 1, 1, n, dtype=q.dtype, device=q.device)
    bias.masked_fill_(unused[:, None, None], float("-inf"))
    # One fused SDPA call over (B, H, n, Dh) views of the cache: several times faster here than
    # baddbmm + softmax + bmm, whose (1 x Dh) @ (Dh x n) products MKL runs as slow batched GEMVs.
    attended = F.scaled_dot_product_attention(
        q[:, :, None, :], keys[:, :, :n], values[:, :, :n], attn_mask=bias, scale=scale
    ).view(B, H, Dh)
    if out is None:
        return attended
    out.copy_(attended)
    return out
