"""What the GPU check's sections share: the run's context, timing, rows printed as they come, the table.

A row is a dict with any of: section, op, shape, dtype, ms, vs, vs_ms, ratio, target, check. ``check``
is "ok", "FAIL ...", "MISS ..." (a performance target not met), "skipped: ..." or a measurement.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rearec.runs import write_json

COLUMNS = ["section", "op", "shape", "dtype", "ms", "vs", "vs_ms", "ratio", "target", "check"]
WIDTHS = {"section": 9, "op": 34, "shape": 30, "dtype": 5, "ms": 9, "vs": 30, "vs_ms": 9, "ratio": 9,
          "target": 22, "check": 0}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e4 or 0 < abs(value) < 1e-3 else f"{value:.4g}"
    return str(value)


def format_row(row: dict) -> str:
    cells = []
    for c in COLUMNS:
        text = _cell(row.get(c))
        width = WIDTHS[c]
        cells.append(text if not width else text[:width].ljust(width))
    return "  ".join(cells).rstrip()


def header() -> str:
    return format_row({c: c for c in COLUMNS}) + "\n" + "  ".join("-" * (WIDTHS[c] or 20) for c in COLUMNS)


@dataclass
class Context:
    """One run: where (``device``), how big (``mode``: tiny | quick | full), and where rows go."""

    device: torch.device
    mode: str
    rows: list = field(default_factory=list)
    out: Callable[[str], None] = lambda line: print(line, flush=True)
    #: Where the rows are kept as they come (rewritten after each row), or None: a run cut short at its
    #: time limit still leaves every row it measured there.
    rows_file: Optional[str] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def tiny(self) -> bool:
        return self.mode == "tiny"

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def emit(self, section: str, **row) -> dict:
        """Records a row and prints it at once: a run cut short still reports what it measured."""
        row = dict(section=section, **row)
        self.rows.append(row)
        self.out(format_row(row))
        if self.rows_file:  # replaced whole, never half-written
            write_json(self.rows_file, self.rows, default=str)
        return row

    def failure(self, section: str, op: str, exc: BaseException, **row) -> dict:
        self.out(traceback.format_exc(limit=-4).rstrip())
        return self.emit(section, op=op, check=f"FAIL {type(exc).__name__}: {str(exc)[:240]}", **row)

    def guarded(self, section: str, op: str, fn: Callable, *args, **row):
        """Runs ``fn``; an exception becomes a FAIL row and the run goes on."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - every section must let the others run
            self.failure(section, op, exc, **row)
            return None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable, graph: bool = False) -> float:
        """Median milliseconds of ``fn``: triton.testing.do_bench (do_bench_cudagraph with ``graph``)
        on CUDA; one timed call after one warm-up elsewhere (tiny runs only show the code works)."""
        if self.cuda:
            from triton.testing import do_bench, do_bench_cudagraph

            rep = 200 if self.full else 60
            return float(do_bench_cudagraph(fn, rep=rep) if graph else do_bench(fn, warmup=10, rep=rep))
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def bandwidth_bytes_per_s(ctx: Context) -> float:
    """Device memory bandwidth from a device-to-device copy (read + write), 1 GiB on a GPU."""
    n = (1 << 28) if ctx.cuda else (1 << 16)
    src = torch.ones(n, dtype=torch.float32, device=ctx.device)
    dst = torch.empty_like(src)
    ms = ctx.ms(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3)


def launch_floor_ms(ctx: Context) -> float:
    """The cost of one tiny kernel: replaying a CUDA graph of one 1-element add (eager elsewhere)."""
    x = torch.zeros(1, device=ctx.device)
    return ctx.ms(lambda: x.add_(1), graph=ctx.cuda)


def print_table(rows: list, out=print) -> None:
    out("")
    out("== final table ==")
    out(header())
    for row in rows:
        out(format_row(row))


