"""Fused top-K scoring: the CPU and Triton (interpreted) backends against the PyTorch reference.

Most inputs hold small integers, so every dot product is exact in float32 whatever the summation
order: results must then be IDENTICAL to the reference, indices and values, ties included (small
integers tie often, and duplicated table rows force ties). One test uses Gaussian data against a
float64 reference with a tolerance. Inputs are fresh random draws each run; the seed is in every
failure message. Intermediate buffers are poisoned (NaN / garbage) before the kernels write them.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel runs: Triton on CPU tensors

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec_kernels import topk_cpu, topk_triton
from rearec_kernels.topk import fused_topk
from rearec_kernels.topk_cpu import fused_topk_cpu
from rearec_kernels.topk_reference import fused_topk_reference

BACKENDS = ["cpu", "triton"]

# Triton 3.6's interpreter itself trips a NumPy deprecation on every scalar load; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(topk_cpu, "poison_buffers", True)
    monkeypatch.setattr(topk_triton, "poison_buffers", True)


def make(B, N, d, *, M=0, lo=-3, hi=4, dtype=torch.float32, seed=None, dup=False):
    """Integer-valued queries/table (exact dot products) and a padded exclusion list."""
    seed = random.randrange(2 ** 31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi, (B, d), generator=g).to(dtype)
    e = torch.randint(lo, hi, (N, d), generator=g).to(dtype)
    if dup and N > 1:  # copy random rows over others: exact duplicate scores at many indices
        src = torch.randint(0, N, (N // 2,), generator=g)
        dst = torch.randint(0, N, (N // 2,), generator=g)
        e[dst] = e[src]
    ex = None
    if M > 0:
        ex = torch.randint(-1, N, (B, M), generator=g)  # -1: empty slots
    return q, e, ex, seed


def check(q, e, k, *, scale=1.0, exclude=None, backend, seed, ref_q=None):
    v, i = fused_topk(q, e, k, scale=scale, exclude=exclude, backend=backend)
    rv, ri = fused_topk_reference(q if ref_q is None else ref_q, e, k, scale, exclude)
    assert v.shape == (q.shape[0], k) and i.shape == (q.shape[0], k), f"seed={seed}"
    assert i.dtype == torch.int64 and v.dtype == rv.dtype, f"seed={seed}"
    assert torch.equal(i, ri), f"seed={seed} backend={backend}: indices differ\n{i}\n{ri}"
    assert torch.equal(v, rv), f"seed={seed} backend={backend}: values differ"
    if exclude is not None:
        hit = (i[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)
        assert not hit.any(), f"seed={seed}: an excluded item was returned"
    return v, i


# ---------------------------------------------------------------------------- shapes and edge cases

CASES = [
    # (B, N, d, k, M)
    (3, 1000, 32, 5, 0),      # Triton: filtered path (N >> k), N not a multiple of any tile
    (4, 1003, 20, 10, 3),     # ragged d, exclusions
    (2, 77, 16, 1, 0),        # k = 1
    (2, 77, 16, 77, 0),       # k = N
    (2, 77, 16, 90, 0),       # k > N: -1/-inf tail
    (1, 500, 33, 7, 2),       # B = 1
    (5, 64, 8, 64, 5),        # k = N with exclusions: the tail is -1
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N,d,k,M", CASES)
def test_matches_reference(backend, B, N, d, k, M):
    q, e, ex, seed = make(B, N, d, M=M)
    check(q, e, k, exclude=ex, backend=backend, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows(backend):
    q, e, ex, seed = make(257, 90 if backend == "triton" else 3000, 16, M=2)
    check(q, e, 7, exclude=ex, backend=backend, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_prefer_lower_index(backend):
    # Few distinct values and duplicated rows: most of each top-k is decided by the tie rule.
    q, e, ex, seed = make(6, 600, 4, lo=-1, hi=2, dup=True)
    check(q, e, 20, backend=backend, seed=seed)
    # An all-equal table: the answer is items 0..k-1 (Triton: every item ties at the threshold,
    # so the candidate lists overflow and the fallback kernel redoes those rows).
    e = torch.ones(300, 4)
    v, i = check(q, e, 9, backend=backend, seed=seed)
    assert torch.equal(i, torch.arange(9).expand(6, 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusion_removes_true_top1(backend):
    q, e, _, seed = make(4, 800, 16)
    _, ri = fused_topk_reference(q, e, 3)
    ex = torch.cat([ri[:, :1], torch.full((4, 2), -1)], dim=1)  # the top-1, then empty slots
    ex[0] = -1  # an entirely empty exclusion row
    v, i = check(q, e, 3, exclude=ex, backend=backend, seed=seed)
    assert (i[1:, 0] != ri[1:, 0]).all()
    assert i[0, 0] == ri[0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusions_leave_fewer_than_k(backend):
    q, e, _, seed = make(3, 20, 8)
    ex = torch.arange(15).repeat(3, 1)
    ex[1, :5] = -1          # row 1 excludes 10 items only
    ex[2, 0] = 99           # ids >= N are ignored
    v, i = check(q, e, 12, exclude=ex, backend=backend, seed=seed)
    assert (i[0, 5:] == -1).all() and torch.isneginf(v[0, 5:]).all()
    assert (i[1, 10:] == -1).all() and (i[1, :10] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.5, -2.0, 0.3, 0.0])
def test_scale(backend, scale):
    q, e, ex, seed = make(3, 400, 12, M=2)
    check(q, e, 6, scale=scale, exclude=ex, backend=backend, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_tables(backend, dtype):
    # Small integers are exact in 16 bits, so even Triton's rounding of the queries to the table's
    # dtype is exact here and the float32 results must match the reference bit for bit.
    q, e, ex, seed = make(3, 500, 24, M=2, dtype=dtype)
    v, _ = check(q.float(), e, 8, exclude=ex, backend=backend, seed=seed)
    assert v.dtype == torch.float32


def test_float64_cpu():
    q, e, ex, seed = make(4, 700, 16, M=3, dtype=torch.float64)
    v, _ = check(q, e, 9, exclude=ex, backend="cpu", seed=seed)
    assert v.dtype == torch.float64
    with pytest.raises(ValueError, match="float64"):
        fused_topk(q, e, 3, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_against_float64(backend):
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    q, e = torch.randn(5, 32, generator=g), torch.randn(2000, 32, generator=g)
    k = 10
    v, i = fused_topk(q, e, k, scale=0.7, backend=backend)
    exact = (q.double() @ e.double().t()) * 0.7
    rv = exact.topk(k, dim=1).values
    torch.testing.assert_close(v.double(), rv, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    # each returned index really has the returned score, in descending order
    torch.testing.assert_close(exact.gather(1, i), v.double(), rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    assert (v[:, 1:] <= v[:, :-1]).all(), f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_dims(backend):
    q, e, _, _ = make(3, 5, 4)
    v, i = fused_topk(q, e[:0], 4, backend=backend)
    assert (i == -1).all() and torch.isneginf(v).all() and i.shape == (3, 4)
    v, i = fused_topk(q[:0], e, 4, backend=backend)
    assert i.shape == (0, 4) and v.shape == (0, 4)


def test_non_contiguous_and_env_override(monkeypatch):
    q, e, ex, seed = make(4, 300, 16, M=2)
    qt, et = q.t().contiguous().t(), e.t().contiguous().t()  # same values, column-major
    assert not qt.is_contiguous() and not et.is_contiguous()
    check(qt, et, 5, exclude=ex.t().contiguous().t(), backend="cpu", seed=seed)
    monkeypatch.setenv("REAREC_KERNEL_BACKEND", "reference")
    v, i = fused_topk(q, e, 5, exclude=ex)
    rv, ri = fused_topk_reference(q, e, 5, 1.0, ex)
    assert torch.equal(i, ri)


# ---------------------------------------------------------------------------- CPU: many blocks

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 9), N=st.integers(1, 900), d=st.integers(1, 24), k=st.integers(1, 120),
    M=st.integers(0, 6), block=st.sampled_from([64, 128, 192]), dup=st.booleans(),
    scale=st.sampled_from([1.0, 0.25, -1.0, 0.3]), seed=st.integers(0, 2 ** 31 - 1),
    table16=st.booleans(),
)
def test_cpu_blocks_property(B, N, d, k, M, block, dup, scale, seed, table16):
    # Small item blocks: many blocks, a ragged last one, running thresholds, dense detours, and
    # (bfloat16 tables) the float32 staging block.
    q, e, ex, _ = make(B, N, d, M=M, lo=-2, hi=3, dup=dup, seed=seed)
    if table16:
        e = e.to(torch.bfloat16)  # small integers: exact
    ex = ex.clamp(max=N - 1) if ex is not None else None
    v, i = fused_topk_cpu(q, e, k, scale, ex, block_items=block)
    rv, ri = fused_topk_reference(q, e, k, scale, ex)
    assert torch.equal(i, ri) and torch.equal(v, rv)


def test_cpu_restores_thread_count():
    # The CPU path narrows the intra-op pool to one thread for its small ops: it must give it back.
    before = torch.get_num_threads()
    q, e, ex, seed = make(3, 500, 8, M=1)
    fused_topk_cpu(q, e, 5, 1.0, ex, block_items=64)
    assert torch.get_num_threads() == before


def test_cpu_adversarial_order():
    # Scores increasing with the index: every block beats the running threshold (dense detours).
    N, d = 3000, 4
    e = torch.zeros(N, d)
    e[:, 0] = torch.arange(N, dtype=torch.float32) // 3  # triples of equal scores
    q = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    v, i = fused_topk_cpu(q, e, 50, 1.0, None, block_items=128)
    rv, ri = fused_topk_reference(q, e, 50)
    assert torch.equal(i, ri) and torch.equal(v, rv)


# ---------------------------------------------------------------------------- Triton internals

def test_triton_key_roundtrip():
    vals = torch.tensor([float("-inf"), -3.5, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    idx = torch.tensor([0, 5, 7, 1, 10 ** 7, 4294967295, 123], dtype=torch.int64)
    bits = vals.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = (ordered << 32) | (4294967295 - idx)
    v, i = topk_triton.decode(keys)
    assert torch.equal(i, idx) and torch.equal(v[vals != 0], vals[vals != 0])
    assert (keys[1:] > keys[:-1])[[0, 3, 4, 5]].all()  # order follows the scores
    v, i = topk_triton.decode(torch.tensor([topk_triton.SENTINEL]))
    assert i.item() == -1 and v.item() == float("-inf")


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad", [
    dict(k=0), dict(k=-3), dict(k=True), dict(k=2.5),
    dict(q=torch.zeros(3)), dict(e=torch.zeros(10, 5)), dict(e=torch.zeros(10, 4, dtype=torch.int64)),
    dict(exclude=torch.zeros(3, 2)), dict(exclude=torch.zeros(2, 2, dtype=torch.int64)),
    dict(exclude=torch.zeros(3, dtype=torch.int64)), dict(backend="gpu"), dict(scale="x"),
])
def test_bad_arguments(bad):
    args = dict(q=torch.zeros(3, 4), e=torch.zeros(10, 4), k=2, exclude=None, backend="cpu", scale=1.0)
    args.update(bad)
    with pytest.raises(ValueError):
        fused_topk(args["q"], args["e"], args["k"], scale=args["scale"], exclude=args["exclude"],
                   backend=args["backend"])
