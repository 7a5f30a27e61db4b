"""Fused linear cross-entropy and ERL's chunked pairwise KL against their PyTorch references.

Loss and both gradients of the CPU path and the Triton path (interpreted) are compared with the
reference computed in float64 from the same float32 inputs: they must agree to 1e-5 relative to the
largest magnitude of each result (loss, grad_hidden, grad_table), or of the softmax term that
makes it where that is larger (see ``close``). Shapes are drawn by hypothesis
(odd N, chunks that do not divide N, a chunk of one item), with ignored rows, tied logits
(duplicated table rows and hidden rows) and scale = 1/0.07 (ReaRec's temperature). Triton's
scratch buffers are poisoned with NaN before the kernels write them. Tests that take ``device`` run
again on CUDA where a GPU is present (compiled kernels with TRITON_INTERPRET=0).
"""
import functools
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec_kernels.backend import interpreting
from rearec_kernels.linear_cross_entropy import fused_linear_cross_entropy, fused_mean_pairwise_kl
from rearec_kernels.linear_cross_entropy_reference import linear_cross_entropy as linear_cross_entropy_reference
from rearec_kernels.linear_cross_entropy_reference import mean_pairwise_kl as mean_pairwise_kl_reference
from rearec_kernels.packed import native_bf16

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread", "triton_on_cpu_needs_interpreter", "poisoned_kernel_outputs"),
]
IGNORE = -100
TEMPERATURE_SCALE = 1 / 0.07


