"""What every command shares at run time: its errors, printing, device and thread choice."""
from __future__ import annotations

import errno
import math
import os
import re
import sys
import tempfile
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
    """Print a line to stdout without breaking an open progress bar. Once the reader of stdout has gone
    (``rearec profile | head -1``), lines are dropped and the command goes on with its work."""
    try:
        tqdm.write(text, file=sys.stdout)
    except BrokenPipeError:
        discard_stdout()


def discard_stdout() -> None:
    """Send the rest of stdout, what is buffered included, to the null device: the reader closed the pipe,
    which is not the command's failure (the output it wanted has reached it)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def show_progress(no_progress: bool) -> bool:
    """Whether to draw progress bars: unless --no-progress, and only when stderr is a terminal (in a
    log file or a pipe every redraw of a bar would stay behind as text)."""
    return not no_progress and sys.stderr.isatty()


def print_error(text: str) -> None:
    """``rearec: error: <text>`` on stderr, one line. Under torchrun every rank may report the same
    error: a rank other than 0 says which it is (unless the text already does)."""
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 1 and rank.isdigit() and int(rank) > 0 and not text.startswith("rank "):
        text = f"rank {rank}: {text}"
    print(f"{PROG}: error: {text}", file=sys.stderr)


def one_line(error: BaseException) -> str:
    """``error`` as one line: the problem and, where known, the fix."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space and run again (a training run: with --resume, which goes on from the last saved epoch)"
        elif isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            fix = "check the path"
        else:
            fix = "check the permissions, or choose another path"
        text = f"{error.strerror}{where}; {fix}"
    else:
        text = str(error) or type(error).__name__
        if isinstance(error, KeyError):
            text = f"missing key {text}"
    return " ".join(text.split())


def out_of_memory(error: BaseException) -> Optional[str]:
    """The one line for an allocation that failed (an option far too large: --max-len, a batch size, the
    model's size), or None when ``error`` is something else. torch's CPU allocator raises a plain
    RuntimeError ("can't allocate memory"), CUDA's torch.OutOfMemoryError."""
    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    if not (isinstance(error, (MemoryError, oom)) or
            (isinstance(error, RuntimeError) and "can't allocate memory" in str(error))):
        return None
    asked = re.search(r"allocate (\d+) bytes", str(error))
    size = f"{int(asked.group(1)) / 2 ** 30:,.1f} GiB" if asked else None
    if size is None:
        asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
        size = asked.group(1) if asked else None
    return ("out of memory" + (f" (it tried to allocate {size})" if size else "") + "; use smaller sizes (--preset, "
            "--hidden-size, --max-len, the batch sizes) or a machine with more memory")


def pick_device(name: Optional[str]) -> str:
    """'auto' (or None): cuda when available, else cpu. Otherwise the name must be a device this machine
    has (cpu, cuda, cuda:N, or mps where available); anything else is a CommandError that names it."""
    if name is None or name.strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = name.strip()
    fix = "use cpu, or cuda on a machine with a GPU"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise CommandError(f"--device {name}: not a device name; {fix} (or auto)") from None
    if device.type == "cpu":
        return "cpu"  # 'cpu:1' names the same CPU, which some loaders refuse
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {name}: no CUDA GPU is available on this machine; {fix}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CommandError(f"--device {name}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}; "
                               f"use one of them, or cpu")
        return text
    if device.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return text
    raise CommandError(f"--device {name}: rearec cannot run on a {device.type} device here; {fix}")


def _check_writable_folder(folder: str, what: str) -> None:
    """CommandError unless a file can be created in the existing ``folder`` (a probe, removed at once)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CommandError(f"cannot write {what}: folder {folder} is not writable ({error.strerror}); check "
                           "its permissions or choose another path") from None


def check_not_empty(path: str, option: str, example: str) -> None:
    """CommandError for an empty path (``--out "$DIR"`` with DIR unset), which no check below refuses: the
    work would run, and its output go nowhere or to a name made from '' (``..partial``)."""
    if not path.strip():
        raise CommandError(f"{option} is empty; give a path, e.g. {option} {example}")


def check_output_file(path: str, option: str, example: str) -> None:
    """Before the work starts: ``path`` (given as ``option``) can be written as a file, i.e. it is not a
    folder and its folder exists and is writable (an existing file is replaced). ``example`` is a file
    name to suggest when ``path`` is a folder."""
    check_not_empty(path, option, example)
    if os.path.isdir(path):
        raise CommandError(f"{option} {path} is a folder; give a file path, e.g. {os.path.join(path, example)}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise CommandError(f"{option} {path} is not a regular file (a device, pipe or socket): the file is written "
                           f"whole and then moved into place; give a file path, e.g. {example}")
    folder = os.path.dirname(os.path.realpath(path))  # a link is written through: its target's folder
    if not os.path.isdir(folder):
        state = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise CommandError(f"cannot write {path}: folder {folder} {state}; create it or choose another path")
    _check_writable_folder(folder, path)


def check_output_folder(path: str, option: str, existing_file: str) -> None:
    """Before the work starts: ``path`` (given as ``option``) can be used as an output folder, i.e. it is
    a writable folder, or one that can be created (its nearest existing parent is a writable folder).
    ``existing_file`` is the error's fix when ``path`` is an existing file."""
    check_not_empty(path, option, os.path.join("runs", "out"))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{option} {path} is an existing file, not a folder; {existing_file}")
    parent = os.path.abspath(path)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CommandError(f"cannot create folder {path}: {parent} is a file, not a folder; choose another "
                           f"path with {option}")
    _check_writable_folder(parent, f"to {path}")


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity (taskset, cpusets), capped by a cgroup v2 CPU
    quota (``docker --cpus``), which leaves every core visible but limits the time on them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> Optional[float]:
    """The cgroup v2 CPU quota in cores ("200000 100000" -> 2.0), or None when there is none."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else float(quota) / float(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def busy_cores(seconds: float = 0.25) -> float:
    """How many of this process's cores (:func:`usable_cores`' affinity) other processes keep busy now:
    their non-idle CPU time over a short window (``/proc/stat``'s per-CPU lines). The 1-minute load
    average where that cannot be read; it lags, so right after a heavy command it would still report
    the cores busy."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def sample():
        total = idle = 0.0
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit()):
                    continue
                if allowed is not None and int(name[3:]) not in allowed:
                    continue
                fields = [float(x) for x in values]
                total += sum(fields)
                idle += fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        if total == 0:
            raise ValueError("no per-CPU line")
        return total, idle

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
    cpus = len(allowed) if allowed is not None else (os.cpu_count() or 1)
    return cpus * (1.0 - (idle1 - idle0) / (total1 - total0))


def choose_threads(requested: Optional[int]) -> Tuple[int, str]:
    """Set torch's CPU thread count and say why: ``(threads, note)``.

    ``--threads`` (or ``OMP_NUM_THREADS``) wins. Otherwise the count is the cores other processes
    leave free now (:func:`busy_cores`), at least 1 and never more than torch's current count: several
    OpenMP threads competing with a busy process for the same cores spin and can run many times
    slower than one thread.
    """
    if requested:
        cores = usable_cores()
        if requested > cores:  # more threads than cores spin against each other (or fail to start)
            raise CommandError(f"--threads {requested} is more than the {cores} core(s) this process may use; "
                               f"pass --threads {cores} or fewer")
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
