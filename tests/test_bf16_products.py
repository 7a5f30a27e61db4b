"""rearec_kernels.bf16_products: bf16 matrix products run as float32 products of their operands, and the
trainer's use of it on a CPU without native bf16 dot products."""
import collections
import contextlib

import pytest
import torch

from rearec import ReaRec, ReaRecConfig
from rearec.train import TrainingObjective
from rearec_kernels import bf16_products
from rearec_kernels.bf16_products import Bf16ProductsAsFloat32, cpu_bf16_products
from tests.conftest import counting_bf16_products

BF16_EPS = 2.0 ** -8  # half an ulp of bfloat16, relative


def operands(op, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    b, m, k, n = 3, 7, 129, 5  # k past one SIMD block: the accumulation order matters
    return {"mm": (r(m, k), r(k, n)), "addmm": (r(m, n), r(m, k), r(k, n)), "bmm": (r(b, m, k), r(b, k, n)),
            "baddbmm": (r(b, m, n), r(b, m, k), r(b, k, n))}[op]


@pytest.mark.parametrize("op", ["mm", "addmm", "bmm", "baddbmm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_product_is_the_float32_product_of_its_operands_rounded_once(op, seed):
    args = operands(op, seed)
    kwargs = {"beta": 0.5, "alpha": 1.5} if op in ("addmm", "baddbmm") else {}
    exact = getattr(torch, op)(*[a.double() for a in args], **kwargs)
    torch_own = getattr(torch, op)(*args, **kwargs)
    out = torch.full_like(torch_own, float("nan"))  # poisoned: the mode's result must replace it
    with Bf16ProductsAsFloat32():
        out = getattr(torch, op)(*args, **kwargs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out, getattr(torch, op)(*[a.float() for a in args], **kwargs).to(torch.bfloat16))
    # Both are within one rounding of the exact product (plus float32 accumulation): the same arithmetic
    scale = exact.abs() + 1e-6 * exact.abs().max()
    for result in (out, torch_own):
        assert ((result.double() - exact).abs() / scale).max() <= 2 * BF16_EPS
    assert (out != torch_own).float().mean() < 0.05  # they differ only where the accumulation order tips a rounding


def test_other_dtypes_and_other_ops_are_left_as_they_are():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 6, generator=g), torch.randn(6, 3, generator=g)
    with Bf16ProductsAsFloat32():
        assert torch.equal(a @ b, torch.mm(a, b))  # float32: untouched
        assert (a.to(torch.bfloat16) + 1).dtype == torch.bfloat16
        with pytest.raises(RuntimeError):  # mixed dtypes fail as they do outside the mode
            torch.mm(a.to(torch.bfloat16), b)


def small_model(objective):
    torch.manual_seed(0)
    return ReaRec(ReaRecConfig(n_items=300, hidden_size=32, n_layers=2, n_heads=2, inner_size=64, dropout=0.0,
                               input_dropout=0.0, max_len=12, reason_steps=2, objective=objective))


@pytest.mark.parametrize("objective", ["prl", "erl"])
def test_a_bf16_training_step_under_the_mode_matches_torchs_bf16(objective):
    """Loss and gradients of one bf16 training step, forward and backward under the mode, against
    torch's own bf16 products (a generic fallback or oneDNN: the same arithmetic), and float32 as the
    yardstick of what bf16 changes."""
    model = small_model(objective)
    g = torch.Generator().manual_seed(3)
    histories = torch.randint(1, 300, (16, 12), generator=g)
    lengths = torch.randint(3, 13, (16,), generator=g)
    targets = torch.randint(1, 300, (16,), generator=g)

    def step(bf16, mode):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)  # PRL's noise
        with mode:
            loss = TrainingObjective(model, fused_ce=True, bf16=bf16)(histories, lengths, targets, epoch=5)
            loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    seen = collections.Counter()
    emulated = step(True, counting_bf16_products(seen)())
    own = step(True, contextlib.nullcontext())
    fp32 = step(False, contextlib.nullcontext())
    assert seen["mm"] > 0 and seen["bmm"] + seen["addmm"] > 0  # forward and backward products went through it
    assert abs(emulated[0] - own[0]) <= 0.25 * abs(own[0] - fp32[0]) + 1e-4 * abs(own[0])
    grad_error = (emulated[1] - own[1]).norm()
    assert grad_error <= 0.5 * (own[1] - fp32[1]).norm() + 1e-6


@pytest.mark.parametrize("native", [False, True])
def test_the_mode_is_used_exactly_for_bf16_on_a_cpu_without_native_bf16(native, monkeypatch):
    monkeypatch.setattr(bf16_products.packed, "native_bf16", lambda: native)
    assert isinstance(cpu_bf16_products("cpu", True), Bf16ProductsAsFloat32) == (not native)
    assert isinstance(cpu_bf16_products("cpu", False), contextlib.nullcontext)
    assert isinstance(cpu_bf16_products("cuda", True), contextlib.nullcontext)
