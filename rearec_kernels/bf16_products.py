"""bf16 matrix products on a CPU without native bf16 dot products, at float32's speed.

Contract:

* ``Bf16ProductsAsFloat32()`` is a context manager (a dispatch mode). Inside it, every matrix product
  (``mm``, ``addmm``, ``bmm``, ``baddbmm``: what ``linear``, ``matmul`` and autocast's products become
  below autograd, forward and backward alike) whose tensor operands are all bfloat16 runs as the float32
  product of their exact upcasts, rounded once to bfloat16. Every other op, a mixed-dtype product
  included, runs as it would outside.
* That is the arithmetic of torch's bf16 products on any CPU (bf16 operands, float32 accumulation, a
  bf16 result); only the order of the float32 additions differs, so a result may differ from
  ``torch.mm``'s in its last bf16 bit.
* ``cpu_bf16_products(device_type, bf16)`` is the context a training step wants: this mode when bf16
  products would run on a CPU without AVX512-BF16 or AMX (``packed.native_bf16``), where torch falls
  back to a generic loop; otherwise nothing. Measured on an AVX2-only CPU, one thread, one ML-1M PRL
  training step (``bench/bf16_cpu_step.py``): float32 640 ms, bf16 fallback 2448 ms, this mode 785 ms.

The mode sees every op of the block in Python (tens of microseconds each): worth it around products
of this size, not around many tiny ones.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rearec_kernels import packed

__all__ = ["Bf16ProductsAsFloat32", "cpu_bf16_products"]

PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                      torch.ops.aten.baddbmm.default})


class Bf16ProductsAsFloat32(TorchDispatchMode):
    """bf16 products as float32 ones (see the module's contract)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS:  # the fast path first: nearly every op of a training step is not a product
            return func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # Only all-bf16 products: a mixed-dtype call goes on as it is (and fails as it would outside)
        if tensors and all(t.dtype == torch.bfloat16 for t in tensors):
            upcast = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*upcast, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def cpu_bf16_products(device_type: str, bf16: bool):
    """:class:`Bf16ProductsAsFloat32` where ``bf16`` products would run on a CPU without native bf16
    dot products; a context that does nothing elsewhere."""
    if bf16 and device_type == "cpu" and not packed.native_bf16():
        return Bf16ProductsAsFloat32()
    return contextlib.nullcontext()
