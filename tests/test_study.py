"""The study v2: the sample-filter rule against a plain reference, the plan's order, a tiny synthetic
study end to end (train, report, regenerate the report exactly from the result files, resume a run
whose result file is missing or whose training was cut short), and bad input."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rearec.cli import main
from rearec.data import DataSpec
from rearec.data.errors import DataError
from rearec.data.splits import temporal_split
from rearec.study import (ARMS, CONFIRMATIONS, claim_run, claimed_by_another, compute_plan, BACKBONE_ARMS, DIAGNOSES, TUNED_AS, base_arm, twin_of, PlannedRun, Protocol, data_spec, copy_run_folder, grid_choice, park_runs, parse_shard, plan,
                          protocol_of, read_result, read_results, with_grid_choice, result_path, run_plan, samples_payload,
                          train_and_record)
from rearec.study_report import training_seconds, write_study_report
from rearec.train import epochs_saved
from tests.synthetic import write_log

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- sample filter
def log(rows):
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def raw_samples(data, s):
    m = data.mapping
    return sorted((m.user_to_raw(s.user(i)), m.item_to_raw(s.target(i)), len(s.history(i))) for i in range(len(s)))


def reference(rows, t1, t2, rule, window):
    """Straight from the definition: per user by time; keep a valid/test sample when its target and
    (window) its newest ``window`` history items / (strict) all its history items were seen in training."""
    per_user = {}
    for idx, (u, i, t) in enumerate(rows):
        per_user.setdefault(u, []).append((t, idx, i))
    samples = {"train": [], "valid": [], "test": []}
    for u, seq in per_user.items():
        seq.sort()
        items = [i for _, _, i in seq]
        for p in range(1, len(seq)):
            part = "train" if seq[p][0] < t1 else "valid" if seq[p][0] < t2 else "test"
            samples[part].append((u, items[:p], items[p]))
    seen = {x for u, h, tg in samples["train"] for x in (*h, tg)}
    out = {"train": sorted((u, tg, len(h)) for u, h, tg in samples["train"])}
    for part in ("valid", "test"):
        kept = [(u, h, tg) for u, h, tg in samples[part]
                if tg in seen and set(h[-window:] if rule == "window" else h) <= seen]
        out[part] = sorted((u, tg, len(h)) for u, h, tg in kept)
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("pqrstuv"), st.integers(0, 12)),
                min_size=4, max_size=40),
       st.integers(0, 13), st.integers(0, 13), st.integers(1, 4))
def test_sample_filter_rules_match_reference(rows, c1, c2, window):
    t1, t2 = min(c1, c2), max(c1, c2)
    if not reference(rows, t1, t2, "strict", window)["train"]:
        return
    both = {}
    for rule in ("window", "strict"):
        data = temporal_split(log(rows), cut_times=(t1, t2), sample_filter=rule, filter_window=window)
        expected = reference(rows, t1, t2, rule, window)
        for part in ("train", "valid", "test"):
            assert raw_samples(data, getattr(data, part)) == expected[part]
        both[rule] = data.stats
        # Every batch (max_len <= window) holds only items the model knows.
        for s in (data.valid, data.test):
            if len(s):
                histories = s.tensors(window).histories
                assert (histories >= 0).all()
    for part in ("valid", "test"):  # both counts are reported whichever rule is used
        for key in (f"{part}_kept_window", f"{part}_kept_strict"):
            assert both["window"][key] == both["strict"][key]
        assert both["window"][part] == both["window"][f"{part}_kept_window"]
        assert both["strict"][part] == both["strict"][f"{part}_kept_strict"]
        assert both["strict"][part] <= both["window"][part]


def test_window_keeps_a_sample_whose_unseen_item_is_old():
    # 'new' appears in u's history only, after the training period, then three seen items follow.
    rows = [("v", "x", 1), ("v", "y", 2), ("v", "z", 3), ("u", "x", 4), ("u", "new", 11), ("u", "x", 12),
            ("u", "y", 13), ("u", "z", 14)]
    window = temporal_split(log(rows), cut_times=(10, 20), sample_filter="window", filter_window=2)
    strict = temporal_split(log(rows), cut_times=(10, 20), sample_filter="strict", filter_window=2)
    assert [len(window.valid.history(i)) for i in range(len(window.valid))] == [4]  # the target z, window (x, y)
    assert len(strict.valid) == 0
    assert "kept by the window rule valid 1" in strict.summary()
    with pytest.raises(DataError, match="unknown sample_filter 'loose'"):
        temporal_split(log(rows), cut_times=(10, 20), sample_filter="loose")
    with pytest.raises(DataError, match="filter_window must be a whole number"):
        temporal_split(log(rows), cut_times=(10, 20), filter_window=0)


def test_sample_filter_option_reaches_the_data(tmp_path, capsys):
    path = write_log(tmp_path / "log.csv", n_users=30, n_items=10, length=8)
    assert DataSpec.for_source(path, sample_filter="strict").load().stats["sample_filter"] == "strict"
    code = main(["study", "--plan", "--results", str(tmp_path / "none")])
    assert code == 0 and "planned compute" in capsys.readouterr().out
    from rearec.cli import build_parser
    from rearec.cli.options import data_spec_from_args

    args = build_parser().parse_args(["train", "--data", path, "--objective", "base", "--out", str(tmp_path / "o"),
                                      "--sample-filter", "strict", "--filter-window", "7"])
    spec = data_spec_from_args(args)
    assert (spec.sample_filter, spec.filter_window) == ("strict", 7)


# ----------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("native", [False, True])
def test_plan_notes_when_its_bf16_runs_take_float32_products(native, tmp_path, capsys, monkeypatch):
    import rearec.train as train_module

    monkeypatch.setattr(train_module.packed, "native_bf16", lambda: native)
    code = main(["study", "--plan", "--results", str(tmp_path / "none")])
    stdout = capsys.readouterr().out
    warned = [line for line in stdout.splitlines() if "no native bfloat16" in line]
    bf16_runs = sum(r.bf16 for r in plan(Protocol()))
    assert code == 0 and 0 < bf16_runs < len(plan(Protocol()))
    assert warned == [] if native else len(warned) == 1 and f" {bf16_runs} of the runs to do train in bf16" in warned[0]


def test_plan_order_and_grid_choice():
    protocol = Protocol()
    runs = plan(protocol)
    grid = [r for r in runs if r.role == "grid"]
    assert runs[:len(grid)] == grid and len(grid) == 3 * len(protocol.grid_lr) * len(protocol.grid_dropout)
    assert (grid[0].lr, grid[0].dropout) == (1e-3, 0.5)  # the public code's point first
    finals = [r for r in runs if r.dataset == "ml-100k" and r.role not in ("diagnosis", "bf16-twin", "confirmation")]
    seeds = [r.seed for r in finals]
    assert seeds == sorted(seeds)  # seed-major: every arm gets seed 0 before any arm gets seed 1
    per_arm = {a: sum(1 for r in finals if r.arm == a and (r.role == "final" or r.lr == 1e-3 and r.dropout == 0.5))
               for a in ARMS if a not in protocol.confirmation_arms}
    assert all(n == protocol.seeds["ml-100k"] for n in per_arm.values())
    assert {r.arm for r in runs if r.role == "diagnosis"} == set(DIAGNOSES)
    # Confirmations: after the diagnosis, at seeds that did not pick them, the diagnosis variant's overrides.
    confirmations = [r for r in runs if r.role == "confirmation" and r.dataset == "ml-100k"]
    assert [r.seed for r in confirmations] == list(protocol.confirmation_seeds) and 0 not in protocol.confirmation_seeds
    assert all(r.overrides == DIAGNOSES[CONFIRMATIONS[r.arm]] and r.tuned_by == ("ml-100k", "prl") for r in confirmations)
    last_diagnosis = max(i for i, r in enumerate(runs) if r.role == "diagnosis")
    assert all(runs.index(r) > last_diagnosis for r in confirmations)
    ml1m = [r for r in runs if r.dataset == "ml-1m"]  # SASRec's arms and the confirmations, then BERT4Rec's
    n_sasrec = (3 + len(protocol.confirmation_arms)) * protocol.seeds["ml-1m"]
    assert len(ml1m) == n_sasrec + 3 * protocol.seeds["ml-1m"]
    assert [r.arm for r in ml1m[:4]] == ["base", "erl", "prl", "prl-nocl"]
    assert all(r.overrides.get("backbone", "sasrec") == "sasrec" for r in ml1m[:n_sasrec])
    assert [r.arm for r in ml1m[n_sasrec:n_sasrec + 3]] == ["bert4rec-base", "bert4rec-erl", "bert4rec-prl"]
    for part in (ml1m[:n_sasrec], ml1m[n_sasrec:]):
        assert [r.seed for r in part] == sorted(r.seed for r in part)  # seed-major within each backbone
    # Mixed precision where the protocol says, and its twins: ML-100K arms again in bf16, before the diagnosis.
    assert all(r.bf16 == (r.dataset in protocol.bf16_datasets) for r in runs if r.role != "bf16-twin")
    twins = [r for r in runs if r.role == "bf16-twin"]
    assert {(twin_of(r.arm), r.seed) for r in twins} == {(a, s) for a in protocol.bf16_twin_arms
                                                          for s in range(protocol.bf16_twin_seeds)}
    assert all(r.bf16 and r.dataset == "ml-100k" and r.tuned_by == ("ml-100k", TUNED_AS.get(twin_of(r.arm), twin_of(r.arm)))
               and r.overrides == ARMS[twin_of(r.arm)] for r in twins)
    assert runs.index(twins[-1]) < min(i for i, r in enumerate(runs) if r.role == "diagnosis")
    assert twin_of("prl") is None and twin_of("bert4rec-prl-bf16") == "bert4rec-prl"
    for arm in BACKBONE_ARMS:  # BERT4Rec arms: on both datasets, at their SASRec counterpart's grid point
        mine = [r for r in runs if r.arm == arm]
        assert {r.dataset for r in mine} == {"ml-100k", "ml-1m"} and mine[0].overrides["backbone"] == "bert4rec"
        assert all(r.tuned_by == (r.tuned_by[0], arm.split("-", 1)[1]) for r in mine)
        assert base_arm(arm) == "bert4rec-base" and base_arm(arm.split("-", 1)[1]) == "base"
    results = [{"arm": "prl", "seed": 0, "role": "grid", "lr": r.lr, "dropout": r.dropout, "best_score": s}
               for r, s in zip([g for g in grid if g.arm == "prl"], [0.1, 0.3, None, 0.2])]
    assert grid_choice(results, "prl", protocol) == (3e-3, 0.5)
    assert grid_choice(results[:3], "prl", protocol) is None
    # A tie goes to the earlier grid point (the grid's order: the public code's point first).
    tied = [dict(r, best_score=0.3) for r in results]
    order = [(g.lr, g.dropout) for g in grid if g.arm == "prl"]
    assert grid_choice(tied, "prl", protocol) == order[0]
    tied_late = [dict(r, best_score=0.3 if i >= 2 else 0.1) for i, r in enumerate(results)]
    assert grid_choice(tied_late, "prl", protocol) == order[2]
    with pytest.raises(ValueError, match="not chosen yet"):
        runs[-1].name
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


# ----------------------------------------------------------------------------------------- end to end
TINY = Protocol(max_epochs=2, patience=1, model_size=dict(hidden_size=8, n_layers=1, n_heads=1, inner_size=8, max_len=8),
                diagnostic_samples=64, grid_lr=(1e-2,), grid_dropout=(0.1,), seeds={"ml-100k": 2, "ml-1m": 1},
                bf16_twin_arms=("prl",), bf16_twin_seeds=1, confirmation_seeds=(2,))


def test_tiny_study_end_to_end_and_exact_report(tmp_path, capsys):
    src = write_log(tmp_path / "log.csv", n_users=50, n_items=13, length=10)
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    planned = [r for r in plan(TINY) if r.dataset == "ml-100k"]
    bert = [r for r in planned if r.arm in BACKBONE_ARMS]
    sasrec = run_plan(TINY, results, work, datasets=("ml-100k",), sources={"ml-100k": src}, log=lambda s: None,
                      backbones=("sasrec",))
    assert sasrec == len(planned) - len(bert) and bert
    trained = sasrec + run_plan(TINY, results, work, datasets=("ml-100k",), sources={"ml-100k": src},
                                log=lambda s: None)  # the rest: the BERT4Rec arms
    assert trained == len(planned)
    record = read_result(result_path(results, "ml-100k", "prl-lr0.01-do0.1-seed1"))
    assert len(record["test"]["ranks"]) == 3 and len(record["test"]["kl"]) == 2
    assert {"ce_last", "pl", "infonce", "state_norm"} <= set(record["history"][0])
    assert len(read_result(result_path(results, "ml-100k", "base-lr0.01-do0.1-seed0"))["test"]["mc_dropout_ranks"]) == 3
    assert "test" in read_result(result_path(results, "ml-100k", "prl-cl0-lr0.01-do0.1-seed0"))
    twin = read_result(result_path(results, "ml-100k", "prl-bf16-lr0.01-do0.1-seed0"))
    assert twin["train_config"]["bf16"] and twin["role"] == "bf16-twin" and "test" in twin
    assert not read_result(result_path(results, "ml-100k", "prl-lr0.01-do0.1-seed0"))["train_config"]["bf16"]
    # ERL's headline ranks are its readout's (the mean of the steps), as evaluate computes them from the
    # saved best weights on the study's own test samples, not the last step's.
    from rearec import ReaRec
    from rearec.evaluate import step_ranks

    erl_name = next(f[:-5] for f in sorted(os.listdir(os.path.join(results, "ml-100k"))) if f.startswith("erl-"))
    erl = read_result(result_path(results, "ml-100k", erl_name))
    model = ReaRec.load(os.path.join(work, "ml-100k", erl_name, "model.safetensors")).eval()
    assert model.config.readout == "mean"
    test_samples = data_spec("ml-100k", TINY, src).load().test
    assert erl["test"]["readout_ranks"] == step_ranks(model, test_samples, all_steps=False)["readout"].tolist()
    assert erl["test"]["readout_ranks"] != erl["test"]["ranks"][-1]

    out, report = tmp_path / "out", tmp_path / "results.md"
    write_study_report(None, results, str(out), str(report), log=lambda s: None)
    first = (report.read_text(), (out / "results.json").read_text())
    assert f"Partial: {trained} of {len(plan(TINY))} planned runs" in first[0] and "| prl-k3 | learned |" in first[0]
    assert all(f"| {name} |" in first[0] for name in DIAGNOSES)  # every diagnosis variant trained and reported
    # A variant's test result is shown only when it beats PRL (seed 0) on validation.
    section = first[0].split("## PRL diagnosis")[1].split("\n## ")[0]
    cells = {row.split(" | ")[0][2:]: row.split(" | ") for row in section.splitlines() if row.startswith("| prl")}
    prl_valid = float(cells["prl"][3])
    assert cells["prl"][4] != "–" and len(cells) == len(DIAGNOSES) + 1
    for name in DIAGNOSES:
        if float(cells[name][3]) != prl_valid:  # (equal to 4 digits: the unrounded scores decide)
            assert (cells[name][4] == "–") == (float(cells[name][3]) < prl_valid), cells[name]
    assert "| prl | 0 |" in first[0] and "- prl: mean bf16 − fp32 test NDCG@20 " in first[0]  # the twin beside its fp32 run
    assert "Compared with the paper" in first[0]
    analysis = json.loads(first[1])["datasets"]["ml-100k"]["arms"]  # BERT4Rec arms against BERT4Rec base
    assert analysis["bert4rec-prl"]["gain_over_base"]["ndcg@10"]["base"] == "bert4rec-base"
    assert analysis["prl"]["gain_over_base"]["ndcg@10"]["base"] == "base"
    confirmation = read_result(result_path(results, "ml-100k", "prl-nocl-lr0.01-do0.1-seed2"))
    assert confirmation["role"] == "confirmation" and confirmation["config"]["cl_weight"] == 0.0
    assert analysis["prl-nocl"]["seeds"] == [2] and analysis["prl-nocl"]["gain_over_base"]["ndcg@10"]["base"] == "base"
    assert "gain_over_base" not in analysis["bert4rec-base"] and "| bert4rec-erl |" in first[0]
    # `rearec study` with its defaults (report only) regenerates the report exactly from the result files.
    os.remove(report)
    code = main(["study", "--results", results, "--out", str(out), "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    assert (report.read_text(), (out / "results.json").read_text()) == first

    # A run whose result file is lost (killed after training) is finished from its checkpoint, unchanged.
    path = result_path(results, "ml-100k", "erl-lr0.01-do0.1-seed1")
    before = json.loads(open(path).read())
    os.remove(path)
    assert run_plan(TINY, results, work, datasets=("ml-100k",), sources={"ml-100k": src}, log=lambda s: None) == 1
    after = json.loads(open(path).read())
    before.pop("wall_seconds"), after.pop("wall_seconds")  # this invocation's time: here only the evaluation
    assert after == before
    assert training_seconds(after) == sum(h["seconds"] for h in before["history"]) > 0  # every epoch still counted
    # Each epoch records its thread count, and the report names a run with epochs at more than one thread
    # (a run resumed with --threads 2 said "1 thread per run" in the report).
    import torch
    assert all(h["threads"] == torch.get_num_threads() for h in after["history"])
    after["history"][0]["threads"] = 2
    with open(path, "w") as f:
        json.dump(after, f)
    write_study_report(None, results, str(out), str(report), log=lambda s: None)
    assert "except some epochs of erl-lr0.01-do0.1-seed1 at more threads" in report.read_text()


def test_a_shard_trains_its_later_runs_while_a_grid_it_needs_runs_elsewhere(tmp_path):
    """Shard 1/2 holds the ERL grid run and PRL K=1, which needs shard 0's PRL grid: it trains ERL
    seed 1 (tuned on its own grid) before waiting, and finishes PRL K=1 once shard 0 has run."""
    src = write_log(tmp_path / "log.csv", n_users=40, n_items=11, length=9)
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    shard = dict(datasets=("ml-100k",), sources={"ml-100k": src}, backbones=("sasrec",), wait_seconds=0.0)
    events = []

    def log(line):
        events.append(line)
        if line.startswith("waiting") and sum(e.startswith("waiting") for e in events) == 1:
            # the other process: runs all of shard 0 while shard 1 waits
            run_plan(TINY, results, work, shard=(0, 2), log=lambda s: None, **shard)

    run_plan(TINY, results, work, shard=(1, 2), log=log, **shard)
    started = [e.split()[-1] for e in events if e.startswith("start")]
    assert started.index("erl-lr0.01-do0.1-seed1") < started.index("prl-k1-lr0.01-do0.1-seed0")
    assert any(e.startswith("waiting for the grid of prl") for e in events)
    mine = [r for i, r in enumerate(plan(TINY)) if i % 2 == 1 and r.dataset == "ml-100k" and r.arm not in BACKBONE_ARMS]
    assert len(started) == len(mine)


def test_processes_share_the_plan_through_claims(tmp_path):
    """Processes on one work folder: a run another process is training (its claim held) is skipped and
    every other run trained; once the claim is let go, the next process trains it. A claim is refused
    to a second claimant while held, and is free again once its holder is killed."""
    src = write_log(tmp_path / "log.csv", n_users=40, n_items=11, length=9)
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    held = "prl-cosine-t0.2-lr0.01-do0.1-seed0"  # the plan's last SASRec run on ML-100K: nothing waits for it
    claim = claim_run(work, "ml-100k", held)
    assert claim is not None and claim_run(work, "ml-100k", held) is None
    assert not claimed_by_another(work, "ml-100k", held)  # this process holds it
    sasrec = [r for r in plan(TINY) if r.dataset == "ml-100k" and r.arm not in BACKBONE_ARMS]
    events = []
    shared = dict(datasets=("ml-100k",), sources={"ml-100k": src}, backbones=("sasrec",))
    assert run_plan(TINY, results, work, log=events.append, **shared) == len(sasrec) - 1
    assert f"skipping ml-100k {held}: another process is training it" in events
    assert not os.path.exists(result_path(results, "ml-100k", held))
    claim.release()
    assert run_plan(TINY, results, work, log=lambda s: None, **shared) == 1
    assert os.path.exists(result_path(results, "ml-100k", held))

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rearec.study import claim_run; "
                               "c = claim_run(*sys.argv[1:]); print('held' if c else 'refused', flush=True); "
                               "time.sleep(60)", work, "ml-100k", held], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert claim_run(work, "ml-100k", held) is None and claimed_by_another(work, "ml-100k", held)
    finally:
        holder.kill()
        holder.wait()
    assert not claimed_by_another(work, "ml-100k", held)  # its holder is gone (SIGKILL)
    again = claim_run(work, "ml-100k", held)
    assert again is not None
    again.release()


def test_a_grid_run_held_by_a_process_that_dies_is_trained_and_its_dependents_too(tmp_path, monkeypatch):
    """The runs tuned by a grid wait for it; when the process holding one of its runs dies, the waiting
    process tries that run again after its wait (it used to wait for it forever)."""
    import rearec.study as study
    src = write_log(tmp_path / "log.csv", n_users=40, n_items=11, length=9)
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    sasrec = [r for r in plan(TINY) if r.dataset == "ml-100k" and r.arm not in BACKBONE_ARMS]
    grid = next(r for r in sasrec if r.role == "grid")
    claim = claim_run(work, "ml-100k", with_grid_choice(grid, results, TINY).name)  # "another process"
    waits = []

    def wait(seconds):  # the holder dies during the first wait; a run that waits on and on fails the test
        waits.append(seconds)
        claim.release()
        if len(waits) > 3:
            raise AssertionError("still waiting for a grid run whose holder died")

    monkeypatch.setattr(study.time, "sleep", wait)
    shared = dict(datasets=("ml-100k",), sources={"ml-100k": src}, backbones=("sasrec",))
    assert run_plan(TINY, results, work, log=lambda s: None, **shared) == len(sasrec)


def test_a_failing_run_stops_no_other_and_temporary_files_are_no_results(tmp_path, monkeypatch):
    """A run whose training raises is logged and left unfinished; the process trains the rest. A
    result being written (atomic_write's temporary file) is not read as a result."""
    import rearec.study as study
    src = write_log(tmp_path / "log.csv", n_users=40, n_items=11, length=9)
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    real, failing = study.train_claimed, "erl-lr0.01-do0.1-seed0"

    def train_claimed(run, resolved, *args):
        if resolved.name == failing:
            raise RuntimeError("a damaged parked state")
        return real(run, resolved, *args)

    monkeypatch.setattr(study, "train_claimed", train_claimed)
    events = []
    runs = [r for r in plan(TINY) if r.dataset == "ml-100k" and r.arm in ("base", "erl") and r.role == "grid"]
    assert len(runs) > 1
    trained = run_plan(TINY, results, work, datasets=("ml-100k",), sources={"ml-100k": src}, log=events.append,
                       backbones=("sasrec",))
    assert any(e.startswith(f"failed ml-100k {failing}: RuntimeError: a damaged parked state") for e in events)
    assert any(e.startswith("cannot train ml-100k erl seed 1: a grid run of erl failed here") for e in events)
    names = {r["name"] for r in read_results(results, "ml-100k")}
    assert failing not in names and trained == len(names) and {r.name for r in runs} - {failing} <= names
    with open(os.path.join(results, "ml-100k", "tmp-x1y2-base-lr0.01-do0.1-seed0.json"), "w") as f:
        f.write('{"half')
    assert {r["name"] for r in read_results(results, "ml-100k")} == names


def tiny_data(tmp_path):
    """(spec, data, samples fingerprint) of a small synthetic log read as the study reads ML-100K."""
    spec = data_spec("ml-100k", TINY, write_log(tmp_path / "log.csv", n_users=40, n_items=11, length=9))
    data = spec.load()
    return spec, data, samples_payload(data)["fingerprint"]


def test_a_cut_short_run_resumes_with_its_diagnostics(tmp_path):
    spec, data, fingerprint = tiny_data(tmp_path)
    run = PlannedRun("ml-100k", "prl", 0, ARMS["prl"], 1e-2, 0.1)
    short = Protocol(**{**TINY.__dict__, "max_epochs": 1, "max_valid_outputs": 7})
    first = train_and_record(run, data, spec, short, str(tmp_path / "r1"), str(tmp_path / "w"), fingerprint, print)
    assert [h["epoch"] for h in first["history"]] == [0]
    # A large validation set keeps the per-step outputs of an evenly spaced subset, named in samples.json.
    kept = samples_payload(data, short)
    assert len(kept["valid_index"]) == 7 == len(first["valid"]["ranks"][0]) == len(kept["valid"]["user"])
    assert kept["valid_index"][0] == 0 and kept["valid_index"][-1] == len(data.valid) - 1
    longer = Protocol(**{**TINY.__dict__, "max_epochs": 3, "patience": 5})
    again = train_and_record(run, data, spec, longer, str(tmp_path / "r2"), str(tmp_path / "w"), fingerprint, print)
    assert [h["epoch"] for h in again["history"]] == [0, 1, 2]
    assert again["history"][0] == first["history"][0]
    assert all("ce_last" in h and "state_norm" in h for h in again["history"])
    fresh = train_and_record(run, data, spec, longer, str(tmp_path / "r3"), str(tmp_path / "w2"), fingerprint, print)
    assert [h["ndcg@20"] for h in fresh["history"]] == pytest.approx([h["ndcg@20"] for h in again["history"]])
    assert np.array_equal(fresh["test"]["ranks"], again["test"]["ranks"])


def test_a_parked_run_resumes_on_another_machine_and_its_copy_goes_once_it_finishes(tmp_path):
    """Day one trains one epoch and parks it; day two has no work folder, resumes from the parked
    copy, and ends where an uninterrupted run ends; parking again drops the finished run's copy."""
    spec, data, fingerprint = tiny_data(tmp_path)
    run = PlannedRun("ml-100k", "base", 0, ARMS["base"], 1e-2, 0.1)
    longer = Protocol(**{**TINY.__dict__, "max_epochs": 3, "patience": 5})
    results, parked = str(tmp_path / "results"), str(tmp_path / "parked")
    day_one = str(tmp_path / "day1")
    short = Protocol(**{**longer.__dict__, "max_epochs": 1})
    train_and_record(run, data, spec, short, str(tmp_path / "elsewhere"), day_one, fingerprint, print)
    assert park_runs(longer, results, day_one, parked, log=lambda s: None) == (1, 0)
    copy = os.path.join(parked, "ml-100k", run.name)
    assert sorted(os.listdir(copy)) == sorted(set(os.listdir(os.path.join(day_one, "ml-100k", run.name))) - {"run.lock"})
    row = next(r for r in compute_plan(longer, results, day_one, parked) if r["name"] == run.name)
    assert row["saved"] == ("work", 1) and not row["done"]
    row = next(r for r in compute_plan(longer, results, str(tmp_path / "empty"), parked) if r["name"] == run.name)
    assert row["saved"] == ("parked", 1)
    shutil.rmtree(day_one)
    events = []
    again = train_and_record(run, data, spec, longer, results, str(tmp_path / "day2"), fingerprint, events.append,
                             parked_dir=parked)
    assert any("resuming from the parked copy" in e for e in events) and any("resumed after epoch 0" in e for e in events)
    fresh = train_and_record(run, data, spec, longer, str(tmp_path / "r3"), str(tmp_path / "w3"), fingerprint, print)
    assert [h["epoch"] for h in again["history"]] == [0, 1, 2]
    untimed = lambda history: [{k: v for k, v in h.items() if "seconds" not in k} for h in history]  # noqa: E731
    assert untimed(again["history"]) == untimed(fresh["history"]) and "state_norm" in again["history"][0]
    assert again["test"]["ranks"] == fresh["test"]["ranks"]
    assert park_runs(longer, results, str(tmp_path / "day2"), parked, log=lambda s: None) == (0, 1)
    assert not os.path.exists(copy)


def test_a_run_folder_rewritten_during_its_copy_is_copied_again(tmp_path, monkeypatch):
    source, destination = tmp_path / "run", tmp_path / "parked" / "run"
    source.mkdir()
    (source / "train_state.pt").write_text("epoch 3")
    (source / "tmp-partial").write_text("x")
    (source / "run.lock").write_text("")  # the training process's lock: not a file of the run
    copies, real_copytree = [], shutil.copytree

    def copytree(src, dst, **kwargs):  # the trainer ends an epoch during the first copy
        real_copytree(src, dst, **kwargs)
        copies.append(1)
        if len(copies) == 1:
            time.sleep(0.01)
            (source / "train_state.pt").write_text("epoch 4!")

    monkeypatch.setattr(shutil, "copytree", copytree)
    copy_run_folder(str(source), str(destination))
    assert len(copies) == 2 and sorted(os.listdir(destination)) == ["train_state.pt"]
    assert (destination / "train_state.pt").read_text() == "epoch 4!"

    def always_busy(src, dst, **kwargs):
        real_copytree(src, dst, **kwargs)
        (source / "train_state.pt").write_text(f"epoch {len(copies)}" * (len(copies) + 2))
        copies.append(1)

    monkeypatch.setattr(shutil, "copytree", always_busy)
    with pytest.raises(RuntimeError, match="pause its training process"):
        copy_run_folder(str(source), str(destination))
    assert (destination / "train_state.pt").read_text() == "epoch 4!"  # the last good copy stays
    # A copy interrupted between its two renames left "tmp-<name>-old" behind, and the next copy's rename
    # onto it failed (the folder is not empty): every later park stopped there.
    monkeypatch.setattr(shutil, "copytree", real_copytree)
    left = destination.parent / f"tmp-{destination.name}-old"  # copy_run_folder's own name for it
    left.mkdir()
    (left / "train_state.pt").write_text("epoch 2")
    (source / "train_state.pt").write_text("epoch 5")
    copy_run_folder(str(source), str(destination))
    assert (destination / "train_state.pt").read_text() == "epoch 5" and not left.exists()


def test_run_estimates_prefer_finished_runs_of_the_same_precision():
    from rearec.study import BF16_TIME, ML1M_FACTOR, estimate_minutes

    def finished(arm, bf16, epochs, seconds):
        return {"dataset": "ml-100k", "arm": arm, "epochs_run": epochs, "seconds_per_epoch": seconds,
                "train_config": {"bf16": bf16}}

    records = [finished("base", False, 10, 60.0), finished("base-bf16", True, 12, 20.0)]
    fp32 = PlannedRun("ml-100k", "base", 4, ARMS["base"], 1e-3, 0.2)
    on_ml1m = PlannedRun("ml-1m", "base", 0, ARMS["base"], 1e-3, 0.2, bf16=True)
    assert estimate_minutes(fp32, records) == pytest.approx(10 * 60 / 60 + 1)
    assert estimate_minutes(on_ml1m, records) == pytest.approx(12 * 20 / 60 * ML1M_FACTOR + 1)  # the twin's time
    assert estimate_minutes(on_ml1m, records[:1]) == pytest.approx(10 * 60 / 60 * ML1M_FACTOR * BF16_TIME + 1)


def test_a_foreign_result_file_is_refused(tmp_path):
    path = tmp_path / "ml-100k" / "base-lr0.001-do0.5-seed0.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a rearec study result"):
        read_result(str(path))


