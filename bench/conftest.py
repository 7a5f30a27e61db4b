"""Shared for benchmarks: every benchmark starts at the thread count the run started with, and
records it; after the run, every ratio a benchmark recorded in extra_info is printed."""
import pytest
import torch

STARTING_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads_as_the_run_started(request):
    """A benchmark that sets torch's thread count (e.g. to time one rank's share on one thread) must
    not leave it for the ones after it: each starts at the run's count and is put back after."""
    torch.set_num_threads(STARTING_THREADS)
    yield
    torch.set_num_threads(STARTING_THREADS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    # The count the benchmark ran at: read as it ends, so that one that sets its own is seen.
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None and "torch_threads" not in bench.extra_info:
        bench.extra_info["torch_threads"] = torch.get_num_threads()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    lines = []
    for bench in benchmarks:
        info = getattr(bench, "extra_info", {}) or {}
        keys = [k for k in info if k.startswith(("ratio", "ms_", "floor", "sgemm", "peak", "x_", "best_s", "extra_mb", "prefill_ms", "decode_ms", "torch_threads"))]
        if keys:
            lines.append(f"{bench.name}: " + ", ".join(f"{k}={info[k]:.4g}" if isinstance(info[k], float) else f"{k}={info[k]}" for k in keys))
    if lines:
        terminalreporter.write_sep("-", "recorded ratios and figures")
        for line in lines:
            terminalreporter.write_line(line)
