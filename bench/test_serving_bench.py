"""Serving real traffic: MovieLens-100K's test period replayed by 16 client threads, four ways.

The stream: every test sample of ``rearec.data.load_dataset("ml-100k")`` (temporal split) is one visit
of its user, with that user's whole history before it, in time order. 16 client threads share the
stream: each takes the earliest visit whose user has no request in flight (a user's next visit
waits for the answer to the previous one, so the session cache sees each user's visits in order),
sends it and waits for the answer (a closed loop). Latency counts from sending. (Giving each client a
fixed set of users instead caps the replay at the busiest client's chain of visits, 566 of the
4,257: at most 7.5x serial whatever the server does. The longest chain of one user is 231.) The
model has the serving shape (d=256, 2 layers, 2 heads, inner 300, max_len 50, K=2,
random weights) and an item table of N=50,000 rows (the dataset's items plus random rows).

Modes, all at k=10, depth 2:
* ``per_request``: each client calls ``engine.recommend([history])``;
* ``session_cache``: the same with ``users=[user]`` on an engine with a session KV cache;
* ``batching``: clients submit to one ``RequestBatcher`` (max_batch 256, 2 ms window);
* ``both``: the batcher in front of the engine with the session cache.

Before each mode the main thread's OpenMP threads are released (``release_openmp_threads``), so that
the serving threads' teams are the only ones (the batcher does the same when it is built).

Recorded: requests/s, p50/p99 latency, cache hit rate and mean batch size per mode, and each mode's
requests/s over ``per_request``'s (``x_speedup_*``) and over serial per-request serving from one
client (``x_over_serial_*``, the issue's baseline; measured on the first 400 visits before and after
the four modes, ``*_serial_before`` / ``*_serial_after``, and the mean used). Also the stream's own
limit on batching (``_lockstep_rounds``): the rounds an infinitely fast server would still need, their
mean size, and the time per round that 10x serial would allow; the engine's limit: those rounds
served back to back from one thread (``x_over_serial_lockstep_direct``), the history tokens a visit
prefills through the session cache on average, and the GEMM floor of a visit at this machine's
sgemm peak (``ms_visit_linear_floor``) beside the time per visit that 10x serial allows.
``test_bf16_over_fp32`` times one B=256 depth-2 call in both dtypes, interleaved, and records the
throughput ratio with the machine's bf16 CPU flags. ``test_session_cache_one_new_item`` compares a
B=256 call of returning users (one new item each) with and without the session cache.

    pytest bench/test_serving_bench.py --benchmark-only
    REAREC_REPLAY_REQUESTS=64 pytest bench/test_serving_bench.py --benchmark-only   # a smoke run
"""
import heapq
import os
import statistics
import threading
import time
from collections import deque

import numpy as np
import pytest
import torch

from rearec import ReaRec, ReaRecConfig
from rearec.data import load_dataset
from rearec.engine import FastReaRec
from rearec.flops import prefill_linear_flops, step_linear_flops
from rearec.serving import RequestBatcher, release_openmp_threads
from rearec.session_cache import shared_prefix
from recommend_timing import DEVICE, sync  # bench/ is on sys.path (no __init__)
from recommend_timing import SERVING_SHAPE as ENGINE_SHAPE, sgemm_peak_gflops

SHAPE = dict(ENGINE_SHAPE, reason_steps=2)  # the serving target: K=2
CLIENTS = 16
K, DEPTH = 10, 2
MODES = ("per_request", "session_cache", "batching", "both")
SERIAL_REQUESTS = 400


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReaRec(ReaRecConfig(**SHAPE)).eval().to(DEVICE)


@pytest.fixture(scope="module")
def stream():
    """[(user, history)] of the test period in time order, capped by REAREC_REPLAY_REQUESTS."""
    test = load_dataset("ml-100k").test
    order = np.argsort(test.target_times, kind="stable")
    cap = int(os.environ.get("REAREC_REPLAY_REQUESTS", len(order)))
    return [(test.user(int(i)), test.history(int(i))) for i in order[:cap]]