def fake_samples(rng, n_valid, n_test, n_users=9):
    """A samples.json (fingerprint "f") of n_valid / n_test samples from n_users users."""
    def part(n):
        return {"user": rng.integers(0, n_users, n).tolist(), "history_length": rng.integers(1, 90, n).tolist()}

    return {"fingerprint": "f", "stats": {"test_kept_window": n_test}, "valid": part(n_valid), "test": part(n_test)}


def fake_record(rng, arm, seed, n_valid, n_test, steps, protocol, fingerprint, readout_mean=False):
    def part(n):
        out = {"ranks": rng.integers(1, 40, (steps, n)).tolist(), "entropy": rng.uniform(1, 3, (steps, n)).tolist(),
               "kl": rng.exponential(0.1, (steps - 1, n)).tolist()}
        if readout_mean:
            out["readout_ranks"] = rng.integers(1, 40, n).tolist()
        return out

    record = {"format": "rearec.study-run/2", "dataset": "ml-100k", "arm": arm, "seed": seed, "role": "final",
              "lr": protocol.grid_lr[0], "dropout": protocol.grid_dropout[0], "name": f"{arm}-{seed}",
              "protocol": protocol.to_dict(), "samples_fingerprint": fingerprint, "status": "converged",
              "best_epoch": 3, "best_score": 0.1, "epochs_run": 13, "history": [], "seconds_per_epoch": 1.0,
              "valid": part(n_valid), "test": part(n_test)}
    if arm == "base":
        record["test"]["mc_dropout_ranks"] = rng.integers(1, 40, (3, n_test)).tolist()
    return record


