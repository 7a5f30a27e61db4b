"""Triton kernels for attention with a KV cache: a causal (or bidirectional) prefill and a one-token
decode step.

Called through :mod:`rearec_kernels.attention`, which checks shapes, dtypes and devices; see there
for the contract. Both kernels take every tensor by (pointer, strides), so q/k/v may be strided
views of one fused QKV projection and the cache is written in place, one layer at a time.

Prefill: one program per (user, head, block of BLOCK_M query rows), FlashAttention-style online
softmax over key blocks, in two loops over one step (``_prefill_key_block``): the key blocks wholly
before the query block (no mask), then the diagonal blocks up to the user's length (causal mask). A valid query row t < n_b never sees a
padding key (those sit at positions >= n_b > t), so causality is the only mask and no (L, L) mask
exists anywhere; query blocks wholly past n_b only store zeros. Each program also copies its own
rows' K/V into the cache (only the valid ones), so every valid token is written exactly once.
Bidirectional prefill (CAUSAL=False, for BERT4Rec) runs one loop over all key blocks up to the
user's length, masking keys past it instead of keys after the query.

Decode: one program per (user, head). It stores the new token's K/V into slot n_b = lengths[b],
starts the online softmax from that token's own score and value (still in registers), then
streams the n_b history slots in blocks of BLOCK_N. With at most a few hundred keys per user and
B*H programs there is enough parallelism without splitting the keys across programs. Its query is
one row of the prefill's 2-D tiles, so both share the same online-softmax step (``_softmax_step``).

Lengths are not checked on the host for CUDA tensors (see :mod:`rearec_kernels.attention`): a user
whose length is out of range gets NaN outputs, and nothing is read or written outside its rows.

Accumulation is float32 for every input dtype. float32 inputs use IEEE-exact ``tl.dot`` (no TF32).
Under Triton's interpreter (TRITON_INTERPRET=1), dot operands are upcast to float32 after the same
rounding the GPU would do, because the interpreter computes low-precision dots wrongly.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rearec_kernels.backend import interpreting
from rearec_kernels.triton_tiles import block_d, dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(m_i, l_i, s):
    """One online-softmax step over a (rows, keys) tile of log2-scaled scores ``s``: the running
    row maxima and sums after it, the tile's unnormalised weights ``p``, and ``alpha``, the factor
    that rescales everything accumulated before (FlashAttention's recurrence, in base 2)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), p, alpha


@triton.jit
def _load_tile(base, offs_n, stride_t, offs_d, stride_d, mask):
    """Rows ``offs_n`` (tokens or cache slots) x columns ``offs_d`` of one (user, head); 0 where masked.
    Row offsets in int64: with any strides, a token's stride times L may pass 2**31 (a time-major
    (L, B, H, Dh) view of more than 2**31 elements)."""
    return tl.load(base + offs_n.to(tl.int64)[:, None] * stride_t + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, offs_n, stride_t, offs_d, stride_d, value, mask):
    """The counterpart of :func:`_load_tile`, converting ``value`` to the destination's dtype."""
    tl.store(base + offs_n.to(tl.int64)[:, None] * stride_t + offs_d[None, :] * stride_d,
             value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _prefill_key_block(
    acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n0, offs_d, d_ok, stride_kt, stride_vt,
    stride_kd, stride_vd, qk_scale, length,
    DIAGONAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr = True,
):
    """Attend one block of query rows to the keys start_n .. start_n + BLOCK_N - 1.

    DIAGONAL=False: keys wholly before the query block, all valid and visible: no masks at all.
    DIAGONAL=True: keys past the user's length load as 0 and the causal mask applies; key start_n
    is <= every row's own position, so no row is left all -inf. With CAUSAL=False the mask is the
    user's length instead (start_n < length, so no row is left all -inf either).
    """
    offs_n = start_n + offs_n0
    if DIAGONAL:
        tile_mask = (offs_n[:, None] < length) & d_ok[None, :]
    else:
        tile_mask = d_ok[None, :]
    k = _load_tile(k_base, offs_n, stride_kt, offs_d, stride_kd, tile_mask)
    v = _load_tile(v_base, offs_n, stride_vt, offs_d, stride_vd, tile_mask)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if DIAGONAL:
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        else:
            s = tl.where(offs_n[None, :] < length, s, float("-inf"))
    m_i, l_i, p, alpha = _softmax_step(m_i, l_i, s)
    p = p.to(v.dtype)  # the PV product runs in the input dtype (tensor cores), as FlashAttention's
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Lens, CacheK, CacheV,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_ckb, stride_ckh, stride_ckt, stride_ckd,
    stride_cvb, stride_cvh, stride_cvt, stride_cvd,
    n_heads, seq_len, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_CACHE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    # A length outside [1, seq_len] (never checked on the host for CUDA tensors): NaN rows, no cache
    # writes, no reads past the sequence.
    given = tl.load(Lens + b)  # checked at its own width: narrowed first, 2^32 + 3 would read as 3
    length_ok = (given >= 1) & (given <= seq_len)
    length = tl.where(length_ok, given, 0).to(tl.int32)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    o_base = Out + b * stride_ob + h * stride_oh
    o_mask = (offs_m[:, None] < seq_len) & d_ok[None, :]

    if start_m >= length:
        # Every row of this block is padding (or the length is out of range).
        fill = tl.where(length_ok, 0.0, float("nan"))
        _store_tile(o_base, offs_m, stride_ot, offs_d, stride_od,
                    tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32) + fill, o_mask)
    else:
        row_ok = offs_m < length
        rows_mask = row_ok[:, None] & d_ok[None, :]
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        q = _load_tile(q_base, offs_m, stride_qt, offs_d, stride_qd, rows_mask)
        if UPCAST:
            q = q.to(tl.float32)

        if WRITE_CACHE:
            # This block's own valid tokens: no other program writes them.
            own_k = _load_tile(k_base, offs_m, stride_kt, offs_d, stride_kd, rows_mask)
            own_v = _load_tile(v_base, offs_m, stride_vt, offs_d, stride_vd, rows_mask)
            _store_tile(CacheK + b * stride_ckb + h * stride_ckh, offs_m, stride_ckt, offs_d, stride_ckd,
                        own_k, rows_mask)
            _store_tile(CacheV + b * stride_cvb + h * stride_cvh, offs_m, stride_cvt, offs_d, stride_cvd,
                        own_v, rows_mask)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # 1) Key blocks wholly before this query block (BLOCK_M is a multiple of BLOCK_N, so they end
        #    exactly at start_m). 2) The diagonal, up to the user's length, under the causal mask.
        if CAUSAL:
            for start_n in range(0, start_m, BLOCK_N):
                acc, l_i, m_i = _prefill_key_block(
                    acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n0, offs_d, d_ok, stride_kt,
                    stride_vt, stride_kd, stride_vd, qk_scale, length, False, UPCAST, DOT_PRECISION)
            for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, length), BLOCK_N):
                acc, l_i, m_i = _prefill_key_block(
                    acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n0, offs_d, d_ok, stride_kt,
                    stride_vt, stride_kd, stride_vd, qk_scale, length, True, UPCAST, DOT_PRECISION)
        else:  # every valid key, the last block masked at the user's length
            for start_n in range(0, length, BLOCK_N):
                acc, l_i, m_i = _prefill_key_block(
                    acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n0, offs_d, d_ok, stride_kt,
                    stride_vt, stride_kd, stride_vd, qk_scale, length, True, UPCAST, DOT_PRECISION, False)

        out = acc / l_i[:, None]
        out = tl.where(row_ok[:, None], out, 0.0)
        _store_tile(o_base, offs_m, stride_ot, offs_d, stride_od, out, o_mask)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lens, CacheK, CacheV,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_ckb, stride_ckh, stride_ckt, stride_ckd,
    stride_cvb, stride_cvh, stride_cvt, stride_cvd,
    n_heads, capacity, head_dim, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_heads).to(tl.int64)
    h = (pid % n_heads).to(tl.int64)
    # Where the new token goes; also the history length. The dispatcher checks 0 <= slot < capacity
    # wherever that costs no host sync; on CUDA it reads nothing, so an out-of-range slot is caught
    # here: nothing is written or read, and the output is NaN.
    given = tl.load(Lens + b)  # checked at its own width, then narrowed
    slot_ok = (given >= 0) & (given < capacity)
    slot = tl.where(slot_ok, given, 0).to(tl.int32)

    # One query row, kept 2-D ([1, BLOCK_D]) so the update below is the prefill's, one row high.
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    zero = tl.zeros([1], dtype=tl.int32)
    row_mask = d_ok[None, :]
    q = _load_tile(Q + b * stride_qb + h * stride_qh, zero, 0, offs_d, stride_qd, row_mask)
    k_new = _load_tile(K + b * stride_kb + h * stride_kh, zero, 0, offs_d, stride_kd, row_mask)
    v_new = _load_tile(V + b * stride_vb + h * stride_vh, zero, 0, offs_d, stride_vd, row_mask)

    ck_base = CacheK + b * stride_ckb + h * stride_ckh
    cv_base = CacheV + b * stride_cvb + h * stride_cvh
    store_mask = row_mask & slot_ok
    _store_tile(ck_base, slot + zero, stride_ckt, offs_d, stride_ckd, k_new, store_mask)
    _store_tile(cv_base, slot + zero, stride_cvt, offs_d, stride_cvd, v_new, store_mask)

    # The online softmax starts from the new token itself, straight from registers.
    q = q.to(tl.float32) * qk_scale
    m_i = tl.sum(q * k_new.to(tl.float32), axis=1)  # [1]
    l_i = m_i * 0.0 + 1.0
    acc = v_new.to(tl.float32)  # [1, BLOCK_D]

    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, slot, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < slot
        tile_mask = n_ok[:, None] & d_ok[None, :]
        k = _load_tile(ck_base, offs_n, stride_ckt, offs_d, stride_ckd, tile_mask)
        s = tl.sum(k.to(tl.float32) * q, axis=1)  # [BLOCK_N]: q . k per slot (no dot: one query row)
        s = tl.where(n_ok, s, float("-inf"))[None, :]
        m_i, l_i, p, alpha = _softmax_step(m_i, l_i, s)
        v = _load_tile(cv_base, offs_n, stride_cvt, offs_d, stride_cvd, tile_mask)
        acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]

    out = acc / l_i[:, None]
    out = tl.where(slot_ok, out, float("nan"))
    _store_tile(Out + b * stride_ob + h * stride_oh, zero, 0, offs_d, stride_od, out, row_mask)


