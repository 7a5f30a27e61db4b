"""The data path at scale: load, filter and split a synthetic log, then one training step, with peak RSS.

Run: ``pytest bench/test_data_bench.py --benchmark-only`` (minutes: it writes 1M, 5M and 20M-row
Parquet logs under the pytest temp folder first; writing is not timed). ``REAREC_BENCH_SMOKE=1``
runs tiny logs instead (the numbers then mean nothing).

Each size runs in fresh processes (one torch thread), so that its peak resident set (VmHWM) is its
own, ``REAREC_DATA_BENCH_REPEATS`` times (default 3; the 1M figure, half a second, moved by half
between single runs), and every figure is the median over them: ``extra_info`` holds ``ms_read``, ``ms_filter``, ``ms_split`` (the three stages of
``rearec.data.load_dataset``), ``ms_load_filter_split`` (their sum), ``ms_step`` (one base training
step: hidden 64, 2 layers, batch 256, max_len 50; the second step, after a warm-up step),
``peak_rss_mb_after_split`` and ``peak_rss_mb`` (after the step), and for sizes above the first
``ratio_time_vs_first`` and ``ratio_rss_vs_first`` (the targets: 20M within 25x the 1M figures, and
load + filter + split of 20M rows in <= 60 s and <= 2.5 GB).

The logs: ``rearec.data.synthetic`` defaults (users = rows / 20, items = rows / 100, Zipf items,
heavy-tailed history lengths), filtered with ``min_history=5``, temporal split 0.8 / 0.9.
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

from rearec.data.synthetic import write_synthetic_log

SMOKE = os.environ.get("REAREC_BENCH_SMOKE") == "1"
SIZES = [20_000, 50_000, 100_000] if SMOKE else [1_000_000, 5_000_000, 20_000_000]
_FIRST = {}

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from rearec.config import ReaRecConfig
from rearec.data.filters import filter_interactions
from rearec.data.readers import read_interactions
from rearec.data.splits import temporal_split
from rearec.model import ReaRec
from rearec.objectives import training_loss

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))

out = {}
t = time.perf_counter(); df = read_interactions(sys.argv[1]); out["ms_read"] = (time.perf_counter() - t) * 1e3
t = time.perf_counter(); df, _ = filter_interactions(df, min_history=5); out["ms_filter"] = (time.perf_counter() - t) * 1e3
t = time.perf_counter(); data = temporal_split(df); out["ms_split"] = (time.perf_counter() - t) * 1e3
del df
out["ms_load_filter_split"] = out["ms_read"] + out["ms_filter"] + out["ms_split"]
out["peak_rss_mb_after_split"] = peak_mb()
out["train_samples"] = len(data.train)
torch.manual_seed(0)
model = ReaRec(ReaRecConfig(n_items=data.n_items, hidden_size=64, n_layers=2, n_heads=2, inner_size=256,
                            max_len=50, objective="base", reason_steps=0))
optimizer = torch.optim.Adam(model.parameters())
batches = data.train.batches(256, 50, shuffle=True, generator=torch.Generator().manual_seed(0))
for i in range(2):
    _, h, l, y = next(batches)
    t = time.perf_counter()
    loss = training_loss(model, h, l, y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    out["ms_step"] = (time.perf_counter() - t) * 1e3
out["peak_rss_mb"] = peak_mb()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("logs")
    return {n: write_synthetic_log(folder / f"synthetic-{n}.parquet", n, seed=0) for n in SIZES}


REPEATS = int(os.environ.get("REAREC_DATA_BENCH_REPEATS", 3))


@pytest.mark.parametrize("rows", SIZES)
def test_load_filter_split_step(benchmark, logs, rows):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = []

    def run():
        done = subprocess.run([sys.executable, "-c", CHILD, str(logs[rows])], capture_output=True, text=True,
                              env=env, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))

    # One round per process (start-up included; see ms_* for the parts); the medians are reported.
    benchmark.pedantic(run, rounds=REPEATS, iterations=1)
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    benchmark.extra_info.update(result, rows=rows, repeats=len(runs))
    first = _FIRST.setdefault("figures", (rows, result))
    if first[0] != rows:
        benchmark.extra_info["ratio_time_vs_first"] = result["ms_load_filter_split"] / first[1]["ms_load_filter_split"]
        benchmark.extra_info["ratio_rss_vs_first"] = result["peak_rss_mb_after_split"] / first[1]["peak_rss_mb_after_split"]