def base_and_erl(rng, protocol, n_valid, n_test, erl_seeds):
    """samples.json, two base records (one step) and ``erl_seeds`` ERL records (3 steps, mean readout)."""
    samples = fake_samples(rng, n_valid, n_test)
    base = [fake_record(rng, "base", s, n_valid, n_test, 1, protocol, "f") for s in range(2)]
    erl = [fake_record(rng, "erl", s, n_valid, n_test, 3, protocol, "f", readout_mean=True) for s in range(erl_seeds)]
    return samples, base, erl


def test_result_files_of_one_protocol_may_differ_in_plan_only_fields():
    base = Protocol().to_dict()
    twins = dict(base, bf16_twin_arms=["prl"], bf16_twin_seeds=1)  # made before the twin list grew
    assert protocol_of([{"protocol": base}, {"protocol": twins}]) == Protocol()
    assert protocol_of([{"protocol": twins}] * 2) == Protocol(bf16_twin_arms=("prl",), bf16_twin_seeds=1)
    grown = dict(twins, bf16_twin_arms=["bert4rec-base", "prl"])  # every twin named anywhere, in ARMS order
    assert protocol_of([{"protocol": twins}, {"protocol": grown}]).bf16_twin_arms == ("prl", "bert4rec-base")
    old = {k: v for k, v in base.items() if not k.startswith("bf16")}  # made before the fields existed
    assert protocol_of([{"protocol": old}, {"protocol": base}]) == Protocol()
    with pytest.raises(ValueError, match="different study protocols"):
        protocol_of([{"protocol": base}, {"protocol": dict(base, patience=3)}])
    with pytest.raises(ValueError, match="different study protocols"):  # a run's precision is no plan detail
        protocol_of([{"protocol": base}, {"protocol": dict(base, bf16_datasets=[])}])


