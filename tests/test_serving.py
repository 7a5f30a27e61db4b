"""Serving: the engine's session KV cache, fixed-shape buffers, bf16 on CPU, and the RequestBatcher.

Every cached result is checked against the same engine call without ``users`` (no cache), on
random visit sequences; bf16 against a float64 reference with the FlashAttention rule.
"""
import os
import re
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec import ReaRec, ReaRecConfig
from rearec.data.ids import IdMapping
from rearec.engine import FastReaRec
from rearec.serving import QueueFull, RequestBatcher, release_openmp_threads
from rearec_kernels.backend import interpreting
from rearec_kernels.kv_cache import KVCache
from tests.synthetic import markov_sequences, next_item_samples
from tests.test_session_cache import run_in_threads

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])


def small_model(seed=0, n_items=60, hidden=16, heads=2, layers=2, max_len=6, K=2, act="gelu"):
    torch.manual_seed(seed)
    model = ReaRec(ReaRecConfig(n_items=n_items, hidden_size=hidden, n_heads=heads, n_layers=layers,
                                inner_size=24, max_len=max_len, reason_steps=K, hidden_act=act)).eval()
    with torch.no_grad():  # make biases and LayerNorm affine parameters matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def assert_same(engine, histories, users, depths, k):
    """With users (session cache) and without: states within 1e-5, same top-k, every readout/exclusion."""
    for depth in depths:
        got = engine.reasoning_states(histories, depth=depth, users=users)
        want = engine.reasoning_states(histories, depth=depth)
        assert (got - want).abs().max() <= 1e-5
        for readout in ("last", "mean"):
            for exclude_seen in (False, True):
                have = engine.recommend(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen,
                                        users=users)
                expect = engine.recommend(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen)
                assert torch.equal(have.items, expect.items)
                assert torch.allclose(have.scores, expect.scores, atol=1e-4, rtol=1e-5)
                assert have.raw_items == expect.raw_items


# ---------------------------------------------------------------------------- the session cache
visit = st.tuples(st.integers(0, 3), st.sampled_from(["append", "append3", "same", "edit", "restart"]),
                  st.integers(0, 10 ** 6))


def user_bytes(config) -> int:
    """One cached user's K/V in float32: keys and values of every layer at max_len positions."""
    return 2 * config.n_layers * config.hidden_size * config.max_len * 4


@given(st.integers(0, 2 ** 31 - 1), st.integers(1, 3), st.integers(1, 2), st.integers(2, 8),
       st.sampled_from([1, 2, 100]), st.lists(st.lists(visit, min_size=1, max_size=3), min_size=1, max_size=7))
@settings(**SETTINGS)
def test_session_cache_equals_no_cache_over_random_visits(seed, heads, layers, max_len, users_fitting, calls):
    """Growth past max_len (the window shifts), edits in the middle, repeats, restarts, several
    users per call (one twice), a budget of 1, 2 or 100 users (eviction), every depth, readout and
    exclude_seen."""
    model = small_model(seed, n_items=37, hidden=8 * heads, heads=heads, layers=layers, max_len=max_len, K=2)
    budget = users_fitting * user_bytes(model.config)
    engine = FastReaRec.from_model(model, session_cache_mb=budget / 2 ** 20)
    full = {}
    for call in calls:
        users, histories = [], []
        for user, action, draw in call:
            history = full.get(user, [])
            item = draw % 37
            if action == "restart" or not history:
                history = [item]
            elif action == "append":
                history = history + [item]
            elif action == "append3":
                history = history + [item, (item * 7 + 1) % 37, (item * 5 + 2) % 37]
            elif action == "edit":
                history = list(history)
                history[draw % len(history)] = (history[draw % len(history)] + 1) % 37
            full[user] = history
            users.append(f"user-{user}")
            histories.append(history)
        assert_same(engine, histories, users, depths=range(3), k=7)
    stats = engine.cache_stats()
    assert stats["hits"] + stats["misses"] >= sum(len(c) for c in calls)
    assert 0 < stats["bytes"] <= budget