def make(B, N, d, *, seed, ignored=0, ties=False, std=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, d, generator=g) * std
    table = torch.randn(N, d, generator=g) * std
    if ties and N > 1:  # duplicated items: tied logits in every row; a duplicated user too
        src, dst = torch.randint(0, N, (N // 2,), generator=g), torch.randint(0, N, (N // 2,), generator=g)
        table[dst] = table[src]
        if B > 1:
            hidden[-1] = hidden[0]
    targets = torch.randint(0, N, (B,), generator=g)
    if ignored:
        targets[torch.randperm(B, generator=g)[:ignored]] = IGNORE
    return hidden, table, targets


def close(actual, expected, what, rel=1e-5, size=None):
    """Max error <= rel * max(max |expected|, size). ``size`` is the magnitude of the terms that make
    the result: cross-entropy is lse - target logit and its gradient softmax - onehot, both exactly 0
    when one item takes all the mass (N = 1), while each term is computed and rounds."""
    expected = expected.to(actual.dtype)
    bound = rel * max(expected.abs().max().item(), size or 0.0, 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def lse_only_reference(h, e, t, scale=1.0, reduction="mean", ignore_index=IGNORE):
    """The reference without its target term: sizes the terms of the loss and of the gradients."""
    keep = (t != ignore_index).double()
    losses = torch.logsumexp(scale * (h.double() @ e.double().T), dim=1) * keep
    if reduction == "none":
        return losses
    return losses.sum() / (keep.sum() if reduction == "mean" else 1.0)


def run(fn, hidden, table, targets, grad_seed, device=None, **kw):
    """(loss, grad_hidden, grad_table) of ``fn`` on ``device`` (default: the inputs'), back on the CPU."""
    device = device or hidden.device
    h = hidden.detach().to(device).clone().requires_grad_()
    e = table.detach().to(device).clone().requires_grad_()
    loss = fn(h, e, targets.to(device), **kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed))
    loss.backward(upstream.to(device=device, dtype=loss.dtype))
    return loss.detach().cpu(), h.grad.cpu(), e.grad.cpu()


def on(device, backend):
    """``device`` for a test of ``backend``: the CPU path is tested on CPU tensors, Triton on CPU
    tensors only under its interpreter (a GPU run sets TRITON_INTERPRET=0)."""
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("the CPU path is tested on CPU tensors")
    if backend == "triton" and device.type == "cpu" and not interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    return device


def check_against_reference(backend, hidden, table, targets, *, scale, reduction, chunk_size=None, tag="",
                            device=torch.device("cpu")):
    kw = dict(scale=scale, reduction=reduction, ignore_index=IGNORE)
    ref = run(lambda h, e, t, **k: linear_cross_entropy_reference(h.double(), e.double(), t, k["scale"],
                                                                  k["reduction"], k["ignore_index"]),
              hidden, table, targets, 1, **kw)
    extra = dict(chunk_size=chunk_size) if backend == "cpu" else {}
    sizes = run(lse_only_reference, hidden, table, targets, 1, **kw)
    got = run(fused_linear_cross_entropy, hidden, table, targets, 1, device, backend=backend, **kw, **extra)
    assert got[0].dtype == torch.float32 and got[0].shape == ref[0].shape, tag
    for name, a, r, size in zip(("loss", "grad_hidden", "grad_table"), got, ref, sizes):
        close(a, r, f"{tag} {backend} {reduction} {name}", size=size.abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 21), N=st.integers(1, 123), d=st.integers(1, 40), chunk=st.none() | st.integers(1, 50),
       reduction=st.sampled_from(["mean", "sum", "none"]), hot=st.booleans(), ignored=st.integers(0, 3),
       ties=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_matches_reference(device, backend, B, N, d, chunk, reduction, hot, ignored, ties, seed):
    hidden, table, targets = make(B, N, d, seed=seed, ignored=min(ignored, B - 1), ties=ties)
    scale = TEMPERATURE_SCALE if hot else 0.7
    check_against_reference(backend, hidden, table, targets, scale=scale, reduction=reduction, chunk_size=chunk,
                            tag=f"seed={seed} B={B} N={N} d={d} chunk={chunk}", device=on(device, backend))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bigger_table_and_batch(device, backend):
    """Several row blocks and item splits in Triton; the default chunk size on the CPU (one chunk),
    and a table of many chunks."""
    seed = random.randrange(2 ** 31)
    big = device.type == "cuda" or backend == "cpu"
    B, N, d = (300, 50_003, 64) if big else (37, 203, 33)
    hidden, table, targets = make(B, N, d, seed=seed, ignored=5, ties=True)
    check_against_reference(backend, hidden, table, targets, scale=TEMPERATURE_SCALE, reduction="mean",
                            tag=f"seed={seed}", device=on(device, backend))


@pytest.mark.parametrize("B, N, rows", [(20, 37, 3), (7, 5, 1), (33, 123, 32), (4, 9, 10)])
def test_one_chunk_softmax_in_row_blocks(monkeypatch, B, N, rows):
    """The one-chunk path normalises big logit blocks a few rows at a time (a ragged last block, one
    row per block, one block for all): the softmax and log-sum-exp of the float64 reference, and the
    same loss and gradients through the autograd function."""
    from rearec_kernels import linear_cross_entropy_cpu
    seed = random.randrange(2 ** 31)
    hidden, table, targets = make(B, N, 11, seed=seed, ignored=1, ties=True)
    p, lse = linear_cross_entropy_cpu.softmax_and_log_sum_exp(hidden, table, torch.float32,
                                                              row_block_elements=rows * N)
    logits = hidden.double() @ table.double().T
    close(p, torch.softmax(logits, dim=1), f"seed={seed} softmax")
    close(lse, torch.logsumexp(logits, dim=1), f"seed={seed} lse")
    monkeypatch.setattr(linear_cross_entropy_cpu, "ROW_BLOCKED_FROM", 0)
    monkeypatch.setattr(linear_cross_entropy_cpu, "ROW_BLOCK_ELEMENTS", rows * N)
    for reduction in ("mean", "none"):
        check_against_reference("cpu", hidden, table, targets, scale=TEMPERATURE_SCALE, reduction=reduction,
                                tag=f"seed={seed}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_row_ignored(backend):
    hidden, table, targets = make(4, 9, 8, seed=3)
    targets[:] = IGNORE
    h = hidden.clone().requires_grad_()
    e = table.clone().requires_grad_()
    assert torch.isnan(fused_linear_cross_entropy(h, e, targets, backend=backend))  # as F.cross_entropy
    total = fused_linear_cross_entropy(h, e, targets, reduction="sum", backend=backend)
    total.backward()
    assert total.item() == 0 and not h.grad.any() and not e.grad.any()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_one_input_needs_grad(backend):
    seed = random.randrange(2 ** 31)
    hidden, table, targets = make(6, 29, 16, seed=seed)
    ref = run(lambda h, e, t: linear_cross_entropy_reference(h.double(), e.double(), t), hidden, table, targets, 2)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, table, targets, backend=backend)
    loss.backward(torch.randn((), generator=torch.Generator().manual_seed(2)))
    close(h.grad, ref[1], f"grad_hidden alone, seed={seed}")


def test_float64_on_cpu_is_exact_to_rounding():
    seed = random.randrange(2 ** 31)
    hidden, table, targets = make(9, 77, 12, seed=seed, ignored=2)
    got = run(fused_linear_cross_entropy, hidden.double(), table.double(), targets, 4,
              scale=TEMPERATURE_SCALE, backend="cpu", chunk_size=10)
    ref = run(linear_cross_entropy_reference, hidden.double(), table.double(), targets, 4, scale=TEMPERATURE_SCALE)
    for a, r in zip(got, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("backend, chunk", [("cpu", None), ("cpu", 7), ("triton", None)])
def test_bfloat16_close_to_reference(backend, chunk):
    seed = random.randrange(2 ** 31)
    hidden, table, targets = make(17, 45, 32, seed=seed)
    hidden, table = hidden.bfloat16(), table.bfloat16()
    extra = dict(chunk_size=chunk) if chunk else {}
    got = run(fused_linear_cross_entropy, hidden, table, targets, 6, backend=backend, **extra)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    ref = run(linear_cross_entropy_reference, hidden.double(), table.double(), targets, 6)
    for name, a, r in zip(("loss", "grad_hidden", "grad_table"), got, ref):
        close(a.float(), r.float(), f"bf16 {name}, seed={seed}", rel=2e-2)


@pytest.mark.skipif(not native_bf16(), reason="bf16 GEMMs are used where the CPU has native bf16 dot products")
@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 40), N=st.integers(1, 300), d=st.integers(1, 64), chunk=st.none() | st.integers(1, 50),
       rows=st.none() | st.integers(1, 9), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignored=st.integers(0, 3), seed=st.integers(0, 2 ** 31 - 1))
def test_bfloat16_gemms_on_cpu_against_float64(B, N, d, chunk, rows, reduction, ignored, seed):
    """bf16 inputs: the CPU path's products run in bf16 (one chunk, row blocks, many chunks). Against
    float64 arithmetic on the same (bf16) inputs, each result's largest error is at most twice that of
    the reference whose product runs in bf16 (the FlashAttention rule), plus 2^-7 of the largest sum
    of absolute terms that make an element: the path rounds the softmax term's factors and products
    (P, w h, P @ E, P.T @ w h) where the reference rounds (P - onehot) w, and a sum's rounding scales
    with its terms, not with what is left after they cancel."""
    import rearec_kernels.linear_cross_entropy_cpu as cpu

    hidden, table, targets = make(B, N, d, seed=seed, ignored=min(ignored, B - 1))
    hidden, table = hidden.bfloat16(), table.bfloat16()
    kw = dict(scale=TEMPERATURE_SCALE, reduction=reduction, ignore_index=IGNORE)
    exact = run(lambda h, e, t, **k: linear_cross_entropy_reference(h, e, t, k["scale"], k["reduction"],
                                                                    k["ignore_index"]),
                hidden.double(), table.double(), targets, 2, **kw)  # float64 gradients too
    in_bf16 = run(functools.partial(linear_cross_entropy_reference, product_dtype=torch.bfloat16),
                  hidden.float(), table.float(), targets, 2, **kw)
    extra = dict(chunk_size=chunk) if chunk else {}
    block = cpu.ROW_BLOCK_ELEMENTS, cpu.ROW_BLOCKED_FROM
    if rows:
        cpu.ROW_BLOCK_ELEMENTS, cpu.ROW_BLOCKED_FROM = rows * N, 0
    try:
        got = run(fused_linear_cross_entropy, hidden, table, targets, 2, backend="cpu", **kw, **extra)
    finally:
        cpu.ROW_BLOCK_ELEMENTS, cpu.ROW_BLOCKED_FROM = block
    # The absolute terms: loss |lse| + |target logit| per row; gradients sum_n P |E| and P.T |h| plus
    # the one-hot rows, each times |upstream weight| * scale (upstream as ``run`` draws it).
    h, e = hidden.double(), table.double()
    logits = TEMPERATURE_SCALE * h @ e.T
    kept = targets != IGNORE
    upstream = torch.randn(exact[0].shape, generator=torch.Generator().manual_seed(2)).double()
    w = (upstream.abs() if reduction == "none" else upstream.abs().expand(B) / (kept.sum() if reduction == "mean" else 1))
    w = torch.where(kept, w, torch.zeros_like(w))[:, None]
    prob = torch.softmax(logits, dim=1)
    onehot = torch.zeros_like(prob)
    onehot[kept.nonzero().squeeze(1), targets[kept]] = 1.0
    terms = {"loss": (torch.logsumexp(logits, 1).abs() + (logits * onehot).sum(1).abs()) * w[:, 0],
             "grad_hidden": (prob + onehot) @ e.abs() * w * TEMPERATURE_SCALE,
             "grad_table": (prob + onehot).T @ (h.abs() * w) * TEMPERATURE_SCALE}
    if reduction != "none":
        terms["loss"] = terms["loss"].sum()
    for name, a, b, r in zip(("loss", "grad_hidden", "grad_table"), got, in_bf16, exact):
        err, reference_error = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        bound = 2 * reference_error + 2.0 ** -7 * terms[name].max().item()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} = 2 x {reference_error:.3g} + 2^-7 x terms"