def test_report_numbers_against_direct_computation():
    from rearec.selectors import ndcg
    from rearec.stats import holm
    from rearec.study_report import analyse_dataset, bf16_twin_section, oracle_verdict, selectors_section

    rng = np.random.default_rng(7)
    protocol = Protocol()
    n_valid, n_test = 37, 53
    users = rng.integers(0, 11, n_test)
    samples = {"fingerprint": "f", "stats": {"test_kept_window": n_test},
               "valid": {"user": rng.integers(0, 11, n_valid).tolist(), "history_length": rng.integers(1, 90, n_valid).tolist()},
               "test": {"user": users.tolist(), "history_length": rng.integers(1, 90, n_test).tolist()}}
    # Five base seeds (the seed oracle pools protocol.mc_draws = 3 of them), one without MC-dropout draws.
    records = ([fake_record(rng, "base", s, n_valid, n_test, 1, protocol, "f") for s in range(5)]
               + [fake_record(rng, "erl", s, n_valid, n_test, 3, protocol, "f", readout_mean=True) for s in range(2)]
               + [fake_record(rng, "prl", s, n_valid, n_test, 3, protocol, "f") for s in range(2)])
    del records[4]["test"]["mc_dropout_ranks"]
    a = analyse_dataset("ml-100k", records, samples, {"ml-100k": records}, protocol)
    base = [np.asarray(r["test"]["ranks"][0]) for r in records[:5]]
    assert a["arms"]["base"]["metrics"]["ndcg@10"][0] == pytest.approx(np.mean([ndcg(b, 10).mean() for b in base]))
    pooled = base[:protocol.mc_draws]
    assert a["arms"]["base"]["seed_oracle"]["ndcg@20"] == pytest.approx(ndcg(np.min(pooled, axis=0), 20).mean())
    # ... compared with those seeds' mean readout, not every seed's (+70.6% where it is +69.3% on ML-100K)
    assert a["arms"]["base"]["seed_oracle"]["base_ndcg@20"] == pytest.approx(np.mean([ndcg(b, 20).mean() for b in pooled]))
    mc = [np.asarray(r["test"]["mc_dropout_ranks"]) for r in records[:4]]
    assert a["arms"]["base"]["mc_dropout_oracle"][0] == pytest.approx(np.mean([ndcg(m.min(0), 20).mean() for m in mc]))
    assert a["arms"]["base"]["mc_dropout_base"] == pytest.approx(np.mean([ndcg(b, 20).mean() for b in base[:4]]))
    erl = records[5:7]
    readout = np.mean([ndcg(np.asarray(r["test"]["readout_ranks"]), 10).mean() for r in erl])
    assert a["arms"]["erl"]["metrics"]["ndcg@10"][0] == pytest.approx(readout)
    gain = a["arms"]["erl"]["gain_over_base"]["ndcg@10"]
    assert gain["gain"] == pytest.approx(readout / a["arms"]["base"]["metrics"]["ndcg@10"][0] - 1)
    assert gain["low"] <= gain["gain"] <= gain["high"] and gain["p"] <= gain["p_holm"] <= 1
    prl_oracle = np.mean([ndcg(np.min(r["test"]["ranks"], axis=0), 20).mean() for r in records[7:]])
    assert a["arms"]["prl"]["step_oracle"][0] == pytest.approx(prl_oracle)
    assert set(a["arms"]["prl"]["selectors"]) >= {"fixed", "min-entropy", "kl-halt", "learned", "random", "oracle"}
    users_mean = np.mean([np.mean([ndcg(b, 10)[users == u].mean() for u in np.unique(users)]) for b in base])
    assert a["arms"]["base"]["user_averaged_ndcg@10"] == pytest.approx(users_mean)
    # Every metric of every arm: seed mean and sample standard deviation of the readout's per-seed value.
    readouts = {"base": base, "erl": [np.asarray(r["test"]["readout_ranks"]) for r in erl],
                "prl": [np.asarray(r["test"]["ranks"][-1]) for r in records[7:]]}
    for arm, ranks in readouts.items():
        for metric, per_seed in (("ndcg@20", [ndcg(x, 20).mean() for x in ranks]),
                                 ("recall@10", [np.mean(x <= 10) for x in ranks]),
                                 ("recall@20", [np.mean(x <= 20) for x in ranks])):
            assert a["arms"][arm]["metrics"][metric] == pytest.approx([np.mean(per_seed), np.std(per_seed, ddof=1)])
    # Per step: each step's own ranks; MC dropout: one draw alone is the mean over every draw.
    for s in range(3):
        per_seed = [ndcg(np.asarray(r["test"]["ranks"][s]), 20).mean() for r in records[7:]]
        assert a["arms"]["prl"]["steps"][f"r{s}"] == pytest.approx([np.mean(per_seed), np.std(per_seed, ddof=1)])
    single = [np.mean([ndcg(draw, 20).mean() for draw in m]) for m in mc]
    assert a["arms"]["base"]["mc_dropout_single"] == pytest.approx([np.mean(single), np.std(single, ddof=1)])
    # User-averaged gain: the arm's user-averaged NDCG@10 over base's, minus 1.
    erl_users = np.mean([np.mean([ndcg(x, 10)[users == u].mean() for u in np.unique(users)]) for x in readouts["erl"]])
    assert a["arms"]["erl"]["user_averaged_gain@10"] == pytest.approx(erl_users / users_mean - 1)
    # Holm across the arms (one family per metric), and across every arm's three adaptive selectors: the
    # target is met by any of them (a family per arm let 7 arms x 3 selectors pass at 3 tests' correction).
    for metric in ("ndcg@10", "ndcg@20"):
        family = [a["arms"][arm]["gain_over_base"][metric] for arm in ("erl", "prl")]
        assert [g["p_holm"] for g in family] == pytest.approx(holm([g["p"] for g in family]))
    family = [a["arms"][arm]["selectors"][n]["gain_over_fixed@20"] for arm in ("erl", "prl")
              for n in ("min-entropy", "kl-halt", "learned")]
    assert [g["p_holm"] for g in family] == pytest.approx(holm([g["p"] for g in family]))
    assert a["selector_tests"] == 6 and "across every arm's adaptive selectors (6 tests" in "\n".join(selectors_section(a))
    assert a["arms"]["prl"]["selectors"]["random"]["gain_over_fixed@20"]["p_holm"] is None  # the placebo: outside
    # The verdict: "mostly noise" exactly when the best noise oracle gets >= 70% of the step oracle's gain.
    base_arm = a["arms"]["base"]
    noise_gain = max(base_arm["mc_dropout_oracle"][0] / np.mean([ndcg(b, 20).mean() for b in base[:4]]),
                     base_arm["seed_oracle"]["ndcg@20"] / np.mean([ndcg(b, 20).mean() for b in pooled])) - 1
    step_gain = np.mean([a["arms"][arm]["step_oracle"][0] / a["arms"][arm]["metrics"]["ndcg@20"][0] - 1
                         for arm in ("erl", "prl")])
    assert ("mostly \"best of several noisy draws\"" in oracle_verdict(a)) == (noise_gain >= 0.7 * step_gain)
    # bf16 twins: a twin of base seed 1 and one of PRL seed 0, each beside its fp32 run; twins stay out of the arms.
    twins = [dict(fake_record(rng, "base-bf16", 1, n_valid, n_test, 1, protocol, "f"), role="bf16-twin"),
             dict(fake_record(rng, "prl-bf16", 0, n_valid, n_test, 3, protocol, "f"), role="bf16-twin")]
    with_twins = records + twins
    assert analyse_dataset("ml-100k", with_twins, samples, {"ml-100k": with_twins}, protocol)["arms"].keys() == a["arms"].keys()
    for r in records + twins:  # distinct best validation scores
        r["best_score"] = round(float(rng.uniform(0.05, 0.15)), 4)
    section = "\n".join(bf16_twin_section(with_twins, protocol, {"ml-100k": with_twins}))
    for twin, fp32, arm_seeds in ((twins[0], records[1], records[:5]), (twins[1], records[7], records[7:9])):
        test = [sum(1 / math.log2(x + 1) for x in r["test"]["ranks"][-1] if x <= 20) / n_test for r in (fp32, twin)]
        arm = twin["arm"].split("-")[0]
        assert (f"| {arm} | {twin['seed']} | 3 / 3 | {fp32['best_score']:.4f} / {twin['best_score']:.4f} | "
                f"{test[0]:.4f} / {test[1]:.4f} | {test[1] - test[0]:+.4f} |") in section
        spread = np.std([ndcg(np.asarray(r["test"]["ranks"][-1]), 20).mean() for r in arm_seeds], ddof=1)
        valid_spread = np.std([r["best_score"] for r in arm_seeds], ddof=1)
        assert (f"- {arm}: mean bf16 − fp32 test NDCG@20 {test[1] - test[0]:+.4f}, mean |bf16 − fp32| "
                f"{abs(test[1] - test[0]):.4f} over 1 seed(s); the fp32 seed "
                f"std is {spread:.4f} over {len(arm_seeds)} fp32 seeds. Best validation NDCG@20, which picks the epoch: "
                f"mean |bf16 − fp32| {abs(twin['best_score'] - fp32['best_score']):.4f}; the fp32 seed std is "
                f"{valid_spread:.4f} over {len(arm_seeds)} fp32 seeds.") in section
    # BERT4Rec's reasoning arms get the adaptive-depth selectors too (they were left out of that table).
    bert = ([fake_record(rng, "bert4rec-base", s, n_valid, n_test, 1, protocol, "f") for s in range(2)]
            + [fake_record(rng, "bert4rec-prl", s, n_valid, n_test, 3, protocol, "f") for s in range(2)])
    both = records + bert
    b = analyse_dataset("ml-100k", both, samples, {"ml-100k": both}, protocol)
    assert set(b["arms"]["bert4rec-prl"]["selectors"]) >= {"fixed", "kl-halt", "learned", "random", "oracle"}
    assert "selectors" not in b["arms"]["bert4rec-base"]
    # A result file computed on other samples is refused.
    records[0]["samples_fingerprint"] = "other"
    with pytest.raises(ValueError, match="other samples than samples.json"):
        analyse_dataset("ml-100k", records, samples, {"ml-100k": records}, protocol)


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 9), st.integers(1, 3), st.booleans(), st.booleans(),
       st.sampled_from([None, 0.2]))
