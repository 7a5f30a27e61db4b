"""Tests for rearec_kernels.attention: prefill and decode with a KV cache, every backend.

The Triton kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
their cases stay small: few programs, short loops. The ground truth is the reference backend in
float64.

Poisoning: outputs go into ``out=`` buffers prefilled with NaN, and every cache slot an op must not
write is prefilled with NaN, so an element left unwritten (or written where it must not be) fails.
The CPU backend needs finite padding tokens and finite unused cache slots (see
``rearec_kernels/kv_cache.py``), so for it those hold large finite junk instead: reading one with a
nonzero weight would still show in the outputs.

Tolerances: float32 1e-5 (abs and rel) against float64. float16/bfloat16 follow FlashAttention's
rule: the error against the float64 reference, max and mean, may be at most twice the error that
the reference's own math makes when run in that dtype, plus the dtype's rounding of the answer.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec_kernels import KVCache, attention_triton, decode_attention, prefill_attention, split_qkv
from rearec_kernels.attention_reference import masked_softmax_attention
from rearec_kernels.backend import triton_available
from tests.conftest import gpu_tiles

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BACKENDS = ["cpu", "triton"]
HEAD_DIMS = [16, 20, 33, 48, 64, 80, 100, 128]
NAN = float("nan")
JUNK = 1e3  # the CPU backend's stand-in for NaN: finite, but it would wreck any output it entered

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    # Triton 3.6's interpreter trips a NumPy deprecation on every scalar it indexes with.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- helpers ----------------------------------------------------------------------------------------

def _gen(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _fill_unused(t: torch.Tensor, mask: torch.Tensor, backend: str, gen) -> None:
    """Where ``mask``: NaN, or for the CPU backend large finite junk."""
    if backend == "cpu":
        t[mask] = (JUNK * _randn(gen, *t.shape, dtype=t.dtype))[mask]
    else:
        t[mask] = NAN


def _draw_lengths(data, batch: int, low: int, high: int) -> torch.Tensor:
    """(batch,) int32 in [low, high]; with >= 2 users both extremes occur."""
    lengths = data.draw(st.lists(st.integers(low, high), min_size=batch, max_size=batch), label="lengths")
    if batch >= 2:
        lengths[0], lengths[-1] = low, high
    return torch.tensor(lengths, dtype=torch.int32)


def _make_qkv(gen, B, L, H, D, fused: bool, dtype=torch.float32):
    """q, k, v of shape (B, L, H, D): separate tensors, or strided views of one fused projection."""
    if fused:
        return split_qkv(_randn(gen, B, L, 3 * H * D, dtype=dtype), H)
    return tuple(_randn(gen, B, L, H, D, dtype=dtype) for _ in range(3))


def _padding_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] >= lengths[:, None].long()  # (B, L): True on padding


def _nan_cache(n_layers, B, H, C, D, dtype=torch.float32) -> KVCache:
    cache = KVCache.allocate(n_layers, B, H, C, D, dtype=dtype)
    cache.keys.fill_(NAN)
    cache.values.fill_(NAN)
    return cache


def _clone(cache: KVCache, dtype=None) -> KVCache:
    dtype = dtype or cache.dtype
    return KVCache(cache.keys.to(dtype).clone(), cache.values.to(dtype).clone(), cache.lengths.clone())


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _max_len_for_interpreter(B: int, H: int, max_programs: int = 40) -> int:
    """Longest sequence keeping the interpreted prefill at about ``max_programs`` 16-row programs."""
    return 16 * max(1, max_programs // (B * H))


def _draw_batch_heads_dim(data):
    """B (1-33), H (1-4) and a head dim of HEAD_DIMS: the sizes the prefill and decode parity tests draw."""
    return (data.draw(st.integers(1, 33), label="B"), data.draw(st.integers(1, 4), label="H"),
            data.draw(st.sampled_from(HEAD_DIMS), label="Dh"))


# -- prefill ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_prefill_matches_reference(backend, data):
    gen = _gen(data)
    B, H, D = _draw_batch_heads_dim(data)
    max_len = _max_len_for_interpreter(B, H) if backend == "triton" else 60
    L = data.draw(st.integers(1, min(max_len, 60)), label="L")
    fused = data.draw(st.booleans(), label="fused")
    with_cache = data.draw(st.booleans(), label="with_cache")
    sm_scale = data.draw(st.sampled_from([None, 0.25]), label="sm_scale")
    lengths = _draw_lengths(data, B, 1, L)

    q, k, v = _make_qkv(gen, B, L, H, D, fused)
    padding = _padding_mask(lengths, L)
    for t in (q, k, v):  # padding tokens must never reach a valid row
        _fill_unused(t, padding, backend, gen)

    cache = expected_cache = None
    layer = 0
    if with_cache:
        layer = data.draw(st.integers(0, 1), label="layer")
        cache = _nan_cache(2, B, H, L + data.draw(st.integers(0, 3), label="spare"), D)
        expected_cache = _clone(cache, torch.float64)
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, expected_cache, layer,
                                 sm_scale=sm_scale, backend="reference")

    out = torch.full((B, L, H, D), NAN)
    got = prefill_attention(q, k, v, lengths, cache, layer, sm_scale=sm_scale, backend=backend, out=out)
    assert got is out
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))  # padding rows exactly 0
    if with_cache:  # valid tokens copied exactly, everything else (NaN) untouched
        _assert_same_bits(cache.keys.double(), expected_cache.keys)
        _assert_same_bits(cache.values.double(), expected_cache.values)
        assert torch.equal(cache.lengths, torch.zeros(B, dtype=torch.int32))  # not the op's job


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_without_out_returns_a_fresh_tensor(backend):
    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    B, L, H, D = 3, 21, 2, 32
    q, k, v = _make_qkv(gen, B, L, H, D, fused=True)
    lengths = torch.tensor([21, 1, 9])
    got = prefill_attention(q, k, v, lengths, backend=backend)
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, backend="reference")
    assert got.shape == (B, L, H, D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, **FP32_TOL, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sm_scale", [0.0, -0.7])
def test_prefill_scale_zero_or_negative(backend, causal, sm_scale):
    """A scale <= 0 is attention like any other (0: uniform weights over the visible keys); PyTorch's
    fused causal CPU kernel returns NaN rows for one, so the CPU path must not hand it is_causal."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = _make_qkv(gen, 2, 6, 2, 4, fused=False)
    lengths = torch.tensor([6, 3])
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, sm_scale=sm_scale, causal=causal,
                                 backend="reference")
    got = prefill_attention(q, k, v, lengths, sm_scale=sm_scale, causal=causal, backend=backend)
    torch.testing.assert_close(got.double(), expected, **FP32_TOL)


