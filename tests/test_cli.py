"""The ``rearec`` command line, in process: round trip, JSON output, resume, profile, quickstart and bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import rearec.cli.quickstart as quickstart
import rearec.train as train_module
from rearec import ReaRec, ReaRecConfig
from rearec.cli import build_parser, main
from rearec.cli import console
from rearec.cli.console import CommandError, choose_threads, refuse_multiple_processes
from rearec.cli.options import data_spec_from_args
from rearec.cli.recommend import read_histories
from rearec.config import PRESETS
from rearec.data import DataSpec, load_dataset
from rearec.runs import DATA_FILE, MODEL_FILE, STATE_FILE, TEST_METRICS_FILE
from tests.synthetic import write_log

TINY = ["--hidden-size", "16", "--layers", "1", "--heads", "1", "--inner-size", "32", "--max-len", "8",
        "--batch-size", "64", "--lr", "0.01", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


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
    return write_log(tmp_path_factory.mktemp("data") / "log.csv", late_user=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, log):
    """One trained PRL run shared by the read-only tests: its folder."""
    out = tmp_path_factory.mktemp("run") / "prl"
    code = main(["train", "--data", log, "--objective", "prl", "--reason-steps", "2", "--epochs", "3",
                 "--out", str(out), *TINY])
    assert code == 0
    return str(out)


def test_train_writes_run_files(log, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "2", "--out", out,
                            "--dedupe", *TINY)
    assert code == 0, err
    assert "users: 51" in stdout and "samples: train" in stdout  # the data summary
    assert "epoch   1" in stdout and "valid ndcg@20" in stdout  # per-epoch loss and validation metric
    assert "readout" in stdout and "recall@10" in stdout  # the test table
    assert "threads: 1" in stdout  # the thread count is said
    for name in (MODEL_FILE, STATE_FILE, "train.log", DATA_FILE, TEST_METRICS_FILE):
        assert (out / name).is_file(), name
    saved = json.loads((out / DATA_FILE).read_text())
    assert saved["source"] == os.path.abspath(log) and saved["options"]["split"] == "temporal"
    assert saved["options"]["dedupe"] is True
    assert saved["items"] == ReaRec.load(out / MODEL_FILE).config.n_items
    # the window rule's window follows the model's max_len (8 here) unless given
    assert DataSpec.read(str(out / DATA_FILE)) == DataSpec.for_source(log, dedupe=True, filter_window=8)
    assert len((out / "train.log").read_text().splitlines()) == 2


def test_preset_sets_the_size_and_options_override_it(log, tmp_path, capsys):
    code, stdout, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--preset",
                            "quickstart", "--max-len", "6", "--out", tmp_path, "--no-progress")
    assert code == 0, err
    config = ReaRec.load(tmp_path / MODEL_FILE).config
    assert {k: getattr(config, k) for k in PRESETS["quickstart"]} == {**PRESETS["quickstart"], "max_len": 6}
    assert "preset quickstart" in stdout


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_noted(native, log, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module.packed, "native_bf16", lambda: native)
    code, stdout, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", *TINY, "--bf16",
                            "--out", tmp_path, "--no-progress")
    assert code == 0, err
    warned = [line for line in stdout.splitlines() if "no native bfloat16" in line]
    assert len(warned) == (0 if native else 1)
    assert all(line.startswith("note: ") and "as float32 products of the bf16 operands" in line for line in warned)
    assert train_module.emulated_bf16_note("cuda") is None  # GPUs: no such fallback


def test_min_rating_none_is_honoured_on_ml100k():
    """'none' is a value, not 'not given': the preset's rating > 3 must not come back."""
    args = build_parser().parse_args(["train", "--data", "ml-100k", "--objective", "base", "--out", "x",
                                      "--min-rating", "none"])
    spec = data_spec_from_args(args)
    assert spec.min_rating is None
    data = spec.load()
    assert not any(step.name.startswith("rating") for step in data.filter_report.steps)
    assert data.filter_report.rows_after == 100_000
    def spec(*extra):
        return data_spec_from_args(build_parser().parse_args(["train", "--data", "ml-100k", "--objective", "base",
                                                              "--out", "x", *extra]))

    assert spec("--min-rating", "OFF").min_rating is None and spec().min_rating == "auto"
    assert spec("--min-rating", "4").min_rating == 4.0


def direct_step_metrics(checkpoint, log, part="test", exclude_history=False, k=10):
    """NDCG@k and Recall@k of every step, the readout and the step oracle, by a loop over samples that
    counts, for each target, the items scored above it (never evaluate.py's code): the reference the
    evaluate command's numbers must equal."""
    model = ReaRec.load(os.path.join(checkpoint, MODEL_FILE)).eval()
    samples = getattr(load_dataset(log), part)
    max_len = model.config.max_len
    ranks = {}
    with torch.no_grad():
        for i in range(len(samples)):
            _, h, n, t = samples.batch(torch.tensor([i]), max_len)
            states = model(h, n)[0]  # (K+1, d)
            _, whole, whole_n, _ = samples.batch(torch.tensor([i]), 10_000)
            seen = set(whole[0, :int(whole_n)].tolist()) if exclude_history else set()
            target = int(t)
            vectors = {f"r{s}": states[s] for s in range(states.shape[0])}
            vectors["readout"] = states.mean(0) if model.config.readout == "mean" else states[-1]
            for name, vector in vectors.items():
                scores = model.scores(vector[None])[0]
                above = sum(1 for j in range(len(scores)) if j != target and j not in seen
                            and float(scores[j]) > float(scores[target]))
                ranks.setdefault(name, []).append(above + 1)
    steps = [name for name in ranks if name[1:].isdigit()]
    ranks["oracle"] = [min(ranks[s][i] for s in steps) for i in range(len(samples))]
    return {name: {f"ndcg@{k}": sum(1 / math.log2(r + 1) for r in rs if r <= k) / len(rs),
                   f"recall@{k}": sum(r <= k for r in rs) / len(rs)} for name, rs in ranks.items()}, len(samples)


def test_evaluate_matches_training_report_and_writes_json(trained, log, tmp_path, capsys):
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
    at_training = json.loads(open(os.path.join(trained, TEST_METRICS_FILE)).read())["metrics"]
    assert report["metrics"]["readout"] == pytest.approx(at_training["readout"])
    oracle, steps = report["metrics"]["oracle"], [report["metrics"][f"r{s}"] for s in range(3)]
    assert all(oracle["ndcg@10"] >= s["ndcg@10"] - 1e-12 for s in steps)
    # Every row against the direct computation: each step's own states, the oracle's per-sample best.
    direct, n = direct_step_metrics(trained, log)  # the run was trained on ``log``
    assert report["metrics"]["n_samples"] == n
    for row in ("readout", "r0", "r1", "r2", "oracle"):
        for metric in ("ndcg@10", "recall@10"):
            assert report["metrics"][row][metric] == pytest.approx(direct[row][metric], abs=1e-9), (row, metric)
    assert len({round(direct[f"r{s}"]["ndcg@10"], 9) for s in range(3)}) > 1  # the steps do differ here


def test_evaluate_json_never_puts_other_metrics_in_the_runs_test_metrics(trained, capsys):
    path = os.path.join(trained, TEST_METRICS_FILE)
    before = open(path).read()
    for extra in (["--part", "valid"], ["--exclude-history"]):
        code, _, err = run(capsys, "evaluate", "--checkpoint", trained, "--json", path, "--no-progress", *extra)
        assert code == 2 and "holds the run's test metrics" in err and len(err.strip().splitlines()) == 1
    assert open(path).read() == before


def test_evaluate_json_through_a_link_and_never_onto_a_device(trained, tmp_path, capsys):
    """--json through a symbolic link writes the link's target and keeps the link; a link to a file the
    evaluation reads is refused like the file; a FIFO (or /dev/stdout) is refused before the work."""
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    code, _, err = run(capsys, "evaluate", "--checkpoint", trained, "--json", link, "--no-progress", "--threads", "1")
    assert code == 0, err
    assert link.is_symlink() and json.loads(target.read_text())["metrics"]["n_samples"] > 0
    to_model = tmp_path / "to_model.json"
    to_model.symlink_to(os.path.join(trained, MODEL_FILE))
    before = open(os.path.join(trained, MODEL_FILE), "rb").read()
    code, _, err = run(capsys, "evaluate", "--checkpoint", trained, "--json", to_model, "--no-progress")
    assert code == 2 and "is a file this evaluation reads" in err
    assert open(os.path.join(trained, MODEL_FILE), "rb").read() == before
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "evaluate", "--checkpoint", trained, "--json", fifo, "--no-progress")
    assert code == 2 and "is not a regular file (a device, pipe or socket)" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_options_and_json_to_stdout(trained, log, capsys):
    code, stdout, err = run(capsys, "evaluate", "--checkpoint", os.path.join(trained, MODEL_FILE),
                            "--part", "valid", "--exclude-history", "--ks", "1,3", "--json", "-",
                            "--no-progress", "--threads", "1")
    assert code == 0, err
    report = json.loads(stdout)  # the table went to stderr
    assert report["part"] == "valid" and report["exclude_history"] and report["ks"] == [1, 3]
    assert "recall@3" in err and "threads: 1 (--threads)" in err
    # The numbers are the validation samples' with each user's whole history excluded.
    direct, n = direct_step_metrics(trained, log, part="valid", exclude_history=True, k=3)
    kept, _ = direct_step_metrics(trained, log, part="valid", exclude_history=False, k=3)
    assert report["metrics"]["n_samples"] == n
    assert report["metrics"]["readout"]["ndcg@3"] == pytest.approx(direct["readout"]["ndcg@3"], abs=1e-9)
    assert report["metrics"]["readout"]["recall@3"] == pytest.approx(direct["readout"]["recall@3"], abs=1e-9)
    assert direct["readout"] != kept["readout"]  # the exclusion matters on this data