def test_autocast_runs_the_products_in_bfloat16():
    """Under bf16 autocast the dispatcher casts the (float32) inputs to bf16: the same loss and
    gradients as an explicit cast, float32 gradients back to the float32 inputs, a float32 loss."""
    hidden, table, targets = make(33, 97, 24, seed=5, ignored=2)

    def under_autocast(h, e, t, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear_cross_entropy(h, e, t, **kw)

    kw = dict(scale=TEMPERATURE_SCALE, backend="cpu", chunk_size=20)
    got = run(under_autocast, hidden, table, targets, 3, **kw)
    cast = run(lambda h, e, t, **k: fused_linear_cross_entropy(h.bfloat16(), e.bfloat16(), t, **k),
               hidden, table, targets, 3, **kw)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, cast):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.float16):  # float16 autocast: all float32
        loss = fused_linear_cross_entropy(hidden, table, targets, scale=TEMPERATURE_SCALE, backend="cpu")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fused_linear_cross_entropy(hidden, table, targets, scale=TEMPERATURE_SCALE,
                                                                backend="cpu"))


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 dot products")
def test_bfloat16_inputs_really_take_the_bfloat16_products():
    """On a CPU with native bf16 dot products, bf16 inputs run bf16 GEMMs (each logit rounded to bf16):
    the loss is the bf16-product reference's to float32 rounding, and visibly not the float32 GEMM's
    on the same inputs (a path that widened silently would pass every tolerance test above)."""
    hidden, table, targets = make(64, 300, 32, seed=3)
    hidden, table = hidden.bfloat16(), table.bfloat16()
    got = fused_linear_cross_entropy(hidden, table, targets, scale=TEMPERATURE_SCALE, reduction="none",
                                     backend="cpu").float()
    in_bf16 = linear_cross_entropy_reference(hidden.float(), table.float(), targets, TEMPERATURE_SCALE, "none",
                                             IGNORE, product_dtype=torch.bfloat16)
    in_fp32 = linear_cross_entropy_reference(hidden.float(), table.float(), targets, TEMPERATURE_SCALE, "none", IGNORE)
    apart = (in_bf16 - in_fp32).abs().max().item()
    assert apart > 1e-3  # the two products differ here
    assert (got - in_bf16).abs().max().item() < 1e-3 * apart