# -- decode -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_decode_matches_reference(backend, data):
    gen = _gen(data)
    B, H, D = _draw_batch_heads_dim(data)
    if backend == "triton":  # interpreter: at most ~40 programs
        H = min(H, max(1, 40 // B))
    C = data.draw(st.integers(2, 40 if backend == "triton" else 70), label="capacity")
    n_layers = 2
    layer = data.draw(st.integers(0, n_layers - 1), label="layer")
    lengths = _draw_lengths(data, B, 1, C - 1)  # C - 1: the new token takes the last slot

    cache = _nan_cache(n_layers, B, H, C, D)
    cache.lengths.copy_(lengths)
    slots = torch.arange(C)[None, :]
    history = slots < lengths[:, None]  # (B, C)
    new_slot = slots == lengths[:, None]
    unused = slots > lengths[:, None]
    for t in (cache.keys[layer], cache.values[layer]):
        seen_as_bcxd = t.transpose(1, 2)  # (B, C, H, D)
        seen_as_bcxd[history] = _randn(gen, B, C, H, D)[history]
        _fill_unused(seen_as_bcxd, unused, backend, gen)
    assert cache.keys[layer].transpose(1, 2)[new_slot].isnan().all()  # must be written by the op

    q, k, v = (_randn(gen, B, H, D) for _ in range(3))
    if data.draw(st.booleans(), label="strided q/k/v"):  # views of a fused (B, 3, H, D) projection
        q, k, v = torch.stack([q, k, v], dim=1).unbind(1)
    expected_cache = _clone(cache, torch.float64)
    expected = decode_attention(q.double(), k.double(), v.double(), expected_cache, layer, backend="reference")

    out = torch.full((B, H, D), NAN)
    got = decode_attention(q, k, v, cache, layer, backend=backend, out=out)
    assert got is out
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)
    _assert_same_bits(cache.keys.double(), expected_cache.keys)
    _assert_same_bits(cache.values.double(), expected_cache.values)
    assert torch.equal(cache.lengths, lengths)  # the caller advances


# -- prefill + K decode steps == one prefill of the whole sequence --------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_decode_steps_equal_full_sequence_prefill(backend, data):
    gen = _gen(data)
    small = backend == "triton"
    B = data.draw(st.integers(1, 4 if small else 33), label="B")
    H = data.draw(st.integers(1, 2 if small else 4), label="H")
    D = data.draw(st.sampled_from(HEAD_DIMS), label="Dh")
    L = data.draw(st.integers(1, 20 if small else 50), label="L")
    K = data.draw(st.integers(0, 8), label="depth")
    lengths = _draw_lengths(data, B, 1, L)
    n_layers, layer = 2, data.draw(st.integers(0, 1), label="layer")
    full_lengths = lengths + K

    # Every user's whole token sequence (history, then K reasoning tokens), right-padded.
    q_all, k_all, v_all = _make_qkv(gen, B, L + K, H, D, fused=data.draw(st.booleans(), label="fused"))
    history_padding = _padding_mask(lengths, L)
    q_hist, k_hist, v_hist = (t[:, :L].clone() for t in (q_all, k_all, v_all))
    for t in (q_hist, k_hist, v_hist):  # positions past the history: padding in the prefill
        _fill_unused(t, history_padding, backend, gen)

    def fresh_cache():  # NaN where nothing should be read; the CPU backend reads zeros there
        cache = KVCache.allocate(n_layers, B, H, L + K, D)
        if backend != "cpu":
            cache.keys.fill_(NAN)
            cache.values.fill_(NAN)
        return cache

    # Incremental: prefill the history, then one decode step per reasoning token.
    cache = fresh_cache()
    prefill_out = prefill_attention(q_hist, k_hist, v_hist, lengths, cache, layer, backend=backend)
    cache.set_lengths(lengths)
    users = torch.arange(B)
    step_outs = []
    for s in range(K):
        pos = lengths.long() + s  # each user's s-th reasoning token
        step_outs.append(decode_attention(q_all[users, pos], k_all[users, pos], v_all[users, pos],
                                          cache, layer, backend=backend))
        cache.advance()
    assert torch.equal(cache.lengths, full_lengths)

    # At once: the whole sequence, same backend, and the float64 reference.
    full_cache = fresh_cache()
    full_out = prefill_attention(q_all, k_all, v_all, full_lengths, full_cache, layer, backend=backend)
    reference = prefill_attention(q_all.double(), k_all.double(), v_all.double(), full_lengths,
                                  backend="reference")

    for b in range(B):
        n, total = int(lengths[b]), int(full_lengths[b])
        # The cache holds the same K/V, bit for bit, wherever either run wrote.
        _assert_same_bits(cache.keys[layer, b, :, :total], full_cache.keys[layer, b, :, :total])
        _assert_same_bits(cache.values[layer, b, :, :total], full_cache.values[layer, b, :, :total])
        torch.testing.assert_close(prefill_out[b, :n], full_out[b, :n], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(prefill_out[b, :n].double(), reference[b, :n], **FP32_TOL)
        for s in range(K):
            torch.testing.assert_close(step_outs[s][b], full_out[b, n + s], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(step_outs[s][b].double(), reference[b, n + s], **FP32_TOL)


# -- low precision; Triton's other tile shapes ----------------------------------------------------

def _in_dtype_prefill(q, k, v, lengths, dtype, *, causal=True, sm_scale=None):
    """The reference's math run in ``dtype`` itself (no float32 upcast): PyTorch's own error there."""
    B, L, H, D = q.shape
    out = torch.zeros(B, L, H, D, dtype=dtype)
    visible = torch.ones(L, L, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    for b in range(B):
        n = int(lengths[b])
        heads_first = [x[b, :n].transpose(0, 1).to(dtype) for x in (q, k, v)]
        out[b, :n] = masked_softmax_attention(*heads_first, visible[:n, :n], scale).transpose(0, 1)
    return out


def _in_dtype_decode(q, cache: KVCache, layer, dtype, *, sm_scale=None):
    """One decode step of the reference's math in ``dtype``; the new token must already be cached."""
    B, H, D = q.shape
    out = torch.zeros(B, H, D, dtype=dtype)
    scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    for b in range(B):
        n = int(cache.lengths[b]) + 1
        keys, values = (t[layer, b, :, :n].to(dtype) for t in (cache.keys, cache.values))
        allowed = torch.ones(1, n, dtype=torch.bool)
        out[b] = masked_softmax_attention(q[b, :, None].to(dtype), keys, values, allowed, scale)[:, 0]
    return out


def assert_within_flash_attention_rule(out, expected, in_dtype, rows, what):
    """|out - expected| <= 2 |in_dtype - expected| + one unit in the last place of ``expected`` in the
    dtype, for the max and the mean over ``rows`` (a mask selecting the rows that carry an answer).
    One ulp, not half: Triton's interpreter rounds to bfloat16 toward zero, not to nearest."""
    errors = {name: (t.double() - expected)[rows].abs() for name, t in (("kernel", out), ("pytorch", in_dtype))}
    rounding = (expected.abs() * torch.finfo(out.dtype).eps)[rows]
    for stat in ("max", "mean"):
        kernel, pytorch = getattr(errors["kernel"], stat)().item(), getattr(errors["pytorch"], stat)().item()
        bound = 2 * pytorch + getattr(rounding, stat)().item()
        assert kernel <= bound, f"{what}: {stat} error {kernel:.3g} > 2 * {pytorch:.3g} (pytorch in {out.dtype}) + rounding"


LOW_PRECISION_SHAPES = [  # (B, L, H, Dh, lengths): odd sizes, ragged users, one full-length user
    (2, 19, 2, 48, [19, 6]),
    (3, 31, 1, 20, [1, 31, 17]),
    (1, 47, 3, 33, [47]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, L, H, D, lengths", LOW_PRECISION_SHAPES)
def test_low_precision(backend, dtype, B, L, H, D, lengths, device, seed=None):
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("backend 'cpu' takes CPU tensors only")
    seed = random.randrange(2 ** 31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    depth = 2
    lengths = torch.tensor(lengths, dtype=torch.int32)
    q, k, v = _make_qkv(gen, B, L, H, D, fused=True, dtype=dtype)
    cache = KVCache.allocate(1, B, H, L + depth, D, dtype=dtype, device=device)
    if backend == "triton":  # the CPU backend needs finite unused slots (see kv_cache.py)
        cache.keys.fill_(NAN)
        cache.values.fill_(NAN)
    expected_cache = _clone(cache, torch.float64)
    expected_cache = KVCache(expected_cache.keys.cpu(), expected_cache.values.cpu(), expected_cache.lengths.cpu())
    out = prefill_attention(*(t.to(device) for t in (q, k, v, lengths)), cache, 0, backend=backend).cpu()
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, expected_cache, 0,
                                 backend="reference")
    assert out.dtype == dtype
    valid = ~_padding_mask(lengths, L)
    assert_within_flash_attention_rule(out, expected, _in_dtype_prefill(q, k, v, lengths, dtype), valid,
                                       f"seed={seed} prefill {backend} {dtype}")
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))

    cache.set_lengths(lengths.to(device))
    expected_cache.set_lengths(lengths)
    for step in range(depth):
        qd, kd, vd = (_randn(gen, B, H, D, dtype=dtype) for _ in range(3))
        got = decode_attention(qd.to(device), kd.to(device), vd.to(device), cache, 0, backend=backend).cpu()
        want = decode_attention(qd.double(), kd.double(), vd.double(), expected_cache, 0, backend="reference")
        in_dtype = _in_dtype_decode(qd, expected_cache, 0, dtype)
        assert_within_flash_attention_rule(got, want, in_dtype, torch.ones(B, dtype=torch.bool),
                                           f"seed={seed} decode step {step} {backend} {dtype}")
        cache.advance()
        expected_cache.advance()
    _assert_same_bits(cache.keys.double().cpu(), expected_cache.keys)
    _assert_same_bits(cache.values.double().cpu(), expected_cache.values)


# The CPU backend's bfloat16 route (two matmuls, float32 softmax) and float16 (fused SDPA), on
# drawn shapes: against the float64 reference by FlashAttention's rule, outputs and cache poisoned.

def _poisoned_cpu_cache(n_layers, B, H, C, D, dtype, lengths, finite_until, gen) -> KVCache:
    """NaN everywhere, except finite junk in each user's slots lengths[b] .. finite_until-1: what the
    CPU backend may read with weight 0 (kv_cache.py). Slots past ``finite_until`` stay NaN."""
    cache = _nan_cache(n_layers, B, H, C, D, dtype)
    slots = torch.arange(C)[None, :]
    junk = (slots >= lengths[:, None].long()) & (slots < finite_until)  # (B, C)
    for t in (cache.keys, cache.values):
        for layer in range(n_layers):
            _fill_unused(t[layer].transpose(1, 2), junk, "cpu", gen)
    return cache


def _draw_users_heads(data) -> tuple[torch.Generator, int, int, int]:
    """A generator and (B, H, Dh) for the CPU low-precision tests: up to 19 users, 3 heads."""
    B, H = data.draw(st.integers(1, 19), label="B"), data.draw(st.integers(1, 3), label="H")
    return _gen(data), B, H, data.draw(st.sampled_from(HEAD_DIMS), label="Dh")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_cpu_low_precision_prefill_matches_reference(dtype, data):
    gen, B, H, D = _draw_users_heads(data)
    L = data.draw(st.integers(1, 47), label="L")
    causal = data.draw(st.booleans(), label="causal")
    sm_scale = data.draw(st.sampled_from([None, 0.05]), label="sm_scale")
    lengths = _draw_lengths(data, B, 1, L)
    q, k, v = _make_qkv(gen, B, L, H, D, fused=data.draw(st.booleans(), label="fused"), dtype=dtype)
    padding = _padding_mask(lengths, L)
    for t in (q, k, v):
        _fill_unused(t, padding, "cpu", gen)
    layer = data.draw(st.integers(0, 1), label="layer")
    cache = _nan_cache(2, B, H, L + data.draw(st.integers(0, 3), label="spare"), D, dtype)
    expected_cache = _clone(cache, torch.float64)

    out = torch.full((B, L, H, D), NAN, dtype=dtype)
    got = prefill_attention(q, k, v, lengths, cache, layer, sm_scale=sm_scale, causal=causal, backend="cpu", out=out)
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, expected_cache, layer,
                                 sm_scale=sm_scale, causal=causal, backend="reference")
    assert got is out and not out.isnan().any()
    in_dtype = _in_dtype_prefill(q, k, v, lengths, dtype, causal=causal, sm_scale=sm_scale)
    assert_within_flash_attention_rule(out, expected, in_dtype, ~padding, f"prefill cpu {dtype} causal={causal}")
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    _assert_same_bits(cache.keys.double(), expected_cache.keys)
    _assert_same_bits(cache.values.double(), expected_cache.values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_cpu_low_precision_decode_steps_equal_full_sequence(dtype, data):
    """Prefill + K decode steps on the cache, and one prefill of the whole sequence: each within the
    rule of the float64 reference, and the same cache bits. Spare capacity (NaN past every length
    the steps reach) takes the decode through both of its key spans (all slots, or the used ones)."""
    gen, B, H, D = _draw_users_heads(data)
    L = data.draw(st.integers(1, 40), label="L")
    K = data.draw(st.integers(1, 4), label="depth")
    spare = data.draw(st.sampled_from([0, 1, 7, 60]), label="spare capacity")
    sm_scale = data.draw(st.sampled_from([None, 0.05]), label="sm_scale")
    lengths = _draw_lengths(data, B, 1, L)
    full_lengths = lengths + K
    n_layers, layer = 2, data.draw(st.integers(0, 1), label="layer")
    q_all, k_all, v_all = _make_qkv(gen, B, L + K, H, D, fused=data.draw(st.booleans(), label="fused"), dtype=dtype)
    q_hist, k_hist, v_hist = (t[:, :L].clone() for t in (q_all, k_all, v_all))
    for t in (q_hist, k_hist, v_hist):
        _fill_unused(t, _padding_mask(lengths, L), "cpu", gen)

    finite_until = int(lengths.max()) + K
    cache = _poisoned_cpu_cache(n_layers, B, H, L + K + spare, D, dtype, lengths, finite_until, gen)
    reference_cache = _clone(cache, torch.float64)  # the reference reads no unused slot: NaN is fine
    out = torch.full((B, L, H, D), NAN, dtype=dtype)
    prefill_attention(q_hist, k_hist, v_hist, lengths, cache, layer, sm_scale=sm_scale, backend="cpu", out=out)
    prefill_attention(q_hist.double(), k_hist.double(), v_hist.double(), lengths, reference_cache, layer,
                      sm_scale=sm_scale, backend="reference")
    cache.set_lengths(lengths)
    reference_cache.set_lengths(lengths)
    users = torch.arange(B)
    for s in range(K):
        pos = lengths.long() + s
        q, k, v = q_all[users, pos], k_all[users, pos], v_all[users, pos]
        step_out = torch.full((B, H, D), NAN, dtype=dtype)
        assert decode_attention(q, k, v, cache, layer, sm_scale=sm_scale, backend="cpu", out=step_out) is step_out
        expected = decode_attention(q.double(), k.double(), v.double(), reference_cache, layer, sm_scale=sm_scale,
                                    backend="reference")
        in_dtype = _in_dtype_decode(q, reference_cache, layer, dtype, sm_scale=sm_scale)
        assert_within_flash_attention_rule(step_out, expected, in_dtype, torch.ones(B, dtype=torch.bool),
                                           f"decode step {s} cpu {dtype}")
        _assert_same_bits(cache.keys.double(), reference_cache.keys)  # the new slot, nothing else
        _assert_same_bits(cache.values.double(), reference_cache.values)
        cache.advance()
        reference_cache.advance()

    full_cache = _poisoned_cpu_cache(n_layers, B, H, L + K + spare, D, dtype, full_lengths, finite_until, gen)
    full_out = prefill_attention(q_all, k_all, v_all, full_lengths, full_cache, layer, sm_scale=sm_scale,
                                 backend="cpu")
    reference = prefill_attention(q_all.double(), k_all.double(), v_all.double(), full_lengths, sm_scale=sm_scale,
                                  backend="reference")
    valid = ~_padding_mask(full_lengths, L + K)
    in_dtype = _in_dtype_prefill(q_all, k_all, v_all, full_lengths, dtype, sm_scale=sm_scale)
    assert_within_flash_attention_rule(full_out, reference, in_dtype, valid, f"full-sequence prefill cpu {dtype}")
    for b in range(B):
        n, total = int(lengths[b]), int(full_lengths[b])
        _assert_same_bits(cache.keys[layer, b, :, :total], full_cache.keys[layer, b, :, :total])
        _assert_same_bits(cache.values[layer, b, :, :total], full_cache.values[layer, b, :, :total])
        assert not out[b, :n].isnan().any() and torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))
    assert torch.equal(cache.lengths, full_lengths)


@pytest.mark.parametrize("block_m, block_n", gpu_tiles(attention_triton, attention_triton.prefill_config))
def test_triton_prefill_other_tiles(block_m, block_n):
    """Every GPU prefill tile (head dims 1..256, ragged ones included), run under the interpreter at a
    ragged head dim."""
    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    B, L, H, D = 2, 70, 1, 24
    lengths = torch.tensor([70, 33], dtype=torch.int32)
    q, k, v = _make_qkv(gen, B, L, H, D, fused=False)
    cache = _nan_cache(1, B, H, L, D)
    expected_cache = _clone(cache, torch.float64)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    out = torch.full_like(q, NAN)  # poisoned: every element must be written by the kernel
    attention_triton.prefill_attention(q, k, v, lengths, cache, 0, out=out, config=config)
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, expected_cache, 0,
                                 backend="reference")
    torch.testing.assert_close(out.double(), expected, **FP32_TOL, msg=lambda m: f"seed={seed}: {m}")
    _assert_same_bits(cache.keys.double(), expected_cache.keys)


@pytest.mark.parametrize("block_n", [tile[0] for tile in gpu_tiles(attention_triton, attention_triton.decode_config)])
@pytest.mark.parametrize("D", [128, 40])  # 40: ragged
def test_triton_decode_other_tiles(block_n, D):
    """Every GPU decode tile, under the interpreter."""
    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    B, H, C = 2, 1, 150
    cache = _nan_cache(1, B, H, C, D)
    lengths = torch.tensor([149, 70], dtype=torch.int32)
    cache.lengths.copy_(lengths)
    for t in (cache.keys[0], cache.values[0]):
        t[0, :, :149] = _randn(gen, H, 149, D)
        t[1, :, :70] = _randn(gen, H, 70, D)
    q, k, v = (_randn(gen, B, H, D) for _ in range(3))
    expected_cache = _clone(cache, torch.float64)
    expected = decode_attention(q.double(), k.double(), v.double(), expected_cache, 0, backend="reference")
    out = torch.full_like(q, NAN)  # poisoned: every element must be written by the kernel
    attention_triton.decode_attention(q, k, v, cache, 0, out=out, config=dict(BLOCK_N=block_n, num_warps=4, num_stages=2))
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)
    _assert_same_bits(cache.keys.double(), expected_cache.keys)


