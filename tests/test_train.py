"""Trainer: learning, best weights, determinism, kill-and-resume, divergence, output folder."""
import collections
import math
import os
import stat

import numpy as np
import pytest
import torch

import rearec.train as train_module
from rearec import ReaRec, ReaRecConfig
from rearec.data import load_dataset
from rearec.evaluate import evaluate
from rearec.runs import (DATA_FILE, LOCK_FILE, LOG_FILE, MODEL_FILE, RESUME, STATE_FILE, TEST_METRICS_FILE, TMP_PREFIX,
                         RESULT_FILE, RunFolderError, RunLock, atomic_write)
from rearec.train import TrainConfig, Trainer, TrainingError
from tests.conftest import counting_bf16_products
from tests.synthetic import write_log

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_log(tmp_path_factory.mktemp("log") / "log.csv", n_users=60, n_items=15)
    return load_dataset(str(path), split="loo")


def tiny_model(data, objective="prl", seed=0):
    torch.manual_seed(seed)
    steps = 0 if objective == "base" else 1
    return ReaRec(ReaRecConfig(n_items=data.n_items, objective=objective, reason_steps=steps, hidden_size=16,
                               n_layers=1, n_heads=1, inner_size=32, max_len=8, dropout=0.1, input_dropout=0.1,
                               warmup_epochs=1))


def config(**overrides):
    values = dict(lr=1e-2, batch_size=64, max_epochs=4, patience=10, seed=7, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def quiet(_line):
    pass


def without_seconds(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "valid_seconds")} for h in history]


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_falls_and_best_weights_are_restored_and_saved(data, tmp_path):
    model = tiny_model(data, objective="base")
    result = Trainer(model, data, config(max_epochs=5), str(tmp_path), log=quiet).fit()
    assert result.status == "max_epochs" and result.epochs_run == 5
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    scores = [h["ndcg@20"] for h in result.history]
    assert result.best_epoch == max(range(5), key=lambda e: (scores[e], -e))
    assert result.best_score == pytest.approx(max(scores))
    saved = ReaRec.load(tmp_path / MODEL_FILE)
    assert states_equal(saved.state_dict(), model.state_dict())  # in-memory model = best = on disk
    assert saved.id_mapping == data.mapping.to_dict()
    assert len((tmp_path / LOG_FILE).read_text().splitlines()) == 5
    assert sorted(os.listdir(tmp_path)) == sorted([LOG_FILE, MODEL_FILE, STATE_FILE])  # no TMP_PREFIX leftovers
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("objective", ["base", "erl", "prl"])
def test_bf16_mixed_precision_step_follows_float32(data, objective):
    # --bf16: the forward under autocast(bfloat16), the item-table losses' softmax in float32. One step's loss
    # and gradient stay close to the float32 step's (bf16 has 8 bits: not equal, only close).
    from rearec.train import TrainingObjective

    users, histories, lengths, targets = data.train.batch(torch.arange(64), 8)
    grads = {}
    for bf16 in (False, True):
        model = tiny_model(data, objective=objective).eval()  # no dropout: the same function twice
        model.config.warmup_epochs = 0
        loss = TrainingObjective(model, bf16=bf16)(histories, lengths, targets, 1, users)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        grads[bf16] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    (want, g32), (got, g16) = grads[False], grads[True]
    assert got == pytest.approx(want, rel=2e-2) and got != want  # close, and bf16 did run
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.98


def test_the_trainer_gives_freed_memory_back_after_training_and_after_validation(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "return_freed_memory", lambda: calls.append("trim") or True)
    monkeypatch.setattr(train_module, "reuse_freed_memory", lambda: calls.append("reuse") or True)
    Trainer(tiny_model(data, objective="base"), data, config(max_epochs=3), str(tmp_path), log=quiet).fit()
    assert calls == ["reuse"] + ["trim"] * 6


@pytest.mark.parametrize("native", [False, True])
def test_bf16_training_runs(native, data, tmp_path, monkeypatch):
    # Where the CPU lacks native bf16 dot products, every step's products (forward and backward) run under
    # rearec_kernels.bf16_products' mode; elsewhere under torch's own
    from rearec_kernels import bf16_products

    seen = collections.Counter()
    monkeypatch.setattr(bf16_products.packed, "native_bf16", lambda: native)
    monkeypatch.setattr(bf16_products, "Bf16ProductsAsFloat32", counting_bf16_products(seen))
    model = tiny_model(data, objective="prl")
    result = Trainer(model, data, config(max_epochs=2, bf16=True), str(tmp_path), log=quiet).fit()
    assert result.epochs_run == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    steps = 2 * math.ceil(len(data.train) / 64)
    # each step: at least the forward's and the backward's products of the item-table loss
    assert (sum(seen.values()) >= 2 * steps) if not native else not seen