def test_session_cache_reuses_the_prefix_and_recomputes_past_max_len():
    engine = FastReaRec.from_model(small_model(max_len=5), session_cache_mb=1)
    history = [3, 1, 4]
    engine.recommend([history], users=["u"])
    assert engine.cache_stats()["misses"] == 1
    for item in [1, 5]:  # lengths 4, 5: extensions of the cached window
        history = history + [item]
        engine.recommend([history], users=["u"])
    assert engine.cache_stats()["hits"] == 2
    history = history + [9]  # length 6 > max_len 5: the window shifts, nothing is reusable
    engine.recommend([history], users=["u"])
    assert engine.cache_stats()["misses"] == 2
    history[-3] = 2  # an edit: the prefix before it is reused
    assert_same(engine, [history], ["u"], depths=[2], k=5)


def test_tensor_and_numpy_user_keys_are_their_values():
    """A 0-d tensor hashes by identity: keys given as tensors or numpy ints must still find their user."""
    engine = FastReaRec.from_model(small_model(max_len=5), session_cache_mb=1)
    engine.recommend([[3, 1], [4]], users=torch.tensor([7, 8]))
    engine.recommend([[3, 1, 4], [4, 1]], users=[torch.tensor(7), np.int64(8)])
    engine.recommend([[3, 1, 4, 1], [4, 1, 5]], users=np.array([7, 8]))
    assert engine.cache_stats()["hits"] == 4 and engine.cache_stats()["misses"] == 2
    with pytest.raises(ValueError, match="user key 0 is an array of shape"):
        engine.recommend([[3]], users=[torch.tensor([7, 8])])


def test_mixed_batch_of_returning_and_recomputed_users():
    """One batch mixing returning users (their new items only) with users whose history is
    recomputed (new, or edited): every row equals the call without users, for states, recommend
    and the adaptive readout, visit after visit."""
    model = small_model(5, max_len=6)
    model.config.halt_kl = 0.05
    engine = FastReaRec.from_model(model, session_cache_mb=1)
    engine.recommend([[1, 2], [4, 5, 6], [7, 8]], users=["a", "b", "c"])  # a, b, c come back below
    histories = [[9, 3], [1, 2, 3], [2, 5, 1, 7], [4, 5, 6, 7], [7, 2]]  # new, back, new, back, edited
    users = ["x", "a", "y", "b", "c"]
    want = engine.reasoning_states(histories, depth=2)
    hits = engine.cache_stats()["hits"]
    assert (engine.reasoning_states(histories, depth=2, users=users) - want).abs().max() <= 1e-5
    assert engine.cache_stats()["hits"] == hits + 3  # a, b and c (up to its edit) reused a prefix
    for step in range(3):  # each visit: everyone appends an item, one user starts over
        histories = [h + [(3 * step + b) % 30] for b, h in enumerate(histories)]
        histories[step] = [step + 1]
        assert_same(engine, histories, users, depths=[0, 2], k=5)
        got_state, got_steps = engine.adaptive_states(histories, depth=2, users=users)
        want_state, want_steps = engine.adaptive_states(histories, depth=2)
        assert torch.equal(got_steps, want_steps) and (got_state - want_state).abs().max() <= 1e-5


def test_session_cache_with_raw_ids(tmp_path):
    model = small_model(3, n_items=30)
    items = [f"item-{i}" for i in range(30)]
    model.save(tmp_path / "m.safetensors", id_mapping=IdMapping(["u"], items))
    engine = FastReaRec.load(tmp_path / "m.safetensors", session_cache_mb=1)
    history = []
    for step in range(9):
        history.append(items[(step * 7) % 30])
        assert_same(engine, [history, history[-2:]], ["a", "b"], depths=[0, 2], k=4)
    assert engine.cache_stats()["hits"] > 0


def test_eviction_under_a_tiny_budget():
    model = small_model(4, max_len=6)
    one_user = user_bytes(model.config)
    engine = FastReaRec.from_model(model, session_cache_mb=2.5 * one_user / 2 ** 20)  # two users fit
    histories = {u: [] for u in range(5)}
    for step in range(12):
        users = [step % 5, (step + 2) % 5]
        for u in users:
            histories[u].append((u * 11 + step) % 60)
        assert_same(engine, [histories[u] for u in users], users, depths=[1], k=6)
    stats = engine.cache_stats()
    assert stats["evictions"] > 0 and stats["bytes"] <= 2 * one_user


