"""Kernels for ReaRec: attention with a KV cache and fused top-K scoring (serving), a fused item-table
cross-entropy and attention with autograd (training).

    from rearec_kernels import KVCache, prefill_attention, decode_attention, split_qkv, fused_topk, Backend
    from rearec_kernels import fused_linear_cross_entropy, fused_mean_pairwise_kl, CausalSelfAttention

Each op picks its implementation per call (``backend=``, see :mod:`rearec_kernels.backend`); Triton is
imported only when the Triton backend runs. Independent of the ``rearec`` package: nothing here
imports it.
"""
from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv
from rearec_kernels.attention_autograd import CausalAttention, CausalSelfAttention, prefill_attention_autograd
from rearec_kernels.backend import Backend
from rearec_kernels.kv_cache import KVCache
from rearec_kernels.linear_cross_entropy import fused_linear_cross_entropy, fused_mean_pairwise_kl
from rearec_kernels.topk import PreparedTable, fused_topk, prepare_table

__all__ = [
    "Backend", "CausalAttention", "CausalSelfAttention", "KVCache", "decode_attention", "fused_linear_cross_entropy",
    "fused_mean_pairwise_kl", "fused_topk", "PreparedTable", "prepare_table", "prefill_attention", "prefill_attention_autograd", "split_qkv",
]
