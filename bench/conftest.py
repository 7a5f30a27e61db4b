"""Shared for benchmarks: after the run, print every ratio a benchmark recorded in extra_info."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    lines = []
    for bench in benchmarks:
        info = getattr(bench, "extra_info", {}) or {}
        keys = [k for k in info if k.startswith(("ratio", "ms_", "floor", "sgemm", "peak", "x_", "best_s", "extra_mb", "prefill_ms", "decode_ms"))]
        if keys:
            lines.append(f"{bench.name}: " + ", ".join(f"{k}={info[k]:.4g}" if isinstance(info[k], float) else f"{k}={info[k]}" for k in keys))
    if lines:
        terminalreporter.write_sep("-", "recorded ratios and figures")
        for line in lines:
            terminalreporter.write_line(line)