def test_recommend_users_and_histories(trained, log, tmp_path, capsys):
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--user", "u3", "--user", "u7", "-k", "4",
                            "--exclude-seen", "--json")
    assert code == 0, err
    recs = json.loads(stdout)["recommendations"]
    assert [r["user"] for r in recs] == ["u3", "u7"]
    assert all(len(r["items"]) == 4 and all(i.startswith("i") for i in r["items"]) for r in recs)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in recs)

    # The same histories from a file give the same items, and agree with the reference model.
    data = load_dataset(log)
    histories = [data.mapping.items_to_raw(data.user_history(u)) for u in ("u3", "u7")]
    assert set(recs[0]["items"]).isdisjoint(histories[0])  # --exclude-seen
    path = tmp_path / "histories.txt"
    path.write_text(" ".join(histories[0]) + "\n" + ",".join(histories[1]) + "\n")
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", "4",
                            "--exclude-seen", "--json")
    assert code == 0, err
    assert [r["items"] for r in json.loads(stdout)["recommendations"]] == [r["items"] for r in recs]
    model = ReaRec.load(os.path.join(trained, MODEL_FILE))
    reference = model.recommend([data.user_history(u) for u in ("u3", "u7")], k=4, exclude_seen=True, raw_ids=False)
    assert [data.mapping.items_to_raw(row) for row in reference.items] == [r["items"] for r in recs]

    # In batches (memory follows --batch-size, not the file): the same rows, in the file's order.
    for batch in ("1", "3"):
        code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", "4",
                                "--exclude-seen", "--json", "--batch-size", batch, "--no-progress")
        assert code == 0, err
        assert [r["items"] for r in json.loads(stdout)["recommendations"]] == [r["items"] for r in recs]
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", "3",
                            "--depth", "0", "--readout", "mean")
    assert code == 0, err
    assert "depth 0, readout mean" in stdout and "line 2" in stdout and stdout.count("  1. ") == 2
    # Depth and readout reach the engine: each answer is the reference model's at that depth and readout
    # (depth 0 and depth 2 give different items here, and so do 'mean' and 'last' at depth 2).
    dense = [data.user_history(u) for u in ("u3", "u7")]
    answers = {}
    for depth, readout in ((0, "mean"), (2, "mean"), (2, "last")):
        code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", "3",
                                "--depth", str(depth), "--readout", readout, "--json")
        assert code == 0, err
        rows = json.loads(stdout)["recommendations"]
        want = model.recommend(dense, k=3, depth=depth, readout=readout, raw_ids=False)
        assert [r["items"] for r in rows] == [data.mapping.items_to_raw(row) for row in want.items], (depth, readout)
        for r, scores in zip(rows, want.scores.tolist()):
            assert r["scores"] == pytest.approx(scores, abs=1e-5), (depth, readout)
        answers[depth, readout] = [r["scores"] for r in rows]
    assert len({str(a) for a in answers.values()}) == 3  # the three cases score differently
    # k past what is left after the exclusions: the header says rows hold fewer
    n_items = model.config.n_items
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", str(n_items),
                            "--exclude-seen")
    assert code == 0, err
    fewest = n_items - max(len(set(h)) for h in histories)
    assert f"top-{n_items} by FastReaRec" in stdout and f"fewer items are left (here {fewest} at least)" in stdout

    # --readout adaptive: with --halt-kl as the model's own halting readout; without one, a one-line error
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "-k", "4",
                            "--readout", "adaptive", "--halt-kl", "0.001", "--json")
    assert code == 0, err
    model.config.halt_kl = 0.001
    adaptive = model.recommend([data.user_history(u) for u in ("u3", "u7")], k=4, readout="adaptive", raw_ids=False)
    assert [r["items"] for r in json.loads(stdout)["recommendations"]] == [data.mapping.items_to_raw(row)
                                                                          for row in adaptive.items]
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "--readout", "adaptive")
    assert code != 0 and "needs --halt-kl" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--histories", path, "--halt-kl", "0.1")
    assert code != 0 and "--halt-kl applies to --readout adaptive" in err
    code, stdout, err = run(capsys, "recommend", "--checkpoint", trained, "--user", "u3", "--depth", "3")
    assert code == 2 and "--depth 3 is more than this checkpoint's 2 reasoning steps" in err and "--depth 0..2" in err
    assert len(err.strip().splitlines()) == 1 and stdout == ""


def test_recommend_without_id_mapping_refuses_users_and_says_dense_ids(log, tmp_path, capsys):
    torch.manual_seed(0)
    data = load_dataset(log)
    model = ReaRec(ReaRecConfig(n_items=data.n_items, hidden_size=8, n_layers=1, n_heads=1, inner_size=8, max_len=8))
    model.save(tmp_path / MODEL_FILE)  # no id mapping, as a checkpoint converted from the public code
    DataSpec.for_source(log).write(str(tmp_path / DATA_FILE), data)
    code, _, err = run(capsys, "recommend", "--checkpoint", tmp_path, "--user", "u1")
    assert code == 2
    assert_one_line_error(err, "no raw-id mapping", "--histories with dense item ids")
    (tmp_path / "h.txt").write_text("0 1 2\n")
    code, stdout, err = run(capsys, "recommend", "--checkpoint", tmp_path, "--histories", tmp_path / "h.txt", "-k", "2")
    assert code == 0, err
    assert "dense (this checkpoint has no raw-id mapping) item ids" in stdout


def test_invalid_utf8_histories_file_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 1 2\n".encode("latin-1"))
    with pytest.raises(CommandError, match=r"latin1\.txt: not UTF-8 text .*save the histories file as UTF-8"):
        read_histories(str(path))


def test_histories_lines_with_a_tab_are_split_on_tabs_only(tmp_path):
    """ML-1M's item ids are titles with spaces and commas: tab-separated, each field is one id."""
    path = tmp_path / "titles.txt"
    path.write_text("Toy Story (1995)\t American President, The (1995) \n"
                    "i1 i2,i3\n"
                    "Heat (1995)\n")
    assert read_histories(str(path)) == [["Toy Story (1995)", "American President, The (1995)"],
                                         ["i1", "i2", "i3"], ["Heat", "(1995)"]]
    # A one-item line whose id holds a space is that id where the model knows it (it was split into
    # "Heat" and "(1995)", refused with "remove it"); lines end at newlines only, not at U+2028.
    known = {"Heat (1995)", "i1", "i2", "i3", "Toy Story (1995)", "American President, The (1995)", "a\u2028b"}.__contains__
    assert read_histories(str(path), known)[2] == ["Heat (1995)"]
    path.write_text("i1 i2\r\na\u2028b\n", newline="")
    assert read_histories(str(path), known) == [["i1", "i2"], ["a\u2028b"]]


