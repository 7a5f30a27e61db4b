"""Per-user keys and values of the history, kept between calls: a byte-bounded LRU of KV slots.

A returning user's history is usually the previous one plus a new item. Attention over the
history is causal and positions count from the oldest kept item, so the key and value of item t at
layer l depend only on items 0..t of the kept window. Whatever prefix two windows share, item for
item, therefore has the same K/V; only the items after it need a prefill. Reuse is decided by
comparing item ids, never trusted from the key alone: a history edited in the middle reuses what
precedes the edit and recomputes the rest; a history that passed ``max_len`` shifts its window,
its first item changes, and everything is recomputed.

Only the history's K/V are kept, never the reasoning tokens' (they depend on the depth asked for).
This holds for causal backbones only: a bidirectional encoder (BERT4Rec) changes every item's K/V
when an item is appended, so its engine must not use this cache (see ``FastReaRec``).

Layout: one pool ``keys``/``values`` of shape (n_layers, n_slots, H, max_len, Dh) allocated on
first use (``torch.empty``, so CPU pages are only committed as slots fill); each cached user owns
one slot of ``slot_bytes``. ``n_slots = max_bytes // slot_bytes``; when all are taken, the least
recently used user is evicted. Loading into and storing from an engine's :class:`KVCache` copy
one position range per row (strided copies of contiguous (positions, Dh) blocks; one advanced-index
gather over (user, position) pairs was several times slower), under one lock, so a slot never
changes while it is copied: the cache is safe to share between threads (on a GPU, a thread calling
from a CUDA stream of its own waits for its copies before it lets go of the lock).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np
import torch

from rearec_kernels.kv_cache import KVCache

__all__ = ["SessionKVCache", "shared_prefix"]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items two windows share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Entry:
    slot: int
    items: tuple  # the dense item ids whose K/V the slot holds, oldest first


class SessionKVCache:
    """K/V of each user's last history window, LRU-bounded in bytes; see the module docstring.

    ``load(users, windows, cache)`` copies what each user's window can reuse into ``cache`` and
    returns how many leading items each row reuses (at most its length - 1: the newest item is
    always prefilled, its last-layer output is r_0). ``store(users, windows, cache)`` keeps each
    user's window K/V from ``cache`` (after the prefill wrote them). A ``None`` user is not cached.
    """

    def __init__(self, max_bytes: int, *, n_layers: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.shape = (n_layers, n_heads, max_len, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        element = torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = 2 * n_layers * n_heads * max_len * head_dim * element  # keys and values
        self.max_bytes = int(max_bytes)
        self.n_slots = self.max_bytes // self.slot_bytes
        if self.n_slots < 1:
            raise ValueError(f"a session cache of {self.max_bytes} bytes holds no user: one user's K/V take "
                             f"{self.slot_bytes} bytes; raise session_cache_mb or pass 0 to turn the cache off")
        self.keys: Optional[torch.Tensor] = None  # (n_layers, n_slots, H, max_len, Dh), on first store
        self.values: Optional[torch.Tensor] = None
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()  # least recently used first
        self._unused = 0  # slots _unused.. n_slots - 1 have never held a user (no list of n_slots ints)
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_users(users, batch: int) -> list:
        """``users`` as a list of ``batch`` hashable keys (None: not cached); ValueError otherwise."""
        if isinstance(users, (str, bytes)) or not hasattr(users, "__len__") or \
                (isinstance(users, (torch.Tensor, np.ndarray)) and users.ndim != 1):
            shape = f" of shape {tuple(users.shape)}" if isinstance(users, (torch.Tensor, np.ndarray)) else ""
            raise ValueError(f"users must be a list with one key per history, got {type(users).__name__}{shape}")
        if isinstance(users, (set, frozenset, dict)):  # no order: keys would pair with the wrong histories
            raise ValueError(f"users is a {type(users).__name__}, which has no order: pass a list with one key per "
                             "history, in the histories' order")
        # Tensor and numpy keys become Python scalars: a 0-d tensor hashes by identity, so it would
        # never find its user again (and would push real users out).
        users = users.tolist() if isinstance(users, (torch.Tensor, np.ndarray)) else list(users)
        users = [u.item() if isinstance(u, (torch.Tensor, np.generic)) and u.ndim == 0 else u for u in users]
        if len(users) != batch:
            raise ValueError(f"users has {len(users)} keys for {batch} histories: pass one key per history")
        for b, user in enumerate(users):
            if isinstance(user, (torch.Tensor, np.ndarray)):
                raise ValueError(f"user key {b} is an array of shape {tuple(user.shape)}: use a str or int per user")
            try:
                hash(user)
            except TypeError:
                raise ValueError(f"user key {b} ({type(user).__name__}) is not hashable: use a str or int "
                                 "per user") from None
            if holds_nan(user):  # never equal to itself, so never found again (each call a new slot)
                raise ValueError(f"user key {b} is or holds NaN, which never matches itself: use a str or int per "
                                 "user")
        return users

    def _check_cache(self, cache: KVCache) -> None:
        n_layers, H, max_len, Dh = self.shape
        if (cache.n_layers, cache.n_heads, cache.head_dim) != (n_layers, H, Dh) or cache.dtype != self.dtype:
            raise ValueError("SessionKVCache: the KVCache does not match this session cache's layers, heads, "
                             "head dim or dtype")

    # ------------------------------------------------------------------ the two operations
    def load(self, users: Sequence[Optional[Hashable]], windows: Sequence[Sequence[int]],
             cache: KVCache) -> list:
        """Copy each row's reusable K/V into slots 0..reuse-1 of ``cache``; returns ``reuse`` per row."""
        self._check_cache(cache)
        reuse = [0] * len(windows)
        with self._lock:
            for b, (user, window) in enumerate(zip(users, windows)):
                if user is None:
                    continue
                entry = self._entries.get(user)
                n = shared_prefix(entry.items, window) if entry is not None else 0
                n = min(n, len(window) - 1)
                if n > 0:
                    self._entries.move_to_end(user)
                    self.hits += 1
                    reuse[b] = n
                    # One strided copy per row: each (layer, head) holds the prefix contiguously.
                    cache.keys[:, b, :, :n] = self.keys[:, entry.slot, :, :n]
                    cache.values[:, b, :, :n] = self.values[:, entry.slot, :, :n]
                else:
                    self.misses += 1
            self._settle_copies()
        return reuse

    def store(self, users: Sequence[Optional[Hashable]], windows: Sequence[Sequence[int]],
              cache: KVCache) -> None:
        """Keep each user's window K/V, read from slots 0..len(window)-1 of ``cache``. A user that
        appears twice keeps the last row's window. Writes only what the slot does not hold yet."""
        self._check_cache(cache)
        last_row = {user: b for b, user in enumerate(users) if user is not None}
        if not last_row:
            return
        with self._lock:
            if self.keys is None:
                n_layers, H, max_len, Dh = self.shape
                shape = (n_layers, self.n_slots, H, max_len, Dh)
                try:
                    self.keys = torch.empty(shape, dtype=self.dtype, device=self.device)
                    self.values = torch.empty(shape, dtype=self.dtype, device=self.device)
                except (MemoryError, RuntimeError) as error:  # torch's CPU and CUDA allocators differ
                    self.keys = self.values = None
                    raise MemoryError(f"the session cache could not allocate its {self.n_slots * self.slot_bytes / 2**20:,.0f} "
                                      f"MiB on {self.device} ({str(error).splitlines()[0] if str(error) else type(error).__name__}): "
                                      "lower session_cache_mb, or pass 0 to turn the cache off") from None
            for user, b in last_row.items():
                window = tuple(windows[b])
                entry = self._entries.get(user)
                if entry is None:
                    entry = _Entry(self._take_slot(), ())
                    self._entries[user] = entry
                else:
                    self._entries.move_to_end(user)
                start, stop = shared_prefix(entry.items, window), len(window)
                entry.items = window
                if start < stop:
                    self.keys[:, entry.slot, :, start:stop] = cache.keys[:, b, :, start:stop]
                    self.values[:, entry.slot, :, start:stop] = cache.values[:, b, :, start:stop]
            self._settle_copies()

    def _settle_copies(self) -> None:
        """On a GPU the copies above are only queued, on the calling thread's current stream. Threads
        that all use the device's default stream run them in the order the lock gave (the engine's own
        calls do). A thread on a stream of its own waits here for its copies, so that no other thread
        overwrites a slot this one is still reading, or reads a slot this one is still writing."""
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if stream != torch.cuda.default_stream(self.device):
                stream.synchronize()

    def _take_slot(self) -> int:
        if self._unused < self.n_slots:
            self._unused += 1
            return self._unused - 1
        _, evicted = self._entries.popitem(last=False)
        self.evictions += 1
        return evicted.slot

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        """hits / misses (rows with a user key that did / did not reuse cached K/V), evictions, bytes
        held by cached users, users, and the budget in bytes."""
        with self._lock:
            return dict(hits=self.hits, misses=self.misses, evictions=self.evictions,
                        bytes=len(self._entries) * self.slot_bytes, users=len(self._entries),
                        max_bytes=self.max_bytes)

    def clear(self) -> None:
        """Forget every user (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._unused = 0


def holds_nan(key) -> bool:
    """Whether a user key is NaN or holds one in a tuple or frozenset: ``("u", nan)`` equals itself (tuples
    compare items by identity first), but never a second ``("u", nan)``, whose NaN is another object."""
    if isinstance(key, (tuple, frozenset)):
        return any(holds_nan(part) for part in key)
    return key != key