def test_dispatcher_default_backend_is_cpu_path_on_cpu(monkeypatch):
    monkeypatch.delenv("REAREC_KERNEL_BACKEND", raising=False)
    hidden, table, targets = make(5, 31, 8, seed=17)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), table, targets)
    assert loss.grad_fn is not None and "CPU" in type(loss.grad_fn).__name__


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_empty_batch(backend):
    """B = 0: the mean is NaN and the sum 0, as F.cross_entropy, on every backend (the Triton path
    divided by its zero row blocks)."""
    table = torch.randn(9, 8, requires_grad=True)
    hidden, targets = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, dtype=torch.long)
    assert torch.isnan(fused_linear_cross_entropy(hidden, table, targets, backend=backend))
    total = fused_linear_cross_entropy(hidden, table, targets, reduction="sum", backend=backend)
    total.backward()
    assert total.item() == 0 and not table.grad.any()


def test_automatic_backend_serves_what_triton_does_not_take(monkeypatch):
    """Where the automatic choice is Triton (CUDA; simulated here), inputs the kernel does not take
    (float64, d > 256) run the chunked PyTorch path instead of failing; an explicit 'triton' refuses."""
    import rearec_kernels.linear_cross_entropy as dispatcher
    from rearec_kernels.backend import Backend
    monkeypatch.delenv("REAREC_KERNEL_BACKEND", raising=False)
    real = dispatcher.resolve
    monkeypatch.setattr(dispatcher, "resolve", lambda op, backend, device: Backend.TRITON if backend in (None, "triton")
                        else real(op, backend, device))
    for hidden, table, targets in (make(5, 31, 8, seed=19), make(4, 17, 300, seed=20)):
        if hidden.shape[1] == 8:
            hidden, table = hidden.double(), table.double()
        loss = fused_linear_cross_entropy(hidden.clone().requires_grad_(), table, targets)
        assert "CPU" in type(loss.grad_fn).__name__
        torch.testing.assert_close(loss, fused_linear_cross_entropy(hidden, table, targets, backend="reference").to(loss.dtype))
        with pytest.raises(ValueError, match="the Triton backend takes .*leave backend unset"):
            fused_linear_cross_entropy(hidden, table, targets, backend="triton")


