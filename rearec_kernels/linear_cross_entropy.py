"""Cross-entropy over a whole item table without its (B, N) logits: what training code calls.

``fused_linear_cross_entropy(hidden, item_table, targets, *, scale=1.0, reduction="mean",
ignore_index=-100, backend=None, chunk_size=None)``

* the cross-entropy of ``logits = scale * hidden @ item_table.T`` against ``targets``, exactly as
  ``F.cross_entropy(logits, targets, reduction=..., ignore_index=...)``, differentiable with respect
  to ``hidden`` and ``item_table``;
* ``hidden`` (B, d) and ``item_table`` (N, d): float32, float64, float16 or bfloat16, one device;
  ``targets`` (B,) integer ids in [0, N), or ``ignore_index`` for a row that does not count;
* the result is float32 (float64 when an input is float64; CPU and reference backends only);
* under ``torch.autocast`` with bfloat16 the inputs are cast to bfloat16, so the products run in it
  as autocast runs every product (the CPU path: oneDNN's bf16 GEMMs, float32 accumulation, logits
  rounded to bf16; Triton: bf16 dots, float32 accumulation), while softmax, log-sum-exp and loss stay
  float32; under float16 autocast everything is float32;
* memory: one chunk of logits at a time. The forward keeps each row's log-sum-exp; the backward
  recomputes the logits chunk by chunk and writes the gradients straight from them (on the CPU, a
  table small enough to be one chunk keeps that chunk's softmax instead of recomputing it);
* the Triton backend takes d <= 256, N <= 2**31 - 2**15 and float32/float16/bfloat16 (float32 dots
  are IEEE, no TF32);
  on CUDA the automatic choice runs the chunked PyTorch path for other inputs (and an empty batch).

``fused_mean_pairwise_kl(states, item_table, *, scale=1.0, backend=None, chunk_size=None)``

* ERL's diversity term: the mean over users and ordered step pairs i != j of
  KL(p_j || stopgrad(p_i)), ``p_s = softmax(scale * states[:, s] @ item_table.T)``; states (B, S, d),
  S >= 2; gradients flow through p_j only. One pass over the table forward, one backward. Its
  products run in bfloat16 under bf16 autocast (and for bfloat16 inputs), as the cross-entropy's do.
  There is no Triton kernel for it: the chunked PyTorch path serves CUDA tensors too (its GEMMs
  dominate and run on cuBLAS); ``backend="reference"`` materialises (B, S, N).

``backend``: "auto" (Triton on CUDA, the chunked CPU path on CPU), "triton", "cpu" or "reference";
``REAREC_KERNEL_BACKEND`` sets the default (see :mod:`rearec_kernels.backend`). ``chunk_size``
(items per chunk) tunes the CPU path; None picks one that keeps a chunk of logits in cache.
Target ranges are checked only on CPU tensors (on CUDA that would cost a host sync); the Triton
kernels stay in bounds whatever the values.
"""
from __future__ import annotations

import math
import operator

import torch

from rearec_kernels.backend import Backend, implementation, requested, resolve, values_checkable
from rearec_kernels.checks import check_float_tensor, check_real

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")
TRITON_MAX_HIDDEN = 256
# The kernels index items in int32 (program id * BLOCK_N, split starts and ends, loop counters): the
# last item split may end up to PROGRAMS_TARGET * BLOCK_N (528 * 32) items past N, so N stays 2**15
# below 2**31 - 1. Larger tables take the chunked PyTorch path.
TRITON_MAX_ITEMS = 2 ** 31 - 2 ** 15


def _check_table(op, hidden, item_table):
    check_float_tensor(op, "item_table", item_table, 2, "(N, d)")
    if hidden.shape[-1] != item_table.shape[1]:
        raise ValueError(f"{op}: hidden is {tuple(hidden.shape)} but item_table is (N, d) = "
                         f"{tuple(item_table.shape)}: d differs")
    if item_table.shape[0] == 0 or item_table.shape[1] == 0:
        raise ValueError(f"{op}: item_table must have at least one item and d >= 1, got {tuple(item_table.shape)}")
    if hidden.device != item_table.device:
        raise ValueError(f"{op}: hidden on {hidden.device} but item_table on {item_table.device}")


def _check_chunk(op, chunk_size):
    if chunk_size is None:
        return None
    try:
        value = operator.index(chunk_size)
    except TypeError:
        value = None
    if value is None or isinstance(chunk_size, bool) or value < 1:
        raise ValueError(f"{op}: chunk_size must be None or a positive integer, got {chunk_size!r}")
    return value


