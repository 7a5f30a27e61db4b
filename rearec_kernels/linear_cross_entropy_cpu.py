"""The fast CPU path of the fused linear cross-entropy: chunked PyTorch inside one autograd.Function.

The item table is walked in chunks of ``chunk_size`` rows; only one (B, chunk) block of logits
exists at a time, sized to stay in cache, so every elementwise pass over it is cheap and the
(B, N) logits and their gradient never reach main memory.

Forward, per chunk: ``z = (scale * hidden) @ E_c.T``, its row maxima and sums of ``exp(z - max)``;
the chunks' (max, sum) pairs combine into the per-row log-sum-exp ``lse`` (kept for backward).
Backward, per chunk: ``P = exp(z - lse)`` with the subtraction folded into the GEMM (``addmm``),
then two GEMMs straight into the gradients: ``grad_h += P @ E_c`` (accumulated by ``addmm_``) and
``grad_E[c] = P.T @ (w * scale * hidden)`` (written in place, once). The one-hot part of
``softmax - onehot`` never enters a chunk: it is one gather and one ``index_add_`` at the end.
So the whole op costs four GEMMs of size B x N x d (dense autograd: three) and no pass over a
(B, N) tensor in main memory (dense: about ten).

A table that fits in ONE chunk (by default: B x N <= 8M logits, 32 MiB in float32) skips the
recompute: the forward keeps that chunk's softmax and the backward runs only its two GEMMs. There
the logits are cache-sized anyway, and the fourth GEMM would cost more than the passes it saves.

Why the table, not the rows, is chunked (Liger-Kernel's fused linear cross-entropy chunks rows and
finishes each row chunk's gradients inside the forward): here B is a few hundred and N up to
millions, so only chunking N bounds the memory, and a chunk's softmax needs its rows' log-sum-exp
over the WHOLE table first. Hence one pass for the lse (forward) and one for the gradients
(backward, which also gets ``reduction="none"``'s per-row weights for free).

bfloat16 inputs on a CPU with native bf16 dot products (:func:`rearec_kernels.packed.native_bf16`)
keep their dtype in the GEMMs: oneDNN accumulates in float32 and rounds each logit (and each
gradient product) to bfloat16, and the scale, softmax, log-sum-exp and loss are float32. That is
what autocast does with any product, and 2-4x faster than widening the operands first (the
cross-entropy of 2,100 rows over 3,707 items, forward and backward, 1 thread). ERL's pairwise KL
below does the same. float16, and bfloat16 elsewhere, are widened to float32 as before.

Rows whose target is ``ignore_index`` are dropped before the loop. Pure PyTorch: it also runs on
CUDA tensors (the dispatcher's automatic choice there for inputs the Triton kernel does not take).
Called through :mod:`rearec_kernels.linear_cross_entropy`.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rearec_kernels.linear_cross_entropy_reference import compute_dtype
from rearec_kernels.packed import native_bf16

# One (B, chunk) logits block of about this many elements (1 MiB in float32): it stays in L2/L3.
CHUNK_ELEMENTS = 1 << 18
MIN_CHUNK, MAX_CHUNK = 256, 8192
# Up to this many logits the whole table is one chunk whose softmax the forward keeps.
ONE_CHUNK_ELEMENTS = 1 << 23
# That softmax is computed in blocks of about ROW_BLOCK_ELEMENTS logits (rows x N) when it has more
# than ROW_BLOCKED_FROM logits (16 MiB in float32, past the cache): (2048, 65) x 3707 items, 1 / 2
# threads, 35.9 / 19.7 -> 25.1 / 14.0 ms; below that one GEMM is as fast or faster (256 rows 2 threads
# 1.48 vs 1.58 ms blocked).
ROW_BLOCK_ELEMENTS = 1 << 19
ROW_BLOCKED_FROM = 1 << 22


def gemm_dtype(hidden: torch.Tensor, item_table: torch.Tensor, work: torch.dtype) -> torch.dtype:
    """The dtype the GEMMs run in: bfloat16 when both inputs are bfloat16 and this CPU has native bf16
    dot products (or the tensors are on CUDA), else ``work`` (the inputs widened)."""
    low = hidden.dtype == item_table.dtype == torch.bfloat16
    return torch.bfloat16 if low and (hidden.device.type != "cpu" or native_bf16()) else work


def _logits_into(out, operand, table_rows, scale):
    """``out`` (rows, n) = the logits of ``operand`` against ``table_rows`` (n, d). ``scale`` None:
    ``operand`` is already scaled and in out's dtype (one GEMM); else the GEMM runs in the operands'
    16-bit dtype and the scale is applied while widening into ``out``."""
    if scale is None:
        return torch.mm(operand, table_rows.T, out=out)
    return out.copy_(torch.mm(operand, table_rows.T)).mul_(scale)  # widened first: the scale in float32


def default_chunk_size(batch: int, n_items: int) -> int:
    if batch * n_items <= ONE_CHUNK_ELEMENTS:
        return max(n_items, 1)
    return max(MIN_CHUNK, min(MAX_CHUNK, CHUNK_ELEMENTS // max(batch, 1)))


def softmax_and_log_sum_exp(operand, item_table, work, row_block_elements=None, scale=None):
    """(softmax (B, N), per-row log-sum-exp (B,)) of the logits ``operand @ item_table.T``, a block of
    rows at a time: each block's logits are normalised while they are still in cache.

    ``operand`` (B, d), here and in the chunked helpers below, is the GEMM's left operand: without
    ``scale``, the hidden rows already scaled and in ``work`` dtype; with ``scale``, the unscaled
    16-bit rows, whose logits are scaled as they widen (:func:`_logits_into`)."""
    B, N = operand.shape[0], item_table.shape[0]
    table = item_table.to(work if scale is None else operand.dtype)
    p = torch.empty(B, N, dtype=work, device=operand.device)
    lse = torch.empty(B, dtype=work, device=operand.device)
    if row_block_elements is None:
        row_block_elements = ROW_BLOCK_ELEMENTS if B * N > ROW_BLOCKED_FROM else B * N
    rows = max(1, row_block_elements // max(N, 1))
    for lo in range(0, B, rows):
        z = p[lo:lo + rows]
        _logits_into(z, operand[lo:lo + rows], table, scale)
        top = z.amax(dim=1)
        z.sub_(top[:, None]).exp_()
        sums = z.sum(dim=1)
        z.div_(sums[:, None])
        torch.add(top, sums.log(), out=lse[lo:lo + rows])
    return p, lse


def _chunks(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def chunked_log_sum_exp(operand, item_table, chunk_size, work, scale=None):
    """Per-row log-sum-exp of the logits of ``operand`` (B,), one chunk of logits at a time
    (``operand`` and ``scale``: see :func:`softmax_and_log_sum_exp`)."""
    B, N = operand.shape[0], item_table.shape[0]
    spans = _chunks(N, chunk_size)
    maxima = torch.empty(len(spans), B, dtype=work, device=operand.device)
    sums = torch.empty_like(maxima)
    block = torch.empty(B, min(chunk_size, N), dtype=work, device=operand.device)
    gemm = work if scale is None else operand.dtype
    for k, (lo, hi) in enumerate(spans):
        z = block[:, : hi - lo]
        _logits_into(z, operand, item_table[lo:hi].to(gemm), scale)
        torch.amax(z, dim=1, out=maxima[k])
        z.sub_(maxima[k][:, None]).exp_()
        torch.sum(z, dim=1, out=sums[k])
    top = maxima.amax(dim=0)
    return top + (sums * (maxima - top).exp()).sum(dim=0).log()


def chunked_softmax_products(operand, item_table, lse, weighted_hidden, chunk_size, work, scale=None):
    """``(P @ E, P.T @ weighted_hidden)`` for ``P = exp(logits - lse)``, the logits of ``operand``
    (see :func:`softmax_and_log_sum_exp`), chunk by chunk.

    Returns (B, d) and (N, d) in ``work`` dtype (the second None when ``weighted_hidden`` is None);
    their (B, N) factor ``P`` is never whole. With ``scale`` (see :func:`softmax_and_log_sum_exp`)
    every product runs in the 16-bit dtype of ``operand`` and ``weighted_hidden``."""
    B, N, d = operand.shape[0], item_table.shape[0], item_table.shape[1]
    device = operand.device
    p_times_e = torch.zeros(B, d, dtype=work, device=device)
    pt_times_h = None if weighted_hidden is None else torch.empty(N, d, dtype=work, device=device)
    block = torch.empty(B, min(chunk_size, N), dtype=work, device=device)
    minus_lse = (-lse)[:, None]
    for lo, hi in _chunks(N, chunk_size):
        p = block[:, : hi - lo]
        if scale is None:
            e = item_table[lo:hi].to(work)
            torch.addmm(minus_lse, operand, e.T, out=p)
            p.exp_()
            p_times_e.addmm_(p, e)
            if pt_times_h is not None:
                torch.mm(p.T, weighted_hidden, out=pt_times_h[lo:hi])
            continue
        e = item_table[lo:hi].to(operand.dtype)
        _logits_into(p, operand, e, scale).add_(minus_lse).exp_()
        p_low = p.to(operand.dtype)
        p_times_e.add_(torch.mm(p_low, e))
        if pt_times_h is not None:
            pt_times_h[lo:hi] = torch.mm(p_low.T, weighted_hidden)
    return p_times_e, pt_times_h


class LinearCrossEntropyCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, item_table, targets, scale, reduction, ignore_index, chunk_size):
        work = compute_dtype(hidden, item_table)
        gemm = gemm_dtype(hidden, item_table, work)
        B = hidden.shape[0]
        valid = targets != ignore_index
        rows = valid.nonzero().squeeze(1)
        all_valid = rows.numel() == B
        h = (hidden if all_valid else hidden[rows]).to(work)
        t = targets if all_valid else targets[rows]
        # The GEMM operand: scaled and widened, or (16-bit GEMMs) as given, scaled while widening.
        operand, late_scale = (h * scale, None) if gemm == work else (h.to(gemm), scale)
        if item_table.shape[0] <= chunk_size:  # one chunk: keep its softmax, no recompute
            probabilities, lse = softmax_and_log_sum_exp(operand, item_table, work, scale=late_scale)
        else:
            probabilities, lse = None, chunked_log_sum_exp(operand, item_table, chunk_size, work, late_scale)
        if gemm == work:
            target_logit = (operand * item_table[t].to(work)).sum(dim=1)
        else:  # the target's logit rounded as the GEMM rounds every logit, so that the loss matches it
            target_logit = (h * item_table[t].to(work)).sum(dim=1).to(gemm).to(work) * scale
        losses = lse - target_logit
        ctx.save_for_backward(hidden, item_table, rows, t, lse, probabilities)
        ctx.config = (scale, reduction, chunk_size, all_valid, work, gemm)
        if reduction == "sum":
            return losses.sum()
        if reduction == "mean":
            return losses.sum() / rows.numel()  # 0 / 0 = NaN when every row is ignored, as F.cross_entropy
        full = losses.new_zeros(B)
        full[rows] = losses
        return full

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, item_table, rows, t, lse, probabilities = ctx.saved_tensors
        scale, reduction, chunk_size, all_valid, work, gemm = ctx.config
        grad_hidden = grad_table = None
        if rows.numel() == 0:
            return (torch.zeros_like(hidden), torch.zeros_like(item_table)) + (None,) * 5
        h = (hidden if all_valid else hidden[rows]).to(work)
        # d loss / d logits[b] = w_b (softmax_b - onehot_b), and d logits / d hidden = scale * E.
        if reduction == "none":
            w = grad_out.to(work) if all_valid else grad_out.to(work)[rows]
        else:
            w = grad_out.to(work).expand(rows.numel())
            if reduction == "mean":
                w = w / rows.numel()
        coef = (w * scale)[:, None]
        weighted = h * coef
        want_table = ctx.needs_input_grad[1]
        if probabilities is not None and gemm == work:
            p_e = probabilities @ item_table.to(work)
            pt_h = probabilities.T @ weighted if want_table else None
        elif probabilities is not None:  # 16-bit GEMMs: the kept softmax rounded once to their dtype
            p_low, table_low = probabilities.to(gemm), item_table.to(gemm)
            p_e = (p_low @ table_low).to(work)
            pt_h = (p_low.T @ weighted.to(gemm)).to(work) if want_table else None
        elif gemm == work:
            p_e, pt_h = chunked_softmax_products(h * scale, item_table, lse, weighted if want_table else None,
                                                 chunk_size, work)
        else:
            p_e, pt_h = chunked_softmax_products(h.to(gemm), item_table, lse,
                                                 weighted.to(gemm) if want_table else None, chunk_size, work, scale)
        if ctx.needs_input_grad[0]:
            g = (p_e - item_table[t].to(work)) * coef
            if all_valid:
                grad_hidden = g.to(hidden.dtype)
            else:
                grad_hidden = torch.zeros_like(hidden)
                grad_hidden[rows] = g.to(hidden.dtype)
        if want_table:
            grad_table = pt_h.index_add_(0, t, weighted, alpha=-1).to(item_table.dtype)
        return grad_hidden, grad_table, None, None, None, None, None


def linear_cross_entropy(hidden, item_table, targets, scale=1.0, reduction="mean", ignore_index=-100,
                         chunk_size=None):
    chunk = default_chunk_size(hidden.shape[0], item_table.shape[0]) if chunk_size is None else int(chunk_size)
    return LinearCrossEntropyCPU.apply(hidden, item_table, targets, scale, reduction, ignore_index, chunk)


# -- ERL's pairwise KL ------------------------------------------------------------------------------
# With z_s = scale * states[:, s] @ E.T and log p_s = z_s - lse_s, one pair's divergence is
#   KL(p_j || p_i) = sum_n p_j (z_j - z_i) - lse_j + lse_i,
# so the forward needs, per user, only the (S, S) matrix A[j, i] = sum_n p_j z_i and the lse's.
# Both accumulate in ONE pass over the table: A and the softmax sums are kept relative to a running
# row maximum per (user, step) and rescaled when it grows (online softmax).
# Backward (gradient through p_j only; p_i is held fixed, as in ERL): for the mean over B users and
# S(S-1) ordered pairs, with c = grad / (B S (S-1)) and T = sum_s log p_s,
#   d / d z_j = c * p_j * (S log p_j - T - sum_{i != j} KL(p_j || p_i)).

def _pairwise_moments(scaled, item_table, steps, chunk_size, work, scale=None):
    """lse (B*S,) and A (B, S, S) with A[b, j, i] = sum_n p_{b,j}[n] z_{b,i}[n]. With ``scale``,
    ``scaled`` is the unscaled 16-bit operand (see :func:`_logits_into`)."""
    rows, N = scaled.shape[0], item_table.shape[0]
    gemm = work if scale is None else scaled.dtype
    B = rows // steps
    device = scaled.device
    top = torch.full((rows,), float("-inf"), dtype=work, device=device)
    sums = torch.zeros(rows, dtype=work, device=device)
    moments = torch.zeros(B, steps, steps, dtype=work, device=device)
    z = torch.empty(rows, min(chunk_size, N), dtype=work, device=device)
    p = torch.empty_like(z)
    for lo, hi in _chunks(N, chunk_size):
        zc, pc = z[:, : hi - lo], p[:, : hi - lo]
        _logits_into(zc, scaled, item_table[lo:hi].to(gemm), scale)
        new_top = torch.maximum(top, zc.amax(dim=1))
        shrink = (top - new_top).exp()  # exp(-inf) = 0 on the first chunk
        torch.sub(zc, new_top[:, None], out=pc).exp_()
        sums = sums * shrink + pc.sum(dim=1)
        moments = moments * shrink.view(B, steps, 1) + torch.bmm(pc.view(B, steps, -1),
                                                                 zc.view(B, steps, -1).transpose(1, 2))
        top = new_top
    lse = top + sums.log()
    return lse, moments / sums.view(B, steps, 1)


class MeanPairwiseKLCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, item_table, scale, chunk_size):
        work = compute_dtype(states, item_table)
        gemm = gemm_dtype(states, item_table, work)
        B, S, d = states.shape
        if gemm == work:
            lse, moments = _pairwise_moments(states.reshape(B * S, d).to(work) * scale, item_table, S, chunk_size, work)
        else:  # 16-bit GEMMs, as in the cross-entropy
            lse, moments = _pairwise_moments(states.reshape(B * S, d), item_table, S, chunk_size, work, scale)
        lse = lse.view(B, S)
        diagonal = moments.diagonal(dim1=1, dim2=2)  # (B, S): sum_n p_j z_j
        kl = diagonal[:, :, None] - moments - lse[:, :, None] + lse[:, None, :]  # (B, S_j, S_i)
        kl_from = kl.sum(dim=2) - kl.diagonal(dim1=1, dim2=2)  # (B, S): sum over i != j
        ctx.save_for_backward(states, item_table, lse, kl_from)
        ctx.config = (scale, chunk_size, work, gemm)
        return kl_from.sum() / (B * S * (S - 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        states, item_table, lse, kl_from = ctx.saved_tensors
        scale, chunk_size, work, gemm = ctx.config
        B, S, d = states.shape
        N = item_table.shape[0]
        c = grad_out.to(work) / (B * S * (S - 1))
        low = gemm != work
        h = states.reshape(B * S, d).to(gemm if low else work)
        scaled = None if low else h * scale
        grad_h = torch.zeros(B * S, d, dtype=work, device=states.device)
        grad_e = torch.empty(N, d, dtype=work, device=states.device)
        log_p = torch.empty(B * S, min(chunk_size, N), dtype=work, device=states.device)
        g = torch.empty_like(log_p)
        minus_lse = (-lse).reshape(B * S, 1)
        offset = kl_from.reshape(B, S, 1)
        for lo, hi in _chunks(N, chunk_size):
            lp, gc = log_p[:, : hi - lo], g[:, : hi - lo]
            e = item_table[lo:hi].to(gemm if low else work)
            if low:
                _logits_into(lp, h, e, scale).add_(minus_lse)
            else:
                torch.addmm(minus_lse, scaled, e.T, out=lp)
            lp3 = lp.view(B, S, -1)
            total = lp3.sum(dim=1, keepdim=True)  # (B, 1, C): T = sum_s log p_s
            bracket = (lp3 * S - total - offset).view(B * S, -1)
            torch.exp(lp, out=gc).mul_(bracket)
            if low:
                gc_low = gc.to(gemm)
                grad_h.add_(torch.mm(gc_low, e))
                grad_e[lo:hi] = torch.mm(gc_low.T, h)
            else:
                grad_h.addmm_(gc, e)
                torch.mm(gc.T, h, out=grad_e[lo:hi])
        factor = c * scale
        grad_states = (grad_h * factor).view(B, S, d).to(states.dtype) if ctx.needs_input_grad[0] else None
        grad_table = (grad_e * factor).to(item_table.dtype) if ctx.needs_input_grad[1] else None
        return grad_states, grad_table, None, None


def mean_pairwise_kl(states, item_table, scale=1.0, chunk_size=None):
    rows = states.shape[0] * states.shape[1]
    chunk = default_chunk_size(rows, item_table.shape[0]) if chunk_size is None else int(chunk_size)
    return MeanPairwiseKLCPU.apply(states, item_table, scale, chunk)