def test_threads_sharing_one_engine_with_the_session_cache():
    model = small_model(5, n_items=80, max_len=8, K=3)
    engine = FastReaRec.from_model(model, session_cache_mb=1)
    plain = FastReaRec.from_model(model, session_cache_mb=0)
    errors = []
    barrier = threading.Barrier(4)

    def client(offset):
        try:
            barrier.wait()
            history = []
            for step in range(12):
                history.append((offset * 13 + step * 5) % 80)
                user = "shared" if step % 4 == 3 else f"u{offset}"  # one user all threads race on
                for depth in (0, 3):
                    got = engine.recommend([history], k=8, depth=depth, users=[user])
                    want = plain.recommend([history], k=8, depth=depth)
                    if not torch.equal(got.items, want.items):
                        errors.append((offset, step, depth))
                    compared.append(1)
        except BaseException as error:  # an error in a thread is no test failure: it is reported below
            errors.append(error)

    compared = []
    run_in_threads(client, 4)
    assert not errors and len(compared) == 4 * 12 * 2
    assert engine.cache_stats()["hits"] > 0


def test_cache_off_and_bad_arguments():
    model = small_model(6)
    engine = FastReaRec.from_model(model, session_cache_mb=0)
    recs = engine.recommend([[1, 2]], users=["u"])  # users are accepted, nothing is cached
    assert torch.equal(recs.items, engine.recommend([[1, 2]]).items)
    assert engine.cache_stats() == dict(hits=0, misses=0, evictions=0, bytes=0, users=0, max_bytes=0)
    for bad in (-1, float("nan"), True, "64"):
        with pytest.raises(ValueError, match="session_cache_mb"):
            FastReaRec.from_model(model, session_cache_mb=bad)
    assert FastReaRec.from_model(model, session_cache_mb=np.int64(1)).cache_stats()["max_bytes"] == 2 ** 20
    with pytest.raises(ValueError, match="holds no user"):
        FastReaRec.from_model(model, session_cache_mb=1e-6)
    cached = FastReaRec.from_model(model, session_cache_mb=1)
    with pytest.raises(ValueError, match="one key per history"):
        cached.recommend([[1, 2], [3]], users=["u"])
    with pytest.raises(ValueError, match="not hashable"):
        cached.reasoning_states([[1, 2]], users=[["u"]])


# ---------------------------------------------------------------------------- fixed shapes
def test_cache_capacity_is_fixed_and_batches_are_bucketed(monkeypatch):
    model = small_model(7, max_len=9, K=2)
    engine = FastReaRec.from_model(model)
    allocations = []
    allocate = KVCache.allocate

    def counting(*args, **kwargs):
        cache = allocate(*args, **kwargs)
        allocations.append(tuple(cache.keys.shape))
        return cache

    monkeypatch.setattr(KVCache, "allocate", counting)
    gen = torch.Generator().manual_seed(8)
    for batch, longest in [(3, 2), (4, 9), (3, 5), (4, 1), (3, 12)]:  # one bucket (4), every longest history
        histories = [torch.randint(60, (int(n),), generator=gen).tolist() for n in
                     torch.randint(1, longest + 1, (batch,), generator=gen)]
        histories[0] = list(range(longest))
        want = model.recommend(histories, k=5)
        assert torch.equal(engine.recommend(histories, k=5).items, want.items)
    assert allocations == [(2, 4, 2, 9 + 2, 8)]  # capacity max_len + K, batch bucket 4: allocated once
    engine.recommend([[1]] * 5, k=5)  # a larger bucket: the buffers grow once...
    assert allocations[-1][1] == 8 and len(allocations) == 2
    for batch in (1, 2, 7, 3):  # ...and serve every smaller batch from their first rows
        assert torch.equal(engine.recommend([[batch, 2]] * batch, k=5).items, model.recommend([[batch, 2]] * batch, k=5).items)
    assert len(allocations) == 2