def test_contrastive_options_against_a_loop(seed, batch, steps, cosine, mask, cl_temperature):
    """The InfoNCE study options (cosine similarity, own temperature, same-user negatives masked) against
    a per-row loop; the defaults are the public code's dot product."""
    import torch

    from rearec.objectives import contrastive_loss

    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, steps + 1, 5, generator=g, dtype=torch.float64)
    noisy = states + 0.3 * torch.randn(batch, steps + 1, 5, generator=g, dtype=torch.float64)
    users = torch.randint(0, 3, (batch,), generator=g)
    got = contrastive_loss(states, noisy, 0.07, cosine=cosine, users=users if mask else None,
                           cl_temperature=cl_temperature)
    t = 0.07 if cl_temperature is None else cl_temperature
    losses = []
    for k in range(1, steps + 1):
        for b in range(batch):
            logits = []
            for c in range(batch):
                if mask and c != b and users[c] == users[b]:
                    continue
                x, y = noisy[b, k], states[c, k]
                sim = torch.dot(x, y) / (x.norm() * y.norm()) if cosine else torch.dot(x, y)
                logits.append((sim / t, c == b))
            values = torch.stack([v for v, _ in logits])
            target = next(i for i, (_, is_b) in enumerate(logits) if is_b)
            losses.append(torch.logsumexp(values, 0) - values[target])
    assert torch.allclose(got, torch.stack(losses).mean())