def test_device_is_checked_before_the_work(trained, tmp_path, capsys, monkeypatch):
    """--device cuda without CUDA: one line naming the device and the fix, before any data or model is
    loaded (profile used to fail in torch with a traceback)."""
    def no_work(*a, **k):
        raise AssertionError("the work started before the device was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(DataSpec, "load", no_work)
    monkeypatch.setattr(ReaRec, "load", no_work)
    for argv in (["evaluate", "--checkpoint", trained, "--device", "cuda"],
                 ["recommend", "--checkpoint", trained, "--user", "u1", "--device", "cuda:0"],
                 ["profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8", "--out", tmp_path,
                  "--device", "cuda"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, err
        assert_one_line_error(err, f"--device {argv[-1]}: no CUDA GPU", "use cpu, or cuda on a machine with a GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CommandError, match=r"--device cuda:3: this machine has 1 GPU\(s\), cuda:0..cuda:0"):
        console.pick_device("cuda:3")
    assert console.pick_device("cuda:0") == "cuda:0" and console.pick_device("auto") == "cuda"
    assert console.pick_device("cpu") == "cpu"


def test_outputs_are_checked_before_the_work(trained, tmp_path, capsys, monkeypatch):
    """A --json that is a folder, or a profile --out that is a file, fails before evaluating or timing,
    and the message names the path given (not a temporary file)."""
    import rearec.cli.evaluate as evaluate_command
    import rearec.cli.profile as profile_command

    def no_work(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(evaluate_command, "evaluate", no_work)
    monkeypatch.setattr(profile_command, "profile_latency", no_work)
    code, _, err = run(capsys, "evaluate", "--checkpoint", trained, "--json", tmp_path, "--no-progress")
    assert code == 2
    assert_one_line_error(err, f"--json {tmp_path} is a folder", os.path.join(str(tmp_path), "metrics.json"))
    assert "tmp-" not in err
    (tmp_path / "taken").write_text("a file")
    code, _, err = run(capsys, "profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8",
                       "--out", tmp_path / "taken", "--no-progress")
    assert code == 2
    assert_one_line_error(err, f"--out {tmp_path / 'taken'} is an existing file", "latency_vs_depth.json")
    code, _, err = run(capsys, "profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8",
                       "--out", tmp_path / "taken" / "sub", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "is a file, not a folder", "--out")


def test_an_empty_output_path_is_refused_before_the_work(trained, tmp_path, capsys, monkeypatch):
    """An empty --json/--out (``--out "$DIR"`` with DIR unset) passed every check: evaluate --json '' wrote
    nothing and exited 0, profile failed after timing, quickstart trained both models into '..partial', train
    loaded the whole log before 'cannot write to output folder (No such file or directory)'."""
    import rearec.cli.evaluate as evaluate_command
    import rearec.cli.profile as profile_command

    def no_work(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(evaluate_command, "evaluate", no_work)
    monkeypatch.setattr(profile_command, "profile_latency", no_work)
    monkeypatch.setattr(DataSpec, "load", no_work)
    monkeypatch.chdir(tmp_path)
    for argv, option in ((["evaluate", "--checkpoint", trained, "--json", ""], "--json"),
                         (["profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8", "--out", " "], "--out"),
                         (["quickstart", "--out", ""], "--out"),
                         (["train", "--data", "ml-100k", "--objective", "base", "--out", ""], "--out"),
                         (["study", "--results", tmp_path, "--out", "", "--report", tmp_path / "r.md"], "--out")):
        code, _, err = run(capsys, *argv, "--no-progress") if argv[0] != "study" else run(capsys, *argv)
        assert code == 2, (argv, err)
        assert_one_line_error(err, f"{option} is empty", "give a path")
    assert os.listdir(tmp_path) == []


def test_interrupted_run_refuses_a_restart_and_resumes(log, tmp_path, capsys, monkeypatch):
    """The CLI side of resume: exit 130 with advice, --resume required, options checked. That the resumed run
    is bit-identical to an uninterrupted one is tested on the Trainer (test_train.py)."""
    args = ["train", "--data", log, "--objective", "prl", "--reason-steps", "1", "--warmup-epochs", "1",
            "--epochs", "3", *TINY, "--out", tmp_path]
    real_loss, calls = train_module.training_loss, []

    def ctrl_c_in_epoch_1(*a, **k):
        calls.append(1)
        if a[-1] == 1 and len(calls) > 3:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(train_module, "training_loss", ctrl_c_in_epoch_1)
    code, _, err = run(capsys, *args)
    assert code == 130
    assert_one_line_error(err, "interrupted in epoch 1", "epochs 0..0 are saved", "resume with --resume")
    ReaRec.load(tmp_path / MODEL_FILE)  # epoch 0's best: usable
    monkeypatch.setattr(train_module, "training_loss", real_loss)

    code, _, err = run(capsys, *args)  # without --resume: refused
    assert code == 2
    assert_one_line_error(err, "already holds a training run", "--resume")
    code, _, err = run(capsys, *args, "--lr", "0.5", "--resume")
    assert code == 2
    assert_one_line_error(err, "--lr 0.01 (now 0.5)", "same options")
    code, _, err = run(capsys, *args, "--min-rating", "4.5", "--resume")
    assert code == 2
    assert_one_line_error(err, "other data options: min_rating 'auto' (now 4.5)", "same data options")
    moved = tmp_path.parent / "moved.csv"  # the same log at another path: its content is what counts
    moved.write_bytes(open(log, "rb").read())
    code, stdout, err = run(capsys, *[str(moved) if a == log else a for a in args], "--resume")
    assert code == 0, err
    assert "resumed after epoch 0" in stdout
    assert len((tmp_path / "train.log").read_text().splitlines()) == 3


def test_a_refused_run_folder_is_left_as_it_was_and_found_before_the_data(trained, log, tmp_path, capsys, monkeypatch):
    """--resume with a folder that holds no run (a mistyped --out) used to create the folder, its parents and
    run.lock, after loading the whole log; the run folder's refusals now come first and create nothing."""
    def no_work(*a, **k):
        raise AssertionError("the data were loaded before the run folder was checked")

    monkeypatch.setattr(DataSpec, "load", no_work)
    typo = tmp_path / "runs" / "prll"
    code, _, err = run(capsys, "train", "--data", log, "--objective", "prl", *TINY, "--out", typo, "--resume")
    assert code == 2
    assert_one_line_error(err, "nothing to resume", "without --resume")
    assert not (tmp_path / "runs").exists()
    before = sorted(os.listdir(trained))
    code, _, err = run(capsys, "train", "--data", log, "--objective", "prl", *TINY, "--out", trained)
    assert code == 2
    assert_one_line_error(err, "already holds a training run", "--resume")
    assert sorted(os.listdir(trained)) == before


def test_interrupted_test_evaluation_says_training_is_saved(log, tmp_path, capsys, monkeypatch):
    import rearec.cli.train as train_command

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "evaluate_and_save", interrupted)
    code, _, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", *TINY, "--out", tmp_path)
    assert code == 130
    assert_one_line_error(err, "interrupted during the test evaluation", f"rearec evaluate --checkpoint {tmp_path}")
    ReaRec.load(tmp_path / MODEL_FILE)


def test_interrupted_first_epoch_says_to_start_again(log, tmp_path, capsys, monkeypatch):
    """Ctrl-C before any epoch finished: nothing to resume, so the advice is to start again, which works."""
    monkeypatch.setattr(train_module, "training_loss", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    args = ["train", "--data", log, "--objective", "base", "--epochs", "1", *TINY, "--out", tmp_path]
    code, _, err = run(capsys, *args)
    assert code == 130
    assert_one_line_error(err, "interrupted in epoch 0", "nothing was saved", "start again without --resume")
    monkeypatch.undo()
    code, _, err = run(capsys, *args)
    assert code == 0, err


def test_divergence_exits_1_says_it_once_and_keeps_the_best_checkpoint(log, tmp_path, capsys, monkeypatch):
    real_loss = train_module.training_loss
    monkeypatch.setattr(train_module, "training_loss",
                        lambda m, h, l, t, epoch=0, **options: real_loss(m, h, l, t, epoch, **options)
                        * (float("nan") if epoch >= 2 else 1))
    code, stdout, err = run(capsys, "train", "--data", log, "--objective", "erl", "--epochs", "5", "--out", tmp_path,
                            *TINY)
    assert code == 1
    assert_one_line_error(err, "NaN", "kept the best weights", "--kl-weight", MODEL_FILE)
    assert (stdout + err).count("became NaN") == 1
    monkeypatch.setattr(train_module, "training_loss", real_loss)
    code, stdout, err = run(capsys, "recommend", "--checkpoint", tmp_path, "--user", "u1")
    assert code == 0, err


def test_world_size_above_one_is_refused(log, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CommandError, match="WORLD_SIZE=2: only 'rearec train' runs under torchrun"):
        refuse_multiple_processes()
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "o")
    assert code == 2
    assert_one_line_error(err, "WORLD_SIZE=2", "without torchrun")
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_multiple_processes()


def test_threads_follow_the_load_and_are_said(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(console, "usable_cores", lambda: 4)  # not this machine's: it may have one core
        monkeypatch.setattr(console, "busy_cores", lambda: 64.0)
        n, note = choose_threads(None)
        assert n == 1 and torch.get_num_threads() == 1
        assert "other processes are busy" in note and "--threads" in note
        n, note = choose_threads(2)
        assert n == 2 and torch.get_num_threads() == 2 and note == "threads: 2 (--threads)"
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_the_machine_now():
    busy = console.busy_cores(0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_cores_follow_affinity_and_the_cgroup_quota(monkeypatch, tmp_path):
    """busy_cores measured the whole host and usable_cores ignored a cgroup quota: under taskset on a busy
    64-core host every thread was refused, and under docker --cpus=2 every core's thread was started."""
    quota = tmp_path / "cpu.max"
    for text, want in (("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("junk", None)):
        quota.write_text(text)
        assert console.cgroup_cpu_quota(str(quota)) == want
    assert console.cgroup_cpu_quota(str(tmp_path / "absent")) is None
    monkeypatch.setattr(console, "cgroup_cpu_quota", lambda: 1.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert console.usable_cores() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert console.usable_cores() == 1
    assert 0.0 <= console.busy_cores(0.05) <= 1.0 + 1e-9  # one allowed core: never more than one busy


def test_more_threads_than_cores_is_refused(monkeypatch):
    monkeypatch.setattr(console, "usable_cores", lambda: 2)
    with pytest.raises(CommandError, match=r"--threads 3 is more than the 2 core\(s\) this process may use; pass "
                                           r"--threads 2 or fewer"):
        choose_threads(3)


@pytest.fixture(scope="module")
def other_log(tmp_path_factory):
    return write_log(tmp_path_factory.mktemp("other") / "other.csv", seed=1, n_items=13, late_user=True)


def _bad_cases():
    return {
        "missing data file": (["train", "--data", "{tmp}/nope.csv", "--objective", "base", "--out", "{tmp}/o"],
                              2, ["no such file"]),
        "unknown column": (["train", "--data", "{log}", "--user-col", "who", "--objective", "base",
                            "--out", "{tmp}/o"], 2, ["no column 'who'", "user_col"]),
        "empty after filtering": (["train", "--data", "{log}", "--min-rating", "9", "--objective", "base",
                                   "--out", "{tmp}/o"], 2, ["removed every interaction", "--min-rating none"]),
        "min rating nan": (["train", "--data", "{log}", "--min-rating", "nan", "--objective", "base",
                            "--out", "{tmp}/o"], 2, ["min_rating is NaN", "--min-rating"]),
        "bad hyperparameter": (["train", "--data", "{log}", "--objective", "base", "--reason-steps", "2",
                                "--out", "{tmp}/o"], 2, ["--reason-steps=0"]),
        "unwritable output folder": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/file/o"],
                                     2, ["is a file, not a folder", "--out"]),
        "resume and overwrite": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/o", "--resume",
                                  "--overwrite"], 2, ["contradict"]),
        "nothing to resume": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/o", "--resume"],
                              2, ["nothing to resume"]),
        "filter window shorter than max_len": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/o",
                                                "--max-len", "8", "--filter-window", "4"], 2,
                                               ["--filter-window 4 is shorter than the model's max_len 8"]),
        "a model option out of range names its option": (
            ["train", "--data", "{log}", "--objective", "prl", "--dropout", "1.5", "--out", "{tmp}/o"], 2,
            ["--dropout must be in [0, 1)", "(got 1.5)"]),
        "sizes that do not fit name their options": (
            ["train", "--data", "{log}", "--objective", "base", "--hidden-size", "65", "--heads", "2", "--out",
             "{tmp}/o"], 2, ["--hidden-size (65) must be divisible by --heads (2)"]),
        "profile's sizes name their options": (["profile", "--hidden-size", "65", "--heads", "2", "--out", "{tmp}/p"],
                                               2, ["--hidden-size (65) must be divisible by --heads (2)"]),
        "another objective's option": (["train", "--data", "{log}", "--objective", "prl", "--kl-weight", "3",
                                         "--out", "{tmp}/o"], 2, ["--kl-weight is read by --objective erl only"]),
        "unknown option names its command's help": (["quickstart", "--resume"], 2,
                                                    ["unrecognized arguments: --resume", "rearec quickstart --help"]),
        "seed out of range": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/o", "--seed",
                               "99999999999999"], 2, ["expected a seed in 0..1099511627776"]),
        "unknown preset": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/o", "--preset", "huge"],
                           2, ["invalid choice: 'huge'"]),
        "usage error": (["train", "--data", "{log}", "--out", "{tmp}/o"], 2, ["--objective", "--help"]),
        "unknown subcommand": (["fly"], 2, ["invalid choice"]),
        "missing checkpoint": (["evaluate", "--checkpoint", "{tmp}/none.safetensors"], 2, ["does not exist"]),
        "not a checkpoint": (["evaluate", "--checkpoint", "{tmp}/file"], 2, ["not a readable rearec checkpoint"]),
        "the training state as checkpoint": (["evaluate", "--checkpoint", "{run}/train_state.pt"], 2,
                                             ["not a readable rearec checkpoint", "pass a model.safetensors",
                                              "train_state.pt is the training state"]),
        "other data": (["evaluate", "--checkpoint", "{run}", "--data", "{other}"], 2,
                       ["trained on other data", "same data file"]),
        "no data.json": (["evaluate", "--checkpoint", "{tmp}/copy.safetensors"], 2, ["data.json", "--data"]),
        "broken data.json": (["evaluate", "--checkpoint", "{tmp}/broken/model.safetensors"], 2,
                             ["data.json", "not valid JSON", "--data"]),
        "unwritable json": (["evaluate", "--checkpoint", "{run}", "--json", "{tmp}/no/such/dir/m.json",
                             "--no-progress"], 2, ["does not exist"]),
        "unknown user": (["recommend", "--checkpoint", "{run}", "--user", "ghost"], 2, ["'ghost'", "not in the data"]),
        "user without history": (["recommend", "--checkpoint", "{run}", "--user", "late"], 2,
                                 ["'late'", "no interaction with an item the model knows"]),
        "blank history line": (["recommend", "--checkpoint", "{run}", "--histories", "{tmp}/blank.txt"], 2,
                               ["line 2 is empty"]),
        "unknown item in history": (["recommend", "--checkpoint", "{run}", "--histories", "{tmp}/unknown.txt"], 2,
                                    ["line 1", "'zz'", "unknown to the model", "separate the ids with tabs"]),
        "missing histories file": (["recommend", "--checkpoint", "{run}", "--histories", "{tmp}/none.txt"], 2,
                                   ["No such file", "none.txt"]),
        "empty histories path": (["recommend", "--checkpoint", "{run}", "--histories", ""], 2,
                                 ["--histories is empty", "--histories histories.txt"]),
        "depth too large": (["recommend", "--checkpoint", "{run}", "--user", "u1", "--depth", "9"], 2, ["0..2"]),
        "user and histories": (["recommend", "--checkpoint", "{run}", "--user", "u1", "--histories", "x"], 2,
                               ["not allowed with"]),
        "profile depth beyond K": (["profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8",
                                    "--reason-steps", "2", "--depths", "0-3"], 2, ["exceed the model's K=2"]),
        "profile bad range": (["profile", "--depths", "a-b"], 2, ["cannot read 'a-b' as integers"]),
        "profile empty range": (["profile", "--depths", "3-1"], 2, ["'3-1' is an empty range", "e.g. 1-3"]),
        "profile negative depth": (["profile", "--depths", "-1"], 2, ["'-1' is below 0"]),
        "profile batch size 0": (["profile", "--batch-sizes", "0-8"], 2, ["--batch-sizes must be >= 1", "1,64,256"]),
        "profile official folder": (["profile", "--official", "--checkpoint", "{run}", "--out", "{tmp}/p"], 2,
                                    ["is a folder", "state_dict (a .pth file)"]),
        "profile official not torch": (["profile", "--official", "--checkpoint", "{log}", "--out", "{tmp}/p"], 2,
                                       ["not a file torch.save wrote", "give the .pth file"]),
        "evaluate json onto the checkpoint": (["evaluate", "--checkpoint", "{run}", "--json", "{run}/model.safetensors",
                                               "--no-progress"], 2, ["is a file this evaluation reads", "eval.json"]),
        "evaluate json onto the run's lock": (["evaluate", "--checkpoint", "{run}", "--json", "{run}/run.lock",
                                               "--no-progress"], 2, ["or the run's lock", "eval.json"]),
        "recommend histories with data options": (["recommend", "--checkpoint", "{run}", "--histories",
                                                   "{tmp}/titles.txt", "--min-rating", "4", "--split", "loo"], 2,
                                                  ["--split, --min-rating apply to --user only"]),
        "profile official without checkpoint": (["profile", "--official", "--out", "{tmp}/p"], 2,
                                                ["--official says", "pass --checkpoint"]),
        "train filter window beside loo": (["train", "--data", "{log}", "--objective", "base", "--split", "loo",
                                            "--filter-window", "3", "--out", "{tmp}/o"], 2,
                                           ["--filter-window chooses the temporal split's evaluation samples",
                                            "--split loo; drop it"]),
        # taken and ignored before: loo has no sample filter, recommend uses no evaluation samples
        "train sample filter beside loo": (["train", "--data", "{log}", "--objective", "base", "--split", "loo",
                                            "--sample-filter", "strict", "--out", "{tmp}/o"], 2,
                                           ["--sample-filter chooses the temporal split's evaluation samples"]),
        "evaluate filter options beside loo": (["evaluate", "--checkpoint", "{run}", "--split", "loo", "--sample-filter",
                                                "strict", "--filter-window", "9"], 2,
                                               ["--sample-filter and --filter-window choose", "--split loo; drop them"]),
        "filter window beside the strict filter": (["evaluate", "--checkpoint", "{run}", "--sample-filter", "strict",
                                                    "--filter-window", "9"], 2,
                                                   ["--filter-window is read by --sample-filter window only"]),
        "recommend user with a sample filter": (["recommend", "--checkpoint", "{run}", "--user", "u1",
                                                 "--sample-filter", "strict"], 2,
                                                ["--sample-filter chooses evaluation samples, which recommend does not use"]),
        "study two modes": (["study", "--plan", "--park"], 2, ["--plan and --park are different things to do"]),
        "study selection without run": (["study", "--shard", "0/2"], 2, ["--shard chooses the runs of --run or --plan"]),
        "quickstart out is a file": (["quickstart", "--out", "{tmp}/file"], 2, ["--out {tmp}/file is an existing file"]),
        "profile checks the checkpoint's backbone": (["profile", "--checkpoint", "{run}", "--backbone", "bert4rec",
                                                      "--out", "{tmp}/p"], 2,
                                                     ["is a sasrec model, not bert4rec", "--backbone sasrec"]),
        "profile refuses sizes beside a checkpoint": (["profile", "--checkpoint", "{run}", "--hidden-size", "999",
                                                       "--n-items", "5", "--out", "{tmp}/p"], 2,
                                                      ["--n-items, --hidden-size describe the random model",
                                                       "drop --checkpoint"]),
        "train bad device": (["train", "--data", "{log}", "--objective", "base", "--out", "{tmp}/o", "--device", "tpu"],
                             2, ["--device tpu", "use cpu, or cuda on a machine with a GPU"]),
        "evaluate bad device": (["evaluate", "--checkpoint", "{run}", "--device", "tpu"], 2,
                                ["--device tpu", "use cpu, or cuda on a machine with a GPU"]),
        "recommend bad device": (["recommend", "--checkpoint", "{run}", "--user", "u1", "--device", "tpu"], 2,
                                 ["--device tpu", "use cpu, or cuda on a machine with a GPU"]),
        "profile bad device": (["profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8",
                                "--device", "tpu", "--out", "{tmp}/p"], 2,
                               ["--device tpu", "use cpu, or cuda on a machine with a GPU"]),
        "profile out is a file": (["profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8",
                                   "--out", "{tmp}/file"], 2,
                                  ["--out {tmp}/file is an existing file, not a folder", "give a folder",
                                   "remove the file"]),
        "evaluate json is a folder": (["evaluate", "--checkpoint", "{run}", "--json", "{tmp}", "--no-progress"], 2,
                                      ["--json {tmp} is a folder", "give a file path", "metrics.json"]),
        "evaluate json under a file": (["evaluate", "--checkpoint", "{run}", "--json", "{tmp}/file/m.json",
                                        "--no-progress"], 2, ["cannot write", "is a file, not a folder"]),
        "tab-separated ids hold spaces": (["recommend", "--checkpoint", "{run}", "--histories", "{tmp}/titles.txt"], 2,
                                          ["line 1", "'Toy Story (1995)'", "unknown to the model"]),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_input_is_one_line_and_exit_code(case, trained, log, other_log, tmp_path, capsys):
    argv, expected_code, fragments = _bad_cases()[case]
    fragments = [f.format(tmp=tmp_path) for f in fragments]
    (tmp_path / "file").write_text("not a folder, not a checkpoint")
    (tmp_path / "titles.txt").write_text("i1\tToy Story (1995)\n")
    (tmp_path / "blank.txt").write_text("i1 i2\n\ni3\n")
    (tmp_path / "unknown.txt").write_text("i1 zz\n")
    checkpoint = open(os.path.join(trained, MODEL_FILE), "rb").read()
    (tmp_path / "copy.safetensors").write_bytes(checkpoint)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MODEL_FILE).write_bytes(checkpoint)
    (tmp_path / "broken" / DATA_FILE).write_text("{'format': ")
    fill = {"tmp": tmp_path, "log": log, "other": other_log, "run": trained}
    code, _, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == expected_code
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "o" / MODEL_FILE).exists()


