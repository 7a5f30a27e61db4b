"""The CPU path of differentiable prefill attention: PyTorch's fused SDPA, differentiated by autograd.

Causal attention alone keeps a valid query away from every padding key (padding sits after the
last valid token), so no padding mask is built; padding rows are zeroed out of place, so they pass
no gradient. Assumes finite padding tokens (``0 * nan`` is nan), as :mod:`rearec_kernels.attention_cpu`
does. Called through :mod:`rearec_kernels.attention_autograd`, which checks inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rearec_kernels.attention_cpu import causal_sdpa_mask


def prefill_attention(q, k, v, lengths, sm_scale, dropout_p=0.0):
    L = q.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         **causal_sdpa_mask(L, sm_scale, q.device), scale=sm_scale,
                                         dropout_p=dropout_p).transpose(1, 2)
    padding = torch.arange(L, device=q.device)[None, :] >= lengths.to(q.device)[:, None]  # (B, L)
    return out.masked_fill(padding[:, :, None, None], 0.0)