def test_contrastive_options_in_the_config_and_training():
    import torch

    from rearec import ReaRec, ReaRecConfig
    from rearec.objectives import training_loss

    with pytest.raises(ValueError, match="cl_similarity must be 'dot' or 'cosine'"):
        ReaRecConfig(n_items=5, cl_similarity="angle")
    with pytest.raises(ValueError, match="cl_temperature must be None or > 0"):
        ReaRecConfig(n_items=5, cl_temperature=0.0)
    cfg = ReaRecConfig(n_items=9, hidden_size=8, n_layers=1, n_heads=1, inner_size=8, max_len=4, warmup_epochs=0,
                       cl_mask_same_user=True, cl_similarity="cosine", cl_temperature=0.2)
    model = ReaRec(cfg)
    histories, lengths, targets = torch.randint(0, 9, (6, 4)), torch.full((6,), 4), torch.randint(0, 9, (6,))
    with pytest.raises(ValueError, match="needs each sample's user"):
        training_loss(model, histories, lengths, targets, epoch=1)
    assert torch.isfinite(training_loss(model, histories, lengths, targets, epoch=1, users=torch.zeros(6).long()))


def test_the_trainer_passes_users_to_a_masked_infonce(tmp_path, monkeypatch):
    """Each sample reaches the loss with its own user: its history and target are a window of that
    user's interactions (so the same-user mask removes the right negatives), and batches do hold
    several samples of one user (so the mask has something to remove)."""
    from rearec import ReaRecConfig
    from rearec import train as train_module
    from rearec.train import TrainConfig, train_run

    data = DataSpec.for_source(write_log(tmp_path / "log.csv", n_users=30, n_items=10, length=8)).load()
    cfg = ReaRecConfig(n_items=data.n_items, hidden_size=8, n_layers=1, n_heads=1, inner_size=8, max_len=6,
                       warmup_epochs=0, cl_mask_same_user=True)
    seen, real_loss = [], train_module.training_loss

    def spy(model, histories, lengths, targets, epoch=0, fused_ce=True, users=None):
        seen.append((histories.clone(), lengths.clone(), targets.clone(), None if users is None else users.clone()))
        return real_loss(model, histories, lengths, targets, epoch, fused_ce=fused_ce, users=users)

    monkeypatch.setattr(train_module, "training_loss", spy)
    _, result = train_run(cfg, data, TrainConfig(max_epochs=1, batch_size=16, progress=False), str(tmp_path / "run"),
                          log=lambda s: None)
    assert result.epochs_run == 1 and result.status == "max_epochs"
    assert seen and all(users is not None for *_, users in seen)
    assert any(len(set(users.tolist())) < len(users) for *_, users in seen)
    for histories, lengths, targets, users in seen:
        for h, n, t, u in zip(histories, lengths, targets, users):
            window = h[:int(n)].tolist() + [int(t)]
            full = data.user_history(data.mapping.users[int(u)])
            assert any(full[i:i + len(window)] == window for i in range(len(full) - len(window) + 1)), \
                f"sample of user {int(u)}: {window} is not a window of that user's history {full}"