# -- launch configuration ---------------------------------------------------------------------------
# Written for H100/H200 (sm_90): power-of-two tiles, tl.dot tiles >= 16. Not autotuned: the sequences
# are short (L ~ 50-200), so one query block per (user, head) is the common case and the choices
# below mostly trade registers against parallelism. bench/gpu_attention.py times the alternatives.

def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    width = block_d(head_dim)
    if interpreting():  # one small config: short loops, several blocks even for short sequences
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    # No register spills on sm_90 at any width, causal, bidirectional or without a cache (ptxas via
    # bench/kernel_variants.py; tests/test_gpu_compile.py checks every width and the ragged head dims
    # 40, 72, 136). A "ragged" head_dim, not a multiple of 16, masks its loads element by element and
    # needs more registers, so it gets tiles of its own where the default spills (worst case over the
    # variants, registers / spill bytes, before -> after):
    ragged = head_dim % 16 != 0
    if dtype == torch.float32:
        # float32 dots are IEEE, i.e. FMA on CUDA cores: the operand tiles sit in registers, at twice
        # the bytes of 16-bit ones, so the tile shrinks as the width grows.
        #   width 16-64: 64x64, 4 warps, 3 stages: 255 / 520 (32), 6252 (64), 272 (head_dim 8)
        #                -> 64x32, 8 warps, 2 stages: 128 / 0 (the width-128 tile before);
        #                ragged width 64 (head_dim 40) 128 / 12 (bidirectional) -> 64x16: 128 / 0
        #   width 128:   64x32, 8 warps, 2 stages: 150 / 16 (bidirectional) -> 32x16: 80 / 0
        #   width 256:   64x32, 8 warps, 2 stages: 255 / 34468; 64x16, 32x32, 32x16 and one stage
        #                still spill (32 to 9052); 16x16 at 2 stages spills 28 at head_dim 200
        #                -> 16x16, 8 warps, 1 stage: 166 / 0
        if width <= 64:
            return dict(BLOCK_M=64, BLOCK_N=16 if ragged and width == 64 else 32, num_warps=8, num_stages=2)
        if width <= 128:
            return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)
    # 16-bit, ragged head dims (those of widths 16 and 32, e.g. 8 and 24, do not spill):
    #   width 64 (head_dim 40):   64x64, 4 warps, 3 stages: 255 / 264 (causal) -> 8 warps, 2 stages: 235 / 0
    #   width 128 (head_dim 72):  64x64, 4 warps, 2 stages: 255 / 352 -> 32x32, 8 warps: 243 / 0
    #                             (64x32 still spills 80)
    #   width 256 (head_dim 136): 64x32, 8 warps, 2 stages: 255 / 1128 -> 32x16: 244 / 0 (32x32: 32)
    if width <= 32:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if width <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2) if ragged else \
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if width <= 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2) if ragged else \
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2) if ragged else \
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    width = block_d(head_dim)
    if interpreting():
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    if head_dim % 16 and width == 64:  # ragged (see prefill_config), head_dim 40: 255 / 152 -> 156 / 0
        return dict(BLOCK_N=64, num_warps=8, num_stages=2)
    # ~8K elements per K (and V) tile: 64 registers a thread at 4 warps.
    return dict(BLOCK_N=max(16, min(128, 8192 // width)), num_warps=4, num_stages=2)


def prefill_attention(q, k, v, lengths, cache=None, layer=0, *, sm_scale=None, out=None, causal=True,
                      config=None):
    B, L, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    cfg = dict(prefill_config(Dh, q.dtype) if config is None else config)
    if cfg["BLOCK_M"] % cfg["BLOCK_N"]:
        raise ValueError(f"BLOCK_M must be a multiple of BLOCK_N, got {cfg}")
    if out is None:
        out = torch.empty(B, L, H, Dh, dtype=q.dtype, device=q.device)
    if cache is not None:
        ck, cv = cache.keys[layer], cache.values[layer]  # (B, H, C, Dh) views: pointer at the layer
    else:
        ck = cv = out  # unused (WRITE_CACHE=False)
    ck_strides = ck.stride() if cache is not None else (0, 0, 0, 0)
    cv_strides = cv.stride() if cache is not None else (0, 0, 0, 0)
    grid = (B * H, triton.cdiv(L, cfg["BLOCK_M"]))
    _prefill_kernel[grid](
        q, k, v, out, lengths, ck, cv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ck_strides, *cv_strides,
        H, L, Dh, scale * LOG2E,
        BLOCK_D=block_d(Dh), WRITE_CACHE=cache is not None, UPCAST=interpreting(),
        DOT_PRECISION=dot_precision(q.dtype), CAUSAL=bool(causal), **cfg,
    )
    return out


def decode_attention(q, k, v, cache, layer, *, sm_scale=None, out=None, config=None):
    B, H, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else float(sm_scale)
    cfg = dict(decode_config(Dh, q.dtype) if config is None else config)
    if out is None:
        out = torch.empty(B, H, Dh, dtype=q.dtype, device=q.device)
    ck, cv = cache.keys[layer], cache.values[layer]
    _decode_kernel[(B * H,)](
        q, k, v, out, cache.lengths, ck, cv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ck.stride(), *cv.stride(),
        H, cache.capacity, Dh, scale * LOG2E,
        BLOCK_D=block_d(Dh), **cfg,
    )
    return out
