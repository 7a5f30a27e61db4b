"""The reference for differentiable prefill attention: :func:`rearec_kernels.attention_reference.prefill_attention`
(explicit masks and softmax, a loop over users), which autograd differentiates as it stands."""
from __future__ import annotations

from rearec_kernels import attention_reference


def prefill_attention(q, k, v, lengths, sm_scale):
    return attention_reference.prefill_attention(q, k, v, lengths, sm_scale=sm_scale)