def _visit_queues(stream):
    """(user -> deque of its visits' stream positions in time order, a heap of (first visit, user):
    the users with no request in flight)."""
    visits = {}
    for j, (user, _) in enumerate(stream):
        visits.setdefault(user, deque()).append(j)
    ready = [(positions[0], user) for user, positions in visits.items()]
    heapq.heapify(ready)
    return visits, ready


def _replay(stream, serve, clients=CLIENTS):
    """Runs the stream through ``serve(user, history)`` from ``clients`` threads; each takes the
    earliest visit whose user has no request in flight (so each user's visits go one at a time, in
    order); (wall s, latencies s)."""
    visits, ready = _visit_queues(stream)
    left = [len(stream)]
    cond = threading.Condition()
    latencies = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(i):
        barrier.wait()
        while True:
            with cond:
                cond.wait_for(lambda: ready or not left[0])
                if not ready:
                    return
                j, user = heapq.heappop(ready)
            start = time.perf_counter()
            serve(user, stream[j][1])
            latencies[i].append(time.perf_counter() - start)
            with cond:
                visits[user].popleft()
                left[0] -= 1
                if visits[user]:
                    heapq.heappush(ready, (visits[user][0], user))
                    cond.notify()  # one waiting client takes it (waking all would load the server's CPU)
                elif not left[0]:
                    cond.notify_all()  # the end: every waiting client returns

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, [x for client_latencies in latencies for x in client_latencies]


def _lockstep_rounds(stream, clients=CLIENTS):
    """The batches an infinitely fast server would form from ``_replay``'s clients: each round serves
    the earliest visit of up to ``clients`` users with nothing in flight, after which their next
    visits are ready. Returns the rounds (lists of stream positions): no server forms bigger batches
    on this stream."""
    visits, ready = _visit_queues(stream)
    rounds = []
    while ready:
        served = [heapq.heappop(ready) for _ in range(min(clients, len(ready)))]
        rounds.append([j for j, _ in served])
        for _, user in served:
            visits[user].popleft()
            if visits[user]:
                heapq.heappush(ready, (visits[user][0], user))
    return rounds


def _lockstep_direct(model, stream, rounds):
    """The most any batcher can get from this engine on this stream: the lockstep rounds served back
    to back from the main thread, session cache on (no clients, no queue, no waiting). requests/s."""
    engine = FastReaRec.from_model(model, session_cache_mb=256)
    engine.recommend([stream[0][1]], k=K, depth=DEPTH)  # warm-up, not a user's visit
    start = time.perf_counter()
    for positions in rounds:
        engine.recommend([stream[j][1] for j in positions], k=K, depth=DEPTH, users=[stream[j][0] for j in positions])
        sync()
    return len(stream) / (time.perf_counter() - start)


def _prefilled_tokens(stream, max_len):
    """History tokens the session cache must prefill over the stream (an unbounded cache): each
    visit's window (its newest ``max_len`` items) past the prefix it shares with the user's previous
    window (the cache's own rule). A window that shifted shares nothing (its first item changed)."""
    last, tokens = {}, 0
    for user, history in stream:
        window = list(history)[-max_len:]
        # the cache reuses at most len - 1 items: the newest is always prefilled (it gives r_0)
        tokens += len(window) - min(shared_prefix(last.get(user, []), window), len(window) - 1)
        last[user] = window
    return tokens


