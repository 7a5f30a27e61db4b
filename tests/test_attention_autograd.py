"""Differentiable prefill attention: the SDPA path and the Triton kernels (interpreted) against the
float64 reference, outputs and gradients of q, k and v.

Tolerance (FlashAttention's rule): a backend's max error against the float64 reference must stay
within twice the error of the same reference run in float32 (plus 1e-6 of the results' size).
Shapes are drawn by hypothesis (odd L, head dims, lengths down to 1); Triton's outputs are
poisoned with NaN before its kernels write them; q, k, v also come as strided views of one fused
projection. Tests that take ``device`` run again on CUDA where a GPU is present.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec_kernels.backend import interpreting
from rearec_kernels.attention import split_qkv
from rearec_kernels.attention_autograd import CausalSelfAttention, prefill_attention_autograd
from rearec_kernels.attention_autograd_reference import prefill_attention as reference_attention
from rearec_kernels import attention_autograd_triton
from rearec_kernels.attention_autograd_triton import attention_forward
from tests.conftest import gpu_tiles

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread", "triton_on_cpu_needs_interpreter", "poisoned_kernel_outputs"),
]


def forward_backward(q, k, v, lengths, grad, *, backend, dtype, sm_scale=None, dropout_p=0.0,
                     device=torch.device("cpu")):
    """Output and (dq, dk, dv) on ``device``, back on the CPU."""
    if q.device != device:  # moved views lose their strides: keep the layout of the CPU inputs
        q, k, v = (t.to(device) for t in (q, k, v))
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = prefill_attention_autograd(*leaves, lengths.to(device), backend=backend, sm_scale=sm_scale,
                                     dropout_p=dropout_p)
    out.backward(grad.to(device=device, dtype=dtype))
    return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]


def check(q, k, v, lengths, *, backend, seed, sm_scale=None, device=torch.device("cpu")):
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    ref = forward_backward(q, k, v, lengths, grad, backend="reference", dtype=torch.float64, sm_scale=sm_scale)
    ref32 = forward_backward(q, k, v, lengths, grad, backend="reference", dtype=torch.float32, sm_scale=sm_scale)
    got = forward_backward(q, k, v, lengths, grad, backend=backend, dtype=torch.float32, sm_scale=sm_scale,
                           device=device)
    # Floor: 1e-6 of the largest result, since dq and dk are exactly 0 in both references when
    # every row attends to itself only (L = 1) while a fused kernel still rounds.
    size = max(r.abs().max().item() for r in ref)
    for name, a, r32, r in zip(("out", "dq", "dk", "dv"), got, ref32, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape
        err = (a.double() - r).abs().max().item()
        allowed = 2 * (r32.double() - r).abs().max().item() + 1e-6 * size
        assert err <= allowed, f"seed={seed} {backend} {name}: error {err:.3g} > {allowed:.3g}"
    padding = torch.arange(q.shape[1])[None, :] >= lengths[:, None]
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert not t[padding].any(), f"seed={seed} {backend} {name}: padding rows are not 0"


def draw(B, L, H, Dh, seed, *, full=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, Dh, generator=g) for _ in range(3))
    lengths = torch.full((B,), L) if full else torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    return q, k, v, lengths


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), L=st.integers(1, 40), H=st.integers(1, 3), Dh=st.integers(1, 33),
       seed=st.integers(0, 2 ** 31 - 1))
def test_matches_float64_reference(device, backend, B, L, H, Dh, seed):
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("the CPU path is tested on CPU tensors")
    if backend == "triton" and device.type == "cpu" and not interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    check(*draw(B, L, H, Dh, seed), backend=backend, seed=seed, device=device)


@pytest.mark.parametrize("block_m, block_n",
                         gpu_tiles(attention_autograd_triton, attention_autograd_triton.kernel_config))
def test_triton_every_gpu_tile(block_m, block_n, monkeypatch):
    """Forward and backward at each GPU tile shape, under the interpreter (which gets 16 x 16 unless
    told otherwise), at a ragged head dim and lengths that end inside a block."""
    if not interpreting():
        pytest.skip("sets the tiles of an interpreted launch")
    tile = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    monkeypatch.setattr(attention_autograd_triton, "kernel_config", lambda head_dim, dtype: dict(tile))
    seed = random.randrange(2 ** 31)
    q, k, v, lengths = draw(2, 70, 1, 24, seed)
    check(q, k, v, lengths, backend="triton", seed=seed)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_projection_views_and_scale(backend):
    """q, k, v as strided views of one (B, L, 3*H*Dh) projection, and an explicit sm_scale."""
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(3, 29, 3 * 2 * 24, generator=g)
    q, k, v = split_qkv(qkv, 2)
    assert not q.is_contiguous()
    lengths = torch.tensor([29, 1, 17])
    check(q, k, v, lengths, backend=backend, seed=seed, sm_scale=0.3)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("sm_scale", [0.0, -0.5])
def test_scale_zero_or_negative(backend, sm_scale):
    """A scale <= 0 is attention like any other (PyTorch's fused causal CPU kernel returns NaN rows for it)."""
    check(*draw(3, 7, 2, 5, seed=11), backend=backend, seed=11, sm_scale=sm_scale)

def test_self_attention_module_is_a_drop_in():
    """CausalSelfAttention equals PyTorch's MultiheadAttention with the same weights and a causal +
    padding mask on every valid row, gradients included."""
    seed = random.randrange(2 ** 31)
    torch.manual_seed(seed)
    B, L, d, H = 3, 13, 24, 4
    ours = CausalSelfAttention(d, H, backend="cpu")
    theirs = torch.nn.MultiheadAttention(d, H, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)
        theirs.in_proj_bias.copy_(ours.qkv.bias)
        theirs.out_proj.weight.copy_(ours.out.weight)
        theirs.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(B, L, d)
    lengths = torch.tensor([13, 4, 9])
    valid = torch.arange(L)[None, :] < lengths[:, None]
    blocked = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not attended
    a = ours(x, lengths)
    b, _ = theirs(x, x, x, attn_mask=blocked, key_padding_mask=~valid, need_weights=False)
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    (a[valid].sum() + (a[valid] ** 2).sum()).backward()
    (b[valid].sum() + (b[valid] ** 2).sum()).backward()
    torch.testing.assert_close(ours.qkv.weight.grad, theirs.in_proj_weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.out.weight.grad, theirs.out_proj.weight.grad, rtol=1e-4, atol=1e-5)


def test_self_attention_module_triton_matches_cpu():
    seed = random.randrange(2 ** 31)
    torch.manual_seed(seed)
    module = CausalSelfAttention(32, 2)
    x = torch.randn(2, 21, 32)
    lengths = torch.tensor([21, 8])
    outputs = []
    for backend in ("cpu", "triton"):
        module.zero_grad()
        module.attention.backend = backend
        y = module(x, lengths)
        y.pow(2).sum().backward()
        outputs.append((y.detach(), module.qkv.weight.grad.clone()))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-4, atol=1e-4, msg=f"seed={seed}")


