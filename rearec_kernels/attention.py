"""Attention with a KV cache for ReaRec inference: what users call.

ReaRec encodes a user's item history (the *prefill*), then runs K reasoning steps, each feeding the
last hidden state back in as one new token that attends to the whole history and the earlier
reasoning tokens (a *decode* step). With a :class:`~rearec_kernels.kv_cache.KVCache` each reasoning
step costs one token per layer instead of recomputing all L + s rows:

    cache = KVCache.allocate(n_layers, B, H, L + K, Dh, dtype=..., device=...)
    for layer ...:   out = prefill_attention(q, k, v, lengths, cache, layer)   # history
    cache.set_lengths(lengths)
    for step in range(K):
        for layer ...: out = decode_attention(q, k, v, cache, layer)           # one token
        cache.advance()

Each op checks its inputs (ValueError), then runs one of three implementations, picked by
:func:`rearec_kernels.backend.resolve` (see there for what each backend takes): the Triton kernels,
the fast CPU path, or the reference. Range checks on ``lengths`` read their values, so they are
skipped for the Triton backend on CUDA (a host sync per call); the kernels there stay in bounds
whatever the values, and give a user whose length is out of range NaN outputs instead.
"""
from __future__ import annotations

import operator

import torch

from rearec_kernels.backend import Backend, implementation, resolve, values_checkable
from rearec_kernels.checks import check_lengths, check_qkv, check_range, check_real, check_triton_attention
from rearec_kernels.kv_cache import KVCache

__all__ = ["KVCache", "prefill_attention", "decode_attention", "split_qkv"]