# ------------------------------------------------------------------------------ ERL's pairwise KL

@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 9), S=st.integers(2, 4), N=st.integers(1, 97), d=st.integers(1, 24),
       chunk=st.integers(1, 40), hot=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_pairwise_kl_matches_reference(B, S, N, d, chunk, hot, seed):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, S, d, generator=g) * 0.3
    table = torch.randn(N, d, generator=g) * 0.3
    scale = TEMPERATURE_SCALE if hot else 1.3
    upstream = torch.randn((), generator=g)
    results = []
    for fn in (lambda s, e: fused_mean_pairwise_kl(s, e, scale=scale, chunk_size=chunk),
               lambda s, e: mean_pairwise_kl_reference(s.double(), e.double(), scale)):
        s, e = states.clone().requires_grad_(), table.clone().requires_grad_()
        value = fn(s, e)
        value.backward(upstream.to(value.dtype))
        results.append((value.detach(), s.grad, e.grad))
    tag = f"seed={seed} B={B} S={S} N={N} d={d} chunk={chunk}"
    # The KL is a difference of expectations of logits: judge its error against the logits' size.
    logit_size = scale * states.norm(dim=-1).max().item() * table.norm(dim=-1).max().item()
    err = (results[0][0].double() - results[1][0]).abs().item()
    assert err <= 1e-5 * max(results[1][0].abs().item(), logit_size, 1.0), f"{tag} kl: error {err:.3g}"
    # d KL / d logit_j = c p_j (S log p_j - sum_s log p_s - ...): terms of size |upstream| logit_size / B,
    # times scale and a row of the other factor.
    widest = max(states.abs().max().item(), table.abs().max().item()) * d
    size = abs(upstream.item()) * logit_size * scale * widest / B
    for name, a, r in zip(("grad_states", "grad_table"), results[0][1:], results[1][1:]):
        close(a, r, f"{tag} {name}", size=size)


