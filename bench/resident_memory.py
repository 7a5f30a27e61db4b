"""Peak resident memory of a benchmark round, for pytest-benchmark's pedantic setup/teardown hooks.

Before each round ``rearec.heap.return_freed_memory`` (glibc's ``malloc_trim(0)``) hands freed heap
pages back to the OS and writing 5 to /proc/self/clear_refs resets the peak resident set size
(VmHWM); after the round, extra = VmHWM - VmRSS at the reset: the largest resident growth during the
call, whoever allocated it (torch, MKL).
"""
import os

from rearec.heap import return_freed_memory


def field_mb(field, path="/proc/self/status"):
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


class ResidentPeak:
    """pedantic setup/teardown hooks: the largest resident growth (and resident peak) over rounds.
    ``ok`` is False where the peak cannot be reset (no writable /proc/self/clear_refs): then
    ``extra_mb`` means nothing."""

    def __init__(self, reset=None):
        self.extra_mb = self.peak_mb = 0.0
        self.ok = os.path.exists("/proc/self/clear_refs")
        self.reset = reset  # called first in every setup: drops the previous round's gradients

    def setup(self, *args, **kwargs):
        if self.reset is not None:
            self.reset()
        return_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.ok = False
        self._base = field_mb("VmRSS")

    def teardown(self, *args, **kwargs):
        peak = field_mb("VmHWM")
        self.peak_mb = max(self.peak_mb, peak)
        self.extra_mb = max(self.extra_mb, peak - self._base)