@pytest.mark.parametrize("dropout_p", [0.2, 0.6])
def test_triton_dropout_matches_reference_with_the_same_mask(dropout_p):
    """The kernels' Philox mask, reported by the forward kernel (WRITE_KEEP), applied to the float64
    reference: output and gradients agree; the three kernels drew the same mask."""
    seed = random.randrange(2 ** 31)
    q, k, v, lengths = draw(2, 29, 2, 16, seed)
    B, L, H, Dh = q.shape
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(seed)
    got = forward_backward(q, k, v, lengths, grad, backend="triton", dtype=torch.float32, dropout_p=dropout_p)
    # The seed the autograd function drew, and the mask it implies:
    torch.manual_seed(seed)
    kernel_seed = int(torch.randint(0, 2 ** 30, (1,)).item())
    scale_tiles = torch.zeros(B * H, L, L)
    attention_forward(q, k, v, lengths, Dh ** -0.5, dropout_p, kernel_seed, keep_out=scale_tiles)
    seen = torch.ones(L, L).tril().bool()[None] & (torch.arange(L)[None, :] < lengths.repeat_interleave(H)[:, None])[:, None, :]
    seen &= (torch.arange(L)[None, :] < lengths.repeat_interleave(H)[:, None])[:, :, None]
    kept = (scale_tiles[seen] > 0).double().mean().item()
    five_sigma = 5 * (dropout_p * (1 - dropout_p) / seen.sum().item()) ** 0.5
    assert abs(kept - (1 - dropout_p)) < five_sigma, f"seed={seed}: kept fraction {kept:.3f}"
    values = scale_tiles[seen]
    assert torch.all((values == 0) | torch.isclose(values, torch.tensor(1 / (1 - dropout_p)))), f"seed={seed}"
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, lengths, Dh ** -0.5, dropout_scale=scale_tiles.double())
    out.backward(grad.double())
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, [out.detach()] + [t.grad for t in leaves]):
        err = (a.double() - r).abs().max().item()
        assert err <= 1e-5 * max(r.abs().max().item(), 1.0), f"seed={seed} dropout {name}: error {err:.3g}"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_only_in_training_and_seeded(backend):
    torch.manual_seed(0)
    module = CausalSelfAttention(16, 2, dropout=0.5, backend=backend)
    x = torch.randn(2, 9, 16)
    lengths = torch.tensor([9, 4])
    module.eval()
    assert torch.equal(module(x, lengths), module(x, lengths))
    module.train()
    torch.manual_seed(1)
    a = module(x, lengths)
    torch.manual_seed(1)
    b = module(x, lengths)
    assert torch.equal(a, b) and not torch.allclose(a, module(x, lengths))