def test_same_seed_gives_identical_runs(data, tmp_path):
    runs = []
    for name in ("a", "b"):
        model = tiny_model(data)
        result = Trainer(model, data, config(max_epochs=3), str(tmp_path / name), log=quiet).fit()
        runs.append((result, model.state_dict()))
    (ra, wa), (rb, wb) = runs
    assert [(h["loss"], h["ndcg@20"]) for h in ra.history] == [(h["loss"], h["ndcg@20"]) for h in rb.history]
    assert states_equal(wa, wb)


def test_kill_and_resume_reaches_the_uninterrupted_result(data, tmp_path, monkeypatch):
    full_model = tiny_model(data)
    full = Trainer(full_model, data, config(), str(tmp_path / "full"), log=quiet).fit()

    # Kill: Ctrl-C in the middle of epoch 2 (after epochs 0 and 1 were saved).
    real_loss, calls = train_module.training_loss, []
    batches_per_epoch = math.ceil(len(data.train) / 64)

    def interrupting_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * batches_per_epoch + 2:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", interrupting_loss)
    killed = Trainer(tiny_model(data), data, config(), str(tmp_path / "killed"), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert killed.epoch == 2
    monkeypatch.setattr(train_module, "training_loss", real_loss)

    # Resume in a new process-like setting: fresh model with other initial weights.
    model = tiny_model(data, seed=123)
    trainer = Trainer(model, data, config(), str(tmp_path / "killed"), log=quiet)
    trainer.resume()
    resumed = trainer.fit()
    assert without_seconds(resumed.history) == without_seconds(full.history)
    assert (resumed.best_epoch, resumed.best_score, resumed.status) == (full.best_epoch, full.best_score, full.status)
    assert states_equal(model.state_dict(), full_model.state_dict())
    on_disk = ReaRec.load(tmp_path / "killed" / MODEL_FILE).state_dict()
    assert states_equal(on_disk, ReaRec.load(tmp_path / "full" / MODEL_FILE).state_dict())


def test_stop_after_k_epochs_then_resume_to_n(data, tmp_path):
    full_model = tiny_model(data, objective="base")
    full = Trainer(full_model, data, config(max_epochs=3), str(tmp_path / "full"), log=quiet).fit()
    Trainer(tiny_model(data, objective="base"), data, config(max_epochs=1), str(tmp_path / "part"), log=quiet).fit()
    model = tiny_model(data, objective="base", seed=5)
    trainer = Trainer(model, data, config(max_epochs=3), str(tmp_path / "part"), log=quiet)
    trainer.resume()
    result = trainer.fit()
    assert [h["loss"] for h in result.history] == [h["loss"] for h in full.history]
    assert states_equal(model.state_dict(), full_model.state_dict())


def test_resume_with_another_process_count_says_so(data, tmp_path):
    """A torchrun job restarted on fewer GPUs resumed without a word on another path (each rank seeds its
    own dropout and takes its own share of each batch): the state records the process count, and a
    resume with another one says so. Here the state is one written by 2 processes."""
    Trainer(tiny_model(data, objective="base"), data, config(max_epochs=1), str(tmp_path), log=quiet).fit()
    state_path = tmp_path / STATE_FILE
    for saved, noted in ((1, False), (2, True)):
        state = torch.load(state_path, weights_only=True)
        state["processes"] = saved
        torch.save(state, state_path)
        lines = []
        Trainer(tiny_model(data, objective="base"), data, config(max_epochs=1), str(tmp_path), log=lines.append).resume()
        said = [line for line in lines if "process(es)" in line]
        assert len(said) == noted and all("trained by 2 process(es), this run has 1" in line
                                          and "resume with 2 process(es)" in line for line in said), lines


def test_resume_with_another_thread_count_says_so(data, tmp_path):
    """Gradients summed by 1 and by 2 threads differ in the last bits, so a resume at another thread
    count is not the uninterrupted run: the log says so, and names the count that keeps it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Trainer(tiny_model(data, objective="base"), data, config(max_epochs=1), str(tmp_path), log=quiet).fit()
        for threads, noted in ((1, False), (2, True)):
            torch.set_num_threads(threads)
            lines = []
            Trainer(tiny_model(data, objective="base"), data, config(max_epochs=1), str(tmp_path),
                    log=lines.append).resume()
            said = [line for line in lines if "CPU thread" in line]
            assert len(said) == noted and all("trained with 1 CPU thread(s), this process has 2" in line
                                              and "--threads 1" in line for line in said), lines
    finally:
        torch.set_num_threads(before)


def test_resume_after_early_stop_trains_nothing(data, tmp_path):
    first = Trainer(tiny_model(data), data, config(lr=0.0, max_epochs=20, patience=2), str(tmp_path), log=quiet).fit()
    assert first.status == "converged" and first.epochs_run == 3
    trainer = Trainer(tiny_model(data), data, config(lr=0.0, max_epochs=20, patience=2), str(tmp_path), log=quiet)
    trainer.resume()
    again = trainer.fit()
    assert again.status == "converged" and again.epochs_run == 3 and again.best_epoch == first.best_epoch


def test_an_unreadable_state_is_not_called_damaged(data, tmp_path):
    """A state that cannot be read (permissions, I/O) was called damaged, with advice to --overwrite:
    the advice deletes the run. (A folder in its place stands for the unreadable file: tests run as root.)"""
    os.mkdir(tmp_path / "train_state.pt")
    with pytest.raises(TrainingError, match=r"cannot read .*train_state.pt \(Is a directory\): check its permissions"):
        Trainer(tiny_model(data), data, config(), str(tmp_path), log=quiet).resume()


def test_resume_errors(data, tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        Trainer(tiny_model(data), data, config(), str(tmp_path), log=quiet).resume()
    Trainer(tiny_model(data), data, config(max_epochs=1), str(tmp_path), log=quiet).fit()
    other = ReaRec(ReaRecConfig(n_items=data.n_items, objective="base", hidden_size=8, n_layers=1, n_heads=1,
                                inner_size=8, max_len=8))
    with pytest.raises(TrainingError, match=r"another model configuration or dataset: hidden_size 16 \(now 8\), "
                                            r"inner_size 32 \(now 8\).*objective 'prl' \(now 'base'\); resume"):
        Trainer(other, data, config(), str(tmp_path), log=quiet).resume()
    with pytest.raises(TrainingError, match=r"--lr 0.01 \(now 0.02\), --seed 7 \(now 8\); resume with the same"):
        Trainer(tiny_model(data), data, config(lr=0.02, seed=8), str(tmp_path), log=quiet).resume()
    with pytest.raises(TrainingError, match=r"--bf16 False \(now True\)"):  # mixed precision stays as it was
        Trainer(tiny_model(data), data, config(bf16=True), str(tmp_path), log=quiet).resume()
    # A damaged state file: one line naming it and the way out, whatever is wrong with it.
    state = tmp_path / STATE_FILE
    whole = state.read_bytes()
    for damaged in (b"", whole[: len(whole) // 2], b"not a torch file"):
        state.write_bytes(damaged)
        with pytest.raises(TrainingError, match=r"train_state.pt is damaged or not a training state .*--overwrite"):
            Trainer(tiny_model(data), data, config(), str(tmp_path), log=quiet).resume()
    torch.save({"model": {}}, state)
    with pytest.raises(TrainingError, match="it lacks model_config, train_config, optimizer"):
        Trainer(tiny_model(data), data, config(), str(tmp_path), log=quiet).resume()
    # Every key present, one of them edited by hand into something else: the same one line, naming the key.
    state.write_bytes(whole)
    good = torch.load(state, weights_only=True)
    first_weight = next(iter(good["model"]))
    edits = {"model_config": "sasrec", "train_config": [1, 2], "epoch": "3", "best_score": None,
             "best_epoch": 1.5, "bad_epochs": "0", "history": "not json", "optimizer": {"state": {}},
             "model": {first_weight: torch.zeros(3)}, "best_state": {"no such weight": torch.zeros(1)}}
    for key, value in edits.items():
        torch.save({**good, key: value}, state)
        with pytest.raises(TrainingError, match=rf"train_state.pt is damaged or not a training state \(its {key} "):
            Trainer(tiny_model(data), data, config(), str(tmp_path), log=quiet).resume()


def test_an_interrupted_save_leaves_the_epoch_before_and_logs_each_epoch_once(data, tmp_path, monkeypatch):
    """Ctrl-C while epoch 1's state is written: the state on disk is epoch 0's, the trainer says one
    epoch is saved, and the resumed run logs epoch 1 once (it was logged before the save)."""
    real_write, writes = train_module.atomic_write, []

    def interrupted_write(path, write):
        writes.append(path)
        if path.endswith(STATE_FILE) and sum(p.endswith(STATE_FILE) for p in writes) == 2:
            raise KeyboardInterrupt
        return real_write(path, write)

    monkeypatch.setattr(train_module, "atomic_write", interrupted_write)
    trainer = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.epoch == 1
    monkeypatch.setattr(train_module, "atomic_write", real_write)
    resumed = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path), log=quiet)
    resumed.resume()
    assert resumed.epoch == 1
    resumed.fit()
    logged = [line.split()[1] for line in (tmp_path / LOG_FILE).read_text().splitlines() if line.startswith("epoch")]
    assert logged == ["0", "1", "2"]


def test_train_config_checks_its_numbers():
    for bad in (dict(patience=0), dict(batch_size=0), dict(max_epochs=0), dict(patience=2.5), dict(seed=-1),
                dict(seed=2 ** 62), dict(seed=True)):
        with pytest.raises(ValueError, match="must be a whole number"):
            TrainConfig(**bad)
    for bad, message in ((dict(metric="hit@20"), "metric 'hit@20' is not one of recall@K, ndcg@K, mrr@K"),
                         (dict(metric="ndcg"), "metric 'ndcg' is not one of"), (dict(metric="NDCG@20"), "not one of"),
                         (dict(lr="1e-3"), "lr must be a finite number >= 0"), (dict(lr=float("nan")), "lr must be"),
                         (dict(weight_decay=-1), "weight_decay must be"),
                         (dict(time_budget_s="60"), "time_budget_s must be None or a number"),
                         (dict(bf16="false"), "bf16 must be True or False"), (dict(progress=None), "progress must be"),
                         (dict(device="gpu"), "device 'gpu' is not a device name")):
        with pytest.raises(ValueError, match=message):  # at once, not after an epoch of training
            TrainConfig(**bad)
    numpy_config = TrainConfig(batch_size=np.int64(64), lr=np.float32(0.5))
    assert type(numpy_config.batch_size) is int and type(numpy_config.lr) is float  # written as JSON


def test_a_model_smaller_than_the_data_is_refused_before_training(data, tmp_path):
    cfg = tiny_model(data).config.to_dict()
    small = ReaRec(ReaRecConfig.from_dict(dict(cfg, n_items=data.n_items - 1)))
    with pytest.raises(ValueError, match=rf"the data has {data.n_items:,} items but the model's table"):
        Trainer(small, data, config(), str(tmp_path), log=quiet)
    with pytest.raises(ValueError, match="the model was trained on other data"):
        evaluate(small, data.train)


def test_time_budget_stops_before_an_epoch_that_would_pass_it(data, tmp_path):
    result = Trainer(tiny_model(data), data, config(max_epochs=5, time_budget_s=0.0), str(tmp_path), log=quiet).fit()
    assert result.status == "time_budget" and result.epochs_run == 1
    assert "time budget" in result.message and (tmp_path / MODEL_FILE).is_file()
    result = Trainer(tiny_model(data), data, config(max_epochs=3, time_budget_s=1e6), str(tmp_path / "b"),
                     log=quiet).fit()
    assert result.status == "max_epochs" and result.epochs_run == 3
    trainer = Trainer(tiny_model(data), data, config(max_epochs=2), str(tmp_path), log=quiet)
    trainer.resume()  # a budget stop is an ordinary pause: resuming without a budget goes on
    assert trainer.fit().epochs_run == 2


def test_divergence_keeps_the_best_weights(data, tmp_path, monkeypatch):
    real_loss = train_module.training_loss

    def nan_from_epoch_2(model, histories, lengths, targets, epoch=0, **options):
        loss = real_loss(model, histories, lengths, targets, epoch, **options)
        return loss * float("nan") if epoch >= 2 else loss

    monkeypatch.setattr(train_module, "training_loss", nan_from_epoch_2)
    lines = []
    model = tiny_model(data)
    result = Trainer(model, data, config(max_epochs=6), str(tmp_path), log=lines.append).fit()
    assert result.status == "diverged"
    assert result.epochs_run == 2 and result.best_epoch <= 1
    assert "NaN" in result.message and "epoch 2" in result.message and "kept the best weights" in result.message
    assert "lower --lr" in result.message  # what to change
    assert result.message not in lines  # the caller prints it, once
    assert result.message in (tmp_path / LOG_FILE).read_text()
    saved = ReaRec.load(tmp_path / MODEL_FILE)  # usable: loads, finite (load checks), equals the best
    assert states_equal(saved.state_dict(), model.state_dict())
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_weights_made_nan_by_the_last_step_of_an_epoch_are_divergence(data, tmp_path, monkeypatch):
    """A finite loss with an infinite gradient: Adam writes NaN into the weights. In an epoch's last step the
    next loss never showed it: validation scored the NaN weights (every target last of 12 items: NDCG@20 > 0),
    kept them as the best and saved a model file that does not load."""
    real_loss, calls = train_module.training_loss, []
    batches_per_epoch = math.ceil(len(data.train) / 64)

    def infinite_gradient_in_the_last_step(model, *args, **kwargs):
        loss = real_loss(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == batches_per_epoch:
            weights = model.item_embedding.weight.sum()
            loss = loss + torch.sqrt(weights - weights.detach())  # 0, with an infinite derivative
        return loss

    monkeypatch.setattr(train_module, "training_loss", infinite_gradient_in_the_last_step)
    model = tiny_model(data)
    result = Trainer(model, data, config(max_epochs=3), str(tmp_path), log=quiet).fit()
    assert result.status == "diverged" and result.best_epoch == -1 and "no weights were kept" in result.message
    assert not (tmp_path / MODEL_FILE).exists()

def test_divergence_advice_for_erl_names_kl_weight():
    assert "--kl-weight" in train_module.divergence_advice("erl")


def test_divergence_in_the_first_epoch_keeps_nothing(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "training_loss", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    result = Trainer(tiny_model(data), data, config(), str(tmp_path), log=quiet).fit()
    assert result.status == "diverged" and result.best_epoch == -1 and "no weights were kept" in result.message
    assert not (tmp_path / MODEL_FILE).exists() and not (tmp_path / STATE_FILE).exists()


def test_unwritable_output_folder(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFolderError, match="cannot write to output folder .*--out"):
        Trainer(tiny_model(data), data, config(), str(blocker / "run"), log=quiet)


def test_atomic_write_goes_through_a_link_and_refuses_a_fifo(tmp_path):
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write(str(link), lambda tmp: open(tmp, "w").write("new"))
    assert link.is_symlink() and target.read_text() == "new"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(str(fifo), lambda tmp: open(tmp, "w").write("new"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == [
        "link.txt", "pipe", "target.txt"]  # no temporary file left


def test_run_folder_start_resume_overwrite_and_atomic_write(tmp_path):
    from rearec.runs import FILE_MODE, OVERWRITE, RESUME, START, atomic_write, remove_results, start_run

    folder = str(tmp_path / "run")
    with pytest.raises(RunFolderError, match=r"nothing to resume: .*train_state.pt does not exist"):
        start_run(folder, RESUME)
    assert not os.path.exists(folder)  # refused without creating it
    start_run(folder, START)
    for name in (STATE_FILE, MODEL_FILE, "notes.txt"):
        (tmp_path / "run" / name).write_text("x")
    with pytest.raises(RunFolderError, match="already holds a training run .*--resume .*--overwrite"):
        start_run(folder, START)
    start_run(folder, RESUME)
    start_run(folder, OVERWRITE)
    assert os.listdir(folder) == ["notes.txt"]  # the run's files go, nothing else
    with pytest.raises(ValueError, match="mode must be 'start', 'resume' or 'overwrite'"):
        start_run(folder, "again")
    # start: a run that never finished an epoch left data.json and train.log: they go, the rest stays.
    for name in (DATA_FILE, LOG_FILE):
        (tmp_path / "run" / name).write_text("left over")
    start_run(folder, START)
    assert os.listdir(folder) == ["notes.txt"]
    # ...but another run's results are never replaced silently, whichever of them is there.
    for name in (MODEL_FILE, TEST_METRICS_FILE, RESULT_FILE):
        (tmp_path / "run" / name).write_text("theirs")
        with pytest.raises(RunFolderError, match=f"already holds {name} of another run.*--overwrite"):
            start_run(folder, START)
        os.remove(tmp_path / "run" / name)
    # resume: the results of the run as it was stay until the resume is accepted, then go (the resumed run
    # writes them again when it ends).
    for name in (STATE_FILE, TEST_METRICS_FILE, RESULT_FILE):
        (tmp_path / "run" / name).write_text("x")
    start_run(folder, RESUME)
    assert sorted(os.listdir(folder)) == sorted(["notes.txt", STATE_FILE, TEST_METRICS_FILE, RESULT_FILE])
    remove_results(folder)
    assert sorted(os.listdir(folder)) == sorted(["notes.txt", STATE_FILE])
    os.remove(tmp_path / "run" / STATE_FILE)

    target = os.path.join(folder, "f.bin")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert os.listdir(folder) == ["notes.txt"]  # no TMP_PREFIX leftover, no half-written file
    atomic_write(target, lambda tmp: open(tmp, "w").write("whole"))
    assert open(target).read() == "whole" and os.stat(target).st_mode & 0o777 == FILE_MODE
    # A write interrupted over an existing file leaves the old content whole, and writes nothing to it.
    for error in (KeyboardInterrupt, RuntimeError("disk full")):
        def fail_again(tmp, error=error):
            assert tmp != target  # the data go to a temporary file, never to the target itself
            open(tmp, "w").write("half")
            raise error

        with pytest.raises((KeyboardInterrupt, OSError)):
            atomic_write(target, fail_again)
        assert open(target).read() == "whole" and sorted(os.listdir(folder)) == ["f.bin", "notes.txt"]


def test_a_run_stopped_during_a_write_is_no_write_failure(tmp_path):
    """Under torchrun a SIGTERM (a peer died) raises RankFailure from its handler, perhaps inside torch.save:
    atomic_write called it a failed write ("if the disk is full, free space"), exit 2 where it is 3."""
    from rearec.distributed import RankFailure
    target = str(tmp_path / "state.pt")

    def stopped(tmp):
        torch.save({"x": 1}, tmp)
        raise RankFailure("rank 0: stopped by signal 15 (another process of the run failed)")

    with pytest.raises(RankFailure, match="stopped by signal 15"):
        atomic_write(target, stopped)
    with pytest.raises(OSError, match="if the disk is full"):  # torch.save's own error for a full disk
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("PytorchStreamWriter failed writing")))
    assert os.listdir(tmp_path) == []


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import rearec.runs as runs
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace",))
        real_replace(a, b)

    monkeypatch.setattr(runs.os, "fsync", fsync)
    monkeypatch.setattr(runs.os, "replace", replace)
    runs.atomic_write(str(tmp_path / "f.json"), lambda tmp: open(tmp, "w").write("{}"))
    assert events == [("fsync", "file"), ("replace",), ("fsync", "folder")]


def test_evaluate_checks_its_options_and_keeps_the_training_mode(data):
    model = tiny_model(data).train()
    for bad, message in ((dict(batch_size=0), "batch_size must be a positive integer"),
                         (dict(batch_size=2.5), "batch_size must be"),
                         (dict(exclude_history="no"), "exclude_history must be True or False")):
        with pytest.raises(ValueError, match=message):
            evaluate(model, data.valid, **bad)
    evaluate(model, data.valid)
    assert model.training  # a user's own training loop goes on in training mode
    model.config.halt_kl = -1.0  # set after construction: checked where it is used
    with pytest.raises(ValueError, match="halt_kl must be a finite number of nats > 0"):
        model.recommend([[1, 2]], readout="adaptive")


def test_resume_mends_the_files_an_interrupt_left_behind(data, tmp_path, monkeypatch):
    """An interrupt after an epoch's save but before its log line, or before the model file was written
    (the state holds the best weights too): the resumed run's train.log has each epoch once and its model
    file holds the best weights. A finished run's test metrics go when it is extended."""
    out = str(tmp_path)
    model_config = tiny_model(data).config
    real_write = Trainer._write_log

    def cut_after_the_save(self, line):
        if line.startswith("epoch   1"):
            raise KeyboardInterrupt
        real_write(self, line)

    monkeypatch.setattr(Trainer, "_write_log", cut_after_the_save)
    with pytest.raises(KeyboardInterrupt):
        train_module.train_run(model_config, data, config(max_epochs=3), out, log=quiet)
    monkeypatch.undo()
    os.remove(os.path.join(out, MODEL_FILE))  # as if cut before the model's write
    (tmp_path / TEST_METRICS_FILE).write_text("{}")  # results of the run as it was
    (tmp_path / "tmp-abc-train_state.pt").write_text("a write cut short")
    model, result = train_module.train_run(model_config, data, config(max_epochs=3), out, mode=RESUME, log=quiet)
    logged = [line.split()[1] for line in (tmp_path / LOG_FILE).read_text().splitlines() if line.startswith("epoch")]
    assert logged == ["0", "1", "2"]
    saved = ReaRec.load(tmp_path / MODEL_FILE).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # the best weights
    assert not (tmp_path / TEST_METRICS_FILE).exists() and not (tmp_path / "tmp-abc-train_state.pt").exists()


def test_resume_mends_a_log_line_cut_short(data, tmp_path):
    """An append to train.log cut short (a full disk) left a last line without its newline; it still began with
    'epoch ', so the count matched and resume kept it, and the next epoch's line was appended onto it."""
    Trainer(tiny_model(data), data, config(max_epochs=2), str(tmp_path), log=quiet).fit()
    log = tmp_path / LOG_FILE
    log.write_text(log.read_text()[:-40])
    trainer = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path), log=quiet)
    trainer.resume()
    trainer.fit()
    lines = log.read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["0", "1", "2"] and all(line.endswith("s)") for line in lines)

