"""Triton kernels for the fused linear cross-entropy: forward log-sum-exp, backward gradients.

Called through :mod:`rearec_kernels.linear_cross_entropy`, which checks shapes and dtypes; see
there for the contract. Tiles: BLOCK_B rows of ``hidden`` by BLOCK_N items by the whole hidden
size (BLOCK_D = next power of two >= d, d <= 256), logits computed in float32 registers and never
stored.

* ``_lse_kernel``: program (row block, item split) runs an online softmax (base 2) over its split
  of the table and writes its rows' partial (max, sum); torch combines the splits into the lse.
* ``_grad_table_kernel``: program per item block walks all row blocks and accumulates its
  ``grad_E`` tile ``(P - onehot)^T (coef * hidden)`` in registers; each tile is written once, no
  atomics, deterministic.
* ``_grad_hidden_kernel``: program (row block, item split) accumulates ``(P - onehot) E`` over its
  split; torch sums the splits' partials and applies ``coef``.

``coef[b] = scale * dloss/dloss_b`` (0 for ignored rows), so both gradients come out finished.
The backward recomputes the logits twice (once per gradient kernel) instead of using atomics: on a
GPU the GEMMs are cheap and the result stays deterministic. Under Triton's interpreter
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
LN2 = 0.6931471805599453


@triton.jit
def _row_block(H, stride_hb, stride_hd, n_rows, hidden_dim, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr):
    """Program axis 0 is a block of rows: their offsets, which are real rows, the feature offsets
    and the (BLOCK_B, BLOCK_D) tile of ``hidden``."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    h = load_tile(H, offs_b, offs_d, stride_hb, stride_hd, n_rows, hidden_dim, UPCAST)
    return offs_b, offs_b < n_rows, offs_d, h


@triton.jit
def _split_items(split, items_per_split, n_items):
    """The items [start, stop) of one item split."""
    start = split * items_per_split
    return start, tl.minimum(start + items_per_split, n_items)


