"""Triton kernels for attention with a KV cache: a causal prefill and a one-token decode step.

Called through :mod:`rearec_kernels.attention`, which checks shapes, dtypes and devices; see there
for the contract. Both kernels take every tensor by (pointer, strides), so q/k/v may be strided
views of one fused QKV projection and the cache is written in place, one layer at a time.

Prefill: one program per (user, head, block of BLOCK_M query rows), FlashAttention-style online
softmax over key blocks, in two loops: the key blocks wholly before the query block (no mask), then
the diagonal blocks up to the user's length (causal mask). A valid query row t < n_b never sees a
padding key (those sit at positions >= n_b > t), so causality is the only mask and no (L, L) mask
exists anywhere; query blocks wholly past n_b only store zeros. Each program also copies its own
rows' K/V into the cache (only the valid ones), so every valid token is written exactly once.

Decode: one program per (user, head). It stores the new token's K/V into slot n_b = lengths[b],
starts the online softmax from that token's own score and value (still in registers), then
streams the n_b history slots in blocks of BLOCK_N. With at most a few hundred keys per user and
B*H programs there is enough parallelism without splitting the keys across programs.

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

LOG2E = 1.4426950408889634


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
    WRITE_CACHE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    length = tl.minimum(tl.load(Lens + b).to(tl.int32), seq_len)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    o_mask = (offs_m[:, None] < seq_len) & d_ok[None, :]

    if start_m >= length:
        # Every row of this block is padding.
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=Out.dtype.element_ty), mask=o_mask)
    else:
        row_ok = offs_m < length
        rows_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=rows_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
        v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

        if WRITE_CACHE:
            # This block's own valid tokens: no other program writes them.
            own_k = tl.load(k_base + offs_m[:, None] * stride_kt, mask=rows_mask, other=0.0)
            own_v = tl.load(v_base + offs_m[:, None] * stride_vt, mask=rows_mask, other=0.0)
            tl.store(CacheK + b * stride_ckb + h * stride_ckh + offs_m[:, None] * stride_ckt
                     + offs_d[None, :] * stride_ckd, own_k.to(CacheK.dtype.element_ty), mask=rows_mask)
            tl.store(CacheV + b * stride_cvb + h * stride_cvh + offs_m[:, None] * stride_cvt
                     + offs_d[None, :] * stride_cvd, own_v.to(CacheV.dtype.element_ty), mask=rows_mask)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # 1) Key blocks wholly before this query block: all valid (start_m < length) and all visible.
        #    BLOCK_M is a multiple of BLOCK_N, so these blocks end exactly at start_m.
        for start_n in range(0, start_m, BLOCK_N):
            offs_n = start_n + offs_n0
            k = tl.load(k_base + offs_n[:, None] * stride_kt, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt, mask=d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(v.dtype)
            if UPCAST:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

        # 2) The diagonal: keys start_m .. min(start_m + BLOCK_M, length) - 1, under the causal mask.
        #    Padding keys load as 0 and only padding rows (zeroed below) could see them.
        hi = tl.minimum(start_m + BLOCK_M, length)
        for start_n in range(start_m, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            key_mask = (offs_n[:, None] < length) & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kt, mask=key_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt, mask=key_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            # Key start_n <= every row's own position here or in loop 1, so no row is all -inf.
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(v.dtype)
            if UPCAST:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        out = tl.where(row_ok[:, None], out, 0.0)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


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
    slot = tl.load(Lens + b).to(tl.int32)  # where the new token goes; also the history length

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0)
    k_new = tl.load(K + b * stride_kb + h * stride_kh + offs_d * stride_kd, mask=d_ok, other=0.0)
    v_new = tl.load(V + b * stride_vb + h * stride_vh + offs_d * stride_vd, mask=d_ok, other=0.0)

    ck_base = CacheK + b * stride_ckb + h * stride_ckh
    cv_base = CacheV + b * stride_cvb + h * stride_cvh
    # Store the new token. A full cache (slot == capacity) is rejected by the dispatcher on CPU
    # tensors; on CUDA it checks nothing (no host sync), so here we only stay in bounds.
    store_ok = d_ok & (slot < capacity)
    tl.store(ck_base + slot * stride_ckt + offs_d * stride_ckd, k_new.to(CacheK.dtype.element_ty), mask=store_ok)
    tl.store(cv_base + slot * stride_cvt + offs_d * stride_cvd, v_new.to(CacheV.dtype.element_ty), mask=store_ok)

    # The online softmax starts from the new token itself, straight from registers.
    q = q.to(tl.float32) * qk_scale
    m_i = tl.sum(q * k_new.to(tl.float32), axis=0)
    l_i = m_i * 0.0 + 1.0
    acc = v_new.to(tl.float32)

    n_hist = tl.minimum(slot, capacity)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, n_hist, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < n_hist
        tile_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(ck_base + offs_n[:, None] * stride_ckt + offs_d[None, :] * stride_ckd, mask=tile_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(n_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(cv_base + offs_n[:, None] * stride_cvt + offs_d[None, :] * stride_cvd, mask=tile_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    out = acc / l_i
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=d_ok)


# -- launch configuration ---------------------------------------------------------------------------
# Written for H100/H200 (sm_90): power-of-two tiles, tl.dot tiles >= 16. Not autotuned: the sequences
# are short (L ~ 50-200), so one query block per (user, head) is the common case and the choices
# below mostly trade registers against parallelism. bench/gpu_attention.py times the alternatives.

def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    block_d = _block_d(head_dim)
    if interpreting():  # one small config: short loops, several blocks even for short sequences
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        if dtype == torch.float32:  # fp32 tiles are twice the registers: more warps, narrower keys
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    block_d = _block_d(head_dim)
    if interpreting():
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    # ~8K elements per K (and V) tile: 64 registers a thread at 4 warps.
    return dict(BLOCK_N=max(16, min(128, 8192 // block_d)), num_warps=4, num_stages=2)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is the default; fp16/bf16 ignore it


def prefill_attention(q, k, v, lengths, cache=None, layer=0, *, sm_scale=None, out=None, config=None):
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
        BLOCK_D=_block_d(Dh), WRITE_CACHE=cache is not None, UPCAST=interpreting(),
        DOT_PRECISION=_dot_precision(q.dtype), **cfg,
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
        BLOCK_D=_block_d(Dh), **cfg,
    )
    return out