def test_one_training_process_per_folder_and_resume_checks(data, tmp_path):
    out = str(tmp_path)
    model_config = tiny_model(data).config
    with pytest.raises(RunFolderError, match="nothing to resume"):  # a mistyped folder: none is created
        train_module.train_run(model_config, data, config(max_epochs=1), str(tmp_path / "typo" / "run"), mode=RESUME,
                               log=quiet)
    assert not (tmp_path / "typo").exists()
    lock = RunLock(out)  # another process training here
    with pytest.raises(RunFolderError, match="another process is training in"):
        train_module.train_run(model_config, data, config(max_epochs=1), out, log=quiet)
    lock.release()
    assert not [p.name for p in tmp_path.iterdir() if p.name not in (LOCK_FILE,)]  # nothing was touched
    train_module.train_run(model_config, data, config(max_epochs=1), out, log=quiet)
    with pytest.raises(TrainingError, match="--fused-ce True \\(now False\\)"):  # changes the result
        train_module.train_run(model_config, data, config(max_epochs=2, fused_ce=False), out, mode=RESUME, log=quiet)
    other = load_dataset(write_log(tmp_path.parent / "other.csv", n_users=40, n_items=15, seed=5), split="loo")
    assert other.n_items <= data.n_items  # fits the model: only the fingerprint can tell
    with pytest.raises(TrainingError, match="was trained on other data"):  # no data.json to tell: the state does
        train_module.train_run(model_config, other, config(max_epochs=2), out, mode=RESUME, log=quiet)