@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                    reason="CUDA graphs need a GPU and compiled Triton kernels (TRITON_INTERPRET unset)")
def test_cuda_graphs_captured_once_per_bucket_and_depth(monkeypatch):
    """Different inputs of one bucket replay the same graphs (a stale replay would differ from eager),
    and two threads capture and replay side by side."""
    model = small_model(20, n_items=90, max_len=9, K=2).cuda()
    graphed = FastReaRec.from_model(model)
    eager = FastReaRec.from_model(model, cuda_graphs=False)
    captures = []
    graph_class = torch.cuda.CUDAGraph

    def counting(*args, **kwargs):
        captures.append(threading.current_thread().name)
        return graph_class(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", counting)
    gen = torch.Generator().manual_seed(21)
    for batch, longest in [(3, 2), (4, 9), (3, 5), (4, 1), (3, 12)]:
        histories = [torch.randint(90, (int(n),), generator=gen).tolist() for n in
                     torch.randint(1, longest + 1, (batch,), generator=gen)]
        for depth in (1, 2):
            got, want = graphed.recommend(histories, k=7, depth=depth), eager.recommend(histories, k=7, depth=depth)
            assert torch.equal(got.items, want.items)
            assert torch.allclose(got.scores, want.scores, atol=1e-4, rtol=1e-5)
    assert len(captures) == 2  # bucket 4, depths 1 and 2
    errors = []

    def client(i):
        for step in range(6):
            histories = [[(i * 11 + step + j) % 90 for j in range(1 + step)]] * (i + 1)
            if not torch.equal(graphed.recommend(histories, k=5).items, eager.recommend(histories, k=5).items):
                errors.append((i, step))

    run_in_threads(client, 2)
    assert not errors


# ---------------------------------------------------------------------------- bf16 on CPU
def trained_model():
    """A tiny model trained briefly (next-item cross-entropy on a Markov task)."""
    torch.manual_seed(9)
    model = ReaRec(ReaRecConfig(n_items=40, hidden_size=32, n_heads=2, inner_size=32, max_len=10, reason_steps=2,
                                dropout=0.1, input_dropout=0.1))
    histories, lengths, targets = next_item_samples(markov_sequences(n_users=200, n_items=40, length=11))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(10)
    for _ in range(40):
        idx = torch.randint(len(targets), (128,), generator=gen)
        states = model(histories[idx], lengths[idx])
        loss = F.cross_entropy(model.scores(model.readout(states)), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())) / a.numel()


@pytest.mark.parametrize("which", ["random", "trained"])
def test_bf16_on_cpu_within_the_reference_bf16_error(which):
    if which == "random":
        torch.manual_seed(11)
        model = ReaRec(ReaRecConfig(n_items=500, hidden_size=64, n_heads=2, inner_size=80, max_len=20,
                                    reason_steps=2)).eval()
    else:
        model = trained_model()
    gen = torch.Generator().manual_seed(12)
    n, L = model.config.n_items, model.config.max_len
    histories = [torch.randint(n, (int(m),), generator=gen).tolist() for m in torch.randint(1, L + 4, (47,), generator=gen)]
    reference = ReaRec(model.config).eval()
    reference.load_state_dict(model.state_dict())
    exact = reference.double().reasoning_states(histories).double()
    reference_bf16 = reference.to(torch.bfloat16).reasoning_states(histories).double()
    engine = FastReaRec.from_model(model, dtype=torch.bfloat16)
    assert engine.item_table.dtype == torch.bfloat16
    got = engine.reasoning_states(histories).double()
    for reduce in (torch.max, torch.mean):  # the FlashAttention rule, on the max and the mean error
        assert reduce((got - exact).abs()) <= 2 * reduce((reference_bf16 - exact).abs()) + 1e-3
    want = FastReaRec.from_model(model).recommend(histories, k=20).items
    assert overlap(engine.recommend(histories, k=20).items, want) >= 0.98


def test_an_engine_built_in_inference_mode_keeps_plain_tables():
    """Tensors made under torch.inference_mode have no version counter, which the Triton top-K's
    per-table cache reads: the engine keeps its scoring table a plain tensor (the same results)."""
    model = small_model(14)
    want = FastReaRec.from_model(model, dtype=torch.bfloat16).recommend([[1, 2, 3]], k=5)
    with torch.inference_mode():
        engine = FastReaRec.from_model(model, dtype=torch.bfloat16)
        got = engine.recommend([[1, 2, 3]], k=5)
    assert not engine.scoring_table.is_inference() and engine.item_table is engine.scoring_table
    assert torch.equal(got.items, want.items)
    model.config.halt_kl = np.float32(0.05)  # a numpy float is a number of nats too
    engine.recommend([[1, 2, 3]], k=5, readout="adaptive")


def test_dtype_checks():
    model = small_model(13)
    with pytest.raises(ValueError, match="float16"):
        FastReaRec.from_model(model, dtype=torch.float16)  # CPU: float32 or bfloat16
    assert FastReaRec.from_model(model, dtype="bfloat16").dtype == torch.bfloat16  # a name works too
    with pytest.raises(ValueError, match="float64 is not served on cpu"):
        FastReaRec.from_model(model, dtype="float64")