def _run_mode(mode, model, stream):
    """One mode's figures; ``serial`` is per-request serving from one client, on the first
    SERIAL_REQUESTS visits (its rate does not depend on how many)."""
    cached = mode in ("session_cache", "both")
    engine = FastReaRec.from_model(model, session_cache_mb=256 if cached else 0)
    engine.recommend([stream[0][1]], k=K, depth=DEPTH)  # warm-up (buffers, kernels), not a user's visit
    # The clients' (and the batcher's) threads serve; the main thread's OpenMP team would only
    # throttle theirs (see release_openmp_threads): every mode, the serial baseline included.
    release_openmp_threads()
    batch = None
    if mode in ("batching", "both"):
        batcher = RequestBatcher(engine, max_batch=256, max_wait_ms=2.0)

        def serve(user, history):
            batcher.submit(history, k=K, depth=DEPTH, user=user if cached else None).result()
    else:
        def serve(user, history):
            engine.recommend([history], k=K, depth=DEPTH, users=[user] if cached else None)
            sync()
    try:
        if mode == "serial":
            wall, latencies = _replay(stream[:SERIAL_REQUESTS], serve, clients=1)
        else:
            wall, latencies = _replay(stream, serve)
    finally:
        if mode in ("batching", "both"):
            batcher.close()
            batch = batcher.stats()["mean_batch"]
    stats = engine.cache_stats()
    looked_up = stats["hits"] + stats["misses"]
    return dict(requests_per_s=len(latencies) / wall, p50_ms=1e3 * np.percentile(latencies, 50),
                p99_ms=1e3 * np.percentile(latencies, 99), hit_rate=stats["hits"] / looked_up if looked_up else 0.0,
                mean_batch=batch if batch is not None else 1.0)


def test_replay_four_modes(benchmark, model, stream):
    results = {}

    def run_all():
        # Serial serving is the baseline of every ratio: timed before and after the four modes, and
        # the mean taken, so that the machine's drift over the replay shifts the ratios less.
        results["serial_before"] = _run_mode("serial", model, stream)
        for mode in MODES:
            results[mode] = _run_mode(mode, model, stream)
        results["serial_after"] = _run_mode("serial", model, stream)
        results["serial"] = {key: (results["serial_before"][key] + results["serial_after"][key]) / 2
                             for key in results["serial_before"]}

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    base, serial = results["per_request"]["requests_per_s"], results["serial"]["requests_per_s"]
    info = dict(SHAPE, k=K, depth=DEPTH, clients=CLIENTS, requests=len(stream), device=DEVICE,
                torch_threads=torch.get_num_threads())
    rounds = _lockstep_rounds(stream)
    # The stream's own limit: an infinitely fast server still needs len(rounds) batches, so 10x serial
    # needs each to cost at most len(stream) / (10 * serial rate) / len(rounds) seconds.
    info.update(n_lockstep_rounds=len(rounds), x_lockstep_mean_batch=len(stream) / len(rounds),
                ms_round_budget_for_10x=1e3 * len(stream) / (10 * serial) / len(rounds))
    # The engine's own limit: those rounds served back to back from one thread (what the batcher
    # would reach with no threads, queue or wait), and the GEMM work a visit cannot avoid (its
    # prefilled tokens through the layers as the engine runs them, the last layer's tail for the
    # newest item only, and its reasoning steps; the item-table pass and attention left out) at this
    # machine's sgemm peak.
    direct = _lockstep_direct(model, stream, rounds)
    tokens = _prefilled_tokens(stream, SHAPE["max_len"]) / len(stream)
    peak = sgemm_peak_gflops()
    hidden, inner, layers = SHAPE["hidden_size"], SHAPE["inner_size"], SHAPE["n_layers"]
    visit_flops = prefill_linear_flops(tokens, hidden, inner, layers) + DEPTH * step_linear_flops(hidden, inner, layers)
    floor_ms = visit_flops / (peak * 1e9) * 1e3
    info.update(x_requests_per_s_lockstep_direct=direct, x_over_serial_lockstep_direct=direct / serial,
                x_prefilled_tokens_per_visit=tokens, sgemm_peak_gflops=peak, ms_visit_linear_floor=floor_ms,
                ms_visit_budget_for_10x=1e3 / (10 * serial))
    for mode, r in results.items():
        info.update({f"x_requests_per_s_{mode}": r["requests_per_s"], f"x_speedup_{mode}": r["requests_per_s"] / base,
                     f"x_over_serial_{mode}": r["requests_per_s"] / serial,
                     f"ms_p50_{mode}": r["p50_ms"], f"ms_p99_{mode}": r["p99_ms"],
                     f"ratio_hit_rate_{mode}": r["hit_rate"], f"x_mean_batch_{mode}": r["mean_batch"]})
    benchmark.extra_info.update(info)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(sorted(f for f in flags if "bf16" in f or f.startswith("amx"))) or "none"


