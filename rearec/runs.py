"""Run folders: the files one training run writes, how each is written, and how a folder is started,
resumed or started over.

A run folder holds (names are the constants below):
  model.safetensors  the best weights so far (our checkpoint format, raw-id mapping included)
  train_state.pt     what the Trainer needs to resume after its last finished epoch
  train.log          one line per epoch
  data.json          the data options (a :class:`rearec.data.DataSpec`), for evaluate and recommend
  test_metrics.json  test metrics after training
  result.json        a study's record of the run (JSON only: nothing here is ever unpickled)

Every file is written by :func:`atomic_write` (a temporary file named ``TMP_PREFIX...`` in the same
folder, then a rename), so a crash leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Callable, Optional

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
LOG_FILE = "train.log"
DATA_FILE = "data.json"
TEST_METRICS_FILE = "test_metrics.json"
RESULT_FILE = "result.json"
#: Files of a run; ``start_run(..., overwrite=True)`` removes them.
RUN_FILES = (MODEL_FILE, STATE_FILE, LOG_FILE, DATA_FILE, TEST_METRICS_FILE, RESULT_FILE)
#: Prefix of the temporary files of :func:`atomic_write`. torch.save names its zip records after
#: the file's stem, so the name must not start with a dot.
TMP_PREFIX = "tmp-"

START, RESUME, OVERWRITE = "start", "resume", "overwrite"


def _file_mode() -> int:
    """The mode open() would give a new file (0o666 less the umask); mkstemp's files are 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (not writable, already holds a run, nothing to resume)."""