def test_an_engine_needs_a_model():
    """Something other than a ReaRec (a state_dict, a path, an engine) is named in one TypeError; it used
    to fail deep inside the constructor with an AttributeError ('dict' object has no attribute 'config')."""
    model = small_model(14)
    for bad in (model.state_dict(), "model.safetensors", FastReaRec.from_model(model), None):
        with pytest.raises(TypeError, match=f"FastReaRec serves a ReaRec model, got {type(bad).__name__}"):
            FastReaRec.from_model(bad)


def test_an_unknown_backend_is_refused_when_the_engine_is_built():
    """A misspelt backend used to build an engine whose every call then failed; it fails at construction."""
    model = small_model(15)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda': use one of auto, triton, cpu, reference"):
        FastReaRec.from_model(model, backend="cuda")
    assert FastReaRec.from_model(model, backend="reference").recommend([[1, 2]], k=3).items.shape == (1, 3)


# ---------------------------------------------------------------------------- the batcher
def batcher_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rearec-batcher")]


def test_batcher_equals_one_call_per_request_mixed_depth_and_k(tmp_path):
    model = small_model(14, n_items=50, max_len=7, K=3)
    items = [f"i{i}" for i in range(50)]
    model.save(tmp_path / "m.safetensors", id_mapping=IdMapping(["u"], items))
    engine = FastReaRec.load(tmp_path / "m.safetensors")
    gen = torch.Generator().manual_seed(15)
    requests = []
    for i in range(40):
        history = [items[j] for j in torch.randint(50, (int(torch.randint(1, 10, (1,), generator=gen)),),
                                                   generator=gen).tolist()]
        requests.append(dict(history=history, k=1 + i % 7, depth=[None, 0, 1, 3][i % 4], exclude_seen=i % 3 == 0))
    with RequestBatcher(engine, max_batch=16, max_wait_ms=20) as batcher:
        futures = [None] * len(requests)

        def client(offset):
            for i in range(offset, len(requests), 4):
                futures[i] = batcher.submit(**requests[i])

        run_in_threads(client, 4)
        results = [f.result(timeout=30) for f in futures]
        assert batcher.stats()["mean_batch"] > 1
    for request, got in zip(requests, results):
        want = engine.recommend([request["history"]], k=request["k"], depth=request["depth"],
                                exclude_seen=request["exclude_seen"])
        assert torch.equal(got.items, want.items)
        assert torch.allclose(got.scores, want.scores, atol=1e-5, rtol=1e-6)
        assert got.raw_items == want.raw_items
    assert not batcher_threads()


def test_batcher_bad_request_fails_only_its_own_future():
    model = small_model(16)
    engine = FastReaRec.from_model(model)
    bad = [dict(history=[]), dict(history=[1, 999]), dict(history=[1], k=0), dict(history=[1], depth=7),
           dict(history=[1], user=["unhashable"]), dict(history=[1], depth=[1]), dict(history=[1], k="3"),
           dict(history=[1], depth=True), dict(history=5), dict(history=None), dict(history=[1], exclude_seen="no")]
    with RequestBatcher(engine, max_batch=64, max_wait_ms=50) as batcher:
        good = [batcher.submit([i % 60, (i * 7) % 60], k=5) for i in range(6)]
        depth_one = batcher.submit([5, 6], k=5, depth=1)  # same window as depth=True, which must fail
        failing = [batcher.submit(**b) for b in bad]
        for request, future in zip(bad, failing):
            args = dict(request)
            user = args.pop("user", None)
            with pytest.raises(ValueError) as expected:
                engine.recommend([args.pop("history")], users=None if user is None else [user], **args)
            with pytest.raises(ValueError, match=re.escape(str(expected.value))):
                future.result(timeout=30)
        for i, future in enumerate(good):
            assert torch.equal(future.result(timeout=30).items, engine.recommend([[i % 60, (i * 7) % 60]], k=5).items)
        assert torch.equal(depth_one.result(timeout=30).items, engine.recommend([[5, 6]], k=5, depth=1).items)


