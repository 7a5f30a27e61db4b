"""Serving single-user requests from many threads: micro-batching in front of a FastReaRec.

Production traffic is a stream of one-user requests. Served one by one, each call re-reads the
whole item table for a single user. :class:`RequestBatcher` queues requests, and a worker thread
takes whatever arrived within ``max_wait_ms`` of the oldest waiting request (up to ``max_batch``),
and serves it with one ``engine.recommend`` call per (depth, exclude_seen) group::

    engine = FastReaRec.load("model.safetensors", session_cache_mb=256)
    with RequestBatcher(engine, max_batch=256, max_wait_ms=2.0) as batcher:
        future = batcher.submit(history, k=10, user="u42")   # from any thread
        recs = future.result()                                 # one row: items, scores, raw_items

Each result is what ``engine.recommend([history], k=k, depth=depth, exclude_seen=exclude_seen,
users=[user])`` returns, up to float rounding: a group is ranked at its largest ``k`` and each request
keeps its first ``k`` (the ranking is a total order, best score first and the lower id on ties, so a
shorter list is a prefix). Batching changes the rounding of the scores (other matrix shapes round
differently), so two items whose scores differ by less than that could trade places.

The window: it opens at the oldest waiting request's arrival or at the moment the previous batch
was answered, whichever is later, and closes after ``max_wait_ms``, when ``max_batch`` requests
wait, or once as many requests arrived since that answer as it answered. The last rule is for
clients who send their next request only when answered (a user's next visit): they are all back in
the next batch, where a window counted from the oldest arrival alone lets those who waited during
a batch leave without the ones it answered, and the clients split into two half-size batches that
take turns. The price, under load from independent clients: a request that arrived while the
previous batch ran may wait up to ``max_wait_ms`` more, for company.

A request that ``recommend`` would refuse fails its own future with that ``ValueError``: when a
batched call raises (a ValueError or any other exception), the group is halved until each failing
request is served alone, so one bad request never fails the others. The queue is bounded
(``max_queue``): ``submit`` waits for room (backpressure) up to its ``timeout``, then raises
:class:`QueueFull`. ``close()`` (or leaving the ``with`` block) serves what is queued and stops the
worker threads.

Threads on CPU: the batcher's worker should be the only thread running torch's parallel ops (see
:func:`release_openmp_threads`, which the batcher calls for the thread that builds it); 16 client
threads calling ``recommend`` themselves served 129 requests/s in the replay bench (README's run), where
one client thread alone served 397-442 and the batcher 1,539.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np
import torch

from rearec.config import plain_number
from rearec.inputs import Recommendations, as_integer

__all__ = ["QueueFull", "RequestBatcher", "release_openmp_threads"]


@functools.lru_cache(maxsize=None)
def _openmp_pause():
    """``omp_pause_resource_all`` of the OpenMP runtime torch ships with (None where not found)."""
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for name in names:
        if name.startswith(("libgomp", "libomp", "libiomp")):
            try:
                return ctypes.CDLL(os.path.join(folder, name)).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
    return None


def release_openmp_threads() -> bool:
    """Let go of the calling thread's OpenMP worker threads (OpenMP 5's ``omp_pause_resource_all``,
    soft: the next parallel region of this thread starts them again). Returns whether it could.

    Why: torch runs its intra-op parallelism on OpenMP, and every thread that has run a parallel
    region keeps a team of worker threads. GNU OpenMP counts them all, and once they outnumber the
    cores it makes every team stop spinning between regions and sleep instead, so each of the
    hundreds of small parallel ops of a ``recommend`` call pays a wake-up. A server that built its
    engine in the main thread and serves from a batcher thread has two teams: on this 2-core CPU the
    same calls took 16.2 ms per 16-user batch from the batcher thread against 12.5 ms from the main
    thread, and 0.05 against 0.02 ms for a small ``add``. :class:`RequestBatcher` calls this in the
    thread that constructs it."""
    pause = _openmp_pause()
    if pause is None:
        return False
    return pause(1) == 0  # omp_pause_soft


class QueueFull(RuntimeError):
    """The batcher's queue stayed full for the whole ``submit`` timeout."""


@dataclass
class _Request:
    history: list
    k: int
    depth: Optional[int]
    user: Optional[Hashable]
    exclude_seen: bool
    arrival: float
    future: Future