def test_bf16_over_fp32(benchmark, model):
    """One recommend call at B=256, L=50, depth 2, k=20 in float32 and in bfloat16, interleaved."""
    batch, rounds = 256, int(os.environ.get("REAREC_BENCH_ROUNDS", 5))
    g = torch.Generator().manual_seed(1)
    histories = torch.randint(SHAPE["n_items"], (batch, SHAPE["max_len"]), generator=g).to(DEVICE)
    lengths = torch.full((batch,), SHAPE["max_len"], device=DEVICE)
    engines = {dtype: FastReaRec.from_model(model, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    times = {dtype: [] for dtype in engines}

    def call(dtype):
        engines[dtype].recommend(histories, k=20, depth=2, lengths=lengths)
        sync()

    for dtype in engines:
        call(dtype)
    for _ in range(rounds):
        for dtype in engines:
            start = time.perf_counter()
            call(dtype)
            times[dtype].append(time.perf_counter() - start)
    fp32, bf16 = (statistics.median(times[d]) for d in (torch.float32, torch.bfloat16))
    benchmark.extra_info.update(dict(SHAPE, batch=batch, depth=2, k=20, device=DEVICE, cpu_bf16_flags=_cpu_flags(),
                                     ms_fp32=fp32 * 1e3, ms_bf16=bf16 * 1e3, x_bf16_over_fp32_throughput=fp32 / bf16))
    benchmark.pedantic(call, args=(torch.bfloat16,), rounds=1, warmup_rounds=0)


def test_session_cache_one_new_item(benchmark, model):
    """256 returning users, each with one new item after 40 or more cached ones, depth 2, k=10:
    ``recommend(..., users=)`` (prefills one item per user) against the same call without users
    (prefills every item), interleaved; the histories grow by one item per round."""
    batch, rounds = 256, int(os.environ.get("REAREC_BENCH_ROUNDS", 5))
    g = torch.Generator().manual_seed(2)
    items = torch.randint(SHAPE["n_items"], (batch, 40 + rounds + 1), generator=g).tolist()
    users = list(range(batch))
    engine = FastReaRec.from_model(model, session_cache_mb=256)
    engine.recommend([row[:40] for row in items], k=K, depth=DEPTH, users=users)  # the users' last visit
    times = {"cached": [], "full": []}
    for r in range(rounds):
        histories = [row[:41 + r] for row in items]
        for mode in times:
            start = time.perf_counter()
            engine.recommend(histories, k=K, depth=DEPTH, users=users if mode == "cached" else None)
            sync()
            times[mode].append(time.perf_counter() - start)
    cached, full = (statistics.median(times[m]) for m in ("cached", "full"))
    stats = engine.cache_stats()
    benchmark.extra_info.update(dict(SHAPE, batch=batch, depth=DEPTH, k=K, device=DEVICE, ms_cached=cached * 1e3,
                                     ms_full_prefill=full * 1e3, x_cached_over_full_throughput=full / cached,
                                     ratio_hit_rate=stats["hits"] / (stats["hits"] + stats["misses"])))
    histories = [row[:41 + rounds] for row in items]
    benchmark.pedantic(engine.recommend, args=(histories,), kwargs=dict(k=K, depth=DEPTH, users=users),
                       rounds=1, warmup_rounds=0)
