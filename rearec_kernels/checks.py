"""Input checks the op dispatchers share (attention, attention_autograd, linear_cross_entropy,
topk): each raises a one-line ValueError that names the op, the argument and what it must be."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: What the Triton attention kernels take (both attention ops).
TRITON_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


def check_float_tensor(op: str, name: str, t, ndim: int, layout: str) -> None:
    """``t`` is a torch.Tensor of ``ndim`` dims (``layout`` says which, e.g. "(B, d)") in a float dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def check_real(op: str, name: str, value) -> float:
    """``value`` as a finite float: a real number (Python, numpy or a one-element tensor), never a str or
    a bool, which ``float()`` would take ("2" -> 2.0, True -> 1.0), nor inf or NaN (every score or
    attention weight it multiplies would be NaN or ±inf, and their order meaningless)."""
    if isinstance(value, (str, bytes, bool)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{op}: {name} must be a real number, got {value!r}")
    if isinstance(value, torch.Tensor) and value.requires_grad:  # float() would cut it from the graph silently
        raise ValueError(f"{op}: {name} is a tensor that requires grad, but it gets no gradient here (it is read as "
                         f"a number); pass {name}.item() or a detached tensor, or scale the inputs yourself")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise ValueError(f"{op}: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{op}: {name} must be finite, got {number}")
    return number


# -- attention (attention.py and attention_autograd.py) ----------------------------------------------

def check_qkv(op: str, q, k, v, ndim: int, layout: str) -> None:
    """q, k, v: float tensors of ``ndim`` dims (``layout``), one shape, dtype and device, none empty."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(op, name, t, ndim, layout)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v must have one shape {layout}, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if any(s == 0 for s in q.shape):
        raise ValueError(f"{op}: empty input {tuple(q.shape)}")


def check_lengths(op: str, lengths, batch: int, device, name: str = "lengths") -> None:
    """``lengths``: a (batch,) integer tensor on ``device`` (its values: :func:`check_range`)."""
    if not isinstance(lengths, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.shape != (batch,):
        raise ValueError(f"{op}: {name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be an integer tensor, got {lengths.dtype}")
    if lengths.device != device:
        raise ValueError(f"{op}: {name} is on {lengths.device}, q on {device}")


def check_range(op: str, name: str, values: torch.Tensor, low: int, high: int, what: str) -> None:
    """low <= values <= high (call only where the dispatcher may read values: ``values_checkable``)."""
    lo, hi = int(values.min()), int(values.max())
    if lo < low or hi > high:
        raise ValueError(f"{op}: {name} must lie in [{low}, {high}] ({what}), got values in [{lo}, {hi}]")


def check_triton_attention(op: str, dtype, head_dim: int) -> None:
    """What the Triton attention kernels take: a 16- or 32-bit float dtype, head dims up to 256."""
    if dtype not in TRITON_ATTENTION_DTYPES:
        raise ValueError(f"{op}: the Triton backend takes float16/bfloat16/float32, got {dtype}")
    if head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"{op}: the Triton backend takes head dims up to {TRITON_MAX_HEAD_DIM}, got {head_dim}")