# -- KVCache ------------------------------------------------------------------------------------------

def test_kv_cache_allocate_and_advance():
    cache = KVCache.allocate(3, 5, 2, 11, 16, dtype=torch.float64)
    assert cache.keys.shape == cache.values.shape == (3, 5, 2, 11, 16)
    assert cache.keys.dtype == torch.float64 and cache.lengths.dtype == torch.int32
    assert (cache.n_layers, cache.batch_size, cache.n_heads, cache.capacity, cache.head_dim) == (3, 5, 2, 11, 16)
    assert not cache.keys.any() and not cache.values.any() and not cache.lengths.any()
    cache.set_lengths(torch.tensor([1, 2, 3, 4, 5]))
    assert cache.advance() is cache
    assert cache.lengths.tolist() == [2, 3, 4, 5, 6] and cache.lengths.dtype == torch.int32
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        KVCache.allocate(1, 0, 2, 4, 16)
    for bad in (2.5, "2", None, True):  # not an int: named, not a TypeError from torch.zeros
        with pytest.raises(ValueError, match=f"KVCache.allocate: capacity must be an int, got {bad!r}"):
            KVCache.allocate(1, 2, 2, bad, 16)
    cache = KVCache.allocate(1, 2, 2, 4, 16)
    for bad in (torch.tensor([1.9, 2.0]), torch.tensor([3]), torch.tensor([[1, 2]]), [1, 2], torch.tensor([True, False])):
        # copy_ would truncate 1.9 to 1 and broadcast [3] to both users
        with pytest.raises(ValueError, match=r"KVCache.set_lengths: lengths must be an integer tensor of shape \(2,\)"):
            cache.set_lengths(bad)
    assert cache.set_lengths(torch.tensor([1, 3], dtype=torch.int32)).lengths.tolist() == [1, 3]
    # store: a 3-D tensor was "not enough values to unpack", layer -1 wrote the last layer, integers were cast
    kv = torch.ones(2, 3, 2, 16)
    for args, match in (((0, kv[..., 0], kv), r"keys must be a \(B, L, H, Dh\) tensor, got \(2, 3, 2\)"),
                        ((-1, kv, kv), r"layer must be an int in \[0, 1\), got -1"),
                        ((1, kv, kv), r"layer must be an int in \[0, 1\), got 1"),
                        ((0, kv, kv.long()), "values are torch.int64 on cpu, the cache torch.float32")):
        with pytest.raises(ValueError, match=f"KVCache.store: {match}"):
            cache.store(*args)
    assert cache.store(0, kv, 2 * kv).values[0, :, :, :3].eq(2).all()
    assert cache.store(np.int64(0), 3 * kv, kv).keys[0, :, :, :3].eq(3).all()  # numpy's ints, as the ops take them
    with pytest.raises(ValueError, match="KVCache.store: layer must be an int"):
        cache.store(0.0, kv, kv)