def split_qkv(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, L, H, Dh) views of one fused projection: (B, L, 3, H, Dh) or (B, L, 3*H*Dh).

    No copy: both attention ops accept these strided views as they are.
    """
    if qkv.dim() == 3:
        B, L, width = qkv.shape
        if width % (3 * n_heads):
            raise ValueError(f"split_qkv: last dim {width} is not a multiple of 3 * n_heads = {3 * n_heads}")
        qkv = qkv.view(B, L, 3, n_heads, width // (3 * n_heads))
    if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.shape[3] != n_heads:
        raise ValueError(f"split_qkv: expected (B, L, 3, {n_heads}, Dh) or (B, L, 3*{n_heads}*Dh), "
                         f"got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return q, k, v


# -- checks -----------------------------------------------------------------------------------------

def _check_cache(op: str, cache, layer: int, B: int, H: int, Dh: int, dtype, device) -> None:
    if not isinstance(cache, KVCache):
        raise ValueError(f"{op}: cache must be a KVCache, got {type(cache).__name__}")
    for name, t in (("cache.keys", cache.keys), ("cache.values", cache.values)):
        if t.dim() != 5 or t.shape[1:3] != (B, H) or t.shape[4] != Dh:
            raise ValueError(f"{op}: {name} must be (n_layers, {B}, {H}, capacity, {Dh}) to match q, "
                             f"got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}, q has {dtype}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, q on {device}")
    if cache.keys.shape != cache.values.shape:
        raise ValueError(f"{op}: cache.keys {tuple(cache.keys.shape)} and cache.values "
                         f"{tuple(cache.values.shape)} differ")
    cache.layer_index(layer, op)


def _check_out(op: str, out, shape, dtype, device) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device != device:
        desc = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{op}: out must be a {tuple(shape)} {dtype} tensor on {device}, got {desc}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides; only a non-unit last stride (no vector loads) is worth a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _into_out(out, compute):
    """For the Triton kernels: ``compute(out)`` where ``out`` is None or has a unit last stride; otherwise
    they write a contiguous result, copied into ``out``. They index features in int32 (a stride of 1 is
    specialised away), so a last stride in the millions would wrap; and such stores are scattered anyway."""
    if out is None or out.stride(-1) == 1 or out.shape[-1] == 1:
        return compute(out)
    return out.copy_(compute(None))


def _scale(op: str, sm_scale):
    return None if sm_scale is None else check_real(op, "sm_scale", sm_scale)


# -- ops --------------------------------------------------------------------------------------------

def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    cache: "KVCache | None" = None,
    layer: int = 0,
    *,
    sm_scale: "float | None" = None,
    backend: "Backend | str | None" = None,
    out: "torch.Tensor | None" = None,
    causal: bool = True,
) -> torch.Tensor:
    """Causal (or, with ``causal=False``, bidirectional) self-attention over each user's right-padded
    history; optionally fills the cache.

    q, k, v: (B, L, H, Dh), one dtype and device; strided views of one fused QKV projection are
    fine (see :func:`split_qkv`). lengths: (B,) integer, 1 <= lengths[b] <= L; token t of user b is
    valid iff t < lengths[b]. Valid token t attends to valid tokens 0..t (causal) or to every valid
    token (``causal=False``, as BERT4Rec); padding is never attended to. Returns (B, L, H, Dh) in q's dtype (written into ``out`` when given) with padding rows 0.
    sm_scale defaults to 1/sqrt(Dh). Padding slots must hold finite numbers (zeros, or a previous
    call's values): the CPU path weights padded keys and values by an exact 0, and 0 · NaN is NaN, so a
    NaN or inf there (a buffer from ``torch.empty``) spoils its user's valid rows (the reference never
    reads them).

    With ``cache``: writes the valid tokens' K/V into ``cache.keys/values[layer, b, :, 0:lengths[b]]``
    (cache: same B, H, Dh, dtype and device; capacity >= L). ``cache.lengths`` is not changed.

    A length outside [1, L] is a ValueError, except for the Triton backend on CUDA, which does not
    read lengths on the host: there that user's rows come back NaN and nothing of it is cached.
    """
    op = "prefill_attention"
    check_qkv(op, q, k, v, 4, "(B, L, H, Dh)")
    B, L, H, Dh = q.shape
    check_lengths(op, lengths, B, q.device)
    if cache is not None:
        _check_cache(op, cache, layer, B, H, Dh, q.dtype, q.device)
        if cache.capacity < L:
            raise ValueError(f"{op}: cache capacity {cache.capacity} < sequence length {L}")
    _check_out(op, out, (B, L, H, Dh), q.dtype, q.device)
    sm_scale = _scale(op, sm_scale)
    if not isinstance(causal, bool):
        raise ValueError(f"{op}: causal must be True or False, got {causal!r}")
    layer = operator.index(layer) if cache is not None else 0  # without a cache no layer is written
    chosen = resolve(op, backend, q.device)
    if chosen is Backend.TRITON:
        check_triton_attention(op, q.dtype, Dh)
    if values_checkable(chosen, q.device):
        check_range(op, "lengths", lengths, 1, L, "1 <= lengths[b] <= L")

    if chosen is Backend.TRITON:
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        lengths = lengths.contiguous()
    impl = implementation("attention", chosen)

    def compute(o):
        return impl.prefill_attention(q, k, v, lengths, cache, layer, sm_scale=sm_scale, out=o, causal=causal)
    # q's dtype, as the contract says: under CPU autocast the CPU path's products run in bfloat16 and
    # would hand back bfloat16 for float32 inputs (.to returns the tensor itself when it is q's dtype)
    return (_into_out(out, compute) if chosen is Backend.TRITON else compute(out)).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    layer: int,
    *,
    sm_scale: "float | None" = None,
    backend: "Backend | str | None" = None,
    out: "torch.Tensor | None" = None,
) -> torch.Tensor:
    """One reasoning step of one layer: one new token per user, attending to everything cached.

    q, k, v: (B, H, Dh). Writes k, v into slot ``n_b = cache.lengths[b]`` of layer ``layer``; the
    query attends over slots 0..n_b inclusive (history, earlier reasoning tokens, itself). Needs
    n_b < cache.capacity. Does not change ``cache.lengths``: call ``cache.advance()`` once per step,
    after all layers. Returns (B, H, Dh) in q's dtype (written into ``out`` when given).

    A length outside [0, capacity) is a ValueError, except for the Triton backend on CUDA, which does
    not read lengths on the host: there that user's output is NaN and nothing is written.
    """
    op = "decode_attention"
    check_qkv(op, q, k, v, 3, "(B, H, Dh)")
    B, H, Dh = q.shape
    _check_cache(op, cache, layer, B, H, Dh, q.dtype, q.device)
    check_lengths(op, cache.lengths, B, q.device, name="cache.lengths")
    _check_out(op, out, (B, H, Dh), q.dtype, q.device)
    sm_scale = _scale(op, sm_scale)
    layer = operator.index(layer)
    chosen = resolve(op, backend, q.device)
    if chosen is Backend.TRITON:
        check_triton_attention(op, q.dtype, Dh)
    if values_checkable(chosen, q.device):
        check_range(op, "cache.lengths", cache.lengths, 0, cache.capacity - 1,
                     "the new token needs a free slot: 0 <= lengths[b] < capacity")

    if chosen is Backend.TRITON:
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        if not cache.lengths.is_contiguous():
            raise ValueError(f"{op}: cache.lengths must be contiguous for the Triton backend")
    impl = implementation("attention", chosen)

    def compute(o):
        return impl.decode_attention(q, k, v, cache, layer, sm_scale=sm_scale, out=o)
    return (_into_out(out, compute) if chosen is Backend.TRITON else compute(out)).to(q.dtype)  # see prefill
