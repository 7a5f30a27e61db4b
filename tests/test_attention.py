"""Tests for rearec_kernels.attention: prefill and decode with a KV cache, every backend.

The Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before any kernel
is defined), so their cases stay small: few programs, short loops. The ground truth is the reference
backend in float64.

Poisoning: outputs go into ``out=`` buffers prefilled with NaN, and every cache slot an op must not
write is prefilled with NaN, so an element left unwritten (or written where it must not be) fails.
The CPU backend needs finite padding tokens and finite unused cache slots (see
``rearec_kernels/kv_cache.py``), so for it those hold large finite junk instead: reading one with a
nonzero weight would still show in the outputs.

Tolerances, against float64: float32 1e-5 (abs and rel); float16 2e-3; bfloat16 2e-2 (the kernels
round the softmax weights to the input dtype before the PV product, as FlashAttention does).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before rearec_kernels.attention_triton defines its kernels

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rearec_kernels import attention_triton  # noqa: E402

if not type(attention_triton._prefill_kernel).__name__.startswith("Interpreted"):
    # Imported (compiled) before this module set TRITON_INTERPRET: define the kernels again.
    importlib.reload(attention_triton)
from rearec_kernels.attention import decode_attention, prefill_attention, split_qkv  # noqa: E402
from rearec_kernels.backend import triton_available  # noqa: E402
from rearec_kernels.kv_cache import KVCache  # noqa: E402

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
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


# -- prefill ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_prefill_matches_reference(backend, data):
    gen = _gen(data)
    B = data.draw(st.integers(1, 33), label="B")
    H = data.draw(st.integers(1, 4), label="H")
    D = data.draw(st.sampled_from(HEAD_DIMS), label="Dh")
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
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))  # padding rows exactly 0
    if with_cache:  # valid tokens copied exactly, everything else (NaN) untouched
        _assert_same_bits(cache.keys.double(), expected_cache.keys)
        _assert_same_bits(cache.values.double(), expected_cache.values)
        assert torch.equal(cache.lengths, torch.zeros(B, dtype=torch.int32))  # not the op's job


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_without_out_returns_a_fresh_tensor(backend):
    gen = torch.Generator().manual_seed(7)
    B, L, H, D = 3, 21, 2, 32
    q, k, v = _make_qkv(gen, B, L, H, D, fused=True)
    lengths = torch.tensor([21, 1, 9])
    got = prefill_attention(q, k, v, lengths, backend=backend)
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, backend="reference")
    assert got.shape == (B, L, H, D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, **TOL[torch.float32])


# -- decode -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_decode_matches_reference(backend, data):
    gen = _gen(data)
    B = data.draw(st.integers(1, 33), label="B")
    H = data.draw(st.integers(1, 4), label="H")
    if backend == "triton":  # interpreter: at most ~40 programs
        H = min(H, max(1, 40 // B))
    D = data.draw(st.sampled_from(HEAD_DIMS), label="Dh")
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
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])
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
        torch.testing.assert_close(prefill_out[b, :n].double(), reference[b, :n], **TOL[torch.float32])
        for s in range(K):
            torch.testing.assert_close(step_outs[s][b], full_out[b, n + s], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(step_outs[s][b].double(), reference[b, n + s], **TOL[torch.float32])


# -- Triton specifics: low precision, other tile shapes ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    gen = torch.Generator().manual_seed(11)
    B, L, H, D, K = 2, 19, 2, 48, 2
    lengths = torch.tensor([19, 6], dtype=torch.int32)
    q, k, v = _make_qkv(gen, B, L, H, D, fused=True, dtype=dtype)
    cache = _nan_cache(1, B, H, L + K, D, dtype=dtype)
    expected_cache = _clone(cache, torch.float64)
    out = prefill_attention(q, k, v, lengths, cache, 0, backend="triton")
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, expected_cache, 0,
                                 backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    cache.set_lengths(lengths)
    expected_cache.set_lengths(lengths)
    for _ in range(K):
        qd, kd, vd = (_randn(gen, B, H, D, dtype=dtype) for _ in range(3))
        got = decode_attention(qd, kd, vd, cache, 0, backend="triton")
        want = decode_attention(qd.double(), kd.double(), vd.double(), expected_cache, 0, backend="reference")
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
        cache.advance()
        expected_cache.advance()
    _assert_same_bits(cache.keys.double(), expected_cache.keys)
    _assert_same_bits(cache.values.double(), expected_cache.values)


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (64, 64)])
def test_triton_prefill_other_tiles(block_m, block_n):
    """The GPU tile shapes (and BLOCK_M > BLOCK_N), run under the interpreter."""
    gen = torch.Generator().manual_seed(block_m + block_n)
    B, L, H, D = 2, 70, 1, 24
    lengths = torch.tensor([70, 33], dtype=torch.int32)
    q, k, v = _make_qkv(gen, B, L, H, D, fused=False)
    cache = _nan_cache(1, B, H, L, D)
    expected_cache = _clone(cache, torch.float64)
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    out = attention_triton.prefill_attention(q, k, v, lengths, cache, 0, config=config)
    expected = prefill_attention(q.double(), k.double(), v.double(), lengths, expected_cache, 0,
                                 backend="reference")
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])
    _assert_same_bits(cache.keys.double(), expected_cache.keys)


def test_triton_decode_other_tiles():
    gen = torch.Generator().manual_seed(5)
    B, H, C, D = 2, 1, 150, 128
    cache = _nan_cache(1, B, H, C, D)
    lengths = torch.tensor([149, 70], dtype=torch.int32)
    cache.lengths.copy_(lengths)
    for t in (cache.keys[0], cache.values[0]):
        t[0, :, :149] = _randn(gen, H, 149, D)
        t[1, :, :70] = _randn(gen, H, 70, D)
    q, k, v = (_randn(gen, B, H, D) for _ in range(3))
    expected_cache = _clone(cache, torch.float64)
    expected = decode_attention(q.double(), k.double(), v.double(), expected_cache, 0, backend="reference")
    out = attention_triton.decode_attention(q, k, v, cache, 0, config=dict(BLOCK_N=64, num_warps=4, num_stages=2))
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])
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
    with pytest.raises(ValueError):
        KVCache.allocate(1, 0, 2, 4, 16)


# -- bad input ------------------------------------------------------------------------------------------

def _bad_prefill_calls():
    B, L, H, D = 2, 5, 2, 16
    x = torch.zeros(B, L, H, D)
    n = torch.tensor([5, 3])
    cache = KVCache.allocate(1, B, H, L, D)
    return {
        "q is 3-D": lambda: prefill_attention(x[0], x[0], x[0], n),
        "k shape differs": lambda: prefill_attention(x, x[:, :4], x, n),
        "dtype differs": lambda: prefill_attention(x, x.double(), x, n),
        "integer q": lambda: prefill_attention(x.long(), x.long(), x.long(), n),
        "float lengths": lambda: prefill_attention(x, x, x, n.float()),
        "lengths shape": lambda: prefill_attention(x, x, x, n[:1]),
        "length 0": lambda: prefill_attention(x, x, x, torch.tensor([5, 0])),
        "length > L": lambda: prefill_attention(x, x, x, torch.tensor([6, 1])),
        "cache heads": lambda: prefill_attention(x, x, x, n, KVCache.allocate(1, B, 3, L, D)),
        "cache dtype": lambda: prefill_attention(x, x, x, n, KVCache.allocate(1, B, H, L, D, dtype=torch.float64)),
        "cache too short": lambda: prefill_attention(x, x, x, n, KVCache.allocate(1, B, H, L - 1, D)),
        "layer out of range": lambda: prefill_attention(x, x, x, n, cache, 1),
        "not a cache": lambda: prefill_attention(x, x, x, n, (cache.keys, cache.values)),
        "out shape": lambda: prefill_attention(x, x, x, n, out=torch.empty(B, L, H, D + 1)),
        "sm_scale": lambda: prefill_attention(x, x, x, n, sm_scale="big"),
        "unknown backend": lambda: prefill_attention(x, x, x, n, backend="cuda-magic"),
        "triton head dim > 256": lambda: prefill_attention(*(torch.zeros(1, 2, 1, 512),) * 3, torch.tensor([2]),
                                                           backend="triton"),
        "triton float64": lambda: prefill_attention(x.double(), x.double(), x.double(), n, backend="triton"),
        "split_qkv width": lambda: split_qkv(torch.zeros(B, L, 100), 3),
    }


def _bad_decode_calls():
    B, H, C, D = 2, 2, 4, 16
    x = torch.zeros(B, H, D)
    cache = KVCache.allocate(2, B, H, C, D)
    full = KVCache.allocate(1, B, H, C, D).set_lengths(torch.tensor([1, C]))
    return {
        "q is 4-D": lambda: decode_attention(x[:, None], x[:, None], x[:, None], cache, 0),
        "v shape differs": lambda: decode_attention(x, x, x[:, :1], cache, 0),
        "cache batch": lambda: decode_attention(x, x, x, KVCache.allocate(1, B + 1, H, C, D), 0),
        "cache head dim": lambda: decode_attention(x, x, x, KVCache.allocate(1, B, H, C, D * 2), 0),
        "layer out of range": lambda: decode_attention(x, x, x, cache, 2),
        "layer negative": lambda: decode_attention(x, x, x, cache, -1),
        "cache full": lambda: decode_attention(x, x, x, full, 0),
        "float cache.lengths": lambda: decode_attention(
            x, x, x, KVCache(cache.keys, cache.values, cache.lengths.float()), 0),
        "out dtype": lambda: decode_attention(x, x, x, cache, 0, out=torch.empty(B, H, D, dtype=torch.float64)),
    }


@pytest.mark.parametrize("case", sorted(_bad_prefill_calls()))
def test_prefill_rejects_bad_input(case):
    with pytest.raises(ValueError):
        _bad_prefill_calls()[case]()


@pytest.mark.parametrize("case", sorted(_bad_decode_calls()))
def test_decode_rejects_bad_input(case):
    with pytest.raises(ValueError):
        _bad_decode_calls()[case]()


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _make_qkv(gen, 2, 6, 1, 25, fused=False)
    n = torch.tensor([6, 4])
    a = prefill_attention(q, k, v, n, backend="reference")
    b = prefill_attention(q, k, v, n, sm_scale=1 / math.sqrt(25), backend="reference")
    assert torch.equal(a, b)
