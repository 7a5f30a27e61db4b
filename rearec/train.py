"""Training: Adam, early stopping on validation NDCG@20 with the best weights restored (the paper's
protocol), deterministic for a seed, resumable, and safe against a diverging objective.

Files in the output folder, each written atomically (temp file + rename):
  model.safetensors  the best model so far (our checkpoint format, raw-id mapping included)
  train_state.pt     everything needed to resume after the last finished epoch
  train.log          one line per epoch
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from tqdm.auto import tqdm

from rearec.evaluate import validation_score
from rearec.objectives import training_loss

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.safetensors"
LOG_FILE = "train.log"


class TrainingError(RuntimeError):
    """A problem the user can fix (bad output folder, mismatched resume state)."""


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


@dataclass
class TrainResult:
    status: str  # "converged" (early stop), "max_epochs", "diverged"
    best_epoch: int
    best_score: float
    epochs_run: int
    history: List[dict] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    # torch.save names its zip records after the file's stem, so the temp name must not start with a dot.
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def prepare_output_folder(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe-", delete=True)
        probe.close()
    except OSError as error:
        raise TrainingError(
            f"cannot write to output folder {out_dir} ({error.strerror}): choose another with --out"
        ) from None


def divergence_advice(objective: str) -> str:
    if objective == "erl":
        return ("ERL subtracts an unbounded KL term that can run away: lower --kl-weight "
                "(e.g. 0.01) or --lr, or train with --objective prl")
    return "lower --lr, or raise --temperature"


class Trainer:
    def __init__(self, model, data, config: TrainConfig, out_dir: str, log: Callable[[str], None] = print):
        self.model = model.to(config.device)
        self.data = data
        self.cfg = config
        self.out_dir = out_dir
        self.log = log
        prepare_output_folder(out_dir)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.id_mapping = data.mapping.to_dict() if getattr(data, "mapping", None) is not None else None
        self.epoch = 0  # the next epoch to run
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_state = None
        self.bad_epochs = 0
        self.history: List[dict] = []

    # ------------------------------------------------------------------ persistence
    def _path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _save_state(self) -> None:
        state = {
            "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "history": json.dumps(self.history),
        }
        _atomic_write(self._path(STATE_FILE), lambda tmp: torch.save(state, tmp))

    def _save_best(self) -> None:
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(self.best_state)
        _atomic_write(self._path(MODEL_FILE), lambda tmp: self.model.save(tmp, id_mapping=self.id_mapping))
        self.model.load_state_dict(current)

    def resume(self) -> None:
        path = self._path(STATE_FILE)
        if not os.path.exists(path):
            raise TrainingError(f"nothing to resume: {path} does not exist (run without --resume to start)")
        state = torch.load(path, map_location=self.cfg.device, weights_only=True)
        if state["model_config"] != self.model.config.to_dict():
            raise TrainingError(
                f"{path} was written for another model configuration or dataset: resume with the same "
                "options, or choose a new --out"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state, self.bad_epochs = state["best_state"], state["bad_epochs"]
        self.history = json.loads(state["history"])
        self.log(f"resumed after epoch {self.epoch - 1} (best {self.cfg.metric} {self.best_score:.4f} at epoch {self.best_epoch})")

    def _write_log(self, line: str) -> None:
        with open(self._path(LOG_FILE), "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ the loop
    def _run_epoch(self, epoch: int):
        """Mean training loss of the epoch, or None when the loss stopped being finite."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout and PRL noise: reproducible per epoch
        order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        train = self.data.train
        self.model.train()
        total, count = 0.0, 0
        batches = train.batches(cfg.batch_size, self.model.config.max_len, shuffle=True, generator=order)
        bar = tqdm(batches, total=math.ceil(len(train) / cfg.batch_size), desc=f"epoch {epoch}",
                   leave=False, disable=not cfg.progress, dynamic_ncols=True)
        for _, histories, lengths, targets in bar:
            device = cfg.device
            loss = training_loss(self.model, histories.to(device), lengths.to(device), targets.to(device), epoch)
            if not torch.isfinite(loss):
                bar.close()
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(targets)
            count += len(targets)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        return total / max(count, 1)

    def fit(self) -> TrainResult:
        cfg, started = self.cfg, time.perf_counter()
        status, message = "max_epochs", ""
        if self.bad_epochs >= cfg.patience:  # resumed after an early stop: nothing is left to train
            status, message = "converged", f"early stop: no better {cfg.metric} for {cfg.patience} epochs"
        while status == "max_epochs" and self.epoch < cfg.max_epochs:
            epoch, t0 = self.epoch, time.perf_counter()
            loss = self._run_epoch(epoch)
            if loss is None:
                status = "diverged"
                kept = (f"kept the best weights, from epoch {self.best_epoch} ({cfg.metric} {self.best_score:.4f})"
                        if self.best_state is not None else "no epoch had finished: no weights were kept")
                message = (f"training loss became NaN/Inf in epoch {epoch}; {kept}. "
                           f"{divergence_advice(self.model.config.objective)}")
                self.log(message)
                self._write_log(message)
                break
            score = validation_score(self.model, self.data.valid, cfg.metric, cfg.eval_batch_size)
            seconds = time.perf_counter() - t0
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
                self.best_state = copy.deepcopy(self.model.state_dict())
            else:
                self.bad_epochs += 1
            self.history.append({"epoch": epoch, "loss": loss, cfg.metric: score, "seconds": round(seconds, 3)})
            line = (f"epoch {epoch:3d}  loss {loss:.4f}  valid {cfg.metric} {score:.4f}  "
                    f"best {self.best_score:.4f} @ {self.best_epoch}  {seconds:.1f}s")
            self.log(line)
            self._write_log(line)
            self.epoch = epoch + 1
            if improved:
                self._save_best()
            self._save_state()
            if self.bad_epochs >= cfg.patience:
                status = "converged"
                message = f"early stop: no better {cfg.metric} for {cfg.patience} epochs"
                break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(status, self.best_epoch, self.best_score, len(self.history), self.history,
                           message, time.perf_counter() - started)