def test_batcher_takes_a_snapshot_of_each_history():
    """An iterator beside a bad request (the batch is retried in halves: the iterator must not be read
    twice), and a list the caller keeps changing after submitting."""
    engine = FastReaRec.from_model(small_model(26))
    live = [1, 2, 3]
    with RequestBatcher(engine, max_batch=64, max_wait_ms=200) as batcher:
        from_iterator = batcher.submit(iter([1, 2, 3]), k=3)
        bad = batcher.submit([1, 999], k=3)
        from_list = batcher.submit(live, k=3)
        live.append(4)
        with pytest.raises(ValueError, match="999"):
            bad.result(timeout=30)
        want = engine.recommend([[1, 2, 3]], k=3).items
        assert torch.equal(from_iterator.result(timeout=30).items, want)
        assert torch.equal(from_list.result(timeout=30).items, want)
    with RequestBatcher(engine, max_batch=64, max_wait_ms=50) as batcher:  # a set has no order: refused
        with pytest.raises(ValueError, match="history 0 is a set, which has no order"):
            batcher.submit({3, 17, 40}, k=3).result(timeout=30)
    with RequestBatcher(engine, max_batch=np.int64(4)) as numpy_sized:
        assert numpy_sized.max_batch == 4 and type(numpy_sized.max_batch) is int


def test_a_done_callback_may_submit_into_a_full_queue():
    """Callbacks run on the worker: a submit from one must not wait for room only that worker makes."""
    engine = FastReaRec.from_model(small_model(27))
    batcher = RequestBatcher(engine, max_batch=1, max_wait_ms=0, max_queue=1)
    follow_ups = []
    first = batcher.submit([1, 2])
    first.add_done_callback(lambda done: [follow_ups.append(batcher.submit([3, i])) for i in range(3)])
    deadline = time.monotonic() + 30
    while len(follow_ups) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(follow_ups) == 3
    assert all(f.result(timeout=30).items.shape[0] == 1 for f in follow_ups)
    batcher.close()


def test_a_done_callback_may_close_the_batcher():
    """close() from a done-callback (on the worker) stops the batcher and still serves what is queued; it
    used to raise "cannot join current thread" there and leave the batcher half closed."""
    engine = FastReaRec.from_model(small_model(28))
    batcher = RequestBatcher(engine, max_batch=1, max_wait_ms=0)
    closed, errors = threading.Event(), []

    def close(done):
        try:
            batcher.close()
        except Exception as error:
            errors.append(error)
        closed.set()

    first = batcher.submit([1, 2])
    queued = batcher.submit([3, 4])
    first.add_done_callback(close)
    assert closed.wait(30) and not errors
    assert torch.equal(queued.result(timeout=30).items, engine.recommend([[3, 4]]).items)
    deadline = time.monotonic() + 30
    while batcher_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not batcher_threads()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([1])


def test_two_workers_closing_from_callbacks_at_once_do_not_deadlock():
    """close() from a done-callback joined the other workers: two workers closing at once each waited for
    the other, forever (and so did every later close() and the queued futures)."""
    engine = FastReaRec.from_model(small_model(29))
    batcher = RequestBatcher(engine, max_batch=1, max_wait_ms=0, workers=2)
    both, returned = threading.Barrier(2, timeout=30), []

    def close(done):
        both.wait()  # both workers are inside a callback
        batcher.close()
        returned.append(threading.current_thread().name)

    first, second = batcher.submit([1, 2]), batcher.submit([3, 4])
    queued = batcher.submit([5])
    first.add_done_callback(close)
    second.add_done_callback(close)
    assert torch.equal(queued.result(timeout=30).items, engine.recommend([[5]]).items)
    deadline = time.monotonic() + 30
    while batcher_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not batcher_threads() and len(returned) == 2
    batcher.close()  # and from the caller's thread, at once


class ProxyEngine:
    """An engine that counts its calls, and whose calls wait until ``release`` is set."""

    def __init__(self, engine, released=True):
        self.engine, self.release, self.calls = engine, threading.Event(), 0
        if released:
            self.release.set()

    def recommend(self, *args, **kwargs):
        self.calls += 1
        self.release.wait(30)
        return self.engine.recommend(*args, **kwargs)


def test_batcher_one_bad_request_costs_a_few_calls_not_one_per_request():
    engine = ProxyEngine(FastReaRec.from_model(small_model(22)))
    histories = [[i % 60] for i in range(63)] + [[1, 60]]  # item 60 is outside the table
    batcher = RequestBatcher(engine, max_batch=64, max_wait_ms=10_000)
    futures = [batcher.submit(h, k=3) for h in histories]  # 64 requests: one full batch
    with pytest.raises(ValueError, match="history 0 holds item id 60"):
        futures[-1].result(timeout=30)
    assert all(f.result(timeout=30).items.shape == (1, 3) for f in futures[:-1])
    batcher.close()
    assert engine.calls <= 1 + 2 * 6  # the batch, then two calls per halving (64 -> 1)


