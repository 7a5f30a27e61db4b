"""Training: Adam, early stopping on validation NDCG@20 with the best weights restored (the paper's
protocol), deterministic for a seed, resumable, and safe against a diverging objective.

The Trainer writes into a run folder (:mod:`rearec.runs`): the best model (``MODEL_FILE``), its own
resume state (``STATE_FILE``, whose layout only this module reads) and one log line per epoch
(``LOG_FILE``), each atomically.

Under torchrun (a process group started by :func:`rearec.distributed.init_from_env`) the same Trainer
runs DistributedDataParallel: every global batch of one shuffled order is split across the ranks
(``batch_size`` stays the global batch), gradients are averaged so that they equal one process's,
validation is sharded and gathered (every rank takes the same early-stopping decision), and rank 0
alone writes the run folder. A rank that fails makes the others raise
:class:`rearec.distributed.RankFailure`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from rearec import distributed
from rearec.data import DataSpec
from rearec.evaluate import report_of_ranks, step_ranks
from rearec.heap import return_freed_memory, reuse_freed_memory
from rearec.config import plain_number
from rearec.metrics import parse_metric, ranking_metrics
from rearec.model import ReaRec
from rearec.objectives import training_loss
from rearec.runs import (DATA_FILE, LOG_FILE, MODEL_FILE, RESUME, START, STATE_FILE, RunFolderError, RunLock, atomic_write,
                         check_start, naming_file, prepare_folder, read_json, remove_results, run_file, start_run,
                         write_text)
from rearec_kernels import packed
from rearec_kernels.bf16_products import cpu_bf16_products


#: Training options that must not change when a run is resumed (they change the result).
RESUME_FIXED = ("lr", "batch_size", "seed", "weight_decay", "metric", "bf16", "fused_ce")
#: The largest seed: each epoch seeds torch with seed * 100,003 + epoch + 1,000,003 * rank, which must fit in 63 bits.
MAX_SEED = 2 ** 40
#: What a training state file (STATE_FILE) holds; one without all of them cannot be resumed.
STATE_KEYS = ("model_config", "train_config", "model", "optimizer", "epoch", "best_score", "best_epoch", "best_state",
              "bad_epochs", "history")


class TrainingError(RunFolderError):
    """A run that cannot continue as asked (nothing to resume, other options than the saved run)."""


@dataclass
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10  # epochs without a better validation score before stopping
    metric: str = "ndcg@20"
    seed: int = 2025
    eval_batch_size: int = 512
    weight_decay: float = 0.0
    device: str = "cpu"
    progress: bool = True
    time_budget_s: Optional[float] = None  # seconds of training per fit(); None: no limit (see fit)
    fused_ce: bool = True  # item-table cross-entropies without their B x N logits (rearec_kernels)
    # Mixed precision: the forward under torch.autocast(bfloat16) (matrix products in bf16, fast on
    # CPUs with AVX512-BF16 or AMX and on GPUs, the item-table losses' products too); weights,
    # optimizer and the losses (their log-sum-exps, ERL's KL) stay fp32. Attention's softmax follows
    # autocast's rules: fp32 on CUDA, bf16 on CPU (CPU autocast has no fp32 rule for softmax).
    # On a CPU without native bf16 the products run as float32 ones (rearec_kernels.bf16_products).
    bf16: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):  # numpy numbers as Python ones (the config is saved as JSON)
            setattr(self, f.name, plain_number(getattr(self, f.name)))
        parse_metric(self.metric)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        budget = self.time_budget_s
        if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                                   or not budget >= 0):
            raise ValueError(f"TrainConfig.time_budget_s must be None or a number of seconds >= 0, got {budget!r}")
        for name in ("progress", "fused_ce", "bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"TrainConfig.device {self.device!r} is not a device name: use cpu, cuda or cuda:N") \
                from None
        for name, low in (("batch_size", 1), ("patience", 1), ("max_epochs", 1), ("eval_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be a whole number >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"the seed must be a whole number in 0..{MAX_SEED}, got {self.seed!r}")


@dataclass
class TrainResult:
    status: str  # "converged" (early stop), "max_epochs", "time_budget", "diverged"
    best_epoch: int
    best_score: float
    epochs_run: int
    history: List[dict] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0


def emulated_bf16_note(device: str) -> Optional[str]:
    """How bf16 training runs on ``device``, in one clause, where that is not torch's own bf16 products;
    None elsewhere.

    On a CPU without native bf16 dot products (AVX512-BF16 or AMX) torch's bf16 matrix products fall
    back to a generic loop, so the trainer runs them as float32 products of the bf16 operands
    (``rearec_kernels.bf16_products``: the same arithmetic). Measured on an AVX2-only CPU, one thread,
    one ML-1M PRL training step (``bench/bf16_cpu_step.py``): fp32 640 ms, torch's bf16 2448 ms, this 785 ms.
    """
    if torch.device(device).type != "cpu" or packed.native_bf16():
        return None
    return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 dot products "
            "(AVX512-BF16 or AMX): training runs its bf16 matrix products as float32 products of the bf16 "
            "operands (the same arithmetic; about float32's speed, where torch's own fallback is 3x slower)")


def divergence_advice(objective: str) -> str:
    if objective == "erl":
        return ("ERL subtracts an unbounded KL term that can run away: lower --kl-weight "
                "(e.g. 0.01) or --lr, or train with --objective prl")
    return "lower --lr, or raise --temperature"


class TrainingObjective(torch.nn.Module):
    """The model with its training loss as forward: the module DDP wraps (DDP syncs the gradients of
    what its forward computed, and the loss also uses the item table outside ``model.forward``)."""

    def __init__(self, model, fused_ce: bool = True, bf16: bool = False):
        super().__init__()
        self.model = model
        self.fused_ce = fused_ce
        self.bf16 = bf16

    def forward(self, histories, lengths, targets, epoch: int, users=None):
        # users (B,): each sample's user, read only by PRL's cl_mask_same_user option
        with torch.autocast(histories.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = training_loss(self.model, histories, lengths, targets, epoch, fused_ce=self.fused_ce, users=users)
        return loss.float()


def distributed_objective(objective: TrainingObjective, device) -> DistributedDataParallel:
    """``objective`` under DDP (broadcasts rank 0's weights, averages gradients). Base training, and
    any objective at K = 0, leaves the reasoning position embeddings without a gradient: DDP is told."""
    config = objective.model.config
    cuda = torch.device(device).type == "cuda"
    # forward_sync_buffers=False: the one buffer, item_features, is constant; DDP's constructor still makes
    # every rank's equal to rank 0's, where the default re-sent it before every forward (N x f floats)
    return distributed.guarded(
        DistributedDataParallel, objective, [torch.device(device)] if cuda else None,
        what="another process of this run failed before training started",
        forward_sync_buffers=False, find_unused_parameters=config.objective == "base" or config.reason_steps == 0)


class Trainer:
    def __init__(self, model, data, config: TrainConfig, out_dir: str, log: Callable[[str], None] = print):
        if getattr(data, "n_items", 0) > model.config.n_items:
            raise ValueError(f"the data has {data.n_items:,} items but the model's table {model.config.n_items:,} rows: "
                             f"build the model with n_items={data.n_items} (at least)")
        self.model = model.to(config.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.world > 1 and model.config.cl_mask_same_user:  # before the warm-up epochs, not after them
            raise ValueError("cl_mask_same_user runs in one process only; train without torchrun")
        self.objective = TrainingObjective(self.model, config.fused_ce, config.bf16)
        if self.world > 1:
            self.objective = distributed_objective(self.objective, config.device)
        self.data = data
        self.cfg = config
        self.out_dir = out_dir
        self.log = log
        prepare_folder(out_dir)
        # PyTorch's fused Adam (CPU and CUDA): the same update in one kernel over every parameter, where
        # the default loops over them (small preset at ML-1M's shape: 1.16 -> 0.28 ms per step).
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                          fused=torch.device(config.device).type in ("cpu", "cuda"))
        self.id_mapping = model.id_mapping  # the data's, or with cold items appended (item features)
        if self.id_mapping is None and getattr(data, "mapping", None) is not None:
            self.id_mapping = data.mapping.to_dict()
        self.epoch = 0  # the next epoch to run
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_state = None
        self.bad_epochs = 0
        self.history: List[dict] = []
        self.fitted = False  # after fit() the model holds the best weights, not the last epoch's
        # A fit() that ended in an exception (Ctrl-C, a full disk) may have left the weights, the optimizer and
        # the counters past what is saved (part of an epoch, an epoch whose save failed)
        self.interrupted = False

    # ------------------------------------------------------------------ persistence
    def _path(self, name: str) -> str:
        return run_file(self.out_dir, name)

    def _save_state(self, next_epoch: int) -> None:
        if self.rank != 0:
            return
        state = {
            "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": next_epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "history": json.dumps(self.history),
            "data_fingerprint": self._data_fingerprint(),
            "threads": torch.get_num_threads(),  # CPU reductions split by thread: the count moves the last bits
            "processes": self.world,  # each process draws its own dropout, noise and masks for its share
        }
        atomic_write(self._path(STATE_FILE), lambda tmp: torch.save(state, tmp))

    def _data_fingerprint(self):
        """The data's content fingerprint, or None for data without one (e.g. a test's own samples)."""
        return self.data.content_fingerprint() if hasattr(self.data, "content_fingerprint") else None

    def _save_best(self) -> None:
        if self.rank != 0:
            return
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(self.best_state)
        self.model.save(self._path(MODEL_FILE), id_mapping=self.id_mapping)
        self.model.load_state_dict(current)

    def resume(self) -> None:
        path = self._path(STATE_FILE)
        if not os.path.exists(path):
            raise TrainingError(f"nothing to resume: {path} does not exist (run without --resume to start)")
        try:
            with open(path, "rb"):  # unreadable (permissions, I/O): not "damaged", whose advice deletes the run
                pass
        except OSError as error:
            raise TrainingError(f"cannot read {path} ({error.strerror or type(error).__name__}): check its "
                                "permissions and the disk, then resume again") from None
        try:
            state = torch.load(path, map_location=self.cfg.device, weights_only=True)
            missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
            problem = "it lacks " + ", ".join(missing) if missing else None
        except Exception as error:  # truncated, empty, not a torch file (torch's own text would suggest
            problem = f"{type(error).__name__}"  # loading it unsafely: not repeated here)
        if not problem:
            problem = self._state_problem(state)
        if problem:
            raise TrainingError(f"{path} is damaged or not a training state ({problem}): restore it from a "
                                "copy, or start again with --overwrite")
        # A field added to the config since the state was saved reads as its default.
        now_config = self.model.config.to_dict()
        saved_config = state["model_config"]
        differ = [k for k, v in saved_config.items() if k not in now_config or now_config[k] != v]
        if differ:
            what = ", ".join(f"{k} {saved_config[k]!r} (now {now_config.get(k, 'unknown')!r})" for k in differ[:6])
            raise TrainingError(
                f"{path} was written for another model configuration or dataset: {what}; resume with the same "
                "options, or choose a new --out"
            )
        saved, now = state["train_config"], dataclasses.asdict(self.cfg)
        changed = [k for k in RESUME_FIXED if k in saved and saved[k] != now[k]]
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in changed)
            raise TrainingError(f"{self.out_dir} was trained with {what}; resume with the same options, "
                                "or choose a new --out")
        fingerprint, now_fingerprint = state.get("data_fingerprint"), self._data_fingerprint()
        if None not in (fingerprint, now_fingerprint) and fingerprint != now_fingerprint:
            raise TrainingError(f"{path} was trained on other data (its samples' fingerprint {fingerprint}, the "
                                f"data's now {now_fingerprint}): resume on the data it was trained on, or choose "
                                "a new --out")
        best, weights = state["best_state"], self.model.state_dict()
        if best is not None and not (best.keys() == weights.keys() and all(
                isinstance(best[k], torch.Tensor) and best[k].shape == weights[k].shape for k in weights)):
            raise TrainingError(f"{path} is damaged or not a training state (its best_state does not fit this "
                                "model): restore it from a copy, or start again with --overwrite")
        saved_features = state["model"].get("item_features") if isinstance(state["model"], dict) else None
        if isinstance(saved_features, torch.Tensor) and "item_features" in weights and not (
                saved_features.shape == weights["item_features"].shape
                and torch.equal(saved_features.cpu(), weights["item_features"].cpu())):
            # the features are no weights: loading the saved ones would train on, silently, with the old file's
            raise TrainingError(f"{path} was trained with other item features (the .item file, or the feature "
                                "matrix, changed since): resume with the features it was trained on, or choose a "
                                "new --out")
        before = copy.deepcopy(weights)
        try:
            key = "model"
            self.model.load_state_dict(state["model"])
            key = "optimizer"
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            self.model.load_state_dict(before)
            raise TrainingError(f"{path} is damaged or not a training state (its {key} does not fit this model: "
                                f"{type(error).__name__}): restore it from a copy, or start again with "
                                "--overwrite") from None
        self.epoch = state["epoch"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state, self.bad_epochs = state["best_state"], state["bad_epochs"]
        self.history = json.loads(state["history"])
        # Each rank read its own copy of the state: a stale copy on one machine would resume it elsewhere. The
        # epoch count and the history (every epoch's loss and seconds) tell the runs and their epochs apart.
        distributed.check_same_everywhere(f"{self.epoch}|{state['history']}", f"the training state resumed from {path}",
                                          "resume every process from the same run folder (one every machine "
                                          "shares, or identical copies)")
        if self.rank == 0:
            self._restore_files()
        self.log(f"resumed after epoch {self.epoch - 1} (best {self.cfg.metric} {self.best_score:.4f} at epoch {self.best_epoch})")
        threads, now_threads = state.get("threads"), torch.get_num_threads()
        if torch.device(self.cfg.device).type == "cpu" and isinstance(threads, int) and threads != now_threads:
            self.log(f"note: epoch {self.epoch - 1} was trained with {threads} CPU thread(s), this process has "
                     f"{now_threads}: sums split differently across threads, so the epochs from here may differ in "
                     f"the last bits from an uninterrupted run (--threads {threads}, or "
                     f"torch.set_num_threads({threads}), keeps them identical)")
        processes = state.get("processes")
        if isinstance(processes, int) and processes != self.world:
            self.log(f"note: epoch {self.epoch - 1} was trained by {processes} process(es), this run has {self.world}: "
                     "each process draws its own dropout, noise and masks for its share of every batch, so the "
                     "epochs from here take another path than an uninterrupted run (a valid one, not the same one; "
                     f"resume with {processes} process(es) to continue it exactly)")

    def _state_problem(self, state: dict):
        """What is wrong with a loaded state file's values ("its KEY ..."), or None: a file edited by
        hand must end in one line naming the key, not in a traceback from deep inside the resume."""
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for key in ("model_config", "train_config", "model", "optimizer"):
            if not isinstance(state[key], dict):
                return f"its {key} is a {type(state[key]).__name__}, not a dict"
        for key in ("epoch", "best_epoch", "bad_epochs"):
            if not whole(state[key]) or state[key] < (-1 if key == "best_epoch" else 0):
                return f"its {key} is {state[key]!r}, not a whole number"
        if not isinstance(state["best_score"], (int, float)) or isinstance(state["best_score"], bool):
            return f"its best_score is {state['best_score']!r}, not a number"
        if not (state["best_state"] is None or isinstance(state["best_state"], dict)):
            return f"its best_state is a {type(state['best_state']).__name__}, not a dict"
        try:
            history = json.loads(state["history"])
        except (TypeError, ValueError):
            history = None
        if not (isinstance(history, list) and all(isinstance(h, dict) and {"epoch", "loss", self.cfg.metric}
                                                  <= h.keys() for h in history)):
            return "its history is not a JSON list of epochs"
        return None

    def _restore_files(self) -> None:
        """Make the run's files agree with its state, as an interrupt may have left them: the model file
        holds the best weights (an interrupt between the state's save and the model's left it old or
        missing), and train.log has one line per epoch of the history (it is appended after the save)."""
        if self.best_state is not None:
            try:
                on_disk = ReaRec.load(self._path(MODEL_FILE)).state_dict()
                current = all(torch.equal(on_disk[k].cpu(), v.cpu()) for k, v in self.best_state.items())
            except (ValueError, KeyError, OSError):
                current = False
            if not current:
                self._save_best()
        path = self._path(LOG_FILE)
        # errors="replace": a damaged byte (a disk error) is no reason to refuse the resume; the lines are
        # rewritten from the state below when they do not match it
        text = open(path, encoding="utf-8", errors="replace").read() if os.path.isfile(path) else ""
        logged = text.splitlines()
        # An append cut short (a full disk) leaves a last line without its newline: the next line would join it
        if sum(line.startswith("epoch ") for line in logged) != len(self.history) or text[-1:] not in ("", "\n"):
            lines, best, best_epoch = [], -math.inf, -1
            for h in self.history:
                if h[self.cfg.metric] > best:
                    best, best_epoch = h[self.cfg.metric], h["epoch"]
                lines.append(self._epoch_line(h["epoch"], h["loss"], h[self.cfg.metric], best, best_epoch,
                                              h["seconds"], h.get("valid_seconds", 0.0)))
            lines += [line for line in logged if not line.startswith("epoch ")]  # messages (divergence)
            write_text(path, "".join(line + "\n" for line in lines))

    def _epoch_line(self, epoch, loss, score, best, best_epoch, seconds, valid_seconds) -> str:
        return (f"epoch {epoch:3d}  loss {loss:.4f}  valid {self.cfg.metric} {score:.4f}  best {best:.4f} @ "
                f"{best_epoch}  {seconds:.1f}s (validation {valid_seconds:.1f}s)")

    def _write_log(self, line: str) -> None:
        if self.rank != 0:
            return
        path = self._path(LOG_FILE)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as error:  # a full disk: file.write's error names no file
            raise naming_file(error, path) from None

    # ------------------------------------------------------------------ the loop
    def run_epoch(self, epoch: int):
        """Mean training loss of the epoch, or None when the loss stopped being finite. A subclass may extend
        it (the study's DiagnosticTrainer logs more per epoch after it)."""
        cfg = self.cfg
        # Dropout and PRL noise: reproducible per epoch, and each rank draws its own.
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * self.rank)
        order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        train = self.data.train
        self.model.train()
        total, count = 0.0, 0
        # One shuffled order for all ranks; this rank trains on its share of every global batch.
        shards = distributed.batch_shards(len(train), cfg.batch_size, order, self.rank, self.world)
        bar = tqdm(shards, total=math.ceil(len(train) / cfg.batch_size), desc=f"epoch {epoch}",
                   leave=False, disable=not cfg.progress or self.rank != 0, dynamic_ncols=True)
        for positions, global_size in bar:
            device = cfg.device
            users, histories, lengths, targets = train.batch(positions, self.model.config.max_len)
            # bf16 on a CPU without native bf16 dot products: the same arithmetic in float32's kernels, forward
            # and backward, 3x faster than torch's fallback there (rearec_kernels.bf16_products)
            with cpu_bf16_products(torch.device(device).type, cfg.bf16):
                loss = self.objective(histories.to(device), lengths.to(device), targets.to(device), epoch,
                                      users.to(device))
                # The sum over ranks decides, identically everywhere, whether the loss is still finite.
                batch_total = distributed.sum_across([loss.item() * len(targets)])[0]
                if not math.isfinite(batch_total):
                    bar.close()
                    return None
                self.optimizer.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients; weighting each rank's mean by its share of the batch
                # makes that average the gradient of the global batch mean (shards may differ by a row).
                (loss * (len(targets) * self.world / global_size)).backward()
            self.optimizer.step()
            total += batch_total
            count += global_size
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        # Each batch's loss is checked before its step, the last step's update here: a finite loss can have an
        # infinite gradient, and Adam then writes NaN into the weights, which validation would score and keep
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            return None
        return total / max(count, 1)

    def _validation_score(self) -> float:
        """``cfg.metric`` of the readout on the validation set; each rank ranks its share of the
        samples and the ranks are gathered, so every rank computes the same number."""
        cfg = self.cfg
        valid = self.data.valid
        lo, hi = distributed.shard_range(len(valid), self.rank, self.world)
        ranks = torch.zeros(0, dtype=torch.int64)
        if hi > lo:
            ranks = step_ranks(self.model, valid.subset(torch.arange(lo, hi)), batch_size=cfg.eval_batch_size,
                               all_steps=False)["readout"]
        ranks = distributed.gather_cat(ranks)
        return float(ranking_metrics(ranks, (int(cfg.metric.split("@")[1]),))[cfg.metric])

    def _collective(self, step: Callable, *args):
        """``step(*args)``; a collective that fails because another rank died becomes RankFailure,
        saying what is saved and how to go on."""
        done = self.epoch
        saved = f"epochs 0..{done - 1} are saved in {self.out_dir}" if done else "no epoch was saved"
        return distributed.guarded(step, *args, what=f"another process of this run failed; {saved}; start "
                                                      "the same torchrun command with --resume; cause")

    def fit(self) -> TrainResult:
        """Train until early stop, ``max_epochs``, divergence, or the time budget: with
        ``time_budget_s`` set, stop before an epoch that would end past it (judged by the last
        epoch's time; at least one epoch runs). A stop for time is an ordinary pause: resume goes on."""
        cfg, started = self.cfg, time.perf_counter()
        if self.interrupted:  # go on from the last saved epoch, as a resume in a new process would
            if self.epoch == 0:
                raise TrainingError("a fit() before this one was interrupted before any epoch was saved, and the "
                                    "model holds part of an epoch's training: build the model and Trainer again")
            self.resume()
        elif self.fitted and self.epoch > 0:  # a fit() before this one left the best weights in the model:
            # go on from the last epoch's, which the state file holds (as a resume would)
            state = torch.load(self._path(STATE_FILE), map_location=cfg.device, weights_only=True)
            self.model.load_state_dict(state["model"])
        reuse_freed_memory()  # a step's freed tensors stay in the heap for the next step (rearec.heap)
        self.interrupted = True  # until this fit() returns
        status, message = "max_epochs", ""
        if self.bad_epochs >= cfg.patience:  # resumed after an early stop: nothing is left to train
            status, message = "converged", f"early stop: no better {cfg.metric} for {cfg.patience} epochs"
        while status == "max_epochs" and self.epoch < cfg.max_epochs:
            epoch, t0 = self.epoch, time.perf_counter()
            loss = self._collective(self.run_epoch, epoch)
            if loss is None:
                status = "diverged"
                kept = (f"kept the best weights, from epoch {self.best_epoch} ({cfg.metric} {self.best_score:.4f})"
                        if self.best_state is not None else "no epoch had finished: no weights were kept")
                message = (f"training loss became NaN/Inf in epoch {epoch}; {kept}. "
                           f"{divergence_advice(self.model.config.objective)}")
                self._write_log(message)  # the caller reports result.message: printed once
                break
            return_freed_memory()
            t_valid = time.perf_counter()
            score = self._collective(self._validation_score)
            return_freed_memory()
            seconds, valid_seconds = time.perf_counter() - t0, time.perf_counter() - t_valid
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
                self.best_state = copy.deepcopy(self.model.state_dict())
            else:
                self.bad_epochs += 1
            # threads: a resumed run may have trained its epochs at several counts (its time and last bits differ)
            self.history.append({"epoch": epoch, "loss": loss, cfg.metric: score, "seconds": round(seconds, 3),
                                 "valid_seconds": round(valid_seconds, 3), "threads": torch.get_num_threads()})
            line = self._epoch_line(epoch, loss, score, self.best_score, self.best_epoch, seconds, valid_seconds)
            # Saved, then counted and logged: an interrupt during the state's save leaves the epoch before;
            # one after it, a model file or log line that resume writes back from the state.
            def save(epoch=epoch, improved=improved):  # rank 0 writes; every rank learns whether it could
                # The state first: it holds the best weights too, so a resume can rewrite a model file
                # that an interrupt kept from being written (see resume).
                self._save_state(next_epoch=epoch + 1)
                self.epoch = epoch + 1  # saved: an interrupt from here on says so, and resume mends the rest
                if improved:
                    self._save_best()

            saved = f"epochs 0..{epoch - 1} are saved" if epoch else "no epoch is saved"
            distributed.on_rank0(save, f"save epoch {epoch} in {self.out_dir} ({saved}; once that is fixed, "
                                       "start the same torchrun command with --resume)")
            self.epoch = epoch + 1
            self.log(line)
            self._write_log(line)
            if self.bad_epochs >= cfg.patience:
                status = "converged"
                message = f"early stop: no better {cfg.metric} for {cfg.patience} epochs"
                break
            spent = time.perf_counter() - started
            # Stop before an epoch that would not end within the budget, judged by this epoch's time.
            over_budget = (cfg.time_budget_s is not None and spent + (time.perf_counter() - t0) > cfg.time_budget_s
                           and self.epoch < cfg.max_epochs)
            # Clocks differ between ranks: stop when any rank would, so that all stop together.
            if self.world > 1:
                over_budget = self._collective(distributed.sum_across, [float(over_budget)])[0] > 0
            if over_budget:
                status = "time_budget"
                message = (f"time budget: stopped after {spent:.0f}s, before an epoch that would pass the "
                           f"{cfg.time_budget_s:g}s budget")
                break
        # A divergence stopped inside an epoch too: the optimizer had taken that epoch's steps before the loss
        # turned (the state file holds the epoch before), so a fit() after it goes on as after an interrupt
        self.fitted, self.interrupted = True, status == "diverged"
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(status, self.best_epoch, self.best_score, len(self.history), self.history,
                           message, time.perf_counter() - started)