def test_prefill_without_a_cache_ignores_layer():
    """layer names the cache layer to fill: without a cache, None (or 1.5) was a bare TypeError."""
    x = torch.randn(1, 3, 1, 16)
    want = prefill_attention(x, x, x, torch.tensor([3]), backend="cpu")
    assert torch.equal(prefill_attention(x, x, x, torch.tensor([3]), None, None, backend="cpu"), want)


# -- lengths out of range (issue 16) ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bad", [0, -1, -7, 6])
def test_prefill_rejects_lengths_out_of_range(backend, bad):
    x = torch.zeros(2, 5, 1, 16)
    with pytest.raises(ValueError, match=r"prefill_attention: lengths must lie in \[1, 5\] .*got values in"):
        prefill_attention(x, x, x, torch.tensor([5, bad]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bad", [-1, -100, 4, 9])
def test_decode_rejects_lengths_out_of_range(backend, bad):
    x = torch.zeros(2, 1, 16)
    cache = KVCache.allocate(1, 2, 1, 4, 16).set_lengths(torch.tensor([1, bad]))
    with pytest.raises(ValueError, match=r"decode_attention: cache.lengths must lie in \[0, 3\] .*free slot"):
        decode_attention(x, x, x, cache, 0, backend=backend)


GUARD = 7.0  # a value no op writes: guard slots around the cache must keep it


def _guarded_cache(n_layers, B, H, C, D, guard, device):
    """A NaN-filled cache whose slots are a view inside a larger buffer: ``guard`` slots before and
    after every (layer, user, head) row hold GUARD, so a write one row out of bounds lands there."""
    keys, values = (torch.full((n_layers, B, H, C + 2 * guard, D), GUARD, device=device) for _ in range(2))
    cache = KVCache(keys[:, :, :, guard:guard + C], values[:, :, :, guard:guard + C],
                    torch.zeros(B, dtype=torch.int32, device=device))
    cache.keys.fill_(NAN)
    cache.values.fill_(NAN)
    return cache, keys, values


def test_triton_decode_kernel_stays_in_bounds_for_bad_lengths(device):
    # The dispatcher rejects these wherever it can read lengths (above); on CUDA it cannot without a
    # host sync, so the kernel itself must neither write nor read out of bounds: called directly here.
    B, H, C, D, guard = 5, 2, 6, 16, 8
    gen = torch.Generator().manual_seed(1)
    cache, keys, values = _guarded_cache(1, B, H, C, D, guard, device)
    lengths = torch.tensor([-1, -guard, C, C + 3, 2], dtype=torch.int32)
    cache.keys[0, 4, :, :2] = _randn(gen, H, 2, D).to(device)
    cache.values[0, 4, :, :2] = _randn(gen, H, 2, D).to(device)
    cache.set_lengths(lengths.to(device))
    expected_cache = KVCache(cache.keys[:, 4:].double().cpu(), cache.values[:, 4:].double().cpu(), lengths[4:])
    q, k, v = (_randn(gen, B, H, D).to(device) for _ in range(3))
    out = attention_triton.decode_attention(q, k, v, cache, 0)

    assert out[:4].isnan().all(), "a user with an out-of-range length must get NaN, not an answer"
    expected = decode_attention(q[4:].double().cpu(), k[4:].double().cpu(), v[4:].double().cpu(), expected_cache,
                                0, backend="reference")
    torch.testing.assert_close(out[4:].double().cpu(), expected, **FP32_TOL)
    for full in (keys, values):
        outside = torch.ones(full.shape[3], dtype=torch.bool)
        outside[guard:guard + C] = False
        assert (full[:, :, :, outside] == GUARD).all(), "a write landed outside the cache"
    assert cache.keys[:, :4].isnan().all() and cache.values[:, :4].isnan().all(), "a bad user's row was written"


def test_triton_prefill_kernel_stays_in_bounds_for_bad_lengths(device):
    B, L, H, D, guard = 5, 20, 1, 16, 4
    gen = torch.Generator().manual_seed(2)
    cache, keys, values = _guarded_cache(1, B, H, L, D, guard, device)
    # int64 lengths; 2^32 + 3 would pass as 3 if narrowed to int32 before the check
    lengths = torch.tensor([0, -3, L + 5, 2 ** 32 + 3, 9], dtype=torch.int64, device=device)
    q, k, v = (_randn(gen, B, L, H, D).to(device) for _ in range(3))
    out = attention_triton.prefill_attention(q, k, v, lengths, cache, 0)

    assert out[:4].isnan().all(), "a user with an out-of-range length must get NaN, not an answer"
    expected = prefill_attention(q[4:].double().cpu(), k[4:].double().cpu(), v[4:].double().cpu(),
                                 lengths[4:].cpu(), backend="reference")
    torch.testing.assert_close(out[4:].double().cpu(), expected, **FP32_TOL)
    for full in (keys, values):
        assert (full[..., :guard, :] == GUARD).all() and (full[..., guard + L:, :] == GUARD).all()
    assert cache.keys[:, :4].isnan().all() and cache.keys[:, 4, :, 9:].isnan().all()


# -- bad input ------------------------------------------------------------------------------------------

def _bad_prefill_calls():
    B, L, H, D = 2, 5, 2, 16
    x = torch.zeros(B, L, H, D)
    n = torch.tensor([5, 3])
    cache = KVCache.allocate(1, B, H, L, D)
    return {
        "q is 3-D": (lambda: prefill_attention(x[0], x[0], x[0], n), r"q must be \(B, L, H, Dh\)"),
        "k shape differs": (lambda: prefill_attention(x, x[:, :4], x, n), "k must be|one shape"),
        "dtype differs": (lambda: prefill_attention(x, x.double(), x, n), "one dtype"),
        "integer q": (lambda: prefill_attention(x.long(), x.long(), x.long(), n), "q must be float16"),
        "float lengths": (lambda: prefill_attention(x, x, x, n.float()), "lengths must be an integer tensor"),
        "lengths shape": (lambda: prefill_attention(x, x, x, n[:1]), r"lengths must have shape \(2,\)"),
        "cache heads": (lambda: prefill_attention(x, x, x, n, KVCache.allocate(1, B, 3, L, D)),
                        r"cache.keys must be \(n_layers, 2, 2, capacity, 16\)"),
        "cache dtype": (lambda: prefill_attention(x, x, x, n, KVCache.allocate(1, B, H, L, D, dtype=torch.float64)),
                        "cache.keys has dtype torch.float64"),
        "cache too short": (lambda: prefill_attention(x, x, x, n, KVCache.allocate(1, B, H, L - 1, D)),
                            "cache capacity 4 < sequence length 5"),
        "layer out of range": (lambda: prefill_attention(x, x, x, n, cache, 1), r"layer must be an int in \[0, 1\)"),
        "not a cache": (lambda: prefill_attention(x, x, x, n, (cache.keys, cache.values)), "cache must be a KVCache"),
        "out shape": (lambda: prefill_attention(x, x, x, n, out=torch.empty(B, L, H, D + 1)), "out must be a"),
        "sm_scale": (lambda: prefill_attention(x, x, x, n, sm_scale="big"), "sm_scale must be a real number"),
        "sm_scale as text": (lambda: prefill_attention(x, x, x, n, sm_scale="0.5"), "sm_scale must be a real number"),
        "sm_scale a bool": (lambda: prefill_attention(x, x, x, n, sm_scale=True), "sm_scale must be a real number"),
        "sm_scale inf": (lambda: prefill_attention(x, x, x, n, sm_scale=float("inf")), "sm_scale must be finite"),
        "sm_scale NaN": (lambda: prefill_attention(x, x, x, n, sm_scale=float("nan")), "sm_scale must be finite"),
        "unknown backend": (lambda: prefill_attention(x, x, x, n, backend="cuda-magic"), "unknown kernel backend"),
        "triton head dim > 256": (lambda: prefill_attention(*(torch.zeros(1, 2, 1, 512),) * 3, torch.tensor([2]),
                                                            backend="triton"), "head dims up to 256, got 512"),
        "triton float64": (lambda: prefill_attention(x.double(), x.double(), x.double(), n, backend="triton"),
                           "Triton backend takes float16/bfloat16/float32"),
        "split_qkv width": (lambda: split_qkv(torch.zeros(B, L, 100), 3), "not a multiple of 3 \\* n_heads"),
    }


def _bad_decode_calls():
    B, H, C, D = 2, 2, 4, 16
    x = torch.zeros(B, H, D)
    cache = KVCache.allocate(2, B, H, C, D)
    full = KVCache.allocate(1, B, H, C, D).set_lengths(torch.tensor([1, C]))
    return {
        "q is 4-D": (lambda: decode_attention(x[:, None], x[:, None], x[:, None], cache, 0), r"q must be \(B, H, Dh\)"),
        "v shape differs": (lambda: decode_attention(x, x, x[:, :1], cache, 0), "one shape"),
        "cache batch": (lambda: decode_attention(x, x, x, KVCache.allocate(1, B + 1, H, C, D), 0),
                        r"cache.keys must be \(n_layers, 2, 2, capacity, 16\)"),
        "cache head dim": (lambda: decode_attention(x, x, x, KVCache.allocate(1, B, H, C, D * 2), 0),
                           r"cache.keys must be \(n_layers, 2, 2, capacity, 16\)"),
        "layer out of range": (lambda: decode_attention(x, x, x, cache, 2), r"layer must be an int in \[0, 2\)"),
        "layer negative": (lambda: decode_attention(x, x, x, cache, -1), r"layer must be an int in \[0, 2\)"),
        "cache full": (lambda: decode_attention(x, x, x, full, 0), "the new token needs a free slot"),
        "float cache.lengths": (lambda: decode_attention(x, x, x, KVCache(cache.keys, cache.values,
                                                                          cache.lengths.float()), 0),
                                "cache.lengths must be an integer tensor"),
        "out dtype": (lambda: decode_attention(x, x, x, cache, 0, out=torch.empty(B, H, D, dtype=torch.float64)),
                      "out must be a"),
        "sm_scale inf": (lambda: decode_attention(x, x, x, cache, 0, sm_scale=-float("inf")), "sm_scale must be finite"),
    }


@pytest.mark.parametrize("case", sorted(_bad_prefill_calls()))
def test_prefill_rejects_bad_input(case):
    call, match = _bad_prefill_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("case", sorted(_bad_decode_calls()))
def test_decode_rejects_bad_input(case):
    call, match = _bad_decode_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _make_qkv(gen, 2, 6, 1, 25, fused=False)
    n = torch.tensor([6, 4])
    a = prefill_attention(q, k, v, n, backend="reference")
    b = prefill_attention(q, k, v, n, sm_scale=1 / math.sqrt(25), backend="reference")
    assert torch.equal(a, b)


@pytest.mark.skipif(not triton_available(), reason="needs triton (interpreter)")
def test_triton_writes_an_out_of_non_unit_last_stride_through_a_contiguous_result(monkeypatch):
    """The Triton kernels index an output's features in int32: an ``out`` whose last stride is not 1 (a
    view like ``buffer[..., ::2]``) reaches them as a contiguous result copied into it, with the right values."""
    gen = torch.Generator().manual_seed(11)
    B, L, H, D = 2, 5, 1, 16
    q, k, v = _make_qkv(gen, B, L, H, D, fused=False)
    lengths = torch.tensor([5, 3])
    strides = []
    for name in ("prefill_attention", "decode_attention"):
        kernel = getattr(attention_triton, name)
        monkeypatch.setattr(attention_triton, name, lambda *a, _kernel=kernel, **kw: strides.append(
            None if kw["out"] is None else kw["out"].stride(-1)) or _kernel(*a, **kw))
    buffer = torch.full((B, L, H, 2 * D), NAN)
    out = buffer[..., ::2]
    cache, expected_cache = KVCache.allocate(1, B, H, L + 1, D), KVCache.allocate(1, B, H, L + 1, D, dtype=torch.float64)
    got = prefill_attention(q, k, v, lengths, cache, 0, backend="triton", out=out)
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, expected_cache, 0, backend="reference")
    assert got is out and not out.isnan().any() and buffer[..., 1::2].isnan().all()
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)
    cache.set_lengths(lengths)
    expected_cache.set_lengths(lengths)
    step = _randn(gen, B, H, D)
    buffer = torch.full((B, H, 3 * D), NAN)
    out = buffer[..., ::3]
    got = decode_attention(step, step, step, cache, 0, backend="triton", out=out)
    expected = decode_attention(*(step.double(),) * 3, expected_cache, 0, backend="reference")
    assert got is out and not out.isnan().any() and buffer[..., 1::3].isnan().all()
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)
    assert strides == [None, None]


