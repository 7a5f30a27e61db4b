"""What every command shares at run time: its errors, printing, device and thread choice."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

PROG = "rearec"


class CommandError(ValueError):
    """A mistake in the command's options or files: one line on stderr, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C, with what was saved and how to go on (exit code 130)."""


class Diverged(Exception):
    """Training stopped on a NaN/Inf loss; the message says what was kept (exit code 1)."""


def out(text: str = "") -> None:
    """Print a line to stdout without breaking an open progress bar."""
    tqdm.write(text, file=sys.stdout)


def show_progress(no_progress: bool) -> bool:
    """Whether to draw progress bars: unless --no-progress, and only when stderr is a terminal (in a
    log file or a pipe every redraw of a bar would stay behind as text)."""
    return not no_progress and sys.stderr.isatty()


def one_line(error: BaseException) -> str:
    """``error`` as one line: the problem and, where known, the fix."""
    if isinstance(error, OSError) and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        fix = ("check the path" if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
               else "check the permissions, or choose another path")
        text = f"{error.strerror}:{where}; {fix}"
    else:
        text = str(error) or type(error).__name__
        if isinstance(error, KeyError):
            text = f"missing key {text}"
    return " ".join(text.split())


def pick_device(name: Optional[str]) -> str:
    """'auto' (or None): cuda when available, else cpu; a CUDA name without CUDA is an error."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores(seconds: float = 0.25) -> float:
    """How many cores other processes keep busy now: the machine's non-idle CPU time over a short
    window (``/proc/stat``). The 1-minute load average where that cannot be read; it lags, so right
    after a heavy command it would still report the cores busy."""
    def sample():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    if total1 <= total0:
        return 0.0
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / (total1 - total0))


def choose_threads(requested: Optional[int]) -> Tuple[int, str]:
    """Set torch's CPU thread count and say why: ``(threads, note)``.

    ``--threads`` (or ``OMP_NUM_THREADS``) wins. Otherwise the count is the cores other processes
    leave free now (:func:`busy_cores`), at least 1 and never more than torch's current count: several
    OpenMP threads competing with a busy process for the same cores spin and can run many times
    slower than one thread.
    """
    if requested:
        torch.set_num_threads(requested)
        return requested, f"threads: {requested} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        return n, f"threads: {n} (OMP_NUM_THREADS)"
    cores = usable_cores()
    busy = busy_cores()
    free = max(1, int(cores - busy + 0.5))
    n = max(1, min(torch.get_num_threads(), free))
    torch.set_num_threads(n)
    note = f"threads: {n} of {cores} cores ({busy:.1f} cores busy with other work"
    if free < cores:
        note += "; other processes are busy, so fewer threads: competing threads spin. Override with --threads"
    return n, note + ")"


def refuse_multiple_processes() -> None:
    """For commands other than train: under torchrun they would run as independent copies."""
    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        world = int(text)
    except ValueError:
        raise CommandError(f"WORLD_SIZE={text!r} is not a number; unset it") from None
    if world > 1:
        raise CommandError(
            f"WORLD_SIZE={world}: only 'rearec train' runs under torchrun; run this command as one "
            "process (rearec ... without torchrun)")
