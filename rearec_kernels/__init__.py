"""Kernels for ReaRec inference: attention with a KV cache, and fused top-K scoring.

Independent of the ``rearec`` package: nothing here imports it.
"""
from rearec_kernels.backend import Backend