@triton.jit
def _item_block(E, n0, offs_d, stride_en, stride_ed, stop, hidden_dim, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Items n0 .. n0 + BLOCK_N - 1 of a split ending at ``stop``: their offsets, which are in the
    split, and their (BLOCK_N, BLOCK_D) tile of the table (0 past ``stop``)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    e = load_tile(E, offs_n, offs_d, stride_en, stride_ed, stop, hidden_dim, UPCAST)
    return offs_n, offs_n < stop, e


@triton.jit
def _lse_kernel(
    H, E, PartMax, PartSum,
    stride_hb, stride_hd, stride_en, stride_ed,
    n_rows, n_items, hidden_dim, items_per_split, qk_scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_b, b_ok, offs_d, h = _row_block(H, stride_hb, stride_hd, n_rows, hidden_dim, BLOCK_B, BLOCK_D, UPCAST)
    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    split = tl.program_id(1)
    start, stop = _split_items(split, items_per_split, n_items)
    for n0 in range(start, stop, BLOCK_N):
        offs_n, n_ok, e = _item_block(E, n0, offs_d, stride_en, stride_ed, stop, hidden_dim, BLOCK_N, UPCAST)
        s = tl.dot(h, tl.trans(e), input_precision=DOT_PRECISION) * qk_scale  # log2-scaled logits
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(PartMax + split * n_rows + offs_b, m_i, mask=b_ok)
    tl.store(PartSum + split * n_rows + offs_b, l_i, mask=b_ok)


@triton.jit
def _softmax_minus_onehot(h, e, lse2, tgt, offs_n, n_ok, qk_scale, DOT_PRECISION: tl.constexpr):
    """(P - onehot) for a (rows, items) tile: P = 2^(log2-scaled logit - lse2); 0 past the table."""
    s = tl.dot(h, tl.trans(e), input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    p = tl.where(n_ok[None, :], p, 0.0)
    return p - tl.where(tgt[:, None] == offs_n[None, :], 1.0, 0.0)


@triton.jit
def _grad_table_kernel(
    H, E, Lse2, Tgt, Coef, GradE,
    stride_hb, stride_hd, stride_en, stride_ed, stride_gn, stride_gd,
    n_rows, n_items, hidden_dim, qk_scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n_items
    d_ok = offs_d < hidden_dim
    e = load_tile(E, offs_n, offs_d, stride_en, stride_ed, n_items, hidden_dim, UPCAST)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, n_rows, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < n_rows
        h = load_tile(H, offs_b, offs_d, stride_hb, stride_hd, n_rows, hidden_dim, UPCAST)
        lse2 = tl.load(Lse2 + offs_b, mask=b_ok, other=0.0)
        tgt = tl.load(Tgt + offs_b, mask=b_ok, other=-1)
        coef = tl.load(Coef + offs_b, mask=b_ok, other=0.0)  # 0 for ignored and padding rows
        g = _softmax_minus_onehot(h, e, lse2, tgt, offs_n, n_ok, qk_scale, DOT_PRECISION) * coef[:, None]
        g = dot_operand(g, h.dtype, UPCAST)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=DOT_PRECISION)
    tl.store(GradE + offs_n.to(tl.int64)[:, None] * stride_gn + offs_d[None, :] * stride_gd,
             acc.to(GradE.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _grad_hidden_kernel(
    H, E, Lse2, Tgt, Part,
    stride_hb, stride_hd, stride_en, stride_ed,
    n_rows, n_items, hidden_dim, items_per_split, qk_scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_b, b_ok, offs_d, h = _row_block(H, stride_hb, stride_hd, n_rows, hidden_dim, BLOCK_B, BLOCK_D, UPCAST)
    d_ok = offs_d < hidden_dim
    lse2 = tl.load(Lse2 + offs_b, mask=b_ok, other=0.0)
    tgt = tl.load(Tgt + offs_b, mask=b_ok, other=-1)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    split = tl.program_id(1)
    start, stop = _split_items(split, items_per_split, n_items)
    for n0 in range(start, stop, BLOCK_N):
        offs_n, n_ok, e = _item_block(E, n0, offs_d, stride_en, stride_ed, stop, hidden_dim, BLOCK_N, UPCAST)
        g = _softmax_minus_onehot(h, e, lse2, tgt, offs_n, n_ok, qk_scale, DOT_PRECISION)
        g = dot_operand(g, e.dtype, UPCAST)
        acc = tl.dot(g, e, acc, input_precision=DOT_PRECISION)
    # int64 offsets: split * B * d passes 2^31 at B * d >= 2^31 / splits
    tl.store(Part + split.to(tl.int64) * n_rows * hidden_dim + offs_b[:, None].to(tl.int64) * hidden_dim
             + offs_d[None, :], acc,
             mask=b_ok[:, None] & d_ok[None, :])


# -- launch configuration ---------------------------------------------------------------------------
# Written for H100/H200 (sm_90), not autotuned (no GPU timing yet): power-of-two tiles, tl.dot tiles
# >= 16, no register spills. The item splits give the (row block, split) kernels about
# PROGRAMS_TARGET programs (a few per SM).

PROGRAMS_TARGET = 528


def kernel_config(hidden_dim: int, dtype: torch.dtype) -> dict:
    """Tiles and launch settings shared by the three kernels, for hidden size d and input dtype.

    Chosen from ptxas register/spill counts on sm_90 (``bench/kernel_variants.py``' compile-only
    driver): float32 dots are IEEE, i.e. FMA, and a 64-item tile or a wide accumulator spills."""
    if interpreting():  # small tiles: several programs and loop trips even for tiny tests
        return dict(BLOCK_B=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32 and block_d(hidden_dim) > 64:
        return dict(BLOCK_B=32, BLOCK_N=16, num_warps=8, num_stages=2)
    return dict(BLOCK_B=64, BLOCK_N=32, num_warps=8, num_stages=2)


def item_splits(n_rows: int, n_items: int, config: dict) -> int:
    if interpreting():
        return min(2, triton.cdiv(n_items, config["BLOCK_N"]))
    row_blocks = triton.cdiv(n_rows, config["BLOCK_B"])
    return max(1, min(triton.cdiv(PROGRAMS_TARGET, row_blocks), triton.cdiv(n_items, config["BLOCK_N"])))


def _launch_common(hidden, item_table):
    dtype = hidden.dtype if hidden.dtype == item_table.dtype else torch.float32
    cfg = kernel_config(item_table.shape[1], dtype)
    common = dict(BLOCK_D=block_d(item_table.shape[1]), UPCAST=interpreting() or hidden.dtype != item_table.dtype,
                  DOT_PRECISION=dot_precision(dtype), **cfg)
    return cfg, common


def log2_sum_exp(hidden, item_table, scale):
    """Per-row log-sum-exp of ``scale * hidden @ item_table.T`` in base 2 (the natural one times
    log2(e)), float32 (B,). The backward takes it as it is (converting to the natural log and back
    would add two roundings to every probability it recomputes); the loss multiplies by ln 2."""
    B, N, d = hidden.shape[0], item_table.shape[0], item_table.shape[1]
    cfg, common = _launch_common(hidden, item_table)
    splits = item_splits(B, N, cfg)
    per_split = triton.cdiv(triton.cdiv(N, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    splits = triton.cdiv(N, per_split)
    part_max = scratch((splits, B), torch.float32, hidden.device)
    part_sum = scratch((splits, B), torch.float32, hidden.device)
    _lse_kernel[(triton.cdiv(B, cfg["BLOCK_B"]), splits)](
        hidden, item_table, part_max, part_sum, *hidden.stride(), *item_table.stride(),
        B, N, d, per_split, scale * LOG2E, **common,
    )
    top = part_max.amax(dim=0)
    return top + torch.log2((part_sum * torch.exp2(part_max - top)).sum(dim=0))


def gradients(hidden, item_table, targets, lse2, coef, scale, want_hidden, want_table):
    """(grad_hidden, grad_table) of sum_b coef_b / scale * loss_b; either may be None when not wanted."""
    B, N, d = hidden.shape[0], item_table.shape[0], item_table.shape[1]
    cfg, common = _launch_common(hidden, item_table)
    lse2 = lse2.contiguous()
    grad_hidden = grad_table = None
    if want_table:
        grad_table = scratch((N, d), item_table.dtype, hidden.device)
        _grad_table_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            hidden, item_table, lse2, targets, coef, grad_table,
            *hidden.stride(), *item_table.stride(), *grad_table.stride(),
            B, N, d, scale * LOG2E, **common,
        )
    if want_hidden:
        splits = item_splits(B, N, cfg)
        per_split = triton.cdiv(triton.cdiv(N, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        splits = triton.cdiv(N, per_split)
        part = scratch((splits, B, d), torch.float32, hidden.device)
        _grad_hidden_kernel[(triton.cdiv(B, cfg["BLOCK_B"]), splits)](
            hidden, item_table, lse2, targets, part, *hidden.stride(), *item_table.stride(),
            B, N, d, per_split, scale * LOG2E, **common,
        )
        grad_hidden = (part.sum(dim=0) * coef[:, None]).to(hidden.dtype)
    return grad_hidden, grad_table


class LinearCrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, item_table, targets, scale, reduction, ignore_index):
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0).clamp_(0, item_table.shape[0] - 1)  # in bounds, unchecked on CUDA
        lse2 = log2_sum_exp(hidden, item_table, scale)
        target_logit = (hidden.float() * item_table[safe].float()).sum(dim=1) * scale
        losses = torch.where(valid, lse2 * LN2 - target_logit, 0.0)
        count = valid.sum()
        ctx.save_for_backward(hidden, item_table, torch.where(valid, targets, -1), lse2, count)
        ctx.config = (scale, reduction)
        if reduction == "sum":
            return losses.sum()
        if reduction == "mean":
            return losses.sum() / count
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, item_table, targets, lse2, count = ctx.saved_tensors
        scale, reduction = ctx.config
        valid = targets >= 0
        g = grad_out.float()
        if reduction == "mean":
            g = g / count.clamp(min=1)
        coef = torch.where(valid, g * scale, 0.0).expand(hidden.shape[0]).contiguous()
        grad_hidden, grad_table = gradients(hidden, item_table, targets, lse2, coef, scale,
                                            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_hidden, grad_table, None, None, None, None


def linear_cross_entropy(hidden, item_table, targets, scale=1.0, reduction="mean", ignore_index=-100,
                         chunk_size=None):
    """See :mod:`rearec_kernels.linear_cross_entropy`; ``chunk_size`` is the CPU path's (ignored)."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    item_table = item_table if item_table.stride(-1) == 1 else item_table.contiguous()
    return LinearCrossEntropyTriton.apply(hidden, item_table, targets.contiguous(), scale, reduction, ignore_index)