def test_out_of_memory_is_one_line_naming_the_sizes(tmp_path, capsys, monkeypatch):
    """An allocation too large for the machine (--max-len 1000000000000 or --batch-sizes 10**12 by mistake) was a
    RuntimeError traceback from torch's CPU allocator; it is one line with the size asked for and what to lower.
    Other RuntimeErrors still end in a traceback: they are bugs, not the user's mistakes."""
    import rearec.cli.profile as profile_command

    failures = [RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 64000000000000 bytes. Error code 12 (Cannot allocate "
                             "memory)"),
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity\n"
                                       "of 79.15 GiB of which 1.2 GiB is free."),
                MemoryError()]
    sizes = ["59,604.6 GiB", "2.00 GiB", None]
    for failure, size in zip(failures, sizes):
        monkeypatch.setattr(profile_command, "profile_latency", lambda *a, failure=failure, **k: (_ for _ in ()).throw(failure))
        code, _, err = run(capsys, "profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8",
                           "--batch-sizes", "1000000000000", "--out", tmp_path, "--no-progress")
        assert code == 2
        assert_one_line_error(err, "out of memory", "--max-len", "the batch sizes", *([f"allocate {size}"] if size else []))
    monkeypatch.setattr(profile_command, "profile_latency", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8", "--out", str(tmp_path),
              "--no-progress"])


