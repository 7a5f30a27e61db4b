"""Fused top-K scoring: the CPU and Triton (interpreted) backends against the PyTorch reference.

Most inputs hold small integers, so every dot product is exact in float32 whatever the summation
order: results must then be IDENTICAL to the reference, indices and values, ties included (small
integers tie often, and duplicated table rows force ties). One test uses Gaussian data against a
float64 reference with a tolerance. The reference itself is checked against a plain Python sort on
small inputs. Inputs are fresh random draws each run; the seed is in every failure message.
Scratch buffers are poisoned (NaN / garbage) before the kernels write them.
"""
import inspect
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec_kernels import Backend, attention, fused_topk, topk, topk_cpu, topk_reference, topk_triton
from rearec_kernels.backend import implementation, poisoned_scratch, resolve
from rearec_kernels.topk import TRITON_MAX_ITEMS

BACKENDS = ["cpu", "triton"]
NAN, INF = float("nan"), float("inf")
reference = topk_reference.fused_topk

# Triton 3.6's interpreter itself trips a NumPy deprecation on every scalar load; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_scratch():
        yield


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


def assert_same(actual, expected, msg):
    """Indices equal; values equal bit for bit, NaN where the expected value is NaN."""
    (v, i), (rv, ri) = actual, expected
    assert torch.equal(i, ri), f"{msg}: indices differ\n{i}\n{ri}"
    torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True, msg=f"{msg}: values differ")


def on(device, backend):
    """``device`` for a test of ``backend``: the CPU backend takes CPU tensors only."""
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("backend 'cpu' takes CPU tensors only")
    return device


def check(q, e, k, *, scale=1.0, exclude=None, backend, seed, device=torch.device("cpu")):
    """fused_topk on ``device`` (inputs moved there) against the reference on the CPU."""
    moved = [t.to(device) if t is not None else None for t in (q, e, exclude)]
    v, i = (t.cpu() for t in fused_topk(*moved[:2], k, scale=scale, exclude=moved[2], backend=backend))
    rv, ri = reference(q, e, k, scale=scale, exclude=exclude)
    assert v.shape == (q.shape[0], k) and i.shape == (q.shape[0], k), f"seed={seed}"
    assert i.dtype == torch.int64 and v.dtype == rv.dtype, f"seed={seed}"
    assert_same((v, i), (rv, ri), f"seed={seed} backend={backend}")
    if exclude is not None:
        hit = (i[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)
        assert not hit.any(), f"seed={seed}: an excluded item was returned"
    return v, i


# ---------------------------------------------------------------------------- one interface

def test_package_face_imports_without_triton():
    code = ("import sys; from rearec_kernels import fused_topk, prefill_attention, decode_attention, "
            "KVCache, Backend, split_qkv; assert 'triton' not in sys.modules, 'triton imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


OPS = {"topk": (topk, ["fused_topk"]), "attention": (attention, ["prefill_attention", "decode_attention"])}


@pytest.mark.parametrize("family, backend", [
    (family, backend) for family in OPS for backend in (Backend.REFERENCE, Backend.CPU, Backend.TRITON)
])
def test_every_backend_has_the_dispatchers_signature(family, backend):
    dispatcher, ops = OPS[family]
    for op in ops:
        public = inspect.signature(getattr(dispatcher, op))
        own = inspect.signature(getattr(implementation(family, backend), op))
        expected = [p for name, p in public.parameters.items() if name != "backend"]
        got = list(own.parameters.values())[:len(expected)]
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in expected], f"{family}_{backend.value}"
        extra = list(own.parameters.values())[len(expected):]  # test/tuning knobs: keyword-only, optional
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra)


def test_backend_table(monkeypatch):
    cuda, cpu, meta = torch.device("cuda"), torch.device("cpu"), torch.device("meta")
    assert resolve("op", None, cpu) is Backend.CPU
    assert resolve("op", "auto", cuda) is Backend.TRITON
    assert resolve("op", None, meta) is Backend.REFERENCE
    for device in (cpu, cuda, meta):
        assert resolve("op", "reference", device) is Backend.REFERENCE
    assert resolve("op", "triton", cpu) is Backend.TRITON  # the interpreter is on in tests
    monkeypatch.setenv("REAREC_KERNEL_BACKEND", "")  # empty: unset (every op raised "unknown kernel backend ''")
    assert resolve("op", None, cpu) is Backend.CPU
    monkeypatch.setenv("REAREC_KERNEL_BACKEND", "reference")
    assert resolve("op", None, cpu) is Backend.REFERENCE
    with pytest.raises(ValueError, match="op: backend 'cpu' takes CPU tensors"):
        resolve("op", "cpu", cuda)
    with pytest.raises(ValueError, match="unknown kernel backend 'gpu'"):
        resolve("op", "gpu", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        resolve("op", "triton", cpu)


def test_cpu_backend_means_the_same_for_both_ops():
    from rearec_kernels import prefill_attention

    x = torch.zeros(2, 3, 1, 4, device="meta")
    with pytest.raises(ValueError, match="backend 'cpu' takes CPU tensors"):
        prefill_attention(x, x, x, torch.ones(2, dtype=torch.int32, device="meta"), backend="cpu")
    with pytest.raises(ValueError, match="backend 'cpu' takes CPU tensors"):
        fused_topk(torch.zeros(2, 4, device="meta"), torch.zeros(5, 4, device="meta"), 2, backend="cpu")


# ---------------------------------------------------------------------------- the reference itself

def python_topk(q, e, k, scale=1.0, exclude=None):
    """The contract written as a Python sort key: (NaN last, score descending, index ascending)."""
    scores = ((q.double() @ e.double().t()) * scale).tolist()
    values, indices = [], []
    for b, row in enumerate(scores):
        banned = set(exclude[b].tolist()) if exclude is not None else set()
        ranked = sorted((n for n in range(len(row)) if n not in banned),
                        key=lambda n: (row[n] != row[n], -row[n] if row[n] == row[n] else 0.0, n))[:k]
        pad = k - len(ranked)
        indices.append(ranked + [-1] * pad)
        values.append([row[n] for n in ranked] + [-INF] * pad)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(indices, dtype=torch.int64)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), N=st.integers(1, 40), d=st.integers(1, 4), k=st.integers(1, 45),
       M=st.integers(0, 5), seed=st.integers(0, 2 ** 31 - 1), specials=st.integers(0, 6))
