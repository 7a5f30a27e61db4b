"""Triton kernels for differentiable causal prefill attention: a forward that keeps the per-row
log-sum-exp, and a FlashAttention-2 style backward that recomputes the attention weights.

Called through :mod:`rearec_kernels.attention_autograd`, which checks inputs; the contract is that
of :func:`rearec_kernels.attention.prefill_attention` without a cache: q, k, v (B, L, H, Dh), any
strides with a unit last stride, right-padded to ``lengths``; valid query t attends to keys 0..t;
padding rows are 0 and pass no gradient.

* ``_attention_forward_kernel``: program per (user x head, block of BLOCK_M queries), online softmax
  (base 2) over the key blocks up to the block's last causal key; stores the output and
  ``lse2 = log2(sum_j 2^(s_j))`` per row (s in log2 units) for the backward.
* ``_attention_backward_kv_kernel``: program per (user x head, block of BLOCK_N keys) walks the
  query blocks that see them and accumulates dK and dV in registers (each written once).
* ``_attention_backward_q_kernel``: program per (user x head, block of BLOCK_M queries) walks the
  key blocks it sees and accumulates dQ.
  Both use ``P = 2^(s - lse2)`` and ``dS = P * (dO V^T - delta)``, ``delta = rowsum(dO * O)``.

Attention dropout (``dropout_p > 0``): weight (row t, key j) of (user, head) ``bh`` is kept, and
scaled by 1 / (1 - p), where Philox ``tl.rand(seed + bh, t * L + j) < 1 - p``; the three kernels
regenerate the same mask from ``seed``, so it is never stored. The normaliser is the undropped one
(as ``F.dropout(softmax(s)) @ V``), and ``delta = rowsum(dO * O)`` still holds with dropout.

No atomics: the backward recomputes the scores twice (once per kernel) and is deterministic.
Accumulation is float32; float32 inputs use IEEE ``tl.dot``. Under Triton's interpreter
(TRITON_INTERPRET=1) dot operands are upcast to float32 after the GPU's rounding.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from rearec_kernels.backend import interpreting
from rearec_kernels.triton_tiles import block_d, dot_operand, dot_precision, load_tile, scratch

LOG2E = 1.4426950408889634


@triton.jit
def _dropout_scale(seed, pid_bh, offs_m, offs_n, seq_len, keep_prob):
    """(rows, keys) tile: 1 / keep_prob where the weight is kept, 0 where it is dropped."""
    r = tl.rand(seed + pid_bh, offs_m[:, None] * seq_len + offs_n[None, :])
    return tl.where(r < keep_prob, 1.0 / keep_prob, 0.0)


@triton.jit
def _user_head_length(pid_bh, Lens, n_heads, seq_len):
    """Program axis 0 is (user x head): the user b and head h (int64, for offsets) and the user's
    length, capped at seq_len."""
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    return b, h, tl.minimum(tl.load(Lens + b).to(tl.int32), seq_len)


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Out, Lse2, Lens, KeepOut,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    n_heads, seq_len, head_dim, qk_scale, seed, keep_prob,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, WRITE_KEEP: tl.constexpr,
):
    """One block of queries; with WRITE_KEEP (tests) also each visited (row, key) dropout scale."""
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b, h, length = _user_head_length(pid_bh, Lens, n_heads, seq_len)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, stride_qd, length, head_dim, UPCAST)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, length)  # past it: keys no row of this block sees
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, offs_d, stride_kt, stride_kd, length, head_dim, UPCAST)
        v = load_tile(v_base, offs_n, offs_d, stride_vt, stride_vd, length, head_dim, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        seen = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < length)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the length see nothing
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = _dropout_scale(seed, pid_bh, offs_m, offs_n, seq_len, keep_prob)
            p = p * keep
            if WRITE_KEEP:
                tl.store(KeepOut + pid_bh * seq_len * seq_len + offs_m[:, None] * seq_len + offs_n[None, :], keep,
                         mask=(offs_m < seq_len)[:, None] & (offs_n < seq_len)[None, :])
        p = dot_operand(p, v.dtype, UPCAST)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    row_ok = offs_m < length
    out = tl.where(row_ok[:, None], acc / tl.where(row_ok, l_i, 1.0)[:, None], 0.0)
    o_mask = (offs_m < seq_len)[:, None] & (offs_d < head_dim)[None, :]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=o_mask)
    lse2 = tl.where(row_ok, m_i + tl.log2(tl.where(row_ok, l_i, 1.0)), 0.0)
    tl.store(Lse2 + pid_bh * seq_len + offs_m, lse2, mask=offs_m < seq_len)


@triton.jit
def _weights_and_score_grads(q, k, v, do, lse2, delta, offs_m, offs_n, length, qk_scale,
                             seed, pid_bh, seq_len, keep_prob, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """For a (queries, keys) tile: the applied weights (P, times the dropout scale), where
    P = 2^(s - lse2) is 0 for a key not seen (later than the query, or past the length; padding
    queries see nothing), and dS = P (dropout scale * dO V^T - delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    seen = (offs_n[None, :] <= offs_m[:, None]) & (offs_m < length)[:, None] & (offs_n[None, :] < length)
    p = tl.where(seen, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_scale(seed, pid_bh, offs_m, offs_n, seq_len, keep_prob)
        return p * keep, p * (dp * keep - delta[:, None])
    return p, p * (dp - delta[:, None])


@triton.jit
def _query_block(q_base, do_base, Lse2, Delta, pid_bh, offs_m, offs_d, stride_qt, stride_qd, stride_ot, stride_od,
                 length, seq_len, head_dim, UPCAST: tl.constexpr):
    """What the backward needs of query rows ``offs_m`` of one (user, head): their q and dO tiles
    (0 past the length) and their lse2 and delta (0 past the length)."""
    q = load_tile(q_base, offs_m, offs_d, stride_qt, stride_qd, length, head_dim, UPCAST)
    do = load_tile(do_base, offs_m, offs_d, stride_ot, stride_od, length, head_dim, UPCAST)
    row_ok = offs_m < length
    lse2 = tl.load(Lse2 + pid_bh * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pid_bh * seq_len + offs_m, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _attention_backward_kv_kernel(
    Q, K, V, dO, Lse2, Delta, Lens, dK, dV,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    n_heads, seq_len, head_dim, qk_scale, sm_scale, seed, keep_prob,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dK, dV (contiguous (B, L, H, Dh), strides of dO's layout given as stride_o*) for one key block."""
    pid_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b, h, length = _user_head_length(pid_bh, Lens, n_heads, seq_len)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kt, stride_kd, length, head_dim, UPCAST)
    v = load_tile(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vt, stride_vd, length, head_dim, UPCAST)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = dO + b * stride_ob + h * stride_oh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query rows before start_n see none of these keys; rows past the length do not count.
    for start_m in range(start_n - start_n % BLOCK_M, length, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse2, delta = _query_block(q_base, do_base, Lse2, Delta, pid_bh, offs_m, offs_d, stride_qt, stride_qd,
                                          stride_ot, stride_od, length, seq_len, head_dim, UPCAST)
        p, ds = _weights_and_score_grads(q, k, v, do, lse2, delta, offs_m, offs_n, length, qk_scale,
                                         seed, pid_bh, seq_len, keep_prob, DOT_PRECISION, DROPOUT)
        p = dot_operand(p, do.dtype, UPCAST)
        dv = tl.dot(tl.trans(p), do, dv, input_precision=DOT_PRECISION)
        ds = dot_operand(ds, q.dtype, UPCAST)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=DOT_PRECISION)
    mask = (offs_n < seq_len)[:, None] & (offs_d < head_dim)[None, :]
    ptrs = b * stride_ob + h * stride_oh + offs_n[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(dK + ptrs, (dk * sm_scale).to(dK.dtype.element_ty), mask=mask)
    tl.store(dV + ptrs, dv.to(dV.dtype.element_ty), mask=mask)


@triton.jit
def _attention_backward_q_kernel(
    Q, K, V, dO, Lse2, Delta, Lens, dQ,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    n_heads, seq_len, head_dim, qk_scale, sm_scale, seed, keep_prob,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dQ (contiguous (B, L, H, Dh), the layout of dO) for one query block."""
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b, h, length = _user_head_length(pid_bh, Lens, n_heads, seq_len)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse2, delta = _query_block(Q + b * stride_qb + h * stride_qh, dO + b * stride_ob + h * stride_oh, Lse2,
                                      Delta, pid_bh, offs_m, offs_d, stride_qt, stride_qd, stride_ot, stride_od,
                                      length, seq_len, head_dim, UPCAST)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, length)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, offs_d, stride_kt, stride_kd, length, head_dim, UPCAST)
        v = load_tile(v_base, offs_n, offs_d, stride_vt, stride_vd, length, head_dim, UPCAST)
        _, ds = _weights_and_score_grads(q, k, v, do, lse2, delta, offs_m, offs_n, length, qk_scale,
                                         seed, pid_bh, seq_len, keep_prob, DOT_PRECISION, DROPOUT)
        ds = dot_operand(ds, k.dtype, UPCAST)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
    mask = (offs_m < seq_len)[:, None] & (offs_d < head_dim)[None, :]
    tl.store(dQ + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=mask)


# -- launch configuration ---------------------------------------------------------------------------
# Written for H100/H200 (sm_90), not autotuned (no GPU timing yet); sequences are short (L ~ 50-200).

def kernel_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles and launch settings shared by the forward and both backward kernels: no register spills
    on sm_90 per ptxas (``bench/kernel_variants.py``' compile-only driver, dropout on) at head dims
    16-256, multiples of 16 and ragged ones (40, 72, 136 checked: Triton specializes the head dim only
    on divisibility by 16). Float32 dots are IEEE, i.e. FMA, which needs smaller tiles than the 16-bit
    tensor cores."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    width = block_d(head_dim)
    if dtype == torch.float32:
        if width <= 64:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2)  # 4 warps spill at head_dim 128
    if width == 64 and head_dim % 16:  # ragged (element-wise masked loads): the dK/dV kernel spilled 4 B at
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)  # head_dim 40 (255 regs) -> 192 / 0
    if width <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if width <= 128 else 8, num_stages=2)


def _common(q):
    Dh = q.shape[3]
    return dict(BLOCK_D=block_d(Dh), UPCAST=interpreting(), DOT_PRECISION=dot_precision(q.dtype),
                **kernel_config(Dh, q.dtype))


def attention_forward(q, k, v, lengths, sm_scale, dropout_p=0.0, seed=0, keep_out=None):
    """(out (B, L, H, Dh) contiguous, lse2 (B*H, L) float32). ``keep_out`` (B*H, L, L) float32, for
    tests: receives the dropout scale (0 or 1 / (1 - p)) of every (row, key) a query block visits."""
    B, L, H, Dh = q.shape
    meta = _common(q)
    out = scratch((B, L, H, Dh), q.dtype, q.device)
    lse2 = scratch((B * H, L), torch.float32, q.device)
    _attention_forward_kernel[(B * H, triton.cdiv(L, meta["BLOCK_M"]))](
        q, k, v, out, lse2, lengths, lse2 if keep_out is None else keep_out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, Dh, sm_scale * LOG2E, seed, 1.0 - dropout_p,
        DROPOUT=dropout_p > 0, WRITE_KEEP=keep_out is not None, **meta,
    )
    return out, lse2


def attention_backward(q, k, v, out, grad_out, lse2, lengths, sm_scale, dropout_p=0.0, seed=0):
    """(dq, dk, dv), each contiguous (B, L, H, Dh) in q's dtype."""
    B, L, H, Dh = q.shape
    meta = dict(_common(q), DROPOUT=dropout_p > 0)
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).permute(0, 2, 1).reshape(B * H, L).contiguous()
    dq, dk, dv = (scratch((B, L, H, Dh), q.dtype, q.device) for _ in range(3))
    args = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), H, L, Dh, sm_scale * LOG2E, sm_scale,
            seed, 1.0 - dropout_p)
    _attention_backward_kv_kernel[(B * H, triton.cdiv(L, meta["BLOCK_N"]))](
        q, k, v, grad_out, lse2, delta, lengths, dk, dv, *args, **meta)
    _attention_backward_q_kernel[(B * H, triton.cdiv(L, meta["BLOCK_M"]))](
        q, k, v, grad_out, lse2, delta, lengths, dq, *args, **meta)
    return dq, dk, dv


class PrefillAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths, sm_scale, dropout_p):
        # The dropout mask's seed comes from torch's CPU generator (torch.manual_seed): no device sync.
        seed = int(torch.randint(0, 2 ** 30, (1,)).item()) if dropout_p > 0 else 0
        out, lse2 = attention_forward(q, k, v, lengths, sm_scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse2, lengths)
        ctx.config = (sm_scale, dropout_p, seed)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse2, lengths = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, grad_out, lse2, lengths, *ctx.config)
        return dq, dk, dv, None, None, None


def prefill_attention(q, k, v, lengths, sm_scale, dropout_p=0.0):
    """Differentiable; q, k, v with a unit last stride, lengths contiguous (the dispatcher sees to it)."""
    return PrefillAttentionTriton.apply(q, k, v, lengths, float(sm_scale), float(dropout_p))