def test_ctrl_c_outside_training_exits_130(trained, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(DataSpec, "load", interrupt)
    code, _, err = run(capsys, "evaluate", "--checkpoint", trained)
    assert code == 130
    assert_one_line_error(err, "interrupted")


def test_quickstart_flow_on_small_data(log, tmp_path, capsys, monkeypatch):
    """The quickstart's steps (two runs, table, FastReaRec top-10, latency table and plot), on the tiny log
    instead of MovieLens-100K."""
    monkeypatch.setattr(quickstart, "DATA", DataSpec.for_source(log, min_rating=None))
    monkeypatch.setitem(PRESETS, "quickstart", dict(hidden_size=16, n_layers=1, n_heads=1, inner_size=32, max_len=8))
    code, stdout, err = run(capsys, "quickstart", "--out", tmp_path, "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert "hidden 16, 1 layers" in stdout and "at most 2 epochs" in stdout  # the settings are printed
    assert "threads: 1" in stdout and "docs/results.md" in stdout
    for label in ("SASRec (base)", "ReaRec-PRL (K=2)", "ReaRec-PRL oracle", "ndcg@10", "recall@20"):
        assert label in stdout
    assert "top-10 for 3 users" in stdout and "latency plot" in stdout
    assert "base: 2 epochs in" in stdout and "not evidence either way" in stdout  # what it trained, said plainly
    rows = json.loads((tmp_path / "latency_vs_depth.json").read_text())["rows"]
    assert sorted({r["depth"] for r in rows}) == [0, 1, 2] and sorted({r["batch_size"] for r in rows}) == [1, 64]
    for name in ("base", "prl"):
        assert (tmp_path / name / MODEL_FILE).is_file()
    # The table's numbers are each run's saved test metrics (base's and PRL's readout, PRL's oracle).
    saved = {name: json.loads((tmp_path / name / TEST_METRICS_FILE).read_text())["metrics"] for name in ("base", "prl")}
    lines = stdout.splitlines()
    for label, metrics in (("SASRec (base)", saved["base"]["readout"]), ("ReaRec-PRL (K=2)", saved["prl"]["readout"]),
                           ("ReaRec-PRL oracle", saved["prl"]["oracle"])):
        printed = [float(x) for x in next(line for line in lines if line.startswith(label)).split()[-4:]]
        assert printed == pytest.approx([metrics[c] for c in ("ndcg@10", "ndcg@20", "recall@10", "recall@20")],
                                        abs=5e-5), label
    # The top-10 never holds an item of the user's history ("seen items excluded").
    data = DataSpec.for_source(log, min_rating=None).load()
    shown = [line for line in lines if line.startswith("user ") and "(history of" in line]
    assert len(shown) == 3
    for line in shown:
        user, items = line.split()[1], line.split("items): ")[1].split()
        assert 0 < len(items) <= 10 and set(items).isdisjoint(data.mapping.items_to_raw(data.user_history(user)))
    # run again: it starts over instead of refusing the existing runs
    code, _, err = run(capsys, "quickstart", "--out", tmp_path, "--epochs", "1", "--no-progress")
    assert code == 0, err
    assert len((tmp_path / "base" / "train.log").read_text().splitlines()) == 1
    # Ctrl-C while training: quickstart's own advice (train's --resume is not one of its options)
    def interrupted(config, data, train_config, out_dir, **kwargs):  # a run cut short after writing a part
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, MODEL_FILE), "w").write("half")
        raise train_module.TrainingInterrupted("training interrupted in epoch 0; resume with --resume")

    monkeypatch.setattr(quickstart, "train_run", interrupted)
    code, _, err = run(capsys, "quickstart", "--out", tmp_path, "--epochs", "1", "--no-progress")
    assert code == 130
    assert_one_line_error(err, "quickstart interrupted while training base", "run 'rearec quickstart' again")
    assert "--resume" not in err
    # the previous run's results stay whole (the interrupted one wrote beside them)
    for name in ("base", "prl"):
        ReaRec.load(tmp_path / name)
    assert (tmp_path / "latency_vs_depth.json").is_file()
    # a staging folder beside it that holds something else is not removed
    staging = tmp_path.parent / (tmp_path.name + ".partial")  # the interrupted run's part is there
    staging.mkdir(exist_ok=True)
    (staging / "precious.txt").write_text("mine")
    code, _, err = run(capsys, "quickstart", "--out", tmp_path, "--epochs", "1", "--no-progress")
    assert code == 2 and (staging / "precious.txt").read_text() == "mine"
    assert_one_line_error(err, "(its staging folder) holds other files (precious.txt)")
    # a folder holding anything else (another run, a note) is refused before any work, and left as it was
    (tmp_path / "my_run").mkdir()
    code, _, err = run(capsys, "quickstart", "--out", tmp_path, "--epochs", "1", "--no-progress")
    assert code == 2
    assert_one_line_error(err, f"--out {tmp_path} holds other files (my_run)", "new or empty folder")
    assert (tmp_path / "my_run").is_dir() and (tmp_path / "base" / MODEL_FILE).is_file()