def test_a_resume_refused_for_other_data_leaves_the_trainer_as_it_was(data, tmp_path):
    """The data's fingerprint was compared after the saved weights, optimizer and counters were loaded: the
    refused Trainer held the run's epoch and weights, and a fit() then trained them on the other data into
    the run's folder. The refusal now comes first, as the other refusals of resume do."""
    Trainer(tiny_model(data), data, config(max_epochs=1), str(tmp_path), log=quiet).fit()
    other = load_dataset(write_log(tmp_path.parent / "other-data.csv", n_users=40, n_items=15, seed=5), split="loo")
    model = tiny_model(data, seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, other, config(max_epochs=2), str(tmp_path), log=quiet)
    with pytest.raises(TrainingError, match="was trained on other data"):
        trainer.resume()
    assert trainer.epoch == 0 and trainer.history == [] and states_equal(model.state_dict(), weights)

def test_a_refused_resume_keeps_the_results_of_the_finished_run(data, tmp_path):
    """train_run removed test_metrics.json and result.json before the resume's checks: a resume refused for a
    changed option deleted the results of a finished run that it never touched. An accepted one removes them."""
    model_config, out = tiny_model(data).config, str(tmp_path)
    train_module.train_run(model_config, data, config(max_epochs=1), out, log=quiet)
    for name in (TEST_METRICS_FILE, RESULT_FILE):
        (tmp_path / name).write_text("{}")
    with pytest.raises(TrainingError, match="--lr 0.01 \\(now 0.5\\)"):
        train_module.train_run(model_config, data, config(max_epochs=2, lr=0.5), out, mode=RESUME, log=quiet)
    assert (tmp_path / TEST_METRICS_FILE).is_file() and (tmp_path / RESULT_FILE).is_file()
    train_module.train_run(model_config, data, config(max_epochs=2), out, mode=RESUME, log=quiet)
    assert not (tmp_path / TEST_METRICS_FILE).exists() and not (tmp_path / RESULT_FILE).exists()