def test_reference_follows_the_contract(B, N, d, k, M, seed, specials):
    q, e, ex, _ = make(B, N, d, M=M, lo=-2, hi=3, dtype=torch.float64, seed=seed, dup=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(specials):  # NaN / +-inf entries: NaN, +-inf and -inf scores
        row = int(torch.randint(N, (1,), generator=g))
        e[row, int(torch.randint(d, (1,), generator=g))] = [NAN, INF, -INF][int(torch.randint(3, (1,), generator=g))]
    if specials % 3 == 2:
        q[0, 0] = NAN  # a NaN query
    assert_same(reference(q, e, k, exclude=ex), python_topk(q, e, k, exclude=ex), f"seed={seed}")


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
def test_matches_reference(backend, B, N, d, k, M, device):
    q, e, ex, seed = make(B, N, d, M=M)
    check(q, e, k, exclude=ex, backend=backend, seed=seed, device=on(device, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows(backend):
    q, e, ex, seed = make(257, 90 if backend == "triton" else 3000, 16, M=2)
    check(q, e, 7, exclude=ex, backend=backend, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_prefer_lower_index(backend, device):
    # Few distinct values and duplicated rows: most of each top-k is decided by the tie rule.
    device = on(device, backend)
    q, e, ex, seed = make(6, 600, 4, lo=-1, hi=2, dup=True)
    check(q, e, 20, backend=backend, seed=seed, device=device)
    # An all-equal table: the answer is items 0..k-1 (Triton: every item ties at the threshold,
    # so the candidate lists overflow and the fallback kernel redoes those rows; two rows, as each
    # fallback row costs seconds in the interpreter).
    e = torch.ones(300, 4)
    v, i = check(q[:2], e, 9, backend=backend, seed=seed, device=device)
    assert torch.equal(i, torch.arange(9).expand(2, 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusion_removes_true_top1(backend):
    q, e, _, seed = make(4, 800, 16)
    _, ri = reference(q, e, 3)
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
    v, i = check(q, e, 12, exclude=ex, backend=backend, seed=seed)
    assert (i[0, 5:] == -1).all() and torch.isneginf(v[0, 5:]).all()
    assert (i[1, 10:] == -1).all() and (i[1, :10] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bad_id", [20, 99, -2])
def test_exclude_ids_out_of_range_are_rejected(backend, bad_id):
    q, e, _, _ = make(3, 20, 8)
    ex = torch.full((3, 4), -1)
    ex[2, 1] = bad_id
    with pytest.raises(ValueError, match=rf"exclude\[2, 1\] = {bad_id} is not an item id in \[0, 20\)"):
        fused_topk(q, e, 5, exclude=ex, backend=backend)



@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_exclude_ids_of_any_integer_dtype(backend, dtype):
    """Unsigned ids included: uint8 ids 1 and 19 of 20 items are ids, not out of range."""
    q, e, _, seed = make(2, 20, 8)
    ex = torch.tensor([[1, 19], [0, 0]], dtype=dtype)
    check(q, e, 5, exclude=ex, backend=backend, seed=seed)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.5, -2.0, 0.3, 0.0])
def test_scale(backend, scale, device):
    # scale 0: every score ties, so Triton's rows all take the fallback (seconds each in the interpreter): one row
    q, e, ex, seed = make(1 if scale == 0 else 3, 400, 12, M=2)
    check(q, e, 6, scale=scale, exclude=ex, backend=backend, seed=seed, device=on(device, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_tables(backend, dtype, device):
    # Small integers are exact in 16 bits, so even Triton's rounding of the queries to the table's
    # dtype is exact here and the float32 results must match the reference bit for bit.
    q, e, ex, seed = make(3, 500, 24, M=2, dtype=dtype)
    v, _ = check(q.float(), e, 8, exclude=ex, backend=backend, seed=seed, device=on(device, backend))
    assert v.dtype == torch.float32


def test_float64_cpu():
    q, e, ex, seed = make(4, 700, 16, M=3, dtype=torch.float64)
    v, _ = check(q, e, 9, exclude=ex, backend="cpu", seed=seed)
    assert v.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_inputs_that_require_grad(backend):
    """A model's output and its embedding weight (both require grad) are scored as they are; the
    results carry no gradient on any backend."""
    q, e, ex, seed = make(3, 50, 8, M=2)
    want = reference(q, e, 5, exclude=ex)
    tables = [torch.nn.Parameter(e)]
    if backend == "cpu":
        tables.append(topk.prepare_table(torch.nn.Parameter(e), bf16_filter=True))
    for table in tables:
        got = fused_topk(q.clone().requires_grad_(), table, 5, exclude=ex, backend=backend)
        assert not got[0].requires_grad
        assert_same(got, want, f"seed={seed} backend={backend} {type(table).__name__}")


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
    assert_same(fused_topk(q, e, 5, exclude=ex), reference(q, e, 5, exclude=ex), f"seed={seed}")


# ---------------------------------------------------------------------------- NaN and infinities

# Triton: what topk_triton.py must do is in the report of the kernels helper (NaN scores as -inf in the
# group maxima; collected when the threshold is -inf, keyed just below -inf so they decode as NaN).
NAN_BACKENDS = ["cpu", "triton"]


def nan_inputs(seed, B=4, N=300, d=8):
    """Integer inputs with NaN table rows, +-inf entries (so +-inf and NaN scores) and a NaN query."""
    q, e, ex, _ = make(B, N, d, M=3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(N, generator=g)
    e[rows[:3]] = NAN
    e[rows[3:6], 0] = INF
    e[rows[6:9], 1] = -INF
    q[1] = NAN
    return q, e, ex


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("k", [5, 280, 296, 299, 310])  # NaN items unreached / reached / past N
def test_nan_ranks_below_every_number(backend, k, device):
    seed = random.randrange(2 ** 31)
    q, e, ex = nan_inputs(seed)
    v, i = check(q, e, k, exclude=ex, backend=backend, seed=seed, device=on(device, backend))
    # Each row: items with a real score, then NaN items, then empty slots; the NaN query only NaN.
    kind = torch.where(i < 0, 2, v.isnan().long())
    assert (kind[:, 1:] >= kind[:, :-1]).all(), f"seed={seed}"
    assert (kind[1] >= 1).all() and (kind[1] == 1).any(), f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_nan_item_hides_nothing(backend, device):
    # The bug this guards against: one NaN table row made the CPU path return -1/-inf everywhere.
    seed = random.randrange(2 ** 31)
    q, e, _, _ = make(3, 700, 16, seed=seed)
    e[int(torch.randint(700, (1,)))] = NAN
    v, i = check(q, e, 10, backend=backend, seed=seed, device=on(device, backend))
    assert (i >= 0).all() and not v.isnan().any()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 6), N=st.integers(1, 600), d=st.integers(1, 12), k=st.integers(1, 120),
       M=st.integers(0, 6), block=st.sampled_from([64, 96]), seed=st.integers(0, 2 ** 31 - 1),
       n_nan=st.integers(0, 40), n_inf=st.integers(0, 40), nan_query=st.booleans())
def test_cpu_nan_property(B, N, d, k, M, block, seed, n_nan, n_inf, nan_query):
    # Many small blocks: NaN and -inf items spread over blocks and over the rows' short tails.
    q, e, ex, _ = make(B, N, d, M=M, lo=-2, hi=3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    e[torch.randint(N, (n_nan,), generator=g), torch.randint(d, (n_nan,), generator=g)] = NAN
    e[torch.randint(N, (n_inf,), generator=g), torch.randint(d, (n_inf,), generator=g)] = -INF
    if nan_query:
        q[-1, 0] = NAN
    got = topk_cpu.fused_topk(q, e, k, exclude=ex, block_items=block)
    assert_same(got, reference(q, e, k, exclude=ex), f"seed={seed}")


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
    got = topk_cpu.fused_topk(q, e, k, scale=scale, exclude=ex, block_items=block)
    assert_same(got, reference(q, e, k, scale=scale, exclude=ex), f"seed={seed}")


def test_cpu_adversarial_order():
    # Scores increasing with the index: every block beats the running threshold (dense detours).
    N, d = 3000, 4
    e = torch.zeros(N, d)
    e[:, 0] = torch.arange(N, dtype=torch.float32) // 3  # triples of equal scores
    q = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    got = topk_cpu.fused_topk(q, e, 50, block_items=128)
    assert_same(got, reference(q, e, 50), "adversarial order")


def test_cpu_path_is_thread_safe():
    # The engine is shared between threads. The CPU path once narrowed torch's thread count to 1
    # inside every call: process-wide, so a thread starting its first torch op meanwhile (read here
    # from fresh threads) inherited 1 thread for good. Two threads now loop over fused_topk while
    # fresh threads read the count; every concurrent result must equal the serial one.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = [make(4, 2000, 16, M=2, seed=s)[:3] for s in range(4)]
        serial = [fused_topk(q, e, 9, exclude=ex, backend="cpu") for q, e, ex in inputs]
        failures, calls, stop = [], [0, 0], threading.Event()

        def serve(j):
            try:
                while not stop.is_set():
                    for (q, e, ex), want in zip(inputs[j::2], serial[j::2]):
                        got = fused_topk(q, e, 9, exclude=ex, backend="cpu")
                        if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                            failures.append("a concurrent result differs from the serial one")
                        calls[j] += 1
            except Exception as error:  # noqa: BLE001 -- reported below
                failures.append(repr(error))

        workers = [threading.Thread(target=serve, args=(j,)) for j in range(2)]
        for w in workers:
            w.start()
        seen, reads = set(), 0
        while (reads < 100 or min(calls) < 20) and reads < 5000 and not failures:
            reader = threading.Thread(target=lambda: seen.add(torch.get_num_threads()))
            reader.start()
            reader.join()
            reads += 1
        stop.set()
        for w in workers:
            w.join()
        assert seen == {2}, f"torch's thread count changed during fused_topk calls: saw {sorted(seen)}"
        assert not failures, failures[:3]
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- CPU: the bf16 filter pass

def wide_inputs(B, N, d, *, seed, q_bits=13, e_lo=-4, e_hi=5, dtype=torch.bfloat16):
    """Queries of ``q_bits``-bit integers (bf16 rounds them: the filter's bound must cover that) and
    a table of small integers in ``dtype``: every float32 dot product is exact for d <= 64, so the
    float32 path and the reference agree bit for bit, while bf16 scores collapse near-ties."""
    g = torch.Generator().manual_seed(seed)
    hi = 2 ** (q_bits - 1)
    q = torch.randint(-hi, hi, (B, d), generator=g).float()
    e = torch.randint(e_lo, e_hi, (N, d), generator=g)
    # Dimension 0 dominates: scores ~ 2^16 e[:, 0], so bf16 (ulp 512..1024 there) ties most of each
    # cluster while the exact scores differ by a few units.
    sign = torch.randint(0, 2, (B,), generator=g) * 2 - 1
    q[:, 0] = sign * (2 ** 16 + torch.randint(0, 8, (B,), generator=g))
    e[:, 0] = torch.randint(2, 4, (N,), generator=g)
    return q, e.to(dtype)


def bf16_check(q, e, k, *, seed, scale=1.0, exclude=None, block=None):
    got = topk_cpu.fused_topk(q, e, k, scale=scale, exclude=exclude, block_items=block, bf16_scan=True)
    assert_same(got, reference(q, e, k, scale=scale, exclude=exclude), f"seed={seed}")
    assert_same(got, topk_cpu.fused_topk(q, e, k, scale=scale, exclude=exclude, block_items=block,
                                         bf16_scan=False), f"seed={seed}: bf16 filter vs float32 path")
    return got


def counter(monkeypatch, owner, name, amount):
    """Wraps method ``name`` of ``owner`` to add ``amount(*args)`` to a running count: [count]."""
    seen = [0]
    method = getattr(owner, name)

    def counted(self, *args):
        seen[0] += amount(*args)
        return method(self, *args)
    monkeypatch.setattr(owner, name, counted)
    return seen


@pytest.fixture
def count_rescores(monkeypatch):
    """How many (row, item) pairs the bf16 filter rescored: proves the filter pass really ran."""
    return counter(monkeypatch, topk_cpu.Bf16Filter, "rescore", lambda rows, items: rows.numel())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 9), N=st.one_of(st.integers(1, 200), st.integers(1000, 3000)), d=st.integers(1, 64),
       k=st.integers(1, 60), M=st.integers(0, 6), block=st.sampled_from([None, 64, 96, 96]),
       q_bits=st.sampled_from([4, 13]),
       scale=st.sampled_from([1.0, 0.25, -1.0, 0.3]), bf16_queries=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2 ** 31 - 1))
def test_bf16_filter_property(count_rescores, B, N, d, k, M, block, q_bits, scale, bf16_queries, dtype, seed):
    # 13-bit queries: bf16 rounds them and the scores near the k-th collapse onto few bf16 values,
    # so every item inside the error bound must be passed on and rescored. float16 tables take the
    # float32 path (no fast float16 GEMM): same answers.
    q, e = wide_inputs(B, N, d, seed=seed, q_bits=q_bits, dtype=dtype)
    if bf16_queries:
        q = q.to(torch.bfloat16)
    ex = torch.randint(-1, N, (B, M), generator=torch.Generator().manual_seed(seed)) if M else None
    before = count_rescores[0]
    _, i = bf16_check(q, e, k, seed=seed, scale=scale, exclude=ex, block=block)
    found = bool((i >= 0).any())  # every item excluded: nothing to rescore
    assert (count_rescores[0] > before) == (dtype == torch.bfloat16 and found), f"seed={seed}"


@pytest.mark.parametrize("ascending", [True, False])
def test_bf16_filter_near_ties_across_blocks(ascending):
    # Scores 2^16 x + y with x = 3 and small y: a whole bf16 ulp (1024) holds them all, so every
    # approximate score ties while the exact ones differ by a few float32 ulps. With y ascending
    # in the item order, each later block beats the running k-th by less than bf16 can tell: the
    # filter's bound alone lets those items through. Duplicated rows: exact ties across blocks.
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    N = 1500
    y = torch.randint(-60, 61, (N,), generator=g)
    y = y.sort().values if ascending else y
    e = torch.stack([torch.full((N,), 3), y], dim=1).float()
    e[1200:1300] = e[400:500]
    e = e.to(torch.bfloat16)
    q = torch.tensor([[2.0 ** 16, 1.0], [2.0 ** 16 + 3, 1.0], [-(2.0 ** 16), -1.0], [2.0 ** 16 - 5, -1.0]])
    for k in (1, 20, 150):
        bf16_check(q, e, k, seed=seed, block=128)
        bf16_check(q, e, k, seed=seed)  # one block: the dense detour's floor


def test_bf16_filter_query_rounding():
    # Queries bf16 cannot hold, and scores that cancel: q = (2^16 + 1, -(2^16 - 1), 1) against rows
    # (x, x, y) scores 2x + y exactly, but x (2^16 - 2^16) + y = y after bf16 rounds the query. The
    # output is exact (small integers), so only the query term of the bound lets the 2x through.
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    N = 1500
    x = torch.randint(1, 9, (N,), generator=g)
    y = torch.randint(-20, 21, (N,), generator=g)
    e = torch.stack([x, x, y], dim=1).to(torch.bfloat16)
    q = torch.tensor([[2.0 ** 16 + 1, -(2.0 ** 16 - 1), 1.0], [2.0 ** 16 + 1, -(2.0 ** 16 - 1), -1.0]])
    for k in (1, 20, 150):
        bf16_check(q, e, k, seed=seed, block=128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_filter_bound_takes_every_row_of_the_block(dtype):
    """The bound scales with the block's largest row norm. Here that row comes last in its block and is
    the answer: q = (2^16 + 1, -(2^16 - 1), 1) rounds in bf16 to (2^16, -2^16, 1), so the row
    (88, 88, -20) scores 156 exactly but -20 in the filter, far below the other rows' 2^-7. Only a bound
    that counts this row's norm keeps it for the exact rescoring. A bf16 table in blocks of 64: the first
    block sets the running best to 2^-7, and in the second a norm over rows 64..126 alone drops row 127.
    A float32 table through its packed bf16 copy (one block): the dense detour's floor, lowered by the
    bound twice, would drop it; the other rows are short (norm 2^-7) because this bound also holds the
    copy's rounding, 2^-8 ||q|| (about 362) per unit of row norm."""
    e = torch.zeros(128, 3)
    e[:, 2] = 2.0 ** -7
    e[127] = torch.tensor([88.0, 88.0, -20.0])
    q = torch.tensor([[2.0 ** 16 + 1, -(2.0 ** 16 - 1), 1.0]])
    if dtype == torch.bfloat16:
        got = bf16_check(q, e.to(dtype), 1, seed=0, block=64)
    else:  # the float32 table through its bf16 copy
        got = topk_cpu.fused_topk(q, e, 1, block_items=64, bf16_scan=True,
                                  **topk.prepare_table(e, bf16_filter=True).cpu_extras())
    assert got[1].tolist() == [[127]] and got[0].tolist() == [[156.0]]


def test_cpu_takes_every_item_when_k_is_the_table():
    """k = N with one item scoring -inf in the last block: it still comes back, last, not as -1."""
    e = torch.randint(1, 5, (96, 4), generator=torch.Generator().manual_seed(3)).float()  # exact scores
    e[80] = float("-inf")
    q = torch.ones(2, 4)
    got = topk_cpu.fused_topk(q, e, 96, block_items=32)
    assert_same(got, reference(q, e, 96), "k = N")
    assert got[1][:, -1].tolist() == [80, 80]


def test_bf16_filter_adversarial_order(count_rescores):
    # Scores increasing with the index (every block beats the threshold: dense detours), in
    # triples of exact ties, with a query bf16 cannot hold.
    N, d = 3000, 4
    e = torch.zeros(N, d)
    e[:, 0] = (torch.arange(N) // 3).float() % 256
    e[:, 1] = (torch.arange(N) // 768).float()
    q = torch.tensor([[1.0, 257.0, 0, 0], [-1.0, -255.0, 0, 0]])
    bf16_check(q, e.to(torch.bfloat16), 50, seed=0, block=128)
    assert count_rescores[0] > 0


@pytest.mark.parametrize("k", [5, 296, 310])
def test_bf16_filter_non_finite_inputs(k):
    # NaN rows and +-inf entries: the bound cannot cover them; the float32 path answers.
    seed = random.randrange(2 ** 31)
    q, e, ex = nan_inputs(seed)
    e = e.to(torch.bfloat16)
    got = topk_cpu.fused_topk(q, e, k, exclude=ex, bf16_scan=True)
    assert_same(got, reference(q, e, k, exclude=ex), f"seed={seed}")
    q[1] = 2.0 ** 97  # finite scores, but too close to overflow for the bound
    assert not topk_cpu.Bf16Filter.covered(q, topk_cpu.Bf16Filter.item_norms(e.nan_to_num(0.0, 1.0, -1.0)), None)
    got = topk_cpu.fused_topk(q, e.nan_to_num(0.0, 1.0, -1.0), k, exclude=ex, bf16_scan=True)
    assert_same(got, reference(q, e.nan_to_num(0.0, 1.0, -1.0), k, exclude=ex), f"seed={seed}")
    # An all-zero table bounds no score, but a scale past float32's range made the scaled query inf and
    # every bound NaN: no chunk stayed live and the bf16 scan returned -1 / -inf where the reference ranks.
    zero, ones = torch.zeros(10, 4, dtype=torch.bfloat16), torch.ones(2, 4)
    assert not topk_cpu.Bf16Filter.covered(ones, topk_cpu.Bf16Filter.item_norms(zero), 1e39)
    got = topk_cpu.fused_topk(ones, zero, 3, scale=1e39, bf16_scan=True)
    assert_same(got, reference(ones, zero, 3, scale=1e39), f"seed={seed}")


def test_bf16_filter_bound_holds():
    # The inequality the filter relies on, checked on every (row, item) pair of Gaussian inputs with
    # rows of very different norms: |a - v| <= 2^-8 |a| + c_b ||e_n|| + t_b.
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(37, 123, generator=g) * torch.logspace(-3, 3, 37)[:, None]
    e = (torch.randn(1031, 123, generator=g) * torch.logspace(-2, 2, 1031)[:, None]).to(torch.bfloat16)
    for post_scale in (None, 0.3):
        norms = topk_cpu.Bf16Filter.item_norms(e)
        f = topk_cpu.Bf16Filter(q, e, post_scale, norms, torch.empty(37 * 1056, dtype=torch.bfloat16))
        a = f.block_scores(0, 1031, poison=True)[:1031].double()  # (items, rows)
        v = torch.mm(e.float(), q.t()) * (post_scale or 1.0)
        bound = 2.0 ** -8 * a.abs() + f.c[None, :] * norms.double()[:, None] + f.t[None, :]
        err = (a - v.double()).abs()
        assert (err <= bound).all(), f"seed={seed}: bound broken by {(err - bound).max()}"
        assert (err > 0.01 * bound).any(), f"seed={seed}: the bound is uselessly loose"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 9), N=st.one_of(st.integers(1, 200), st.integers(1000, 3000)), d=st.integers(1, 64),
       k=st.integers(1, 60), M=st.integers(0, 6), block=st.sampled_from([None, 64, 96]),
       scale=st.sampled_from([1.0, 0.25, -1.0, 0.3]), seed=st.integers(0, 2 ** 31 - 1))
def test_float32_table_filtered_through_its_bf16_copy(count_rescores, B, N, d, k, M, block, scale, seed):
    # 12-bit integer entries: bf16 rounds every one of them by up to 2^-8 relative (the copy's scores
    # are off by tens), while the float32 dot products with 4-bit queries stay exact integers that
    # differ by 1: only the bound lets the right items through, and rescoring from the float32 rows
    # must give the float32 path's values bit for bit.
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 9, (B, d), generator=g).float()
    e = torch.randint(-4095, 4096, (N, d), generator=g).float()
    ex = torch.randint(-1, N, (B, M), generator=g) if M else None
    prepared = topk.prepare_table(e, bf16_filter=True)
    assert prepared.filter_table.dtype == torch.bfloat16 and prepared.table is e
    assert (prepared.filter_norms >= torch.linalg.vector_norm(prepared.filter_table.double(), dim=1)).all()
    before = count_rescores[0]
    got = topk_cpu.fused_topk(q, e, k, scale=scale, exclude=ex, block_items=block, bf16_scan=True,
                              **prepared.cpu_extras())
    want = reference(q, e, k, scale=scale, exclude=ex)
    assert_same(got, want, f"seed={seed}")
    assert_same(got, topk_cpu.fused_topk(q, e, k, scale=scale, exclude=ex, block_items=block, bf16_scan=False),
                f"seed={seed}: filtered vs float32 path")
    assert (count_rescores[0] > before) == bool((got[1] >= 0).any()), f"seed={seed}: the filter did not run"
    assert_same(fused_topk(q, prepared, k, scale=scale, exclude=ex, backend="cpu"), want, f"seed={seed}: dispatcher")
    assert_same(fused_topk(q, prepared, k, scale=scale, exclude=ex, backend="reference"), want, f"seed={seed}: reference")


def test_bf16_filter_bounds_at_the_worst_output_rounding():
    # The bf16 GEMM's output rounding alone, at its worst: every product of two bf16 values in [1, 2)
    # (d = 2, second entries 0: the float32 accumulation is exact and the query is bf16-exact), some
    # rounded up and some down by nearly 2^-8 |a|. The filter's own bounds must hold on each pair:
    # ``exact_at_least(a) <= v`` (the dense detour's floor) and ``v >= T => a >= lowest_passing(T)``
    # (``a > lowest_passing(T, strict=True)``), at T = v, the tightest threshold an item must pass.
    values = 1 + torch.arange(128, dtype=torch.float32) / 128  # every bf16 value in [1, 2)
    signs = torch.where(torch.arange(128) % 3 == 0, -1.0, 1.0)
    q = torch.stack([values * signs, torch.zeros(128)], dim=1)
    e = torch.stack([values, torch.zeros(128)], dim=1).to(torch.bfloat16)
    for post_scale in (None, 0.5):  # 0.5 keeps every product exact
        norms = topk_cpu.Bf16Filter.item_norms(e)
        f = topk_cpu.Bf16Filter(q, e, post_scale, norms, torch.empty(128 * 128, dtype=torch.bfloat16))
        a = f.block_scores(0, 128, poison=True)[:128].float()  # (items, rows)
        v = e.float() @ q.t() * (post_scale or 1.0)  # exact: 16-bit products
        rounding = (a.double() - v.double()) / a.double().abs()
        assert rounding.max() > 0.96 * 2.0 ** -8 and rounding.min() < -0.96 * 2.0 ** -8  # the worst case is here
        for n in range(128):
            assert (f.exact_at_least(a[n]) <= v[n].double()).all(), f"item {n}: a floor above the exact score"
            assert (a[n] >= f.lowest_passing(v[n])).all(), f"item {n}: an item reaching T would be filtered out"
            assert (a[n] > f.lowest_passing(v[n], strict=True)).all(), f"item {n}: strict"
        # and the bounds are not vacuous: within 2^-7 |a| of the scores
        assert (f.exact_at_least(a[0]) >= a[0].double() * (1 - 2.0 ** -7 * torch.sign(a[0].double()))).all()
    # The boundary itself: with no other error (c = t = 0, no slack) an item at a = T / (1 + 2^-8)
    # may score exactly T, so it passes a threshold T, strictly as well.
    f.c, f.t, f.SLACK = torch.zeros(128, dtype=torch.float64), 0.0, 0.0
    T = a[:, 0].double() * (1 + 2.0 ** -8 * torch.sign(a[:, 0].double()))  # exact in float32 too
    for n in range(128):
        assert f.lowest_passing(T[n].expand(128))[0] == a[n, 0]
        assert a[n, 0] > f.lowest_passing(T[n].expand(128), strict=True)[0]


def test_bf16_copy_bound_holds():
    # The filter's inequality when the GEMM scans a bf16 copy of a float32 table and v is the float32
    # table's score: the copy's rounding term is in the bound.
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(37, 123, generator=g) * torch.logspace(-3, 3, 37)[:, None]
    e = torch.randn(1031, 123, generator=g) * torch.logspace(-2, 2, 1031)[:, None]
    prepared = topk.prepare_table(e, bf16_filter=True)
    for post_scale in (None, 0.3):
        f = topk_cpu.Bf16Filter(q, prepared.filter_table, post_scale, prepared.filter_norms,
                                torch.empty(37 * 1056, dtype=torch.bfloat16), exact_table=e)
        a = f.block_scores(0, 1031, poison=True)[:1031].double()  # (items, rows)
        v = torch.mm(e.double(), q.double().t()) * (post_scale or 1.0)
        bound = 2.0 ** -8 * a.abs() + f.c[None, :] * prepared.filter_norms.double()[:, None] + f.t[None, :]
        err = (a - v).abs()
        assert (err <= bound).all(), f"seed={seed}: bound broken by {(err - bound).max()}"
        assert (err > 0.01 * bound).any(), f"seed={seed}: the bound is uselessly loose"
        rows, items = torch.arange(37).repeat_interleave(5), torch.randint(1031, (185,), generator=g)
        exact = (e[items].double() * q[rows].double()).sum(1) * (post_scale or 1.0)
        # from the float32 rows (the bf16 copy would be off by up to 2^-8 ||q|| ||e||)
        size = torch.linalg.vector_norm(e[items].double(), dim=1) * torch.linalg.vector_norm(q[rows].double(), dim=1)
        assert ((f.rescore(rows, items).double() - exact).abs() <= 1e-5 * size * abs(post_scale or 1.0)).all(), f"seed={seed}"


def test_bf16_copy_rounding_that_adds_up():
    # The copy's worst case: q = (1, -1, 1, -1, ...) is bf16-exact, and each entry rounds to 1.0 in
    # the direction that adds up. The copy scores these rows 0 while their float32 scores are about
    # 0.0027 d: only the copy's own term in the bound lets them beat rows that really score 0.001 d.
    d, k = 64, 10
    q = torch.tensor([[1.0, -1.0] * (d // 2)])
    down, up = 1 + 2.0 ** -8 - 2.0 ** -12, 1 - 2.0 ** -9 + 2.0 ** -13  # both round to 1.0 in bf16
    adversarial = torch.tensor([down, up] * (d // 2)).repeat(150, 1)
    adversarial[:, 0] += torch.arange(150) * 2.0 ** -20  # distinct exact scores, same bf16 rows
    plain = torch.ones(320, d)  # first, over 10 blocks of 32: the running k-th best is theirs by then
    plain[:, 0] += 0.001 * d  # bf16-exact rows scoring 0.001 d - d/2 + d/2
    plain = plain.bfloat16().float()
    e = torch.cat([plain, adversarial])
    assert torch.equal(e[320:].bfloat16().float(), torch.ones(150, d))
    prepared = topk.prepare_table(e, bf16_filter=True)
    for block in (None, 32):
        got = topk_cpu.fused_topk(q.expand(4, -1).contiguous(), e, k, block_items=block, bf16_scan=True,
                                  **prepared.cpu_extras())
        want = reference(q.expand(4, -1), e, k)
        assert (want[1] >= 320).all()  # the adversarial rows are the best
        assert_same(got, want, f"block={block}")


def test_prepare_table_choices():
    e = torch.randn(50, 8)
    assert topk.prepare_table(e, bf16_filter=False).filter_table is None
    auto = topk.prepare_table(e, bf16_filter=None)  # a copy only where the CPU has native bf16 dot products
    assert (auto.filter_table is not None) == topk_cpu.native_bf16()
    half = topk.prepare_table(e.bfloat16(), bf16_filter=True)  # a bf16 table: its norms, no copy
    assert half.filter_table is None and half.filter_norms is not None
    assert topk.prepare_table(e.double(), bf16_filter=True).cpu_extras() == {}
    with pytest.raises(ValueError, match="prepare_table: item_table"):
        topk.prepare_table(torch.randn(3))


@pytest.fixture
def count_packed(monkeypatch):
    """How many filter GEMMs ran on a packed table: proves the packed path really ran."""
    return counter(monkeypatch, topk_cpu.PackedTable, "scores", lambda start, q: 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 20), N=st.one_of(st.integers(1, 200), st.integers(1000, 3000)), d=st.integers(1, 64),
       k=st.integers(1, 60), M=st.integers(0, 6), pack_block=st.sampled_from([32, 96, 2 ** 18]),
       float32_table=st.booleans(), scale=st.sampled_from([1.0, 0.25, -1.0, 0.3]), seed=st.integers(0, 2 ** 31 - 1))
def test_packed_filter_property(count_packed, B, N, d, k, M, pack_block, float32_table, scale, seed):
    # The filter GEMM on the pre-packed table (query blocks of up to 16 rows), in blocks of the packed
    # size (ragged and zero-padded at the end), for a float32 table's bf16 copy (12-bit integer
    # entries: the copy's rounding matters, as above) and for a bf16 table itself.
    g = torch.Generator().manual_seed(seed)
    if float32_table:
        q = torch.randint(-8, 9, (B, d), generator=g).float()
        e = torch.randint(-4095, 4096, (N, d), generator=g).float()
    else:
        q, e = wide_inputs(B, N, d, seed=seed)
    ex = torch.randint(-1, N, (B, M), generator=g) if M else None
    prepared = topk.prepare_table(e, bf16_filter=True, pack_block=pack_block)
    assert (prepared.filter_packed is not None) == topk_cpu.PackedTable.available()
    before = count_packed[0]
    got = fused_topk(q, prepared, k, scale=scale, exclude=ex, backend="cpu")
    assert_same(got, reference(q, e, k, scale=scale, exclude=ex), f"seed={seed}")
    ran = prepared.filter_packed is not None and B <= topk_cpu.PACKED_MAX_QUERIES
    assert (count_packed[0] - before == (-(-N // pack_block) if ran else 0)), f"seed={seed}"


def test_packed_products_equal_torch_mm():
    # Block by block, the packed GEMM is torch.mm's product bit for bit, padding rows scoring 0.
    if not topk_cpu.PackedTable.available():
        pytest.skip("this CPU has no native bf16 dot products (or this torch no oneDNN packing)")
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(1000, 77, generator=g).to(torch.bfloat16)
    q = torch.randn(5, 77, generator=g).to(torch.bfloat16)
    packed = topk_cpu.PackedTable.of(e, block=256)
    assert len(packed.parts) == 4 and packed.block == 256
    for start in range(0, 1000, 256):
        rows = e[start:start + 256]
        got = packed.scores(start, q)
        assert got.shape == (5, -(-rows.shape[0] // topk_cpu.CHUNK) * topk_cpu.CHUNK)
        assert torch.equal(got[:, :rows.shape[0]], torch.mm(q, rows.t())), f"seed={seed}, block at {start}"
        assert (got[:, rows.shape[0]:] == 0).all()
    assert topk_cpu.PackedTable.of(e.float()) is None and topk_cpu.PackedTable.of(e, block=100) is None


def test_no_packing_where_it_is_not_available(monkeypatch):
    monkeypatch.setattr(topk_cpu.PackedTable, "available", staticmethod(lambda: False))
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-4095, 4096, (300, 16), generator=g).float()  # integer scores: exact in any order
    prepared = topk.prepare_table(e, bf16_filter=True)
    assert prepared.filter_packed is None and prepared.filter_table is not None
    q = torch.randint(-8, 9, (3, 16), generator=g).float()
    assert_same(fused_topk(q, prepared, 7, backend="cpu"), reference(q, e, 7), f"unpacked, seed={seed}")


def test_bf16_filter_is_the_default_where_native(count_rescores):
    q, e = wide_inputs(4, 300, 16, seed=1)
    check(q, e, 5, backend="cpu", seed=1)
    assert (count_rescores[0] > 0) == topk_cpu.native_bf16()


# ---------------------------------------------------------------------------- Triton internals

def adversarial_floats(seed, n):
    """float32 values where an order-preserving key is easy to get wrong: signed zeros, subnormals,
    the extremes, infinities, neighbours one ulp apart, repeats."""
    g = torch.Generator().manual_seed(seed)
    one = torch.tensor(1.0)
    tiny = torch.finfo(torch.float32).tiny
    fixed = torch.tensor([0.0, -0.0, 1e-45, -1e-45, tiny, -tiny, 3.4028235e38, -3.4028235e38, INF, -INF,
                          1.0, -1.0, torch.nextafter(one, one + 1).item(), torch.nextafter(one, one - 1).item(),
                          -torch.nextafter(one, one + 1).item(), -torch.nextafter(one, one - 1).item()])
    spread = torch.randn(n, generator=g) * torch.exp2(torch.randint(-140, 120, (n,), generator=g).float())
    values = torch.cat([fixed, spread, fixed])  # every fixed value twice: ties at distinct indices
    return values[torch.randperm(values.numel(), generator=g)]


@pytest.mark.parametrize("k", [5, 300])
def test_triton_scores_come_back_bit_exact(k, device):
    # d = 1 and a query of 1.0: every score IS a chosen float32, so the kernel's key encoding and
    # the module's decoding are checked end to end, on every kind of float, against the reference.
    seed = random.randrange(2 ** 31)
    values = adversarial_floats(seed, 268)
    q = torch.tensor([[1.0], [-1.0], [0.5]])
    check(q, values[:, None], k, backend="triton", seed=seed, device=device)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(-(2 ** 63) + 1, 2 ** 63 - 1), min_size=2, max_size=40, unique=True))
def test_triton_key_decoding_keeps_the_order(keys):
    # Any two keys the kernel can produce: the larger one decodes to the better (score, index) pair,
    # score descending then index ascending. (The kernel stores no -0.0 and no NaN but one.)
    keys = torch.tensor(keys, dtype=torch.int64)
    values, indices = topk_triton.decode(keys)
    real = ~values.isnan() & ~((values == 0) & torch.signbit(values))
    keys, values, indices = keys[real], values[real].double(), indices[real]
    order = torch.argsort(keys, descending=True)
    v, i = values[order], indices[order]
    better = (v[:-1] > v[1:]) | ((v[:-1] == v[1:]) & (i[:-1] < i[1:]))
    assert better.all()
    assert ((indices >= 0) & (indices <= 2 ** 32 - 1)).all()


# ---------------------------------------------------------------------------- validation

def test_a_table_changed_in_place_after_prepare_table_is_refused():
    """prepare_table keeps the caller's table but a snapshot of its bf16 copy and norms: after e.mul_(-1) the
    filter scanned the old rows and the exact pass scored the new, results of neither table."""
    e, q = torch.randn(64, 8), torch.randn(3, 8)
    prepared = topk.prepare_table(e, bf16_filter=True)
    fused_topk(q, prepared, 5, backend="cpu")
    e.mul_(-1)
    with pytest.raises(ValueError, match="changed in place after prepare_table"):
        fused_topk(q, prepared, 5, backend="cpu")
    again = fused_topk(q, topk.prepare_table(e, bf16_filter=True), 5, backend="cpu")
    assert torch.equal(again[1], fused_topk(q, e, 5, backend="reference")[1])


def test_prepare_table_takes_an_inference_tensor():
    """A table made under torch.inference_mode has no version counter: prepare_table raised RuntimeError
    reading it (FastReaRec cloned around it; the public function did not). It is prepared, and scores."""
    with torch.inference_mode():
        e, q = torch.randn(64, 8), torch.randn(3, 8)
        prepared = topk.prepare_table(e, bf16_filter=True)
        got = fused_topk(q, prepared, 5, backend="cpu")
    assert prepared.filter_table is not None and prepared.version is None
    assert torch.equal(got[1], fused_topk(q, e, 5, backend="reference")[1])


def test_prepare_table_refuses_a_bad_pack_block():
    """pack_block=-32 (or 0, or 40) made every result of the filter path empty: ids -1, scores -inf."""
    e = torch.randn(64, 8)
    for bad in (-32, 0, 40, 32.0, True):
        with pytest.raises(ValueError, match=f"pack_block must be a positive multiple of 32, got {bad!r}"):
            topk.prepare_table(e, bf16_filter=True, pack_block=bad)


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "k must be >= 1"), (dict(k=-3), "k must be >= 1"), (dict(k=True), "k must be a positive"),
    (dict(k=2.5), "k must be a positive"), (dict(q=torch.zeros(3)), "queries must be 2-D"),
    (dict(e=torch.zeros(10, 5)), "d differs"), (dict(e=torch.zeros(10, 4, dtype=torch.int64)), "item_table must be float"),
    (dict(exclude=torch.zeros(3, 2)), "integer item ids"), (dict(exclude=torch.zeros(2, 2, dtype=torch.int64)), r"exclude must be \(B, M\)"),
    (dict(exclude=torch.zeros(3, dtype=torch.int64)), r"exclude must be \(B, M\)"), (dict(backend="gpu"), "unknown kernel backend"),
    (dict(scale="x"), "scale must be a real number"), (dict(scale="2"), "scale must be a real number"),
    (dict(scale=True), "scale must be a real number"), (dict(scale=torch.ones(2)), "scale must be a real number"),
    (dict(scale=torch.tensor(2.0, requires_grad=True)), "scale is a tensor that requires grad, but it gets no gradient"),
    (dict(scale=float("inf")), "scale must be finite"), (dict(scale=torch.tensor(float("nan"))), "scale must be finite"),
    (dict(q=torch.zeros(3, 4, dtype=torch.float64), backend="triton"), "Triton backend takes .* queries"),
    (dict(e=torch.zeros(1, 4).expand(TRITON_MAX_ITEMS + 1, 4), backend="triton"), "Triton backend takes up to"),
])
def test_bad_arguments(bad, match):
    args = dict(q=torch.zeros(3, 4), e=torch.zeros(10, 4), k=2, exclude=None, backend="cpu", scale=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_topk(args["q"], args["e"], args["k"], scale=args["scale"], exclude=args["exclude"],
                   backend=args["backend"])


@pytest.mark.parametrize("queries, table, scale", [
    ([[3e38, 1.0]], [[1e-3, 0.0], [0.0, 1.0], [2e-3, 0.0], [0.0, 0.0]], 2.0),  # scale * q overflows, the scores do not
    ([[1e-38, 0.0]], [[1e30, 0.0], [3e30, 0.0]], 2.0 ** -20),  # scale * q rounds below the normal range
])
def test_a_power_of_two_scale_never_overflows_or_rounds_the_queries(queries, table, scale):
    """The CPU path folds a power-of-two scale into the queries only where that is exact."""
    q, e = torch.tensor(queries), torch.tensor(table)
    want = fused_topk(q, e, e.shape[0], scale=scale, backend="reference")
    got = fused_topk(q, e, e.shape[0], scale=scale, backend="cpu")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_native_bf16_follows_the_cpu_flags():
    """The bf16 paths (the top-K's filter, the fused cross-entropy's bf16 products) switch on exactly
    where the CPU reports AVX512-BF16 or AMX: on such a machine a probe that said False would turn them
    off without any test failing, the bf16 tests only skipping."""
    from rearec_kernels.packed import native_bf16

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


@pytest.mark.parametrize("queries, table, message", [
    ([[1.0, 2.0]], torch.ones(4, 2), r"fused_topk: queries must be a torch.Tensor, got list"),
    (torch.ones(2, 3, 1), torch.ones(4, 2), r"fused_topk: queries must be 2-D, got shape \(2, 3, 1\)"),
    (torch.ones(2, 2, dtype=torch.int32), torch.ones(4, 2), r"queries must be float16/bfloat16/float32/float64, got torch.int32"),
    (torch.ones(2, 2), torch.ones(4, 2, dtype=torch.int64), r"must be float16/bfloat16/float32/float64, got torch.int64"),
])
def test_bad_arguments_name_what_was_received(queries, table, message):
    """Each refusal names the op, the argument and what it got (type, shape or dtype)."""
    with pytest.raises(ValueError, match=message):
        fused_topk(queries, table, 1)
