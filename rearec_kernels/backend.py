"""Which implementation of an op runs: one backend table for every op of this package.

Every op family exists three times, side by side, with one function name and one signature:
  ``<family>_reference.py``  readable PyTorch, float64-capable: the ground truth in tests;
  ``<family>_triton.py``     the Triton kernels;
  ``<family>_cpu.py``        the fast path for CPU tensors;
and one dispatcher, ``<family>.py``, that users call: it checks every input, asks :func:`resolve`
which backend runs, checks that backend's own limits, and calls ``implementation(family, backend)``.

One meaning of each backend, for every op:

==============  ==============================================================================
``auto``        ``triton`` for CUDA tensors, ``cpu`` for CPU tensors, ``reference`` on other devices
``triton``      CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``, Triton's interpreter,
                for tests); limits per op (dtypes, head dims, ...) are checked by the dispatcher
``cpu``         CPU tensors only
``reference``   any device; materialises everything, loops where that reads more plainly
==============  ==============================================================================

``REAREC_KERNEL_BACKEND`` (auto | triton | cpu | reference) sets the default for every call that does
not pass ``backend=`` itself.

Checks that must read tensor values (a length in range, an exclusion id in range) run wherever
reading costs no extra host-device sync (:func:`values_checkable`); for the Triton backend on CUDA
tensors they are skipped, and the kernels stay in bounds whatever the values (each op says how).
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import importlib
import os
from types import ModuleType

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


def requested(op: str, backend: "Backend | str | None") -> Backend:
    """The backend asked for: ``backend``, else ``REAREC_KERNEL_BACKEND``, else AUTO (may be AUTO)."""
    # An empty variable (REAREC_KERNEL_BACKEND= in a launch script) is unset, as TRITON_INTERPRET's is.
    choice = backend if backend is not None else (os.environ.get(ENV_VAR) or Backend.AUTO)
    try:
        return Backend(choice)
    except ValueError:
        names = ", ".join(b.value for b in Backend)
        raise ValueError(f"{op}: unknown kernel backend {choice!r}: use one of {names}") from None


def resolve(op: str, backend: "Backend | str | None", device: torch.device) -> Backend:
    """The concrete backend for ``op`` on tensors on ``device``: never AUTO. ValueError when the
    chosen backend cannot take tensors on that device."""
    choice = requested(op, backend)
    if choice is Backend.AUTO:
        if device.type == "cuda":
            return Backend.TRITON
        return Backend.CPU if device.type == "cpu" else Backend.REFERENCE
    if choice is Backend.TRITON:
        if not triton_available():
            raise ValueError(f"{op}: backend 'triton' asked for, but triton is not installed: "
                             "pip install triton, or pass backend='reference'")
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise ValueError(f"{op}: backend 'triton' takes CUDA tensors (CPU tensors only under "
                             f"TRITON_INTERPRET=1), got tensors on {device}")
    if choice is Backend.CPU and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' takes CPU tensors, got tensors on {device}: "
                         "pass backend='triton' or 'reference'")
    return choice


def implementation(family: str, backend: Backend) -> ModuleType:
    """The module ``rearec_kernels.<family>_<backend>`` (imported on first use: no Triton import
    unless the Triton backend runs)."""
    if backend is Backend.AUTO:
        raise ValueError("implementation: resolve the backend first")
    return importlib.import_module(f"rearec_kernels.{family}_{backend.value}")


def values_checkable(backend: Backend, device: torch.device) -> bool:
    """Whether a dispatcher may read tensor values for its checks: everywhere except the Triton
    backend on a GPU, where reading one value stalls the host until the GPU catches up (and breaks
    CUDA-graph capture)."""
    return not (backend is Backend.TRITON and device.type != "cpu")


# -- scratch poisoning (tests) ------------------------------------------------------------------------
# Backends that use scratch buffers fill them with NaN / garbage first while this is on, so that any
# element a kernel should have written but did not shows up in the results. A context variable, not a
# module global: it is scoped to a ``with`` block and to the thread (or task) that set it.
_POISON_SCRATCH = contextvars.ContextVar("rearec_kernels_poison_scratch", default=False)


@contextlib.contextmanager
def poisoned_scratch():
    """``with poisoned_scratch(): ...`` -- scratch buffers are poisoned before use inside the block."""
    token = _POISON_SCRATCH.set(True)
    try:
        yield
    finally:
        _POISON_SCRATCH.reset(token)


def scratch_poisoned() -> bool:
    """True inside :func:`poisoned_scratch`: backends then poison their scratch buffers."""
    return _POISON_SCRATCH.get()