def naming_file(error: OSError, path: str) -> OSError:
    """``error``, or where it names no file (file.write's ENOSPC does not) the same error naming ``path``."""
    if error.filename is None and error.errno is not None:
        return type(error)(error.errno, error.strerror, path)
    return error


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` with a temporary path in ``path``'s folder, then rename it onto ``path``:
    ``path`` holds the old content or the new, never a part. The file's data reach the disk before the
    rename, and the rename before this returns (fsync), so that this holds after a power loss too.
    A symbolic link is written through: its target gets the content, the link stays."""
    if os.path.islink(path):
        path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise OSError(errno.EINVAL, "not a regular file (a device, pipe or socket); give a file path", path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as error:
            raise naming_file(error, path) from None
        except Exception as error:  # torch.save and safetensors report a full disk as their own errors
            if isinstance(error, RuntimeError) and type(error) is not RuntimeError:
                raise  # a specific error, no failed write: a run stopped by a signal, a failed collective
            raise OSError(f"could not write {path} ({' '.join(str(error).split())[:200]}); if the disk is full, "
                          "free space and run again (a training run: with --resume)") from None
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the system lets a folder be opened for it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> None:
    """Write ``text`` as UTF-8, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, payload, default=None, compact: bool = False) -> None:
    """Write ``payload`` as UTF-8 JSON, atomically: indented, or with ``compact`` on one line without
    spaces (large result files). ``default``: as in ``json.dumps``, for values JSON has no type for."""
    layout = dict(separators=(",", ":")) if compact else dict(indent=2)
    write_text(path, json.dumps(payload, ensure_ascii=False, default=default, **layout) + "\n")


def replace_folder(new: str, target: str, old: Optional[str] = None) -> None:
    """``new`` becomes ``target``; an existing ``target`` is moved aside first (to ``old``, default
    ``target.old``) and removed after, so that at every moment one whole version exists. A leftover of
    an interrupted swap at ``old`` is cleared first (it would block the move)."""
    old = old or os.path.normpath(target) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: str, what: str = "file"):
    """The JSON in ``path``; a broken file is a RunFolderError that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
        raise RunFolderError(f"{path}: this {what} is not valid JSON ({reason}); restore or delete it") from None


def run_file(folder: str, name: str) -> str:
    return os.path.join(folder, name)


def model_file(path) -> str:
    """A checkpoint given as the file or as its run folder -> the file's path."""
    path = os.fspath(path)
    return run_file(path, MODEL_FILE) if os.path.isdir(path) else path


def has_run(folder: str) -> bool:
    """Whether ``folder`` holds a resumable training run."""
    return os.path.isfile(run_file(folder, STATE_FILE))


def prepare_folder(folder: str) -> None:
    """Create ``folder`` if needed and check that files can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=TMP_PREFIX + "probe-", delete=True)
        probe.close()
    except OSError as error:
        raise RunFolderError(
            f"cannot write to output folder {folder} ({error.strerror}): choose another with --out"
        ) from None


#: The lock a training process holds on its run folder (see :class:`RunLock`).
LOCK_FILE = "run.lock"


class RunLock:
    """An exclusive lock on a run folder while a process trains in it: a second ``rearec train`` into the
    same folder is refused instead of writing over the first. ``fcntl.flock``: the system releases it when
    the process ends, however it ends (where flock does not exist, nothing is locked)."""

    def __init__(self, folder: str):
        self.file = None
        try:
            import fcntl
        except ImportError:
            return
        prepare_folder(folder)
        self.file = open(run_file(folder, LOCK_FILE), "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self.file.close()
            self.file = None
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # a file system without flock (some NFS, Lustre): train unlocked, as before locks
            raise RunFolderError(f"another process is training in {folder} (it holds {run_file(folder, LOCK_FILE)}): "
                                 "wait for it to finish, or choose another --out") from None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


def check_start(folder: str, mode: str = START) -> None:
    """The refusals of :func:`start_run`, from reading ``folder`` alone: nothing is created or changed,
    so that a mistake (``--resume`` with a mistyped folder, say) leaves no folder behind, and can be
    found before the data are loaded."""
    if mode not in (START, RESUME, OVERWRITE):
        raise ValueError(f"mode must be {START!r}, {RESUME!r} or {OVERWRITE!r}, got {mode!r}")
    if mode == START and has_run(folder):
        raise RunFolderError(f"{folder} already holds a training run ({STATE_FILE}); pass --resume to "
                             "continue it, --overwrite to start over, or choose another --out")
    if mode == START:
        # No resumable run here: a model or results of another run must not be replaced silently.
        kept = [name for name in RUN_FILES if name not in (DATA_FILE, LOG_FILE) and os.path.isfile(run_file(folder, name))]
        if kept:
            raise RunFolderError(f"{folder} already holds {', '.join(kept)} of another run, which a new run would "
                                 "replace: pass --overwrite to replace them, or choose another --out")
    if mode == RESUME and not has_run(folder):
        raise RunFolderError(f"nothing to resume: {run_file(folder, STATE_FILE)} does not exist "
                             "(run without --resume to start)")


def start_run(folder: str, mode: str = START) -> None:
    """Get ``folder`` ready for training.

    ``start``: a new run; refused when the folder already holds one, or the model or results of another
    run (leftovers of a run that never finished an epoch are removed). ``resume``: continue the run in
    the folder; refused when there is none (its results stay until the resume is accepted: see
    :func:`remove_results`). ``overwrite``: remove the run's files and start anew.
    """
    check_start(folder, mode)
    prepare_folder(folder)
    for name in os.listdir(folder):  # the temporary files of writes a kill cut short (atomic_write)
        if name.startswith(TMP_PREFIX) and name.endswith(tuple("-" + run for run in RUN_FILES)):
            os.remove(run_file(folder, name))
    if mode == OVERWRITE:
        for name in RUN_FILES:
            if os.path.isfile(run_file(folder, name)):
                os.remove(run_file(folder, name))
    elif mode == START:
        # The data.json and train.log of a run that never finished an epoch are its leftovers, removed.
        for name in (DATA_FILE, LOG_FILE):
            if os.path.isfile(run_file(folder, name)):
                os.remove(run_file(folder, name))


def remove_results(folder: str) -> None:
    """Remove the results of the run in ``folder`` as it was, once its resume has been accepted (a refused
    resume keeps them): the resumed run writes them again when it ends."""
    for name in (TEST_METRICS_FILE, RESULT_FILE):
        if os.path.isfile(run_file(folder, name)):
            os.remove(run_file(folder, name))
