"""The reference for differentiable prefill attention: explicit masks and softmax, in float32 at least.

Without dropout it is :func:`rearec_kernels.attention_reference.prefill_attention` (a loop over
users), which autograd differentiates as it stands. With dropout, or with an explicit
``dropout_scale`` (B*H, L, L) tensor of per-weight factors (0 or 1 / (1 - p), as the Triton kernel
reports them in tests), the attention weights are multiplied by it after the softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rearec_kernels import attention_reference


def prefill_attention(q, k, v, lengths, sm_scale, dropout_p=0.0, dropout_scale=None):
    if dropout_p == 0 and dropout_scale is None:
        return attention_reference.prefill_attention(q, k, v, lengths, sm_scale=sm_scale)
    B, L, H, Dh = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    scores = torch.einsum("blhd,bmhd->bhlm", q.to(work), k.to(work)) * scale
    positions = torch.arange(L, device=q.device)
    valid = positions[None, :] < lengths.to(q.device)[:, None]  # (B, L)
    seen = (positions[:, None] >= positions[None, :])[None, None] & valid[:, None, None, :]
    seen = seen | torch.eye(L, dtype=torch.bool, device=q.device)  # padding rows: no empty softmax
    weights = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    if dropout_scale is not None:
        weights = weights * dropout_scale.view(B, H, L, L).to(work)
    else:
        weights = F.dropout(weights, dropout_p)
    out = torch.einsum("bhlm,bmhd->blhd", weights, v.to(work))
    return out.masked_fill(~valid[:, :, None, None], 0.0).to(q.dtype)