def test_a_full_disk_is_an_os_error_naming_the_file(tmp_path):
    def full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 43520 vs 43412")

    with pytest.raises(OSError, match=r"could not write .*state.pt \(\[enforce fail.*if the disk is full"):
        atomic_write(str(tmp_path / "state.pt"), full)
    assert not list(tmp_path.iterdir())


def test_fit_again_goes_on_from_the_last_epoch_not_the_best(data, tmp_path):
    """fit() leaves the best weights in the model; a second fit() on the same Trainer (after a time-budget
    stop, say) must go on from the last epoch's weights, as a resume from the folder does."""
    whole = Trainer(tiny_model(data), data, config(max_epochs=4), str(tmp_path / "whole"), log=quiet).fit()
    trainer = Trainer(tiny_model(data), data, config(max_epochs=2), str(tmp_path / "twice"), log=quiet)
    trainer.fit()
    trainer.cfg = config(max_epochs=4)
    again = trainer.fit()
    assert without_seconds(again.history) == without_seconds(whole.history)


def test_fit_again_after_an_interrupted_fit_goes_on_from_the_saved_epoch(data, tmp_path, monkeypatch):
    """A fit() that ended in an exception left the model, the optimizer and the history past what is saved:
    a save that failed (full disk) kept epoch 2 in the history and its training in the weights, so a second
    fit() trained epoch 2 again and logged it twice. It now goes on from the saved epoch, as a resume does."""
    whole = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path / "whole"), log=quiet).fit()
    real_write = train_module.atomic_write

    def full_disk_at_epoch_2(path, write):
        if path.endswith(STATE_FILE) and os.path.isfile(path) and torch.load(path, weights_only=True)["epoch"] == 2:
            raise OSError(f"could not write {path}")
        return real_write(path, write)

    monkeypatch.setattr(train_module, "atomic_write", full_disk_at_epoch_2)
    trainer = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path / "again"), log=quiet)
    with pytest.raises(OSError, match="could not write"):
        trainer.fit()
    monkeypatch.setattr(train_module, "atomic_write", real_write)  # space freed
    again = trainer.fit()
    assert without_seconds(again.history) == without_seconds(whole.history)
    logged = [line.split()[1] for line in (tmp_path / "again" / LOG_FILE).read_text().splitlines()]
    assert logged == ["0", "1", "2"]
    # Ctrl-C in epoch 0: nothing is saved to go on from, and the weights hold part of an epoch
    real_loss, calls = train_module.training_loss, []

    def interrupting_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", interrupting_loss)
    trainer = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path / "first"), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    with pytest.raises(TrainingError, match="interrupted before any epoch was saved.*build the model and Trainer"):
        trainer.fit()

