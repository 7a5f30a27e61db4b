"""The ``rearec`` command line, in process: round trip, JSON output, resume, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import rearec.cli as cli
import rearec.train as train_module
from rearec import ReaRec
from rearec.cli import main
from tests.synthetic import markov_sequences

TINY = ["--hidden-size", "16", "--layers", "1", "--heads", "1", "--inner-size", "32", "--max-len", "8",
        "--batch-size", "64", "--lr", "0.01", "--no-progress"]



pytestmark = pytest.mark.usefixtures("one_thread")

def write_log(path, n_users=50, n_items=12, length=8, seed=0, late_user=True):
    """Markov-chain log as CSV with ratings; user u's t-th event at time t*1000+u. ``late_user`` adds a
    user whose only interaction (with an item nobody else has) comes after the training period."""
    seqs = markov_sequences(n_users=n_users, n_items=n_items, length=length, seed=seed)
    with open(path, "w") as f:
        f.write("user_id,item_id,rating,timestamp\n")
        for u, row in enumerate(seqs.tolist()):
            for t, item in enumerate(row):
                f.write(f"u{u},i{item},{4 + (u + t) % 2},{t * 1000 + u}\n")
        if late_user:
            f.write(f"late,fresh,5,{length * 1000}\n")
    return str(path)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rearec: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return write_log(tmp_path_factory.mktemp("data") / "log.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, log):
    """One trained PRL run shared by the read-only tests: (out_dir, stdout)."""
    out = tmp_path_factory.mktemp("run") / "prl"
    code = main(["train", "--data", log, "--objective", "prl", "--reason-steps", "2", "--epochs", "3",
                 "--out", str(out), *TINY])
    assert code == 0
    return str(out)


def test_train_writes_run_files(log, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "2", "--out", out,
                            *TINY)
    assert code == 0, err
    assert "users: 51" in stdout and "samples: train" in stdout  # the data summary
    assert "epoch   1" in stdout and "valid ndcg@20" in stdout  # per-epoch loss and validation metric
    assert "readout" in stdout and "recall@10" in stdout  # the test table
    for name in ("model.safetensors", "train_state.pt", "train.log", "data.json", "test_metrics.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "data.json").read_text())
    assert saved["source"] == os.path.abspath(log) and saved["options"]["split"] == "temporal"
    assert saved["items"] == ReaRec.load(out / "model.safetensors").config.n_items
    assert len((out / "train.log").read_text().splitlines()) == 2


def test_evaluate_matches_training_report_and_writes_json(trained, tmp_path, capsys):
    target = tmp_path / "metrics.json"
    code, stdout, err = run(capsys, "evaluate", "--checkpoint", trained, "--json", target, "--no-progress")
    assert code == 0, err
    for row in ("readout", "r0", "r1", "r2", "oracle"):
        assert f"\n{row} " in stdout
    assert "ndcg@50" in stdout and "mrr@5" in stdout
    report = json.loads(target.read_text())
    assert report["part"] == "test" and report["ks"] == [5, 10, 20, 50]
    assert set(report["metrics"]) >= {"readout", "r0", "r1", "r2", "oracle", "n_samples"}
    assert set(report["metrics"]["oracle"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (5, 10, 20, 50)}
    at_training = json.loads(open(os.path.join(trained, "test_metrics.json")).read())["metrics"]
    assert report["metrics"]["readout"] == pytest.approx(at_training["readout"])
    oracle, steps = report["metrics"]["oracle"], [report["metrics"][f"r{s}"] for s in range(3)]
    assert all(oracle["ndcg@10"] >= s["ndcg@10"] - 1e-12 for s in steps)


def test_evaluate_options_and_json_to_stdout(trained, capsys):
    code, stdout, err = run(capsys, "evaluate", "--checkpoint", os.path.join(trained, "model.safetensors"),
                            "--part", "valid", "--exclude-history", "--ks", "1,3", "--json", "-",
                            "--no-progress", "--threads", "1")
    assert code == 0, err
    report = json.loads(stdout)  # the table went to stderr
    assert report["part"] == "valid" and report["exclude_history"] and report["ks"] == [1, 3]
    assert "recall@3" in err


def test_recommend_users_and_histories(trained, log, tmp_path, capsys):
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--user", "u3", "--user", "u7", "-k", "4",
                            "--exclude-seen", "--json")
    assert code == 0, err
    recs = json.loads(stdout)["recommendations"]
    assert [r["user"] for r in recs] == ["u3", "u7"]
    assert all(len(r["items"]) == 4 and all(i.startswith("i") for i in r["items"]) for r in recs)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in recs)

    # The same histories from a file give the same items, and agree with the reference model.
    from rearec.data import load_dataset

    data = load_dataset(log)
    histories = [data.mapping.items_to_raw(data.user_history(u)) for u in ("u3", "u7")]
    assert set(recs[0]["items"]).isdisjoint(histories[0])  # --exclude-seen
    path = tmp_path / "histories.txt"
    path.write_text(" ".join(histories[0]) + "\n" + ",".join(histories[1]) + "\n")
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", "4",
                            "--exclude-seen", "--json")
    assert code == 0, err
    assert [r["items"] for r in json.loads(stdout)["recommendations"]] == [r["items"] for r in recs]
    model = ReaRec.load(os.path.join(trained, "model.safetensors"))
    reference = model.recommend([data.user_history(u) for u in ("u3", "u7")], k=4, exclude_seen=True, raw_ids=False)
    assert [data.mapping.items_to_raw(row) for row in reference.items] == [r["items"] for r in recs]

    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", "3",
                            "--depth", "0", "--readout", "mean")
    assert code == 0, err
    assert "depth 0, readout mean" in stdout and "line 2" in stdout and stdout.count("  1. ") == 2


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(log, tmp_path, capsys, monkeypatch):
    args = ["train", "--data", log, "--objective", "prl", "--reason-steps", "1", "--warmup-epochs", "1",
            "--epochs", "3", *TINY]
    code, _, err = run(capsys, *args, "--out", tmp_path / "full")
    assert code == 0, err

    real_loss, calls = train_module.training_loss, []

    def ctrl_c_in_epoch_1(*a, **k):
        calls.append(1)
        if a[-1] == 1 and len(calls) > 3:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(train_module, "training_loss", ctrl_c_in_epoch_1)
    code, _, err = run(capsys, *args, "--out", tmp_path / "killed")
    assert code == 130
    assert_one_line_error(err, "interrupted", "resume with --resume")
    assert (tmp_path / "killed" / "model.safetensors").is_file()  # epoch 0's best: usable
    ReaRec.load(tmp_path / "killed" / "model.safetensors")
    monkeypatch.setattr(train_module, "training_loss", real_loss)

    code, _, err = run(capsys, *args, "--out", tmp_path / "killed")  # without --resume: refused
    assert code == 2
    assert_one_line_error(err, "already holds a training run", "--resume")
    code, _, err = run(capsys, *args, "--lr", "0.5", "--out", tmp_path / "killed", "--resume")
    assert code == 2
    assert_one_line_error(err, "--lr", "same options")

    code, stdout, err = run(capsys, *args, "--out", tmp_path / "killed", "--resume")
    assert code == 0, err
    assert "resumed after epoch 0" in stdout
    full = json.loads((tmp_path / "full" / "test_metrics.json").read_text())["metrics"]
    resumed = json.loads((tmp_path / "killed" / "test_metrics.json").read_text())["metrics"]
    assert resumed == full
    a = ReaRec.load(tmp_path / "full" / "model.safetensors").state_dict()
    b = ReaRec.load(tmp_path / "killed" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_exits_1_and_keeps_the_best_checkpoint(log, tmp_path, capsys, monkeypatch):
    real_loss = train_module.training_loss
    monkeypatch.setattr(train_module, "training_loss",
                        lambda m, h, l, t, epoch=0: real_loss(m, h, l, t, epoch) * (float("nan") if epoch >= 2 else 1))
    code, _, err = run(capsys, "train", "--data", log, "--objective", "erl", "--epochs", "5", "--out", tmp_path, *TINY)
    assert code == 1
    assert_one_line_error(err, "NaN", "kept the best weights", "--kl-weight", "model.safetensors")
    monkeypatch.setattr(train_module, "training_loss", real_loss)
    code, stdout, err = run(capsys, "recommend", "--checkpoint", tmp_path, "--user", "u1")
    assert code == 0, err


@pytest.fixture(scope="module")
def other_log(tmp_path_factory):
    return write_log(tmp_path_factory.mktemp("other") / "other.csv", seed=1, n_items=13)


def _bad_cases():
    return {
        "missing data file": (["train", "--data", "{tmp}/nope.csv", "--objective", "base", "--out", "{tmp}/o"],
                              2, ["no such file"]),
        "unknown column": (["train", "--data", "{log}", "--user-col", "who", "--objective", "base",
                            "--out", "{tmp}/o"], 2, ["no column 'who'", "user_col"]),
        "empty after filtering": (["train", "--data", "{log}", "--min-rating", "9", "--objective", "base",
                                   "--out", "{tmp}/o"], 2, ["removed every interaction", "min_rating"]),
        "bad hyperparameter": (["train", "--data", "{log}", "--objective", "base", "--reason-steps", "2",
                                "--out", "{tmp}/o"], 2, ["reason_steps=0"]),
        "unwritable output folder": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/file/o"],
                                     2, ["cannot write to output folder", "--out"]),
        "usage error": (["train", "--data", "{log}", "--out", "{tmp}/o"], 2, ["--objective", "--help"]),
        "unknown subcommand": (["fly"], 2, ["invalid choice"]),
        "missing checkpoint": (["evaluate", "--checkpoint", "{tmp}/none.safetensors"], 2, ["does not exist"]),
        "not a checkpoint": (["evaluate", "--checkpoint", "{tmp}/file"], 2, ["not a readable rearec checkpoint"]),
        "other data": (["evaluate", "--checkpoint", "{run}", "--data", "{other}"], 2,
                       ["trained on other data", "same data file"]),
        "no data.json": (["evaluate", "--checkpoint", "{tmp}/copy.safetensors"], 2, ["data.json", "--data"]),
        "unwritable json": (["evaluate", "--checkpoint", "{run}", "--json", "{tmp}/no/such/dir/m.json",
                             "--no-progress"], 2, ["does not exist"]),
        "unknown user": (["recommend", "--checkpoint", "{run}", "--user", "ghost"], 2, ["'ghost'", "not in the data"]),
        "user without history": (["recommend", "--checkpoint", "{run}", "--user", "late"], 2,
                                 ["'late'", "no interaction with an item the model knows"]),
        "blank history line": (["recommend", "--checkpoint", "{run}", "--histories", "{tmp}/blank.txt"], 2,
                               ["line 2 is empty"]),
        "unknown item in history": (["recommend", "--checkpoint", "{run}", "--histories", "{tmp}/unknown.txt"], 2,
                                    ["line 1", "'zz'", "unknown to the model"]),
        "missing histories file": (["recommend", "--checkpoint", "{run}", "--histories", "{tmp}/none.txt"], 2,
                                   ["No such file", "none.txt"]),
        "depth too large": (["recommend", "--checkpoint", "{run}", "--user", "u1", "--depth", "9"], 2, ["0..2"]),
        "user and histories": (["recommend", "--checkpoint", "{run}", "--user", "u1", "--histories", "x"], 2,
                               ["not allowed with"]),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_input_is_one_line_and_exit_code(case, trained, log, other_log, tmp_path, capsys):
    argv, expected_code, fragments = _bad_cases()[case]
    (tmp_path / "file").write_text("not a folder, not a checkpoint")
    (tmp_path / "blank.txt").write_text("i1 i2\n\ni3\n")
    (tmp_path / "unknown.txt").write_text("i1 zz\n")
    (tmp_path / "copy.safetensors").write_bytes(open(os.path.join(trained, "model.safetensors"), "rb").read())
    fill = {"tmp": tmp_path, "log": log, "other": other_log, "run": trained}
    code, _, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == expected_code
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_ctrl_c_outside_training_exits_130(trained, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_data", interrupt)
    code, _, err = run(capsys, "evaluate", "--checkpoint", trained)
    assert code == 130
    assert_one_line_error(err, "interrupted")


def test_quickstart_flow_on_small_data(log, tmp_path, capsys, monkeypatch):
    """The quickstart's steps (two runs, table, FastReaRec top-10, optional latency plot), on the tiny log
    instead of MovieLens-100K."""
    real_load = cli.load_data
    monkeypatch.setattr(cli, "load_data", lambda spec: real_load({**spec, "source": log, "min_rating": None}))
    monkeypatch.setitem(cli.QUICKSTART, "hidden_size", 16)
    monkeypatch.setitem(cli.QUICKSTART, "inner_size", 32)
    monkeypatch.setitem(cli.QUICKSTART, "max_len", 8)
    monkeypatch.setitem(cli.QUICKSTART, "n_layers", 1)
    profile_rows = []

    class FakeProfile:
        @staticmethod
        def profile_latency(engine, depths, batch_sizes, **kw):
            profile_rows.extend({"depth": d, "batch_size": b} for b in batch_sizes for d in depths)
            return profile_rows

        @staticmethod
        def write_profile(rows, out_dir, meta=None):
            return {"png": os.path.join(out_dir, "latency_vs_depth.png")}

    monkeypatch.setattr(cli, "_profile_module", lambda: FakeProfile)
    code, stdout, err = run(capsys, "quickstart", "--out", tmp_path, "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert "hidden size 16" in stdout and "epochs: up to 2" in stdout  # the settings are printed
    for label in ("SASRec (base)", "ReaRec-PRL (K=2)", "ReaRec-PRL oracle", "ndcg@10", "recall@20"):
        assert label in stdout
    assert "top-10 for 3 users" in stdout and "latency plot" in stdout
    assert sorted({r["depth"] for r in profile_rows}) == [0, 1, 2]
    for name in ("base", "prl"):
        assert (tmp_path / name / "model.safetensors").is_file()
    # run again: it starts over instead of refusing the existing runs
    code, _, err = run(capsys, "quickstart", "--out", tmp_path, "--epochs", "1", "--no-progress")
    assert code == 0, err


def test_profile_subcommand_joins_when_provided(capsys, monkeypatch):
    profile = pytest.importorskip("rearec.profile")

    def add(parser):
        parser.add_argument("--depths", default="0-2")

    monkeypatch.setattr(profile, "add_profile_arguments", add, raising=False)
    monkeypatch.setattr(profile, "run_profile", lambda args: print("profiled", args.depths) or 0, raising=False)
    code, stdout, _ = run(capsys, "profile", "--depths", "0-4")
    assert code == 0 and stdout.strip() == "profiled 0-4"


def test_help_and_python_m(capsys):
    code, stdout, _ = run(capsys, "quickstart", "--help")
    assert code == 0 and "hidden size 64" in stdout and "10 minutes" in stdout
    done = subprocess.run([sys.executable, "-m", "rearec", "recommend", "--checkpoint", "x"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("rearec: error: ")