def test_profile_runs_for_real_on_a_tiny_model(tmp_path, capsys):
    code, stdout, err = run(capsys, "profile", "--n-items", "37", "--hidden-size", "8", "--layers", "1", "--heads", "2",
                            "--inner-size", "12", "--max-len", "5", "--reason-steps", "3", "--depths", "0,2-3",
                            "--batch-sizes", "1,3", "--repeats", "2", "-k", "4", "--out", tmp_path, "--no-progress")
    assert code == 0, err
    saved = json.loads((tmp_path / "latency_vs_depth.json").read_text())
    assert [(r["batch_size"], r["depth"]) for r in saved["rows"]] == [(1, 0), (1, 2), (1, 3), (3, 0), (3, 2), (3, 3)]
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] * 0.999 for r in saved["rows"])
    assert saved["meta"]["n_items"] == 37 and saved["meta"]["hidden_size"] == 8 and saved["meta"]["k"] == 4
    assert (tmp_path / "latency_vs_depth.png").read_bytes()[:4] == b"\x89PNG"
    assert "median ms" in stdout and "N=37, d=8" in stdout
    # depths and batch sizes in any order: rows sorted, every row against its batch's depth 0
    code, stdout, err = run(capsys, "profile", "--n-items", "37", "--hidden-size", "8", "--layers", "1", "--heads", "2",
                            "--inner-size", "12", "--max-len", "5", "--reason-steps", "3", "--depths", "2,0",
                            "--batch-sizes", "3,1", "--repeats", "2", "-k", "4", "--out", tmp_path, "--no-progress")
    assert code == 0, err
    saved = json.loads((tmp_path / "latency_vs_depth.json").read_text())
    assert [(r["batch_size"], r["depth"]) for r in saved["rows"]] == [(1, 0), (1, 2), (3, 0), (3, 2)]
    assert "nan" not in stdout
    # one depth, not 0: no slope and nothing to compare with, said as '-' and saved as null (strict JSON)
    code, stdout, err = run(capsys, "profile", "--n-items", "37", "--hidden-size", "8", "--layers", "1", "--heads", "2",
                            "--inner-size", "12", "--max-len", "5", "--reason-steps", "3", "--depths", "2",
                            "--batch-sizes", "1", "--repeats", "2", "-k", "4", "--out", tmp_path, "--no-progress")
    assert code == 0, err

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON")

    saved = json.loads((tmp_path / "latency_vs_depth.json").read_text(), parse_constant=refuse)
    assert [r["marginal_ms_per_step"] for r in saved["rows"]] == [None]
    row = next(line for line in stdout.splitlines() if line.split()[:2] == ["1", "2"])
    assert "nan" not in stdout and row.split()[4] == "-" and row.split()[-1] == "-"


def test_profile_depths_out_of_range_are_said_in_a_short_line(capsys):
    """A typo such as --depths 0-80000 for 0-8: the error listed every depth past K in one line of any
    length (0-99999999999 built the whole list first); a range is now bounded and the excess summarised."""
    random_model = ["profile", "--n-items", "20", "--hidden-size", "8", "--inner-size", "8", "--reason-steps", "2"]
    code, _, err = run(capsys, *random_model, "--depths", "0-1000")
    assert code == 2
    assert_one_line_error(err, "depths 3..1000 (998 of them) exceed the model's K=2", "--depths 0-2")
    assert len(err) < 200
    for argv in (["--depths", "0-99999999999"], ["--batch-sizes", "1-5000,64"]):
        code, _, err = run(capsys, *random_model, *argv)
        assert code == 2
        assert_one_line_error(err, f"argument {argv[0]}", "values, more than the 1,024 this option takes")
    code, _, err = run(capsys, *random_model, "--depths", "0,9,5")
    assert code == 2
    assert_one_line_error(err, "depths 9, 5 exceed the model's K=2")


def test_profile_defaults_to_every_depth_and_records_what_ran(tmp_path, capsys):
    code, stdout, err = run(capsys, "profile", "--n-items", "30", "--hidden-size", "8", "--inner-size", "8",
                            "--reason-steps", "2", "--backbone", "bert4rec", "-k", "500", "--batch-sizes", "1",
                            "--repeats", "1", "--out", tmp_path, "--no-progress")
    assert code == 0, err
    saved = json.loads((tmp_path / "latency_vs_depth.json").read_text())
    assert sorted({r["depth"] for r in saved["rows"]}) == [0, 1, 2]  # 0..K, not 0-8
    assert (saved["meta"]["backbone"], saved["meta"]["reason_steps"], saved["meta"]["k"]) == ("bert4rec", 2, 30)
    assert "bert4rec, K=2" in stdout and "k=30" in stdout


def test_a_rank_other_than_0_says_which_it_is(capsys, monkeypatch):
    """Under torchrun every rank may print the same error: ranks > 0 say which they are."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _, err = run(capsys, "train", "--data", "missing.csv", "--objective", "base", "--out", "x")
    assert code == 2 and err.startswith("rearec: error: rank 1: ") and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("RANK", "0")
    code, _, err = run(capsys, "evaluate", "--checkpoint", "missing")
    assert code == 2 and err.startswith("rearec: error: ") and "rank" not in err


def test_a_broken_pipe_elsewhere_is_an_error(capsys, monkeypatch):
    import rearec.cli.study as study_command

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(study_command, "run", broken)
    code, _, err = run(capsys, "study", "--plan")
    assert code == 2 and "Broken pipe" in err  # stdout is fine: not the reader going away


def test_a_closed_stdout_stops_nothing(tmp_path):
    """`rearec profile | head -1`: the reader goes away before the first line; the command still writes
    its files and ends quietly with 0 (no 'Broken pipe' error, no traceback)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rearec", "profile", "--n-items", "50", "--reason-steps", "1", "--preset", "quickstart",
         "--depths", "0", "--batch-sizes", "1", "--repeats", "1", "--threads", "1", "--out", tmp_path, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 0, err
    assert "rror" not in err and "Traceback" not in err, err
    assert (tmp_path / "latency_vs_depth.json").is_file() and (tmp_path / "latency_vs_depth.png").is_file()


