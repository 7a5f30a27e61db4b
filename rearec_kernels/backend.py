"""Which implementation of an op runs: one enum, picked per call or from the environment.

Every op in this package exists three times, side by side:
  ``<op>_reference.py``  readable PyTorch, float64-capable: the ground truth in tests;
  ``<op>_triton.py``     the Triton kernel for CUDA tensors;
  ``<op>_cpu.py``        the fast path for CPU tensors (Triton cannot run compiled on a CPU);
and one dispatcher, ``<op>.py``, that users call. The dispatcher asks :func:`resolve` which to run.

``REAREC_KERNEL_BACKEND`` (auto | triton | cpu | reference) overrides the default for every call that
does not pass ``backend=`` itself. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
(Triton's interpreter, for tests).
"""
from __future__ import annotations

import enum
import os

import torch

ENV_VAR = "REAREC_KERNEL_BACKEND"


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    CPU = "cpu"
    REFERENCE = "reference"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an odd platform
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: "Backend | str | None", device: torch.device) -> Backend:
    """The concrete backend for tensors on ``device``: never AUTO."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, Backend.AUTO)
    try:
        choice = Backend(choice)
    except ValueError:
        names = ", ".join(b.value for b in Backend)
        raise ValueError(f"unknown kernel backend {choice!r}: use one of {names}") from None
    if choice is Backend.AUTO:
        return Backend.TRITON if device.type == "cuda" and triton_available() else Backend.CPU
    if choice is Backend.TRITON:
        if not triton_available():
            raise RuntimeError("backend 'triton' asked for, but triton is not installed: pip install triton")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1"
            )
    return choice