class FailingEngine:
    """An engine whose every call fails with the same error (a device fault, not a request's)."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def recommend(self, *args, **kwargs):
        self.calls += 1
        raise self.error


def test_batcher_a_persistent_fault_costs_log_calls_not_one_per_request():
    """An error no input check raises, on every call (a failed fixed-size allocation, a broken device):
    halving the batch down to single requests made 2n - 1 = 127 calls for 64 requests."""
    engine = FailingEngine(RuntimeError("CUDA error: an illegal memory access was encountered"))
    batcher = RequestBatcher(engine, max_batch=64, max_wait_ms=10_000)
    futures = [batcher.submit([1], k=3) for _ in range(64)]
    for f in futures:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            f.result(timeout=30)
    batcher.close()
    assert engine.calls <= 1 + 6  # the batch, then one call per halving


def test_batcher_worker_outlives_callbacks_and_completed_futures():
    """A done-callback raising past Exception (SystemExit) went out of set_result and ended the worker, as did
    a future the client completed itself: every later request then waited forever."""
    engine = ProxyEngine(FastReaRec.from_model(small_model(24)), released=False)
    batcher = RequestBatcher(engine, max_batch=3, max_wait_ms=10_000)
    first, second, third = (batcher.submit([i + 1], k=2) for i in range(3))

    def leave(_):
        raise SystemExit("a callback that exits")

    first.add_done_callback(leave)
    third.set_result("answered by the client")
    engine.release.set()
    assert second.result(timeout=30).items.shape == (1, 2)
    assert batcher.submit([4], k=2).result(timeout=30).items.shape == (1, 2)  # the worker lives on
    assert third.result() == "answered by the client"
    batcher.close()


def test_batcher_waits_and_timeouts_beyond_the_locks_limit():
    """A max_wait_ms or a submit timeout past threading.TIMEOUT_MAX raised OverflowError in the worker
    (its future then waited forever) or in submit."""
    engine = FastReaRec.from_model(small_model(25))
    with pytest.raises(ValueError, match="max_wait_ms must be a number of milliseconds from 0 to"):
        RequestBatcher(engine, max_wait_ms=1e300)
    with RequestBatcher(engine, max_batch=2, max_wait_ms=threading.TIMEOUT_MAX * 1e3) as batcher:
        a = batcher.submit([1], k=2, timeout=float("inf"))
        b = batcher.submit([2], k=2, timeout=1e300)
        assert a.result(timeout=30).items.shape == b.result(timeout=30).items.shape == (1, 2)
        for bad in (float("nan"), -1, "soon", True):
            with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
                batcher.submit([1], timeout=bad)


def test_batcher_numpy_and_torch_k_join_the_batch():
    """A k that is a numpy or torch integer is a k that recommend takes: it joins its group's one call
    (each such request used to be served by a call of its own), and keeps its own first k."""
    model = small_model(29)
    engine = ProxyEngine(FastReaRec.from_model(model))
    ks = [np.int64(3), torch.tensor(5), 2, np.int32(7), 4, torch.tensor(1)]
    histories = [[1 + i, 7, 2 + i] for i in range(len(ks))]
    batcher = RequestBatcher(engine, max_batch=len(ks), max_wait_ms=10_000)
    futures = [batcher.submit(h, k=k) for h, k in zip(histories, ks)]  # one full batch
    results = [f.result(timeout=30) for f in futures]
    batcher.close()
    assert engine.calls == 1
    for history, k, got in zip(histories, ks, results):
        want = model.recommend([history], k=int(k))
        assert torch.equal(got.items, want.items)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-6, atol=1e-6)


def test_batcher_workers_stay_alive_and_count_only_real_batches():
    """Several workers: one that finds the queue emptied by another when its window ends goes back to
    waiting (it used to take the empty batch for "closed" and stop)."""
    engine = FastReaRec.from_model(small_model(24))
    batcher = RequestBatcher(engine, max_batch=64, max_wait_ms=20, workers=3)
    for _ in range(5):
        futures = [batcher.submit([1 + i, 2], k=3) for i in range(3)]
        assert all(f.result(timeout=30).items.shape == (1, 3) for f in futures)
        time.sleep(0.05)
    assert len(batcher_threads()) == 3
    stats = batcher.stats()
    assert stats["requests"] == 15 and 5 <= stats["batches"] <= 15
    batcher.close()
    assert not batcher_threads()


def test_batcher_full_queue_and_close_drains():
    engine = FastReaRec.from_model(small_model(17))
    blocked = ProxyEngine(engine, released=False)
    batcher = RequestBatcher(blocked, max_batch=1, max_wait_ms=0, max_queue=2)
    first = batcher.submit([1, 2])  # taken by the worker, which blocks
    time.sleep(0.05)
    queued = [batcher.submit([3]), batcher.submit([4, 5])]
    with pytest.raises(QueueFull, match="max_queue"):
        batcher.submit([6], timeout=0.05)
    blocked.release.set()
    batcher.close()  # serves what is queued, then stops
    assert all(f.done() for f in [first] + queued)
    assert torch.equal(queued[1].result().items, engine.recommend([[4, 5]]).items)
    assert not batcher_threads()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([1])


def test_batcher_window_ends_when_the_answered_clients_are_back():
    """Closed-loop clients (each sends its next request once answered): after the first batch,
    a batch leaves as soon as as many requests arrived as the last batch answered, not at the end
    of max_wait_ms; so every batch holds all the clients, and a long window costs them nothing."""
    engine = ProxyEngine(FastReaRec.from_model(small_model(23)))
    clients, visits = 4, 6
    batcher = RequestBatcher(engine, max_batch=64, max_wait_ms=2_000)
    results = {}

    def client(c):
        for v in range(visits):
            history = [(c * 11 + j) % 60 for j in range(v + 1)]
            results[c, v] = (history, batcher.submit(history, k=3).result(timeout=60))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    # One batch per round of visits, every client in it. The first batch waits for its window (nobody
    # was answered before); the other five end as the last client returns, not at the window's end.
    stats = batcher.stats()
    assert (stats["requests"], stats["batches"], stats["mean_batch"]) == (clients * visits, visits, clients)
    assert stats["window_ends"] == dict(full=0, returned=visits - 1, waited=1, closing=0)
    for (c, v), (history, got) in results.items():
        assert torch.equal(got.items, engine.engine.recommend([history], k=3).items)


def test_release_openmp_threads_leaves_torch_working():
    """The release is soft: the same thread's next parallel op starts its threads again and computes
    the same; releasing twice is fine. (On Linux the wheel's libgomp has it: True.)"""
    x = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    before = x @ x.T
    released = release_openmp_threads()
    assert isinstance(released, bool)
    if sys.platform.startswith("linux"):
        assert released
    assert torch.equal(x @ x.T, before) and release_openmp_threads() == released


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="counts the process's threads in /proc; needs 2 cores for an OpenMP team")
def test_release_openmp_threads_ends_the_team():
    """After a parallel op on 2 intra-op threads the process has an OpenMP worker thread more; the
    release ends it (the thread count falls back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def count():
            return len(os.listdir("/proc/self/task"))

        release_openmp_threads()
        idle = count()
        torch.randn(2000, 2000).exp_()  # a parallel region: the team's worker thread starts
        assert count() > idle
        assert release_openmp_threads()
        deadline = time.monotonic() + 5
        while count() > idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert count() == idle
    finally:
        torch.set_num_threads(threads)


def test_batcher_with_the_session_cache():
    model = small_model(18, n_items=70, max_len=6)
    engine = FastReaRec.from_model(model, session_cache_mb=1)
    plain = FastReaRec.from_model(model, session_cache_mb=0)
    histories = {u: [] for u in range(6)}
    with RequestBatcher(engine, max_batch=8, max_wait_ms=5, workers=2) as batcher:
        for step in range(8):
            futures = {}
            for u in histories:
                histories[u].append((u * 17 + step * 3) % 70)
                futures[u] = batcher.submit(list(histories[u]), k=6, depth=step % 3, user=u)
            for u, future in futures.items():
                want = plain.recommend([histories[u]], k=6, depth=step % 3)
                assert torch.equal(future.result(timeout=30).items, want.items)
    assert engine.cache_stats()["hits"] > 0
    assert not batcher_threads()


def test_batcher_bad_settings():
    engine = FastReaRec.from_model(small_model(19))
    for kwargs in (dict(max_batch=0), dict(max_queue=0), dict(workers=0), dict(max_wait_ms=-1),
                   dict(max_wait_ms=float("inf")), dict(max_wait_ms=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            RequestBatcher(engine, **kwargs)