def _choose_backend(op, backend, hidden, item_table) -> Backend:
    """The backend for these inputs. The Triton kernel takes float32/float16/bfloat16, d up to
    TRITON_MAX_HIDDEN and up to TRITON_MAX_ITEMS items: the automatic choice runs the chunked PyTorch path (the CPU backend's module,
    on any device) for other inputs and for an empty batch; an explicit 'triton' refuses them."""
    choice = resolve(op, backend, hidden.device)
    if choice is not Backend.TRITON:
        return choice
    problem = None
    if hidden.dtype not in TRITON_DTYPES or item_table.dtype not in TRITON_DTYPES:
        problem = "takes float32/float16/bfloat16"
    elif item_table.shape[1] > TRITON_MAX_HIDDEN:
        problem = f"takes d up to {TRITON_MAX_HIDDEN}, got {item_table.shape[1]}"
    elif item_table.shape[0] > TRITON_MAX_ITEMS:
        problem = f"takes up to {TRITON_MAX_ITEMS} items, got {item_table.shape[0]}"
    if hidden.shape[0] == 0:  # nothing to launch a kernel for: the PyTorch path returns the empty loss
        return Backend.CPU
    if problem is None:
        return choice
    if requested(op, backend) is Backend.AUTO:
        return Backend.CPU
    raise ValueError(f"{op}: the Triton backend {problem}: leave backend unset (auto) for the chunked PyTorch "
                     "path, which runs on any device")


def _autocast_operand_dtype(device_type: str) -> torch.dtype:
    """The dtype the item-table losses' products take under autocast: autocast's when it is
    bfloat16, else float32 (float16's range is too short for them). Their softmax, log-sum-exp and
    loss stay float32 in every case: those need the range."""
    low = torch.get_autocast_dtype(device_type)
    return low if low == torch.bfloat16 else torch.float32


def _autocasts(x: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether autocast takes this op's products to a lower precision: it is on for the inputs' device,
    and neither input is float64 (which autocast leaves as it is: the op then computes in float64)."""
    return torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, table.dtype)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: "Backend | str | None" = None,
    chunk_size: "int | None" = None,
) -> torch.Tensor:
    op = "fused_linear_cross_entropy"
    check_float_tensor(op, "hidden", hidden, 2, "(B, d)")
    _check_table(op, hidden, item_table)
    if _autocasts(hidden, item_table):
        # Autograd returns float32 gradients to float32 inputs through the cast.
        low = _autocast_operand_dtype(hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_cross_entropy(hidden.to(low), item_table.to(low), targets, scale=scale,
                                              reduction=reduction, ignore_index=ignore_index, backend=backend,
                                              chunk_size=chunk_size)
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{op}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{op}: targets must hold integer item ids, got {targets.dtype}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"{op}: targets must be (B,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"{op}: targets on {targets.device} but hidden on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    scale = check_real(op, "scale", scale)
    chunk_size = _check_chunk(op, chunk_size)
    N = item_table.shape[0]
    targets = targets.to(torch.int64)  # before the range check: a uint8 target 156 would equal ignore_index -100
    choice = _choose_backend(op, backend, hidden, item_table)
    # Wherever reading values is allowed: on a GPU too when a PyTorch path runs (float64, d > 256, or
    # backend="reference"), which would index the table with a bad id (a wrong row for -1, an assert past N).
    if values_checkable(choice, targets.device) and targets.numel():
        counted = targets[targets != ignore_index]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= N):
            raise ValueError(f"{op}: targets must be item ids in [0, {N}) or ignore_index={ignore_index}, "
                             f"got values in [{int(counted.min())}, {int(counted.max())}]")

    return implementation("linear_cross_entropy", choice).linear_cross_entropy(hidden, item_table, targets, scale, reduction, ignore_index,
                                                        chunk_size)


def fused_mean_pairwise_kl(
    states: torch.Tensor,
    item_table: torch.Tensor,
    *,
    scale: float = 1.0,
    backend: "Backend | str | None" = None,
    chunk_size: "int | None" = None,
) -> torch.Tensor:
    op = "fused_mean_pairwise_kl"
    check_float_tensor(op, "states", states, 3, "(B, S, d)")
    _check_table(op, states, item_table)
    if _autocasts(states, item_table):
        low = _autocast_operand_dtype(states.device.type)
        with torch.autocast(states.device.type, enabled=False):
            return fused_mean_pairwise_kl(states.to(low), item_table.to(low), scale=scale, backend=backend,
                                          chunk_size=chunk_size)
    if states.shape[1] < 2:
        raise ValueError(f"{op}: needs at least 2 steps to compare, got states of shape {tuple(states.shape)}")
    if states.shape[0] == 0:
        raise ValueError(f"{op}: states hold no users (B = 0)")
    scale = check_real(op, "scale", scale)
    chunk_size = _check_chunk(op, chunk_size)
    choice = resolve(op, backend, states.device)
    if choice is Backend.TRITON:  # no kernel of its own: the chunked PyTorch path runs on any device
        choice = Backend.CPU
    return implementation("linear_cross_entropy", choice).mean_pairwise_kl(states, item_table, scale, chunk_size)