def test_bfloat16_triton_close_to_reference():
    seed = random.randrange(2 ** 31)
    q, k, v, lengths = draw(2, 33, 2, 32, seed=seed)
    grad = torch.randn(q.shape)
    ref = forward_backward(q, k, v, lengths, grad, backend="reference", dtype=torch.float64)
    got = forward_backward(q, k, v, lengths, grad, backend="triton", dtype=torch.bfloat16)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (a.double() - r).abs().max().item()
        assert err <= 3e-2 * r.abs().max().item(), f"bf16 {name}: error {err:.3g}, seed={seed}"


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, dtype=torch.long)), {},
     r"must be \(B, L, H, Dh\)"),
    ((torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 5), torch.zeros(2, 3, 1, 4), torch.ones(2, dtype=torch.long)), {},
     "q, k, v must have one shape"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.ones(3, dtype=torch.long),), {}, r"lengths must have shape \(2,\)"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.ones(2),), {}, "integer tensor"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.tensor([1, 4]),), {}, r"lengths must lie in \[1, 3\]"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.tensor([0, 3]),), {}, r"lengths must lie in \[1, 3\]"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.ones(2, dtype=torch.long),), dict(sm_scale="x"), "sm_scale"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.ones(2, dtype=torch.long),), dict(sm_scale=float("nan")),
     "sm_scale must be finite"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.ones(2, dtype=torch.long),), dict(dropout_p=1.0), r"dropout_p .* \[0, 1\)"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.ones(2, dtype=torch.long),), dict(dropout_p="a"), "dropout_p"),
    ((torch.zeros(2, 3, 1, 4, dtype=torch.float64),) * 3 + (torch.ones(2, dtype=torch.long),),
     dict(backend="triton"), "Triton backend takes"),
    ((torch.zeros(2, 3, 1, 4),) * 3 + (torch.ones(2, dtype=torch.long),), dict(backend="fast"), "unknown kernel backend"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefill_attention_autograd(*args, **kwargs)


def test_module_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        CausalSelfAttention(10, 3)


def test_reference_agrees_with_dense_masked_softmax():
    """The reference itself: one dense masked softmax in float64, written out here independently."""
    q, k, v, lengths = draw(2, 9, 2, 5, seed=3)
    q, k, v = q.double(), k.double(), v.double()
    out = prefill_attention_autograd(q, k, v, lengths, backend="reference")
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / 5 ** 0.5
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & (torch.arange(9)[None, :] < lengths[:, None])[:, None, None]
    weights = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    dense = torch.einsum("bhlm,bmhd->blhd", weights, v)
    valid = torch.arange(9)[None, :] < lengths[:, None]
    torch.testing.assert_close(out[valid], dense[valid])