def test_cpu_paths_return_q_dtype_under_autocast():
    """Under CPU bf16 autocast the CPU paths' products run in bfloat16 and returned bfloat16 for float32
    q, against the contract ("in q's dtype") and the reference; prefill, decode and the autograd op."""
    from rearec_kernels.attention_autograd import prefill_attention_autograd
    gen = torch.Generator().manual_seed(4)
    q, k, v = _make_qkv(gen, 2, 5, 2, 16, fused=False)
    n = torch.tensor([5, 3])
    cache = KVCache.allocate(1, 2, 2, 8, 16)
    want = prefill_attention(q.double(), k.double(), v.double(), n, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prefill_attention(q, k, v, n, cache, 0, backend="cpu")
        trained = prefill_attention_autograd(q, k, v, n, backend="cpu")
        cache.set_lengths(n)
        step = decode_attention(q[:, 0], k[:, 0], v[:, 0], cache, 0, backend="cpu")
    assert got.dtype == trained.dtype == step.dtype == torch.float32
    valid = torch.arange(5)[None, :] < n[:, None]
    torch.testing.assert_close(got.double()[valid], want[valid], atol=5e-2, rtol=0)  # bf16 products
    torch.testing.assert_close(trained.double()[valid], want[valid], atol=5e-2, rtol=0)