def test_help_and_python_m(capsys):
    code, stdout, _ = run(capsys, "quickstart", "--help")
    assert code == 0 and "within 5 minutes" in stdout and "docs/results.md" in stdout
    code, stdout, _ = run(capsys, "train", "--help")
    assert code == 0 and "--preset" in stdout and "--dedupe" in stdout
    done = subprocess.run([sys.executable, "-m", "rearec", "recommend", "--checkpoint", "x"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("rearec: error: ")


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_only_on_a_terminal(log, tmp_path, capsys, monkeypatch, terminal):
    """Without --no-progress, bars are drawn when stderr is a terminal and left out of a log or pipe
    (each redraw would stay behind as text); the per-epoch lines are printed either way."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    argv = ["train", "--data", log, "--objective", "base", "--epochs", "1", "--out", tmp_path / "run",
            *[a for a in TINY if a != "--no-progress"]]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "epoch   0" in stdout
    assert ("it/s" in err) == terminal, err


def test_profile_takes_a_run_folder(trained, tmp_path, capsys):
    """``--checkpoint`` of every command takes a run folder as well as its model.safetensors."""
    for checkpoint in (trained, os.path.join(trained, MODEL_FILE)):
        code, stdout, err = run(capsys, "profile", "--checkpoint", checkpoint, "--depths", "0-2", "--batch-sizes", "2",
                                "--repeats", "1", "-k", "3", "--out", tmp_path, "--no-progress")
        assert code == 0, err
        meta = json.loads((tmp_path / "latency_vs_depth.json").read_text())["meta"]
        assert meta["source"] == os.path.join(trained, MODEL_FILE)
    code, _, err = run(capsys, "profile", "--checkpoint", tmp_path / "none", "--no-progress")
    assert code == 2 and "does not exist" in err


def test_evaluate_with_data_keeps_the_runs_data_options(log, tmp_path, capsys):
    """--data on evaluate replaces only the log's path: the run's split stays (it used to fall back
    to the defaults, a temporal split here). A log moved away is named with the way out."""
    out = tmp_path / "loo"
    code, _, err = run(capsys, "train", "--data", log, "--split", "loo", "--objective", "base", "--epochs", "1",
                       "--out", out, *TINY)
    assert code == 0, err
    moved = tmp_path / "moved.csv"
    moved.write_bytes(open(log, "rb").read())
    _, saved_run, _ = run(capsys, "evaluate", "--checkpoint", out, "--json", "-", "--no-progress")
    _, with_data, _ = run(capsys, "evaluate", "--checkpoint", out, "--data", moved, "--json", "-", "--no-progress")
    assert json.loads(with_data)["metrics"]["n_samples"] == json.loads(saved_run)["metrics"]["n_samples"]
    data_json = json.loads((out / DATA_FILE).read_text())
    data_json["source"] = str(tmp_path / "gone.csv")
    (out / DATA_FILE).write_text(json.dumps(data_json))
    code, _, err = run(capsys, "evaluate", "--checkpoint", out, "--no-progress")
    assert code == 2
    assert_one_line_error(err, "gone.csv", "is not there", "pass --data with its new path")


def test_a_new_run_never_replaces_another_runs_model(log, tmp_path, capsys):
    """A folder with a model but no training state (copied, or its state deleted): a new run is
    refused instead of writing over the model; --overwrite replaces it."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out", out, *TINY)[0] == 0
    (out / "train_state.pt").unlink()
    model = (out / MODEL_FILE).read_bytes()
    code, _, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out", out, *TINY)
    assert code == 2
    assert_one_line_error(err, "already holds model.safetensors", "--overwrite")
    assert (out / MODEL_FILE).read_bytes() == model
    code, _, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out", out,
                       "--overwrite", *TINY)
    assert code == 0, err


def test_resume_refuses_a_log_that_changed(tmp_path, capsys):
    log = write_log(tmp_path / "log.csv", n_users=40, n_items=12)
    args = ["train", "--data", log, "--objective", "base", "--out", tmp_path / "run", *TINY]
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    text = open(log).read().replace("u1,", "user-one,")  # a user renamed in place
    open(log, "w").write(text)
    code, _, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 2
    assert_one_line_error(err, "has changed since", "resume on the log as it was")


def test_evaluate_refuses_a_log_that_changed_since_training(tmp_path, capsys):
    """Rows appended to the log (its users and items unchanged, so the id mapping still matched) moved the
    temporal split's quantiles: evaluate scored another test set, without a word. Options given on the
    command line choose other samples on purpose and are not checked; the log as it was evaluates."""
    log = write_log(tmp_path / "log.csv", n_users=40, n_items=12)
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out", run_dir, *TINY)[0] == 0
    original = open(log).read()
    with open(log, "a") as f:
        f.writelines(f"u{u},i{u % 12},5,{90_000 + u}\n" for u in range(20))
    code, _, err = run(capsys, "evaluate", "--checkpoint", run_dir, "--no-progress")
    assert code == 2
    assert_one_line_error(err, "has changed since this run was trained on it", "evaluate on the log as it was")
    assert run(capsys, "evaluate", "--checkpoint", run_dir, "--no-progress", "--sample-filter", "strict")[0] == 0
    open(log, "w").write(original)
    assert run(capsys, "evaluate", "--checkpoint", run_dir, "--no-progress")[0] == 0


def test_a_log_without_header_trains_and_evaluates(tmp_path, capsys):
    """MovieLens' ratings.dat layout: '::'-separated, no header, columns by position; evaluate reads the
    options back from data.json."""
    rows = [line.split(",") for line in open(write_log(tmp_path / "log.csv", n_users=40, n_items=12)).read().split()[1:]]
    log = tmp_path / "ratings.dat"
    log.write_text("".join(f"{u[1:]}::{i[1:]}::{r}::{t}\n" for u, i, r, t in rows))
    args = ["train", "--data", log, "--sep", "::", "--objective", "base", "--epochs", "1", "--out", tmp_path / "run", *TINY]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert_one_line_error(err, "looks like data, not a header", "--no-header")
    code, stdout, err = run(capsys, *args, "--no-header", "--user-col", "0", "--item-col", "1", "--rating-col", "2",
                            "--time-col", "3")
    assert code == 0, err
    assert f"interactions: {len(rows)}" in stdout  # the first line is an interaction, not a header
    assert json.loads((tmp_path / "run" / DATA_FILE).read_text())["options"]["header"] is False
    code, stdout, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "run")
    assert code == 0, err


def test_resume_refuses_a_log_whose_interactions_changed(tmp_path, capsys):
    """Same users and items (the id mapping's fingerprint is unchanged), but one user's events reordered."""
    log = write_log(tmp_path / "log.csv", n_users=40, n_items=12)
    args = ["train", "--data", log, "--objective", "base", "--out", tmp_path / "run", *TINY]
    assert run(capsys, *args, "--epochs", "1")[0] == 0
    header, *rows = open(log).read().splitlines()
    user = [i for i, row in enumerate(rows) if row.startswith("u5,")]
    first, second = next((a, b) for a, b in zip(user, user[1:]) if rows[a].split(",")[1] != rows[b].split(",")[1])
    a, b = rows[first].split(","), rows[second].split(",")
    a[1], b[1] = b[1], a[1]  # the two events swap items
    rows[first], rows[second] = ",".join(a), ",".join(b)
    open(log, "w").write("\n".join([header, *rows]) + "\n")
    code, _, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 2
    assert_one_line_error(err, "has changed since", "resume on the log as it was")
    saved = json.loads((tmp_path / "run" / DATA_FILE).read_text())
    assert len(saved["content_fingerprint"]) == 16 and len(saved["fingerprint"]) == 16


def test_study_report_refuses_a_missing_results_folder(tmp_path, capsys):
    report = tmp_path / "results.md"
    report.write_text("the committed report")
    code, _, err = run(capsys, "study", "--results", tmp_path / "runz", "--out", tmp_path / "out", "--report", report)
    assert code == 2
    assert_one_line_error(err, "no result folder", "--results")
    assert report.read_text() == "the committed report"


def test_study_checks_its_outputs_before_the_work(tmp_path, capsys, monkeypatch):
    """A --report in a missing folder or that is a folder, an --out that is a file, and a --results that is a
    file under --run: one line naming the option, before a report file is written or a run trained (the
    report used to fail after results.json was replaced, naming its temporary file; --run trained on)."""
    import rearec.cli.study as study_command

    def no_training(*a, **k):
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr(study_command, "run_plan", no_training)
    results, out, taken = tmp_path / "runs", tmp_path / "out", tmp_path / "taken"
    results.mkdir()
    taken.write_text("a file")
    for argv, fragments in (
            (["--report", tmp_path / "no" / "results.md"], ["cannot write", f"folder {tmp_path / 'no'} does not exist"]),
            (["--report", results], [f"--report {results} is a folder", "results.md"]),
            (["--out", taken, "--report", tmp_path / "r.md"], [f"--out {taken} is an existing file"]),
            (["--run", "--results", taken, "--report", tmp_path / "r.md"], [f"--results {taken} is an existing file"])):
        argv = ["study", "--results", results, "--out", out, *argv]
        code, _, err = run(capsys, *argv)
        assert code == 2, err
        assert_one_line_error(err, *fragments)
        assert "tmp-" not in err
        assert not out.exists()
    # A report inside a new --out folder (scripts/study_session.sh's workers): the folder is made with it.
    import rearec.study_report

    written = []
    monkeypatch.setattr(rearec.study_report, "write_study_report",
                        lambda *a, **k: written.append(a) or {"finished_runs": 0, "planned_runs": 0})
    code, _, err = run(capsys, "study", "--results", results, "--out", out, "--report", out / "results.md")
    assert code == 0 and len(written) == 1, err


def test_objective_options_reach_the_saved_config(log, tmp_path, capsys):
    """Every objective option of 'rearec train' lands in the checkpoint's config, at the value given."""
    given = {"--dropout": 0.3, "--input-dropout": 0.15, "--temperature": 0.5, "--pl-weight": 0.7,
             "--temp-scale": 3.0, "--noise-std": 0.05, "--cl-weight": 0.4, "--warmup-epochs": 1}
    out = tmp_path / "prl"
    options = [str(x) for pair in given.items() for x in pair]
    code, _, err = run(capsys, "train", "--data", log, "--objective", "prl", "--epochs", "1", "--out", out,
                       *options, *TINY)
    assert code == 0, err
    config = ReaRec.load(out / MODEL_FILE).config
    for flag, value in given.items():
        assert getattr(config, flag[2:].replace("-", "_")) == value, flag
    out = tmp_path / "erl"
    code, _, err = run(capsys, "train", "--data", log, "--objective", "erl", "--epochs", "1", "--out", out,
                       "--kl-weight", "0.2", *TINY)
    assert code == 0, err
    assert ReaRec.load(out / MODEL_FILE).config.kl_weight == 0.2


