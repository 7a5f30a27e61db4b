"""Kernels for ReaRec inference: attention with a KV cache, and fused top-K scoring.

    from rearec_kernels import KVCache, prefill_attention, decode_attention, split_qkv, fused_topk, Backend

Each op picks its implementation per call (``backend=``, see :mod:`rearec_kernels.backend`); Triton is
imported only when the Triton backend runs. Independent of the ``rearec`` package: nothing here
imports it.
"""
from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv
from rearec_kernels.backend import Backend
from rearec_kernels.kv_cache import KVCache
from rearec_kernels.topk import fused_topk

__all__ = ["Backend", "KVCache", "decode_attention", "fused_topk", "prefill_attention", "split_qkv"]