def evaluate_sharded(model, samples, ks, progress: bool = False) -> dict:
    """:func:`rearec.evaluate.evaluate` (every step of ``model``) under torchrun: each rank ranks its
    contiguous share of ``samples`` and the ranks are gathered, so every rank returns the whole report
    (one process: the same as ``evaluate``). Every rank must call it."""
    lo, hi = distributed.shard_range(len(samples), distributed.rank(), distributed.world_size())
    names = ["readout"] + [f"r{s}" for s in range(model.config.reason_steps + 1)]
    was_training = model.training
    progress = progress and distributed.rank() == 0  # one bar, not one per rank
    try:
        ranks = (step_ranks(model, samples.subset(torch.arange(lo, hi)), progress=progress) if hi > lo else
                 {name: torch.zeros(0, dtype=torch.int64) for name in names})
    finally:
        model.train(was_training)
    gathered = {name: distributed.guarded(distributed.gather_cat, ranks[name],
                                          what="another process of this run failed during the test evaluation; "
                                               "training had finished and is saved")
                for name in names}
    return report_of_ranks(gathered, ks)


def epochs_saved(out_dir: str) -> int:
    """How many epochs the training state of run folder ``out_dir`` holds (the epoch a resume starts
    at); 0 when it has none or one that cannot be read. Exact where the log is not: the state is saved
    before the epoch's log line, which a kill between the two leaves out until the run resumes."""
    path = run_file(out_dir, STATE_FILE)
    if not os.path.isfile(path):
        return 0
    try:  # memory-mapped: the weights and optimizer moments are not read
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # truncated, empty, not a torch file, no "epoch"
        return 0
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else 0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train_run`; the message says what was saved and how to go on."""


def train_run(model_config, data, train_config: TrainConfig, out_dir: str, *, mode: str = START,
              data_spec=None, log: Callable[[str], None] = print, item_features=None, trainer_class=None,
              then: Optional[Callable[[ReaRec, TrainResult], None]] = None):
    """Train a fresh model into the run folder ``out_dir``; returns ``(model, result)``.

    ``mode`` is :data:`rearec.runs.START`, ``RESUME`` or ``OVERWRITE`` (see :func:`rearec.runs.start_run`).
    ``data_spec`` (a :class:`rearec.data.DataSpec`) is saved as the folder's ``DATA_FILE``; on resume it
    must equal the saved one. The initial weights come from ``train_config.seed``. ``item_features``
    (a :class:`rearec.data.item_features.DataItemFeatures`) gives the model its feature rows and the id
    mapping with the cold items. ``trainer_class``: a :class:`Trainer` subclass to use instead (e.g. the
    study's, which logs more per epoch). ``then(model, result)``: called before the folder's lock is released,
    for work that writes into the folder after training (the CLI's test metrics), so that no other process
    can start a run there in between.
    """

    lock = None

    def prepare_folder_files():
        nonlocal lock
        check_start(out_dir, mode)  # before the lock creates the folder: a refused run leaves none behind
        lock = RunLock(out_dir)  # held until this function returns: one training process per folder
        start_run(out_dir, mode)
        if data_spec is not None:
            data_path = run_file(out_dir, DATA_FILE)
            if mode == RESUME and os.path.isfile(data_path):
                # The log may have moved (its path is not compared): its content is, by the fingerprints.
                saved_options, options = DataSpec.read(data_path).options(), data_spec.options()
                differ = [name for name in options if saved_options.get(name) != options[name]]
                if differ:
                    what = ", ".join(f"{name} {saved_options.get(name)!r} (now {options[name]!r})" for name in differ)
                    raise TrainingError(f"{out_dir} was trained with other data options: {what} (see {data_path}); "
                                        "resume with the same data options, or choose a new --out")
                saved = read_json(data_path, "data file")
                now = {"fingerprint": data.mapping.fingerprint(), "content_fingerprint": data.content_fingerprint()}
                if any(saved.get(key) not in (None, value) for key, value in now.items()):
                    raise TrainingError(f"{data_spec.source} has changed since {out_dir} was trained on it (its "
                                        "users, items or interactions differ from the run's, see the fingerprints in "
                                        f"{data_path}): resume on the log as it was, or start a new --out")
            data_spec.write(data_path, data)

    try:
        distributed.on_rank0(prepare_folder_files, f"prepare the run folder {out_dir}")
        model, result = _train_in_folder(model_config, data, train_config, out_dir, mode, log, item_features,
                                         trainer_class)
        if then is not None:
            then(model, result)
        return model, result
    finally:
        if lock is not None:
            lock.release()


def _train_in_folder(model_config, data, train_config, out_dir, mode, log, item_features, trainer_class):
    """:func:`train_run` once its folder is ready (and locked)."""
    torch.manual_seed(train_config.seed)  # initial weights
    if item_features is None:
        model, mapping = ReaRec(model_config), data.mapping
    else:
        if model_config.cold_items != item_features.n_cold:
            raise ValueError(f"the item features hold {item_features.n_cold} cold items, but the model config says "
                             f"cold_items={model_config.cold_items}: set cold_items=item_features.n_cold")
        model, mapping = ReaRec(model_config, item_features=item_features.matrix), item_features.mapping
    model.id_mapping = mapping.to_dict()  # as in the saved checkpoint: raw ids for FastReaRec
    trainer = (trainer_class or Trainer)(model, data, train_config, out_dir, log=log)
    if mode == RESUME:
        trainer.resume()
        distributed.on_rank0(lambda: remove_results(out_dir), f"remove the results of the resumed run in {out_dir}")
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        done = trainer.epoch  # epochs finished and saved
        if done:
            raise TrainingInterrupted(f"training interrupted in epoch {done}; epochs 0..{done - 1} are saved in "
                                      f"{out_dir}; resume with --resume (and the same options)") from None
        raise TrainingInterrupted("training interrupted in epoch 0; no epoch had finished, nothing was saved; "
                                  "start again without --resume") from None
    return model, result