def test_profile_rows_from_known_timings(monkeypatch):
    """profile_latency's statistics from timings fixed in advance (each call's milliseconds a known
    function of batch size, depth and repeat): median, linearly interpolated p90, the least-squares
    slope per batch size, users per second, and format_profile's ratio to each batch size's depth 0."""
    import statistics

    from rearec import profile as profile_module
    from rearec.engine import FastReaRec
    from rearec.profile import format_profile, profile_latency

    def fake_times(call, repeats, warmup=1):
        call()  # the engine really runs once (checks its inputs), then the timings are made up
        batch, depth = fake_times.shape
        return [10.0 * batch + 3.0 * batch * depth ** 2 + r for r in range(repeats)]  # slopes differ by batch

    engine = FastReaRec.from_model(ReaRec(ReaRecConfig(n_items=30, hidden_size=8, n_heads=1, inner_size=8,
                                                       max_len=5, reason_steps=3)).eval())
    real_recommend = engine.recommend

    def recommend(histories, **kwargs):
        fake_times.shape = (len(histories), kwargs["depth"])
        return real_recommend(histories, **kwargs)

    monkeypatch.setattr(engine, "recommend", recommend)
    monkeypatch.setattr(profile_module, "time_calls", fake_times)
    rows = profile_latency(engine, depths=[0, 1, 3], batch_sizes=[2, 4], repeats=10, progress=False)
    assert [(r["batch_size"], r["depth"]) for r in rows] == [(2, 0), (2, 1), (2, 3), (4, 0), (4, 1), (4, 3)]
    for batch in (2, 4):
        mine = [r for r in rows if r["batch_size"] == batch]
        medians = [10.0 * batch + 3.0 * batch * d ** 2 + 4.5 for d in (0, 1, 3)]  # the median of r = 0..9 is 4.5
        assert [r["median_ms"] for r in mine] == pytest.approx(medians)
        assert [r["p90_ms"] for r in mine] == pytest.approx([m - 4.5 + 8.1 for m in medians])  # 0.9 * 9
        xs = [0, 1, 3]
        slope = (sum((x - statistics.fmean(xs)) * (m - statistics.fmean(medians)) for x, m in zip(xs, medians))
                 / sum((x - statistics.fmean(xs)) ** 2 for x in xs))
        assert all(r["marginal_ms_per_step"] == pytest.approx(slope) for r in mine)
        assert [r["users_per_s"] for r in mine] == pytest.approx([batch / (m / 1e3) for m in medians])
    lines = format_profile(rows).splitlines()[1:]
    ratios = [float(line.split()[-1]) for line in lines]
    by_row = [r["median_ms"] / next(x["median_ms"] for x in rows if x["batch_size"] == r["batch_size"] and x["depth"] == 0)
              for r in rows]
    assert ratios == pytest.approx(by_row, abs=5e-4) and ratios[3] == 1.0


def test_sigterm_is_an_interruption_that_says_how_to_resume(log, tmp_path):
    """`kill`, `timeout` or a job scheduler's SIGTERM during training: the Ctrl-C message (what was saved,
    how to resume) on one line, exit 143, and the run resumes (it used to die silently with 143)."""
    import signal

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "rearec", "train", "--data", str(log), "--objective", "base", "--epochs", "500",
            "--patience", "500", "--out", str(out), "--threads", "1", *TINY]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(__file__)))
    for line in process.stdout:  # after the first finished epoch
        if line.startswith("epoch   0"):
            break
    process.send_signal(signal.SIGTERM)
    process.stdout.read()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 143, err
    assert_one_line_error(err, "training interrupted in epoch", "resume with --resume")
    assert (out / STATE_FILE).is_file()


def test_a_failed_profile_plot_leaves_the_earlier_pair(tmp_path, monkeypatch):
    """write_profile draws the plot before it writes the JSON: a plot that fails leaves the folder's earlier
    JSON and PNG as they were (a new JSON beside an old PNG would disagree with it)."""
    from rearec import profile as profile_module

    rows = [{"batch_size": 1, "depth": d, "median_ms": 1.0 + d, "p90_ms": 1.5 + d, "marginal_ms_per_step": 1.0,
             "users_per_s": 1000.0 / (1.0 + d)} for d in (0, 1)]
    paths = profile_module.write_profile(rows, str(tmp_path))
    before = {name: open(paths[name], "rb").read() for name in ("json", "png")}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profile_module, "plot_profile", broken)
    with pytest.raises(OSError):
        profile_module.write_profile([dict(r, median_ms=9.0) for r in rows], str(tmp_path))
    assert {name: open(paths[name], "rb").read() for name in ("json", "png")} == before


@pytest.mark.parametrize("victim", ["train.log", "test_metrics.json"])
def test_a_full_disk_names_the_file_and_the_way_on(log, tmp_path, capsys, monkeypatch, victim):
    """file.write's ENOSPC names no file: the error read 'No space left on device:; check the permissions',
    with neither the file nor --resume."""
    import builtins
    import errno

    real_open = builtins.open

    def full_disk_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode or "a" in mode:
            if os.path.basename(str(path)).endswith(victim):
                f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as f.write raises it: no filename
        return f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    code, _, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out",
                       tmp_path / "run", *TINY)
    monkeypatch.undo()
    assert code == 2
    assert_one_line_error(err, "No space left on device: ", victim, "free space and run again", "--resume")


def test_a_damaged_byte_in_train_log_does_not_stop_a_resume(log, tmp_path, capsys):
    """A byte that is not UTF-8 in train.log (a disk error) made --resume fail with a bare codec error; the
    log is rewritten from the saved state where its lines do not match it."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out", out, *TINY)[0] == 0
    with open(out / "train.log", "ab") as f:
        f.write(b"\xff\n")
    code, _, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "2", "--out", out, "--resume",
                       *TINY)
    assert code == 0, err
    assert [line.split()[1] for line in (out / "train.log").read_text(errors="replace").splitlines()
            if line.startswith("epoch")] == ["0", "1"]


def test_the_run_folder_stays_locked_until_the_test_metrics_are_written(log, tmp_path, capsys, monkeypatch):
    """run.lock was released when training ended, before the test evaluation: a `train --overwrite` into the
    same folder could start there, and the first process then wrote its test metrics into the second run."""
    from rearec.cli import train as train_command
    from rearec.runs import RunFolderError, RunLock

    out = tmp_path / "run"
    real = train_command.evaluate_and_save
    probes = []

    def probing(model, data, out_dir, **kwargs):
        try:
            RunLock(out_dir).release()
            probes.append("free")
        except RunFolderError:
            probes.append("locked")
        return real(model, data, out_dir, **kwargs)

    monkeypatch.setattr(train_command, "evaluate_and_save", probing)
    assert run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out", out, *TINY)[0] == 0
    assert probes == ["locked"] and (out / TEST_METRICS_FILE).is_file()
    RunLock(str(out)).release()  # and released once the command is done


def test_evaluate_without_data_json_uses_the_models_window(trained, log, tmp_path, capsys):
    """Without data.json beside a checkpoint, evaluate filtered the test samples with the default window
    (50), where train sets it to the model's max_len (8 here): other test samples than train's."""
    import shutil
    copy = tmp_path / "copy.safetensors"
    shutil.copy(os.path.join(trained, "model.safetensors"), copy)
    code, _, err = run(capsys, "evaluate", "--checkpoint", copy, "--data", log, "--json", tmp_path / "m.json",
                       "--no-progress")
    assert code == 0, err
    want = json.loads(open(os.path.join(trained, TEST_METRICS_FILE)).read())["metrics"]
    got = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert got["n_samples"] == want["n_samples"] and got["readout"] == pytest.approx(want["readout"])


def test_a_changed_max_len_on_resume_is_named_as_such(log, tmp_path, capsys):
    """The window filter follows --max-len: a resume with another --max-len was refused for 'other data
    options: filter_window 8 (now 10)', an option the user never gave."""
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "1", "--out", out, *TINY)[0] == 0
    longer = [("10" if a == "8" and TINY[i - 1] == "--max-len" else a) for i, a in enumerate(TINY)]
    code, _, err = run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "2", "--out", out,
                       "--resume", *longer)
    assert code == 2 and "max_len 8 (now 10)" in err and "filter_window" not in err, err
    assert run(capsys, "train", "--data", log, "--objective", "base", "--epochs", "2", "--out", out, "--resume",
               *TINY)[0] == 0


def test_quickstart_refuses_the_current_folder(tmp_path, capsys, monkeypatch):
    """--out . in an empty folder passed every check: the staging folder was '..partial' and replacing '.' failed
    only after both trainings."""
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    for folder in (".", str(work), str(tmp_path)):
        code, _, err = run(capsys, "quickstart", "--out", folder)
        assert code == 2
        assert_one_line_error(err, f"--out {folder} is the current folder or holds it", "--out runs/quickstart")
    assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(work) == []