def test_fit_again_after_a_divergence_goes_on_from_the_saved_epoch(data, tmp_path, monkeypatch):
    """A divergence stops inside an epoch, after the optimizer took that epoch's first steps: a second fit()
    went on with those steps in Adam's moments, where a resume from the folder starts the epoch again."""
    whole = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path / "whole"), log=quiet).fit()
    real_loss, calls = train_module.training_loss, []

    def nan_once_in_epoch_1(model, histories, lengths, targets, epoch=0, **options):
        loss = real_loss(model, histories, lengths, targets, epoch, **options)
        calls.append(epoch)
        return loss * float("nan") if calls.count(1) == 2 else loss

    monkeypatch.setattr(train_module, "training_loss", nan_once_in_epoch_1)
    trainer = Trainer(tiny_model(data), data, config(max_epochs=3), str(tmp_path / "again"), log=quiet)
    assert trainer.fit().status == "diverged"
    again = trainer.fit()  # the loss is finite this time
    assert without_seconds(again.history) == without_seconds(whole.history)

def test_an_interrupt_after_the_state_is_saved_says_so(data, tmp_path, monkeypatch):
    """Ctrl-C while the model file of epoch 0 is written: the state is saved, so the message says to
    resume (not to start again, which the folder would refuse), and the resume mends the model file."""
    def cut(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_best", cut)
    with pytest.raises(train_module.TrainingInterrupted, match=r"epochs 0\.\.0 are saved .* resume with --resume"):
        train_module.train_run(tiny_model(data).config, data, config(max_epochs=2), str(tmp_path), log=quiet)
    monkeypatch.undo()
    model, _ = train_module.train_run(tiny_model(data).config, data, config(max_epochs=2), str(tmp_path),
                                      mode=RESUME, log=quiet)
    assert (tmp_path / MODEL_FILE).is_file()


def test_a_file_system_without_flock_trains_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    RunLock(str(tmp_path)).release()  # not "another process is training"


def test_evaluate_takes_numpy_and_torch_integers(data):
    model = tiny_model(data)
    want = evaluate(model, data.valid, batch_size=16)
    for size in (np.int64(16), torch.tensor(16)):
        assert evaluate(model, data.valid, batch_size=size) == want


def test_a_metric_is_named_as_the_metrics_name_it(data, tmp_path):
    # 'ndcg@020' and 'ndcg@٢٠' (non-ASCII digits) passed the check and then failed after the first epoch with a
    # KeyError: validation's metrics are named 'ndcg@20'. They are refused at once, as other bad names are.
    for name in ("ndcg@020", "ndcg@\u0662\u0660", "recall@00", "ndcg@\u00b2"):
        with pytest.raises(ValueError, match="is not one of recall@K, ndcg@K, mrr@K"):
            TrainConfig(metric=name)
    result = Trainer(tiny_model(data), data, config(max_epochs=1, metric="mrr@10"), str(tmp_path), log=quiet).fit()
    assert result.history[0]["mrr@10"] == result.best_score
