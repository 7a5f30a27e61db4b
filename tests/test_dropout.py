"""rearec.dropout: the CPU dropout with a 16-bit mask, and attention with dropout on its weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from rearec.dropout import drop_mask, dropout, keep_scale, softmax_dropout_attention


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_drop_rate_and_independence(p):
    seed = int(torch.randint(1 << 30, (1,)))
    torch.manual_seed(seed)
    n = 1 << 20
    dropped = drop_mask((n,), p)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 5 * sigma + 2 ** -17, f"seed={seed}"
    # neighbours (the four 16-bit draws of one 64-bit word) are independent: P(both dropped) = p^2
    both = (dropped[0::2] & dropped[1::2]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n // 2)) + 2 ** -16, f"seed={seed}"


def test_forward_backward_and_seeding():
    seed = int(torch.randint(1 << 30, (1,)))
    x = torch.randn(37, 53, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 53, dtype=torch.float64)
    torch.manual_seed(seed)
    out = dropout(x, 0.3)
    (out * w).sum().backward()
    torch.manual_seed(seed)
    dropped = drop_mask(x.shape, 0.3)
    keep = (~dropped).double()
    assert torch.equal(out.detach(), x.detach() * keep * (1 / 0.7))
    assert torch.allclose(x.grad, w * keep / 0.7, rtol=1e-15, atol=0)
    assert 0 < dropped.sum() < dropped.numel()
    torch.manual_seed(seed)
    assert torch.equal(dropout(x, 0.3).detach(), out.detach())  # reproducible
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x


def test_keep_scale_and_the_bfloat16_path_use_the_same_draws():
    seed = int(torch.randint(1 << 30, (1,)))
    torch.manual_seed(seed)
    scale = keep_scale((41, 7), 0.3)
    torch.manual_seed(seed)
    dropped = drop_mask((41, 7), 0.3)
    assert torch.equal(scale, torch.where(dropped, 0.0, 1 / 0.7)) and scale.dtype == torch.float32
    x = torch.randn(41, 7).bfloat16().requires_grad_()
    torch.manual_seed(seed)
    out = dropout(x, 0.3)  # bf16: scaled by the float 1 / 0.7, not by its bf16 rounding
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (x.detach().float() * (1 / 0.7)).bfloat16().masked_fill(dropped, 0))
    out.float().sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 1 / 0.7).masked_fill(dropped, 0))


def test_attention_with_dropout():
    seed = int(torch.randint(1 << 30, (1,)))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    allowed = torch.rand(3, 1, 5, 5, generator=g) < 0.6
    allowed |= torch.eye(5, dtype=torch.bool)  # every row allows a key
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(softmax_dropout_attention(q, [(k, v, allowed)], 1e-9), want, atol=1e-6)  # p rounds to 0
    torch.manual_seed(seed)
    got = softmax_dropout_attention(q, [(k, v, allowed)], 0.25)
    torch.manual_seed(seed)
    dropped = drop_mask((3, 2, 5, 5), 0.25)
    weights = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf")), -1)
    assert torch.allclose(got, (weights.masked_fill(dropped, 0) / 0.75) @ v, atol=1e-6)


def test_attention_over_segments_is_attention_over_their_concatenation():
    """Two segments of keys (the first masked, the second all allowed, as a reasoning step reads step
    0's keys and the reasoning tokens'): the same output and gradients as one segment of the
    concatenated keys, with and without dropout (same random draws)."""
    seed = int(torch.randint(1 << 30, (1,)))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, 1, 8, generator=g, requires_grad=True)
    k1, v1 = (torch.randn(3, 2, 6, 8, generator=g, requires_grad=True) for _ in range(2))
    k2, v2 = (torch.randn(3, 2, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    allowed1 = torch.rand(3, 1, 1, 6, generator=g) < 0.5
    allowed1[:, :, :, 0] = True
    joined_allowed = torch.cat([allowed1, torch.ones(3, 1, 1, 2, dtype=torch.bool)], dim=-1)
    upstream = torch.randn(3, 2, 1, 8, generator=g)
    for p in (0.0, 0.3):
        torch.manual_seed(seed)
        got = softmax_dropout_attention(q, [(k1, v1, allowed1), (k2, v2, None)], p)
        got_grads = torch.autograd.grad((got * upstream).sum(), (q, k1, v1, k2, v2))
        torch.manual_seed(seed)
        want = softmax_dropout_attention(q, [(torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), joined_allowed)], p)
        want_grads = torch.autograd.grad((want * upstream).sum(), (q, k1, v1, k2, v2))
        assert torch.allclose(got, want, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got_grads, want_grads))
        # the masked keys get no gradient
        assert torch.all(got_grads[1].masked_select(~allowed1.transpose(-1, -2).expand(3, 2, 6, 8)) == 0)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_every_16_bit_draw_once_drops_exactly_p(p, monkeypatch):
    """Fed each of the 2^16 possible draws exactly once, the mask drops round(p 2^16) of them: the rate
    is p to within 2^-17 by construction, not only on average (a cut off by one is caught here, where a
    statistical test would need billions of draws). The 0/1 multipliers use the same cut."""
    import rearec.dropout as module

    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int16)[torch.randperm(2 ** 16)]

    def all_draws(shape, device=None):
        return every.view(-1, 1), every.numel()

    monkeypatch.setattr(module, "_draws", all_draws)
    dropped = drop_mask((2 ** 16,), p)
    assert int(dropped.sum()) == round(p * 2 ** 16)
    assert torch.equal(module.keep_ones((2 ** 16,), p), (~dropped).float())
    assert torch.equal(keep_scale((2 ** 16,), p), torch.where(dropped, 0.0, 1 / (1 - p)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_p_within_two_to_the_minus_17_of_one_drops_nearly_everything(dtype):
    """round(p 2^16) = 2^16 made the int16 threshold wrap to -2^15: nothing was dropped and every element
    scaled by 1 / (1 - p) (dropout(ones, 1 - 1e-7).mean() was 1e7). Such p go to F.dropout; the mask
    builders refuse them."""
    p = 1 - 1e-7
    x = torch.ones(4096, dtype=dtype)
    torch.manual_seed(0)
    assert (dropout(x, p) == 0).float().mean() > 0.99
    with pytest.raises(ValueError, match="16-bit draws"):
        drop_mask((8,), p)
    with pytest.raises(ValueError, match="16-bit draws"):
        keep_scale((8,), p)
    assert drop_mask((1 << 16,), 1 - 2 ** -16).float().mean() > 0.999  # the largest p drawn here
