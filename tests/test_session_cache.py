"""SessionKVCache on its own: what it reuses, that reused K/V are the right ones, LRU in bytes, threads.

The "model" here is a stand-in whose K/V at position t are a function of the items 0..t (what causal
attention guarantees), so a wrong reuse shows up as wrong numbers. The engine-level tests (the real
model, every depth and readout) are in tests/test_serving.py.
"""
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec.session_cache import SessionKVCache, shared_prefix
from rearec_kernels.kv_cache import KVCache

LAYERS, HEADS, DH, MAX_LEN = 2, 2, 3, 7
SETTINGS = dict(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def true_kv(window):
    """(keys, values), each (LAYERS, HEADS, len(window), DH): position t depends on window[:t+1] only."""
    keys = torch.empty(LAYERS, HEADS, len(window), DH)
    for t in range(len(window)):
        seed = hash(tuple(window[: t + 1])) % (2**31)
        keys[:, :, t] = torch.randn(LAYERS, HEADS, DH, generator=torch.Generator().manual_seed(seed))
    return keys, -keys


def session(users_fitting: int) -> SessionKVCache:
    slot = 2 * LAYERS * HEADS * MAX_LEN * DH * 4
    return SessionKVCache(users_fitting * slot, n_layers=LAYERS, n_heads=HEADS, max_len=MAX_LEN, head_dim=DH)


def serve(sessions: SessionKVCache, users, windows):
    """One engine call: load, check reused K/V, 'prefill' the rest, store. Returns reuse per row."""
    cache = KVCache.allocate(LAYERS, len(windows), HEADS, MAX_LEN + 2, DH)
    cache.keys.fill_(float("nan"))
    cache.values.fill_(float("nan"))
    reuse = sessions.load(users, windows, cache)
    for b, window in enumerate(windows):
        keys, values = true_kv(window)
        n = reuse[b]
        assert 0 <= n < len(window)
        assert torch.equal(cache.keys[:, b, :, :n], keys[:, :, :n])
        assert torch.equal(cache.values[:, b, :, :n], values[:, :, :n])
        cache.keys[:, b, :, n:len(window)] = keys[:, :, n:]
        cache.values[:, b, :, n:len(window)] = values[:, :, n:]
    sessions.store(users, windows, cache)
    return reuse


@given(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_shared_prefix(a, b):
    n = shared_prefix(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


visits = st.lists(st.tuples(
    st.integers(0, 4),  # user
    st.sampled_from(["append", "append2", "same", "edit", "new"]),
    st.integers(0, 5),  # item drawn
    st.integers(0, 10),  # edit position
), min_size=1, max_size=25)


@given(visits, st.integers(1, 6), st.integers(1, 3))
@settings(**SETTINGS)
def test_random_visits_reuse_exactly_the_shared_prefix_with_lru_eviction(plan, users_fitting, per_call):
    """Growth past max_len (window shift), edits in the middle, repeats, new users, eviction: each
    row reuses exactly what the last stored window of a still-cached user shares with it."""
    sessions = session(users_fitting)
    full = {}  # user -> full history so far
    stored = OrderedDict()  # the reference LRU: user -> window, least recent first
    hits = misses = evictions = 0
    calls = [plan[i:i + per_call] for i in range(0, len(plan), per_call)]
    for call in calls:
        users, windows, expected = [], [], []
        for user, action, item, where in call:
            history = full.get(user, [])
            if action == "new" or not history:
                history = [item]
            elif action == "append":
                history = history + [item]
            elif action == "append2":
                history = history + [item, (item + 1) % 6]
            elif action == "edit":
                history = list(history)
                history[where % len(history)] = (history[where % len(history)] + 1) % 6
            full[user] = history
            window = tuple(history[-MAX_LEN:])
            users.append(user)
            windows.append(window)
            old = stored.get(user)
            n = min(shared_prefix(old, window), len(window) - 1) if old is not None else 0
            expected.append(n)
            hits, misses = hits + (n > 0), misses + (n == 0)
            if n > 0:
                stored.move_to_end(user)
        assert serve(sessions, users, windows) == expected
        for user in dict.fromkeys(users):  # the reference LRU's store, last row of a user wins
            if user in stored:
                stored.move_to_end(user)
            elif len(stored) == users_fitting:
                stored.popitem(last=False)
                evictions += 1
            stored[user] = windows[max(i for i, u in enumerate(users) if u == user)]
    stats = sessions.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (hits, misses, evictions)
    assert stats["users"] == len(stored) and stats["bytes"] == len(stored) * sessions.slot_bytes
    assert stats["bytes"] <= stats["max_bytes"]


def test_rows_without_a_user_are_never_cached():
    sessions = session(2)
    assert serve(sessions, [None, "a"], [(1, 2, 3), (1, 2, 3)]) == [0, 0]
    assert serve(sessions, [None, "a"], [(1, 2, 3, 4), (1, 2, 3, 4)]) == [0, 3]
    assert sessions.stats()["users"] == 1


def run_in_threads(target, n: int) -> None:
    """``target(i)`` for i in 0..n-1, each on its own thread; returns when all are done."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_threads_sharing_one_cache():
    sessions = session(5)  # fewer slots than users: eviction races with loads
    errors = []

    def client(offset):
        try:
            histories = {}
            for step in range(40):
                # two users of this thread's own, and every fifth visit one user that all threads share
                user = "shared" if step % 5 == 4 else f"u{offset}-{step % 2}"
                history = histories.setdefault(user, [])
                history.append((offset * 7 + step) % 5)
                serve(sessions, [user], [tuple(history[-MAX_LEN:])])
                served.append(1)
        except BaseException as error:  # pragma: no cover - reported below (an error in a thread is no failure)
            errors.append(error)

    served = []
    run_in_threads(client, 4)
    assert not errors and len(served) == 4 * 40
    stats = sessions.stats()
    assert stats["hits"] > 0 and stats["evictions"] > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="holds no user"):
        session(1).__class__(100, n_layers=LAYERS, n_heads=HEADS, max_len=MAX_LEN, head_dim=DH)
    with pytest.raises(ValueError, match="one key per history"):
        SessionKVCache.check_users(["a"], 2)
    with pytest.raises(ValueError, match="not hashable"):
        SessionKVCache.check_users([["a"]], 1)
    with pytest.raises(ValueError, match="one key per history"):
        SessionKVCache.check_users("ab", 2)
    # A set or dict paired its keys with the histories in hash order; a NaN key never found its user
    # again (float("nan") != itself), taking a new slot each call and pushing real users out.
    for unordered in ({"a", "b"}, frozenset("ab"), {"a": 0, "b": 1}):
        with pytest.raises(ValueError, match="no order: pass a list"):
            SessionKVCache.check_users(unordered, 2)
    # Inside a tuple too: ("u", nan) equals itself (identity first) but never the next call's ("u", nan).
    nan = float("nan")
    for key in (nan, np.float64("nan"), torch.tensor(nan), ("u", nan), ("u", (1, nan)), frozenset({("u", nan)})):
        with pytest.raises(ValueError, match="user key 1 is or holds NaN"):
            SessionKVCache.check_users(["a", key], 2)
    assert SessionKVCache.check_users([("u", 1.5), ("v", (2, "x"))], 2) == [("u", 1.5), ("v", (2, "x"))]
    with pytest.raises(ValueError, match="does not match"):
        session(1).load(["a"], [(1,)], KVCache.allocate(LAYERS, 1, HEADS, 4, DH + 1))
    # One key as a 0-d array or tensor (users=np.array("u42")): iterating it was a TypeError traceback;
    # a 2-D array would pair its rows with the histories.
    for one in (np.array("u42"), torch.tensor(7), np.array([["a"], ["b"]])):
        with pytest.raises(ValueError, match=r"users must be a list with one key per history, got .* of shape"):
            SessionKVCache.check_users(one, 2 if one.ndim == 2 else 1)
    assert SessionKVCache.check_users(np.array(["a", "b"]), 2) == ["a", "b"]


def test_clear_forgets_every_user_and_frees_every_slot():
    """After clear() no user's K/V is reused, the byte and user counts are 0 (the hit and miss counters
    stay), and every slot can be filled again: a full cache takes as many new users as it holds."""
    sessions = session(users_fitting=3)
    windows = [[1, 2, 3], [2, 3], [3, 1, 1]]
    serve(sessions, ["a", "b", "c"], windows)
    assert serve(sessions, ["a", "b", "c"], [w + [0] for w in windows]) == [3, 2, 3]  # all three reused
    before = sessions.stats()
    sessions.clear()
    after = sessions.stats()
    assert after["users"] == 0 and after["bytes"] == 0
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert serve(sessions, ["a", "b", "c"], [w + [0] for w in windows]) == [0, 0, 0]  # forgotten
    assert serve(sessions, ["d", "e", "f"], [[1], [2], [3]]) == [0, 0, 0]
    assert sessions.stats()["users"] == 3 and sessions.stats()["evictions"] == before["evictions"] + 3


def test_a_cache_too_big_to_allocate_says_which_setting_to_lower():
    """The slots are allocated on the first store: a size the machine cannot hold is a one-line
    MemoryError naming session_cache_mb, and the cache stays empty (a later store fails alike)."""
    sessions = session(users_fitting=2 ** 50)  # about 7e17 bytes
    for _ in range(2):
        with pytest.raises(MemoryError, match="lower session_cache_mb, or pass 0"):
            serve(sessions, ["a"], [(1, 2)])
        assert sessions.keys is None and sessions.stats()["users"] == 0