class RequestBatcher:
    """Micro-batches single-user requests into ``engine.recommend`` calls; see the module docstring.

    ``max_batch``: most requests per engine call; ``max_wait_ms``: how long the oldest request waits
    for company; ``max_queue``: most requests waiting (bounded memory); ``workers``: worker threads
    (each serves whole batches; the engine is safe to share between threads). The constructing
    thread's OpenMP threads are released (:func:`release_openmp_threads`): the workers' teams should
    be the only ones. With several workers, call ``torch.set_num_threads(cores // workers)`` before
    building the batcher, so that their teams together fit the cores.
    """

    def __init__(self, engine, max_batch: int = 256, max_wait_ms: float = 2.0, max_queue: int = 4096,
                 workers: int = 1):
        max_batch, max_queue, workers, max_wait_ms = map(plain_number, (max_batch, max_queue, workers, max_wait_ms))
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(max_wait_ms, (int, float)) or isinstance(max_wait_ms, bool) or \
                not 0 <= max_wait_ms <= threading.TIMEOUT_MAX * 1e3:
            raise ValueError(f"max_wait_ms must be a number of milliseconds from 0 to {threading.TIMEOUT_MAX * 1e3:.3g}, "
                             f"got {max_wait_ms!r}")
        if getattr(engine, "input_shard", None) is not None:
            raise ValueError("a FastReaRec built with shard_items=True cannot serve behind a RequestBatcher: its batches "
                             "follow arrival times, which differ between ranks, and every rank must make the same "
                             "calls in the same order; call the engine from one thread per rank instead")
        self.engine = engine
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1e3
        self.max_queue = max_queue
        self._queue: "deque[_Request]" = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closing = False
        self.requests = self.batches = 0  # served so far
        # Why each batch's window closed: full (max_batch), returned (as many arrived since the last
        # answer as it answered), waited (max_wait_ms passed), closing (close() drains the queue).
        self.window_ends = {"full": 0, "returned": 0, "waited": 0, "closing": 0}
        # The window's clock (see _next_batch): when the last batch's results were handed out, how
        # many requests it answered, and how many requests had arrived by then.
        self._last_served, self._last_answered, self._arrived_by_then = float("-inf"), max_batch, 0
        self._arrivals = 0
        release_openmp_threads()
        self._threads = [threading.Thread(target=self._work, name=f"rearec-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ clients
    def submit(self, history: Sequence, k: int = 10, depth: Optional[int] = None, user: Optional[Hashable] = None,
               exclude_seen: bool = False, *, timeout: Optional[float] = None) -> Future:
        """A Future of this history's one-row :class:`Recommendations`. Waits up to ``timeout``
        seconds (None: as long as it takes) for room in the queue, then raises :class:`QueueFull`; from a
        done-callback (callbacks run on the worker thread that answered) it never waits. The history is
        copied: changing the list afterwards does not change the request."""
        # A snapshot: the caller may change its list after submitting, and an iterator could be read only
        # once (a batch that fails is retried in halves, to find the request that failed it).
        if isinstance(history, (torch.Tensor, np.ndarray)):
            history = history.tolist()
        elif not isinstance(history, (str, bytes, set, frozenset, dict)) and hasattr(history, "__iter__"):
            history = list(history)  # (a set has no order: left as it is, for recommend to refuse)
        future: Future = Future()
        request = _Request(history, k, depth, user, exclude_seen, 0.0, future)
        # A future's done-callbacks run on the worker that served it: a submit from there must not wait
        # for room that only that worker can make. It joins the queue at once, past max_queue if need be.
        from_worker = threading.current_thread() in self._threads
        if timeout is not None:
            timeout = plain_number(timeout)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
                raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
            if timeout >= threading.TIMEOUT_MAX:  # "forever" (the lock's wait takes no more)
                timeout = None
        with self._not_full:
            if not from_worker and not self._not_full.wait_for(
                    lambda: self._closing or len(self._queue) < self.max_queue, timeout):
                raise QueueFull(f"the request queue stayed full ({self.max_queue} waiting) for {timeout} s: "
                                "slow down, add workers, or raise max_queue")
            if self._closing:
                raise RuntimeError("this RequestBatcher is closed: submit to a new one")
            request.arrival = time.monotonic()
            self._queue.append(request)
            self._arrivals += 1
            self._not_empty.notify()
        return future

    def close(self) -> None:
        """Serve every queued request, then stop the worker threads (waits for them). From a done-callback
        (which runs on a worker) it returns at once: the workers drain what is left once their callbacks
        return. (Waiting there deadlocks: a thread cannot join itself, and two workers closing from
        callbacks at once would each wait for the other.)"""
        with self._lock:
            self._closing = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
        if threading.current_thread() in self._threads:
            return
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> "RequestBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """requests and batches served so far, the mean batch size, and why the batches' windows closed
        (``window_ends``: full, returned, waited, closing)."""
        with self._lock:
            return dict(requests=self.requests, batches=self.batches,
                        mean_batch=self.requests / self.batches if self.batches else 0.0,
                        window_ends=dict(self.window_ends))

    # ------------------------------------------------------------------ workers
    def _next_batch(self) -> list:
        """Blocks for the next batch; an empty list means closed and drained."""
        with self._not_empty:
            while True:
                self._not_empty.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return []
                deadline = max(self._queue[0].arrival, self._last_served) + self.max_wait
                while len(self._queue) < self.max_batch and not self._closing \
                        and self._arrivals - self._arrived_by_then < self._last_answered:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._not_empty.wait(remaining)
                if self._queue:  # (another worker may have taken it all while this one waited)
                    break
            reason = ("full" if len(self._queue) >= self.max_batch else "closing" if self._closing else
                      "returned" if self._arrivals - self._arrived_by_then >= self._last_answered else "waited")
            self.window_ends[reason] += 1
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self.requests += len(batch)
            self.batches += 1
            self._not_full.notify_all()
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            try:
                self._answer(batch)
            except BaseException as error:  # a fault of the batcher itself: still, no future stays pending
                for request in batch:
                    _deliver(request.future, error=error)

    def _answer(self, batch: list) -> None:
        groups: dict = {}
        for request in batch:
            try:
                running = request.future.set_running_or_notify_cancel()
            except RuntimeError:  # the client completed the future itself: nothing to serve
                continue
            if running:
                # Types too: depth=True must not join depth=1 (recommend refuses a bool depth).
                key = (type(request.depth), request.depth, type(request.exclude_seen), request.exclude_seen)
                try:
                    hash(key)
                except TypeError:  # e.g. a list as depth: alone, recommend will say what is wrong
                    key = id(request)
                groups.setdefault(key, []).append(request)
        answers: dict = {}  # id(request) -> (request, its Recommendations or the exception it raised)
        for group in groups.values():
            try:
                self._serve(group, group[0].depth, group[0].exclude_seen, answers)
            except BaseException as error:  # the worker must outlive any request
                for request in group:
                    answers.setdefault(id(request), (request, error))
        # The window's clock starts now, before any client hears back (see _next_batch).
        with self._lock:
            self._last_served, self._last_answered = time.monotonic(), len(batch)
            self._arrived_by_then = self._arrivals
        for request, outcome in answers.values():
            if isinstance(outcome, BaseException):
                _deliver(request.future, error=outcome)
            else:
                _deliver(request.future, result=outcome)

    def _serve(self, group: list, depth, exclude_seen: bool, answers: dict) -> None:
        bad_k = [r for r in group if not _valid_k(r.k)]
        for request in bad_k:  # alone, so that it fails with recommend's own error for its k
            self._serve_valid([request], depth, exclude_seen, answers)
        self._serve_valid([r for r in group if _valid_k(r.k)], depth, exclude_seen, answers)

    def _serve_valid(self, group: list, depth, exclude_seen: bool, answers: dict) -> Optional[BaseException]:
        """Serves ``group`` with one recommend call; each request's result (or error) into ``answers``.
        Returns the error the whole group's call raised, if it failed."""
        if not group:
            return None
        users = [r.user for r in group]
        try:
            k = group[0].k if len(group) == 1 else max(as_integer(r.k) for r in group)  # alone: recommend checks it
            recs = self.engine.recommend([r.history for r in group], k=k, depth=depth, exclude_seen=exclude_seen,
                                         users=users if any(u is not None for u in users) else None)
        except Exception as error:
            if len(group) == 1:  # the very call recommend([history], ...) makes: its own error
                answers[id(group[0])] = (group[0], error)
                return error
            # Some request is bad (a ValueError, or anything else one request can cause): halve the
            # group until each bad one is alone. A bad request costs about two calls per halving, not
            # one call per request of its group.
            half = len(group) // 2
            first = self._serve_valid(group[:half], depth, exclude_seen, answers)
            if first is not None and not isinstance(error, INPUT_ERRORS) and _same_error(first, error):
                # Half the rows fail as all did, with an error no input check raises (a device error, a
                # failed allocation of a fixed size): the machine's fault, not a request's. The other half
                # shares it without a call: a persistent fault costs log2(n) calls per batch, not 2n - 1.
                for request in group[half:]:
                    answers[id(request)] = (request, error)
                return error
            self._serve_valid(group[half:], depth, exclude_seen, answers)
            return error
        except BaseException as error:  # never leave a future pending
            for request in group:
                answers[id(request)] = (request, error)
            return error
        for i, request in enumerate(group):
            answers[id(request)] = (request, _row(recs, i, as_integer(request.k)))
        return None


#: Errors that the engine's input checks raise: one request's, found by halving its batch.
INPUT_ERRORS = (ValueError, TypeError, IndexError, KeyError)


def _same_error(a: BaseException, b: BaseException) -> bool:
    return type(a) is type(b) and str(a) == str(b)


def _deliver(future: Future, result=None, error: Optional[BaseException] = None) -> None:
    """Complete ``future``; a future the client already completed, or a done-callback that raises past
    ``Exception`` (SystemExit...), must not end the worker: the other requests still wait for it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except BaseException:  # noqa: BLE001 - see the docstring; the future's own callbacks' business
        pass


def _valid_k(k) -> bool:
    """A k that ``recommend`` takes (any other would be hidden behind the group's largest k): a positive
    integer, numpy and torch integers included (they join the group's call, not one of their own)."""
    value = as_integer(k)
    return value is not None and value >= 1


def _row(recs: Recommendations, i: int, k: int) -> Recommendations:
    raw = None if recs.raw_items is None else [recs.raw_items[i][:k]]
    return Recommendations(items=recs.items[i:i + 1, :k].clone(), scores=recs.scores[i:i + 1, :k].clone(),
                           raw_items=raw)