@pytest.mark.skipif(not native_bf16(), reason="bf16 GEMMs are used where the CPU has native bf16 dot products")
@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 9), S=st.integers(2, 4), N=st.integers(1, 80), d=st.integers(1, 24),
       chunk=st.none() | st.integers(1, 30), seed=st.integers(0, 2 ** 31 - 1))
def test_pairwise_kl_bfloat16_gemms_against_float64(B, S, N, d, chunk, seed):
    """bf16 inputs (what bf16 autocast passes): the KL's products run in bf16. Against float64 on the
    same inputs, the largest error is at most twice that of the reference whose logits come from a
    bf16 product (the FlashAttention rule), plus 2^-6 of the largest exact value (the path also
    rounds the gradient's products); under autocast the same as an explicit bf16 cast."""
    g = torch.Generator().manual_seed(seed)
    states = (torch.randn(B, S, d, generator=g) * 0.3).bfloat16()
    table = (torch.randn(N, d, generator=g) * 0.3).bfloat16()
    upstream = torch.randn((), generator=g)

    results = []
    for fn, dtype in ((lambda s, e: fused_mean_pairwise_kl(s, e, scale=TEMPERATURE_SCALE, chunk_size=chunk), torch.bfloat16),
                      (lambda s, e: mean_pairwise_kl_reference(s, e, TEMPERATURE_SCALE), torch.float64),
                      (lambda s, e: mean_pairwise_kl_reference(s, e, TEMPERATURE_SCALE, product_dtype=torch.bfloat16),
                       torch.float32)):
        s, e = (x.detach().to(dtype).clone().requires_grad_() for x in (states, table))
        value = fn(s, e)
        value.backward(upstream.to(value.dtype))
        grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in (s, e)]  # N = 1: no path
        results.append((value.detach().double(), grads[0].double(), grads[1].double()))
    got, exact, reference = results
    for k, name in enumerate(("kl", "grad_states", "grad_table")):
        err = (got[k] - exact[k]).abs().max().item()
        reference_error = (reference[k] - exact[k]).abs().max().item()
        bound = 2 * reference_error + 2.0 ** -6 * exact[k].abs().max().item() + 1e-6
        assert err <= bound, f"seed={seed} {name}: error {err:.3g} > {bound:.3g} (reference {reference_error:.3g})"
    s = states.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fused_mean_pairwise_kl(s, table.float(), scale=TEMPERATURE_SCALE, chunk_size=chunk)
    assert under.dtype == torch.float32 and torch.equal(under.double(), got[0])


def test_pairwise_kl_float64_exact_to_rounding():
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    table = torch.randn(41, 7, generator=g, dtype=torch.float64)
    out = []
    for fn in (lambda s, e: fused_mean_pairwise_kl(s, e, scale=TEMPERATURE_SCALE, chunk_size=6),
               lambda s, e: mean_pairwise_kl_reference(s, e, TEMPERATURE_SCALE)):
        s, e = states.clone().requires_grad_(), table.clone().requires_grad_()
        value = fn(s, e)
        value.backward()
        out.append((value.detach(), s.grad, e.grad))
    for a, r in zip(*out):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed}: {m}")



# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args, kwargs, match", [
    (("h", "e", "t"), {}, "hidden must be a torch.Tensor"),
    ((torch.zeros(3), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), {}, r"hidden must be \(B, d\)"),
    ((torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long)), {}, "d differs"),
    ((torch.zeros(3, 4, dtype=torch.int32), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), {}, "float32"),
    ((torch.zeros(3, 4), torch.zeros(0, 4), torch.zeros(3, dtype=torch.long)), {}, "at least one item"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3)), {}, "integer item ids"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long)), {}, r"targets must be \(B,\)"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([0, 5, 1])), {}, r"item ids in \[0, 5\)"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([0, -1, 1])), {}, r"item ids in \[0, 5\)"),
    # uint8 156 is -100 (the default ignore_index) wrapped: still an out-of-range id, not an ignored row
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([0, 156, 1], dtype=torch.uint8)), {}, r"item ids in \[0, 5\)"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), dict(reduction="avg"), "reduction"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), dict(scale="hot"), "scale"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), dict(scale=float("inf")), "finite"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), dict(scale="2"), "scale must be a real number"),
    # a learnable temperature would have stopped training silently: float() cuts the graph
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)),
     dict(scale=torch.tensor(2.0, requires_grad=True)), "scale is a tensor that requires grad"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), dict(ignore_index=1.5), "ignore_index"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), dict(chunk_size=0), "chunk_size"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), dict(backend="gpu"), "unknown kernel backend"),
    ((torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)),
     dict(backend="triton"), "Triton backend takes float32"),
    ((torch.zeros(3, 300), torch.zeros(5, 300), torch.zeros(3, dtype=torch.long)), dict(backend="triton"), "Triton backend takes d up to 256"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(*args, **kwargs)



def test_bad_table_under_autocast_is_named():
    """Under autocast too a table that is no tensor is the one-line error, not an AttributeError."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="fused_linear_cross_entropy: item_table must be a torch.Tensor"):
            fused_linear_cross_entropy(torch.zeros(3, 4), [[0.0] * 4], torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="fused_mean_pairwise_kl: item_table must be a torch.Tensor"):
            fused_mean_pairwise_kl(torch.zeros(3, 2, 4), None)
        # Integer or bool inputs were cast to bf16 before any check, and taken
        targets = torch.zeros(3, dtype=torch.long)
        with pytest.raises(ValueError, match="hidden must be float16/bfloat16/float32/float64, got torch.int32"):
            fused_linear_cross_entropy(torch.ones(3, 4, dtype=torch.int32), torch.ones(5, 4), targets)
        with pytest.raises(ValueError, match="item_table must be float"):
            fused_linear_cross_entropy(torch.ones(3, 4), torch.ones(5, 4, dtype=torch.bool), targets)
        with pytest.raises(ValueError, match="states must be float16/bfloat16/float32/float64, got torch.int64"):
            fused_mean_pairwise_kl(torch.ones(3, 2, 4, dtype=torch.long), torch.ones(5, 4))


def test_float64_inputs_stay_float64_under_autocast():
    """Autocast leaves float64 alone (F.cross_entropy of float64 logits stays float64 under it); the fused ops
    cut float64 inputs to bf16 there."""
    g = torch.Generator().manual_seed(5)
    h, e = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(20, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 20, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(h, e, t, backend="cpu")
        want = F.cross_entropy(h @ e.T, t)
        kl = fused_mean_pairwise_kl(h.view(3, 2, 8), e, backend="cpu")
    assert got.dtype == want.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=0)
    assert kl.dtype == torch.float64 and torch.allclose(kl, fused_mean_pairwise_kl(h.view(3, 2, 8), e, backend="cpu"),
                                                        rtol=1e-12, atol=0)

@pytest.mark.parametrize("states, match", [
    (torch.zeros(3, 4), r"states must be \(B, S, d\)"),
    (torch.zeros(3, 1, 4), "at least 2 steps"),
    (torch.zeros(0, 2, 4), "no users"),
    (torch.zeros(3, 2, 5), "d differs"),
])
def test_pairwise_kl_bad_input(states, match):
    with pytest.raises(ValueError, match=match):
        fused_mean_pairwise_kl(states, torch.zeros(7, 4))


# ------------------------------------------------------------------------------ the objectives use it

def _objective_config(objective, n_items, **extra):
    from rearec import ReaRecConfig

    steps = 0 if objective == "base" else 2
    return ReaRecConfig(n_items=n_items, objective=objective, reason_steps=steps, hidden_size=16, n_layers=1,
                        n_heads=2, inner_size=32, max_len=11, dropout=0.1, input_dropout=0.1, warmup_epochs=1,
                        **extra)


@pytest.mark.parametrize("objective", ["base", "erl", "prl"])
def test_objective_fused_equals_dense(objective):
    from rearec.objectives import objective_loss

    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    cfg = _objective_config(objective, 53, kl_weight=0.3)
    S = cfg.reason_steps + 1
    states = torch.randn(13, S, 16, generator=g)
    noisy = states + 0.1 * torch.randn(13, S, 16, generator=g)
    items = torch.randn(53, 16, generator=g) * 0.2
    targets = torch.randint(0, 53, (13,), generator=g)
    results = []
    for fused in (True, False):
        s, e = states.clone().requires_grad_(), items.clone().requires_grad_()
        loss = objective_loss(cfg, s, e, targets, noisy if objective == "prl" else None, fused_ce=fused)
        loss.backward()
        results.append((loss.detach(), s.grad, e.grad))
    for name, a, r in zip(("loss", "grad_states", "grad_items"), *results):
        close(a, r, f"seed={seed} {objective} {name}")


def test_dense_erl_keeps_its_kl_in_float32_under_bf16_autocast():
    """--bf16 --no-fused-ce: autocast ran ERL's cross term p @ log p^T as a bf16 product, off by ~0.01 nats
    per pair where the fused path (and the trainer's contract: losses in float32) keep it exact. The KL
    of the bf16 logits, against the same KL in float64."""
    from rearec.objectives import erl_loss, item_cross_entropy

    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    states, items = torch.randn(6, 3, 16, generator=g), torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 40, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = item_cross_entropy(states.mean(1), items, targets, 1.0, False) - erl_loss(states, items, targets, 1.0,
                                                                                        1.0, fused_ce=False)
        logits = (states @ items.T).double()  # the bf16 product the loss's softmax starts from
    log_p = torch.log_softmax(logits, dim=-1)
    pair = (log_p.exp()[:, :, None] * (log_p[:, :, None] - log_p[:, None, :])).sum(-1)  # KL(p_j || p_i)
    want = pair[:, ~torch.eye(3, dtype=torch.bool)].mean()
    assert abs(kl.item() - want.item()) < 1e-4 * max(1.0, want.item()), f"seed={seed}: {kl.item()} vs {want.item()}"


@pytest.mark.parametrize("objective", ["base", "erl", "prl"])
def test_training_with_fused_ce_equals_dense(objective):
    """Two epochs on a small synthetic log: the same losses and weights with and without the fused
    cross-entropy, up to float rounding (dropout, PRL's noise and the batch order are seeded alike)."""
    from rearec import ReaRec
    from rearec.objectives import training_loss
    from tests.synthetic import markov_sequences, next_item_samples

    histories, lengths, targets = next_item_samples(markov_sequences(n_users=40, n_items=30, length=12, seed=1))
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = ReaRec(_objective_config(objective, 30))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for epoch in range(2):
            torch.manual_seed(100 + epoch)
            order = torch.randperm(len(targets))
            for batch in order.split(128):
                loss = training_loss(model, histories[batch], lengths[batch], targets[batch], epoch, fused_ce=fused)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            runs.append((losses, model(histories, lengths)))
    # Compared: every step's loss and the trained model's states, not raw weights: the attention key
    # bias has an exactly-zero gradient, so Adam turns rounding noise there into steps of size lr.
    (fused_losses, fused_states), (dense_losses, dense_states) = runs
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(dense_losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_states, dense_states, rtol=1e-3, atol=1e-4)