def test_a_run_saved_before_a_config_field_existed_resumes(tmp_path):
    """A checkpoint whose config lacks a field added later (here the InfoNCE options) resumes: the
    field takes its default. A real difference is still refused."""
    import torch

    from rearec import ReaRecConfig
    from rearec.runs import RESUME, STATE_FILE
    from rearec.train import TrainConfig, TrainingError, train_run

    data = DataSpec.for_source(write_log(tmp_path / "log.csv", n_users=30, n_items=10, length=8)).load()
    cfg = ReaRecConfig(n_items=data.n_items, hidden_size=8, n_layers=1, n_heads=1, inner_size=8, max_len=6)
    folder = str(tmp_path / "run")
    train_run(cfg, data, TrainConfig(max_epochs=1, batch_size=16, progress=False), folder, log=lambda s: None)
    state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
    for key in ("cl_similarity", "cl_temperature", "cl_mask_same_user"):
        del state["model_config"][key]
    torch.save(state, os.path.join(folder, STATE_FILE))
    _, result = train_run(cfg, data, TrainConfig(max_epochs=2, batch_size=16, progress=False), folder, mode=RESUME,
                          log=lambda s: None)
    assert result.epochs_run == 2
    other = ReaRecConfig(**{**cfg.to_dict(), "cl_similarity": "cosine"})
    with pytest.raises(TrainingError, match="another model configuration"):
        train_run(other, data, TrainConfig(max_epochs=3, batch_size=16, progress=False), folder, mode=RESUME,
                  log=lambda s: None)


def test_a_collapsed_seed_is_flagged_and_the_gain_given_without_it():
    from rearec.selectors import ndcg
    from rearec.study_report import analyse_dataset, collapse_note, collapsed_runs, dataset_section

    rng = np.random.default_rng(3)
    protocol = Protocol()
    n_valid, n_test = 29, 90
    samples, base, erl = base_and_erl(rng, protocol, n_valid, n_test, erl_seeds=3)
    for r, score in zip(base + erl, (0.14, 0.15, 0.13, 0.0269, 0.12)):
        r["best_score"] = score
    erl[1]["best_epoch"] = 1
    records = base + erl
    a = analyse_dataset("ml-100k", records, samples, {"ml-100k": records}, protocol)
    assert a["arms"]["base"]["collapsed"] == []
    assert a["arms"]["erl"]["collapsed"] == [{"seed": 1, "best_epoch": 1, "valid": 0.0269, "others_valid": 0.125}]
    # The gain without the collapsed seed: seeds 0 and 2 against every base seed.
    kept = np.mean([ndcg(np.asarray(erl[s]["test"]["readout_ranks"]), 20).mean() for s in (0, 2)])
    base20 = np.mean([ndcg(np.asarray(r["test"]["ranks"][0]), 20).mean() for r in base])
    without = a["arms"]["erl"]["gain_without_collapsed@20"]
    assert without["gain"] == pytest.approx(kept / base20 - 1)
    assert without["gain"] != pytest.approx(a["arms"]["erl"]["gain_over_base"]["ndcg@20"]["gain"])
    assert without["low"] <= without["gain"] <= without["high"]
    assert without["dropped"] == ["erl seed 1"]
    note = collapse_note(a)
    assert "erl seed 1 collapsed (best epoch 1, best validation NDCG@20 0.0269 against 0.1250" in note
    assert f"without erl seed 1, erl's NDCG@20 gain is {without['gain'] * 100:+.1f}%" in note
    assert note in "\n".join(dataset_section("ml-100k", a, protocol))
    # A collapsed base seed weakens the base, so every gain over it is given without it too (the arm's
    # own collapsed seeds dropped as well); an arm with none of its own gets the sentence all the same.
    weak = fake_record(rng, "base", 2, n_valid, n_test, 1, protocol, "f")
    weak["best_score"] = 0.03
    prl = [fake_record(rng, "prl", s, n_valid, n_test, 3, protocol, "f") for s in range(2)]
    records = base + [weak] + erl + prl
    a = analyse_dataset("ml-100k", records, samples, {"ml-100k": records}, protocol)
    assert [c["seed"] for c in a["arms"]["base"]["collapsed"]] == [2]
    base20 = np.mean([ndcg(np.asarray(r["test"]["ranks"][0]), 20).mean() for r in base])  # seeds 0 and 1
    prl20 = np.mean([ndcg(np.asarray(r["test"]["ranks"][-1]), 20).mean() for r in prl])
    assert a["arms"]["erl"]["gain_without_collapsed@20"]["gain"] == pytest.approx(kept / base20 - 1)
    assert a["arms"]["erl"]["gain_without_collapsed@20"]["dropped"] == ["erl seed 1", "base seed 2"]
    assert a["arms"]["prl"]["gain_without_collapsed@20"]["gain"] == pytest.approx(prl20 / base20 - 1)
    note = collapse_note(a)
    assert "base seed 2 collapsed" in note and "without prl seed" not in note
    assert f"without base seed 2, prl's NDCG@20 gain is {(prl20 / base20 - 1) * 100:+.1f}%" in note
    # The threshold: half the median of the other seeds flags nothing at exactly half, and one seed alone
    # or a missing score is never flagged.
    runs = [{"seed": 0, "best_epoch": 5, "best_score": 0.05}, {"seed": 1, "best_epoch": 9, "best_score": 0.1}]
    assert collapsed_runs(runs) == []
    runs[0]["best_score"] = 0.0499
    assert [c["seed"] for c in collapsed_runs(runs)] == [0]
    assert collapsed_runs(runs[:1]) == [] and collapsed_runs([dict(runs[0], best_score=None), runs[1]]) == []
    assert collapse_note({"arms": {"base": {"collapsed": []}}}) == ""


