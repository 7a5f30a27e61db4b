"""Input checks the op dispatchers share (attention, attention_autograd, linear_cross_entropy,
topk): each raises a one-line ValueError that names the op, the argument and what it must be."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
