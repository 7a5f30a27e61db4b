"""The Triton top-K's exactness certificate under stress (Triton's interpreter, tiny shapes).

Pass 1 (tensor cores on a GPU) and the exact pass disagree by at most the proven margin m_b
(``topk_triton.score_margin``). Here ``adversarial_pass1`` pushes every pass-1 score m_b * 0.9 away
from the exact one, the sign alternating over blocks of 64 items (whole chunks lean one way), and
the tables put many items within an ulp or two of the k-th best score, so any slip in the margins' bookkeeping changes the answer. Tables are
float32 or float16: the interpreter's low-precision dots are only right after the kernels' upcast,
and the exact scores here are single products (one non-zero coordinate), exact in every dtype.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel runs: Triton on CPU tensors

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec_kernels import topk_triton
from rearec_kernels.backend import poisoned_scratch
from rearec_kernels.topk import fused_topk

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_scratch():
        yield


def near_threshold_table(N, d, cluster, dtype, seed):
    """Items whose scores (against queries along axis 0) sit within a few ulps of one value T, among
    items far below it; the queries are +-1 along axis 0, so every score is one exact product."""
    g = torch.Generator().manual_seed(seed)
    T = torch.tensor(3.0 + random.Random(seed).random(), dtype=dtype)
    ulps = torch.randint(-3, 4, (N,), generator=g)
    first = T.expand(N).clone()
    for _ in range(3):  # walk up to 3 ulps up or down, one nextafter at a time
        first = torch.where(ulps > 0, torch.nextafter(first, torch.tensor(float("inf"), dtype=dtype)), first)
        first = torch.where(ulps < 0, torch.nextafter(first, torch.tensor(float("-inf"), dtype=dtype)), first)
        ulps = ulps - ulps.sign()
    far = torch.rand(N, generator=g) * -5.0 - 1.0  # well below T
    in_cluster = torch.randperm(N, generator=g)[:cluster]
    column = far.to(dtype)
    column[in_cluster] = first[in_cluster]
    e = torch.zeros(N, d, dtype=dtype)
    e[:, 0] = column
    e[:, 1:] = torch.randn(N, d - 1, generator=g).to(dtype)  # never seen by these queries
    return e


def check(q, e, k, exclude=None, scale=1.0, msg=""):
    v, i = fused_topk(q, e, k, scale=scale, exclude=exclude, backend="triton")
    rv, ri = fused_topk(q.to(e.dtype) if e.dtype != torch.float32 else q, e, k, scale=scale, exclude=exclude,
                        backend="reference")
    assert torch.equal(i, ri), f"{msg}: indices differ\n{i}\n{ri}"
    assert torch.equal(v, rv), f"{msg}: values differ"


@pytest.mark.parametrize("adversary", [0.0, 0.9, -0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cluster", [40, 280])  # float32: 280 > the candidate capacity: the fallback
def test_items_within_ulps_of_threshold(adversary, dtype, cluster):
    seed = random.randrange(2 ** 31)
    N, d, k = 301, 5, 7
    e = near_threshold_table(N, d, cluster, dtype, seed)
    q = torch.zeros(3, d)
    q[:, 0] = torch.tensor([1.0, 1.0, 0.5])  # row 2: half the scores, still exact
    ex = torch.randint(-1, N, (3, 4), generator=torch.Generator().manual_seed(seed))
    with topk_triton.adversarial_pass1(adversary):
        check(q, e, k, exclude=ex, msg=f"seed={seed}")
    took_fallback = topk_triton.diagnostics["fallback_rows"]
    if dtype == torch.float32:  # the TF32 margin spans the whole cluster: all of it is collected
        assert (int(took_fallback) > 0) == (cluster == 280), f"seed={seed}: fallback rows {int(took_fallback)}"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 19), N=st.integers(150, 700), d=st.integers(1, 40), k=st.integers(1, 12),
       M=st.integers(0, 5), adversary=st.sampled_from([0.9, -0.9, 0.5]), table16=st.booleans(),
       scale=st.sampled_from([1.0, -0.5, 0.3]), seed=st.integers(0, 2 ** 31 - 1))
def test_adversarial_pass1_small_integers(B, N, d, k, M, adversary, table16, scale, seed):
    # Small integers: every dot product is exact in float32, so the answer is unique, ties included.
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float16 if table16 else torch.float32
    q = torch.randint(-2, 3, (B, d), generator=g).float()
    e = torch.randint(-2, 3, (N, d), generator=g).to(dtype)
    ex = torch.randint(-1, N, (B, M), generator=g) if M else None
    with topk_triton.adversarial_pass1(adversary):
        check(q, e, k, exclude=ex, scale=scale, msg=f"seed={seed}")


def test_margin_bounds_tf32_and_fp32_error():
    # The margin must cover what it claims: a TF32 product (10 mantissa bits per operand, truncated)
    # against the float32 dot, on fresh random inputs (the low bits TF32 drops are anyone's).
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(8, 64, generator=g)
    e = torch.randn(50, 64, generator=g)
    tf32 = lambda x: (x.view(torch.int32) & ~0x1FFF).view(torch.float32)  # noqa: E731 - truncation
    approx = tf32(q).double() @ tf32(e).double().t()
    exact = q.double() @ e.double().t()
    m = topk_triton.score_margin(q, e, 1.0).double()
    assert ((approx - exact).abs() <= m[:, None] / 2).all(), f"seed={seed}"  # one side of |g - f|: half the margin


def test_no_host_sync(monkeypatch):
    # Every value stays on the device: reading one back (item, bool, int, nonzero, tolist) would sync
    # with the host on CUDA, so here it raises.
    q = torch.randint(-2, 3, (5, 16)).float()
    e = torch.randint(-2, 3, (400, 16)).float()
    ex = torch.randint(-1, 400, (5, 3))
    want = fused_topk(q, e, 6, exclude=ex, backend="reference")

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync: a device value was read back")

    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    v, i = topk_triton.fused_topk(q, e, 6, scale=1.0, exclude=ex)
    monkeypatch.undo()
    assert torch.equal(i, want[1]) and torch.equal(v, want[0])


def test_table_norm_cache_follows_in_place_writes():
    # The margin uses the table's largest row norm, cached per table version: an in-place write must
    # invalidate it, or the margin would be too small for the new table.
    e = torch.randn(300, 8)
    q = torch.randn(2, 8)
    before = topk_triton.score_margin(q, e, 1.0)
    assert torch.equal(before, topk_triton.score_margin(q, e, 1.0))
    e.mul_(4.0)
    after = topk_triton.score_margin(q, e, 1.0)
    assert (after > 3.9 * before).all()
    e[5] = 1000.0
    assert (topk_triton.score_margin(q, e, 1.0) > 10 * after).all()


def test_an_inference_tensor_table_is_served_and_its_writes_seen():
    # Tensors made under torch.inference_mode have no version counter (reading it raises): the bound
    # is then computed on every call, so that an in-place write is still seen.
    with torch.inference_mode():
        e = torch.randn(300, 8)
        q = torch.randn(2, 8)
        v, i = topk_triton.fused_topk(q, e, 5)
        want = torch.topk(q @ e.t(), 5)
        assert torch.equal(i, want.indices) and torch.allclose(v, want.values, rtol=1e-6, atol=1e-6)
        before = topk_triton.score_margin(q, e, 1.0)
        e[5] = 1000.0
        assert (topk_triton.score_margin(q, e, 1.0) > 10 * before).all()


def nan_last_reference(q, e, k, exclude):
    """The contract as a Python sort key: (NaN last, score descending, index ascending)."""
    scores = q.float() @ e.float().t()
    values, indices = [], []
    for b in range(q.shape[0]):
        banned = set(exclude[b].tolist()) if exclude is not None else set()
        items = [n for n in range(e.shape[0]) if n not in banned]
        items.sort(key=lambda n: (bool(scores[b, n].isnan()), -float(scores[b, n].nan_to_num(0.0)), n))
        items = items[:k]
        values.append([float(scores[b, n]) for n in items] + [float("-inf")] * (k - len(items)))
        indices.append(items + [-1] * (k - len(items)))
    return torch.tensor(values), torch.tensor(indices)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, 0 * inf
@pytest.mark.parametrize("k", [5, 150, 296, 310])  # NaN items unreached / reached / past N
def test_nan_scores_rank_last(k):
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    N, d = 300, 8
    q = torch.randint(-3, 4, (4, d), generator=g).float()
    e = torch.randint(-3, 4, (N, d), generator=g).float()
    rows = torch.randperm(N, generator=g)
    e[rows[:3]] = float("nan")
    e[rows[3:6], 0] = float("inf")
    e[rows[6:9], 1] = float("-inf")
    q[1] = float("nan")
    ex = torch.randint(-1, N, (4, 3), generator=g)
    v, i = fused_topk(q, e, k, exclude=ex, backend="triton")
    rv, ri = nan_last_reference(q, e, k, ex)
    assert torch.equal(i, ri), f"seed={seed}: indices differ\n{i}\n{ri}"
    torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True, msg=f"seed={seed}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("k, n_inf", [(1, 1), (2, 1), (3, 3), (4, 3)])
def test_a_kth_best_score_of_plus_inf(k, n_inf):
    """When k or more items score +inf the threshold is +inf and the margin infinite: their difference
    must not shut every item out (it did: the rows came back empty)."""
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    q = torch.ones(2, 4)
    e = torch.randint(-3, 4, (300, 4), generator=g).float()  # exact scores, many ties
    e[torch.randperm(300, generator=g)[:n_inf], 0] = float("inf")
    v, i = fused_topk(q, e, k, backend="triton")
    rv, ri = nan_last_reference(q, e, k, None)
    assert torch.equal(i, ri) and torch.equal(v, rv), f"seed={seed}\n{i}\n{ri}"


def test_one_nan_row_keeps_the_fast_path():
    # A NaN table row scores NaN for everyone: it must neither hide real items nor inflate the margin.
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (3, 16), generator=g).float()
    e = torch.randint(-2, 3, (700, 16), generator=g).float()
    e[int(torch.randint(700, (1,), generator=g))] = float("nan")
    v, i = fused_topk(q, e, 10, backend="triton")
    rv, ri = nan_last_reference(q, e, 10, None)
    assert torch.equal(i, ri) and torch.equal(v, rv), f"seed={seed}"
    assert torch.isfinite(topk_triton.score_margin(q, e, 1.0)).all()


def test_selection_wider_than_the_fallback():
    # k + M > MAX_SELECT: no filtering pass, every item a candidate, still the exact answer.
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (2, 4), generator=g).float()
    e = torch.randint(-2, 3, (4500, 4), generator=g).float()
    ex = torch.randint(-1, 4500, (2, 30), generator=g)
    k = topk_triton.MAX_SELECT + 5
    check(q, e, k, exclude=ex, msg=f"seed={seed}")