def test_a_p_value_at_the_bootstrap_floor_is_printed_as_a_bound():
    """With no replicate on the other side of zero, p is the floor 2/(rounds+1) (x the Holm factor): the
    report printed it as if measured ("Holm p 0.007"); it says "≤ 0.007"."""
    from rearec.study_report import ROUNDS, analyse_dataset, dataset_section, p_text

    assert p_text({"p_holm": 0.00699, "p_at_floor": True}) == "≤ 0.00699"
    assert p_text({"p_holm": 0.0312, "p_at_floor": False}, ".2g") == "0.031"
    rng = np.random.default_rng(4)
    protocol = Protocol()
    n_valid, n_test = 23, 60
    samples, base, erl = base_and_erl(rng, protocol, n_valid, n_test, erl_seeds=2)
    for r in base:  # every sample at rank 8 against rank 1: every replicate's gain is far above zero
        r["test"]["ranks"][0] = [8] * n_test
    for r in erl:
        r["test"]["readout_ranks"] = [1] * n_test
    a = analyse_dataset("ml-100k", base + erl, samples, {"ml-100k": base + erl}, protocol)
    g = a["arms"]["erl"]["gain_over_base"]["ndcg@20"]
    assert g["p_at_floor"] and g["p"] == pytest.approx(2 / (ROUNDS + 1))
    row = next(line for line in dataset_section("ml-100k", a, protocol) if line.startswith("| erl |"))
    assert f"| ≤ {g['p_holm']:.3g} |" in row


def test_a_diagnosis_run_that_diverged_before_its_first_epoch_is_a_row_of_its_table():
    """Such a run's result has no score (best_score None) and no test outputs: its row says so, where
    the report failed with a TypeError; so does a PRL reference without a score."""
    from rearec.study_report import diagnosis_section

    rng = np.random.default_rng(5)
    protocol = Protocol()
    prl = dict(fake_record(rng, "prl", 0, 7, 9, 3, protocol, "f"), role="grid")
    cl0 = dict(fake_record(rng, "prl-cl0", 0, 7, 9, 3, protocol, "f"), role="diagnosis", best_score=0.2)
    diverged = {k: v for k, v in fake_record(rng, "prl-pl0", 0, 7, 9, 3, protocol, "f").items() if k not in ("valid", "test")}
    diverged.update(role="diagnosis", status="diverged", best_epoch=-1, best_score=None, epochs_run=0,
                    seconds_per_epoch=None, message="training loss became NaN/Inf in epoch 0")
    records = [prl, cl0, diverged]
    rows = [line for line in diagnosis_section(records, protocol, {"ml-100k": records}) if line.startswith("| prl")]
    assert rows[2].startswith("| prl-pl0 | diverged | -1 |  | – |")
    assert rows[1].startswith("| prl-cl0 | converged | 3 | 0.2000 | 0.") and rows[0].startswith("| prl | converged | 3 |")
    unscored = [dict(prl, best_score=None), cl0]
    rows = [line for line in diagnosis_section(unscored, protocol, {"ml-100k": unscored}) if line.startswith("| prl")]
    assert rows[0].startswith("| prl | converged | 3 |  | 0.") and rows[1].startswith("| prl-cl0 | converged | 3 | 0.2000 | – |")


def test_a_result_file_under_another_name_is_refused(tmp_path):
    """A run's result is read from <dataset>/<name>.json only: a copy beside it (a merge, a backup) counted
    the run twice (its seed twice in the tables), and a file in another dataset's folder was its run."""
    record = fake_record(np.random.default_rng(0), "base", 0, 3, 4, 1, Protocol(), "f")
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / f"{record['name']}.json").write_text(json.dumps(record))
    assert [r["name"] for r in read_results(str(tmp_path), "ml-100k")] == [record["name"]]
    (folder / f"{record['name']} (copy).json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"\(copy\).json holds the result of ml-100k/base-0, whose file is "):
        read_results(str(tmp_path), "ml-100k")
    os.remove(folder / f"{record['name']} (copy).json")
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / f"{record['name']}.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="holds the result of ml-100k/base-0"):
        read_results(str(tmp_path), "ml-1m")


def test_a_result_file_without_its_keys_is_refused(tmp_path):
    """A result of the right format whose keys were cut by hand was a KeyError traceback in the report."""
    record = fake_record(np.random.default_rng(0), "base", 0, 3, 4, 1, Protocol(), "f")
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / f"{record['name']}.json").write_text(json.dumps({k: v for k, v in record.items() if k != "protocol"}))
    with pytest.raises(ValueError, match=r"base-0.json lacks protocol: a result file edited or cut by hand"):
        read_results(str(tmp_path), "ml-100k")


def test_results_of_another_protocol_are_refused_by_study_run(tmp_path, monkeypatch, capsys):
    """`rearec study --run` trains with the code's protocol: result files made with another counted as
    done, chose the grid and entered its report unchecked; they are refused before any training (and by
    the report given that protocol), while files that differ in plan-only fields are taken."""
    import rearec.study as study

    rng = np.random.default_rng(2)
    results = tmp_path / "results"
    (results / "ml-100k").mkdir(parents=True)
    record = fake_record(rng, "base", 0, 3, 4, 1, Protocol(patience=3), "f")
    (results / "ml-100k" / f"{record['name']}.json").write_text(json.dumps(record))
    trained = []
    def train_claimed(*args, **kwargs):  # fails, so that a plan that went on ends at once (no grid resolves)
        trained.append(1)
        raise RuntimeError("trained")

    monkeypatch.setattr(study, "train_claimed", train_claimed)
    args = ["study", "--run", "--results", str(results), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--report", str(tmp_path / "out" / "results.md")]
    assert main(args) == 2 and not trained
    assert "another study protocol than this one (patience differ)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"another study protocol than this one \(patience differ\)"):
        write_study_report(Protocol(), str(results), str(tmp_path / "out"), str(tmp_path / "r.md"), log=lambda s: None)
    record = fake_record(rng, "base", 0, 3, 4, 1, Protocol(bf16_twin_arms=("prl",), bf16_twin_seeds=1), "f")
    (results / "ml-100k" / f"{record['name']}.json").write_text(json.dumps(record))
    assert protocol_of([record], Protocol()) == Protocol()


def test_the_finished_count_is_of_planned_runs(tmp_path):
    """A result of a run outside the plan (a seed or variant the plan no longer holds) counted as a
    planned run finished: with one planned run missing the report said all had finished."""
    rng = np.random.default_rng(4)
    results = tmp_path / "results"
    planned = plan(TINY)
    extra = PlannedRun("ml-100k", "base", 9, ARMS["base"], TINY.grid_lr[0], TINY.grid_dropout[0])
    for run in planned[:-1] + [extra]:
        lr, dropout = TINY.grid_lr[0], TINY.grid_dropout[0]
        record = fake_record(rng, run.arm, run.seed, 3, 4, 1, TINY, "f")
        record.update(dataset=run.dataset, role=run.role, name=run.resolved(lr, dropout).name)
        (results / run.dataset).mkdir(parents=True, exist_ok=True)
        (results / run.dataset / f"{record['name']}.json").write_text(json.dumps(record))
    report = tmp_path / "results.md"
    summary = write_study_report(None, str(results), str(tmp_path / "out"), str(report), log=lambda s: None)
    assert summary["finished_runs"] == len(planned) - 1 and summary["planned_runs"] == len(planned)
    assert f"Partial: {len(planned) - 1} of {len(planned)} planned runs have finished" in report.read_text()


def test_epochs_saved_are_read_from_the_training_state(tmp_path):
    """Counting the log's epoch lines was one short after a kill between an epoch's state save and its
    log line (and crashed --plan and --park on a line cut after 'epoch '); the state says. A damaged state
    counts no epoch and is still parked."""
    folder = tmp_path / "work" / "ml-100k" / "base-lr0.01-do0.1-seed0"
    folder.mkdir(parents=True)
    (folder / "train.log").write_text("epoch   0  loss 5.1\nepoch  ")
    torch.save({"epoch": 2, "model": {"w": torch.zeros(3)}}, folder / "train_state.pt")
    assert epochs_saved(str(folder)) == 2
    (folder / "train_state.pt").write_text("state")
    assert epochs_saved(str(folder)) == 0
    parked = tmp_path / "parked"
    events = []
    assert park_runs(TINY, str(tmp_path / "results"), str(tmp_path / "work"), str(parked), log=events.append) == (1, 0)
    assert events == [f"parked ml-100k {folder.name} (no epoch saved)"]
    assert (parked / "ml-100k" / folder.name / "train_state.pt").read_text() == "state"
