"""ReaRecConfig: every hyperparameter of the model and its objectives, in one place.

Defaults follow the paper's public code (Tang et al., 2025, arXiv 2503.22675).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

OBJECTIVES = ("base", "erl", "prl")
BACKBONES = ("sasrec", "bert4rec")
READOUTS = ("last", "mean")  # a model's own readout (training and default evaluation)
#: Readouts a call may ask for: also "adaptive", per-user depth by KL halting at ``halt_kl``.
CALL_READOUTS = READOUTS + ("adaptive",)
ACTIVATIONS = ("gelu", "relu", "swish", "tanh", "sigmoid")
DEFAULT_REASON_STEPS = 2


def plain_number(value):
    """A numpy number as the Python int or float it holds, anything else (bools included) unchanged:
    configs take ``np.int64(n)`` where they take ``n``, and are written as JSON."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def valid_halt_kl(value) -> bool:
    """Whether ``value`` can be ``halt_kl``, the KL threshold of ``readout="adaptive"``: a finite number of
    nats > 0 (Python or numpy; a bool is not one). One rule for the config and for each call."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


@dataclass
class ReaRecConfig:
    """Sizes and training hyperparameters of a ReaRec model.

    ``reason_steps`` (K) defaults to 2, or 0 for the ``base`` objective (plain SASRec); ``readout``
    defaults to "mean" for ERL and "last" otherwise. ``pad_item`` is an item-table row that is never
    recommended (the padding row of checkpoints written by the public code); models trained here
    have none, padding is handled with lengths.

    ``backbone`` is the sequence encoder: "sasrec" (causal) or "bert4rec" (bidirectional over the
    history, which ends in a mask token; trained with a cloze loss, masking ``mask_ratio`` of the
    items). ``item_feature_dim`` (f) adds to each item's id embedding a learned projection of a fixed
    (n_items, f) feature matrix, given to the model (``ReaRec(config, item_features=...)``).
    ``cold_items``: the table's last rows are items with features but no training interactions (cold
    items). The training losses leave them out of their softmax, and their id embedding (and BERT4Rec
    output bias) start at zero and stay there, so that a cold item's vector is its projected features:
    as a never-seen negative it would otherwise only ever be pushed down.
    """

    n_items: int
    hidden_size: int = 256
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 300
    hidden_act: str = "gelu"
    dropout: float = 0.5
    input_dropout: float = 0.2
    layer_norm_eps: float = 1e-12
    # The LayerNorm applied to every step's input (history embeddings and reasoning tokens); None: the
    # layer_norm_eps above. The public code's ReaRec wrapper fixes it at 1e-12 whatever its
    # layer_norm_eps, and ReaRec.from_official_checkpoint sets that.
    input_norm_eps: Optional[float] = None
    init_std: float = 0.02
    max_len: int = 50
    reason_steps: Optional[int] = None
    temperature: float = 0.07
    objective: str = "prl"
    readout: Optional[str] = None
    # ERL
    kl_weight: float = 0.05
    # PRL
    pl_weight: float = 1.0
    temp_scale: float = 5.0
    noise_std: float = 0.01
    cl_weight: float = 1.0
    warmup_epochs: int = 2
    # PRL study options (defaults: the public code): InfoNCE similarity "dot" or "cosine", its own
    # temperature (None: ``temperature``), and the user's other samples masked out of its negatives
    cl_similarity: str = "dot"
    cl_temperature: Optional[float] = None
    cl_mask_same_user: bool = False
    # readout="adaptive" (per call): each user stops at the first step s >= 1 whose item distribution
    # moved less than halt_kl nats from step s-1, KL(p_s || p_{s-1}) < halt_kl (the study's kl-halt
    # selector fits it on validation); None: no adaptive readout
    halt_kl: Optional[float] = None
    pad_item: Optional[int] = None
    # Backbone and item features
    backbone: str = "sasrec"
    mask_ratio: float = 0.2
    item_feature_dim: Optional[int] = None
    cold_items: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy numbers (n_items = ids.max() + 1) as Python ones
            setattr(self, f.name, plain_number(getattr(self, f.name)))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
        if self.reason_steps is None:
            self.reason_steps = 0 if self.objective == "base" else DEFAULT_REASON_STEPS
        if self.readout is None:
            self.readout = "mean" if self.objective == "erl" else "last"
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        def whole(value) -> bool:  # an int, never a bool
            return isinstance(value, int) and not isinstance(value, bool)

        def real(value) -> bool:  # a finite number, never a bool
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("dropout", "input_dropout", "temperature", "layer_norm_eps", "init_std", "temp_scale", "kl_weight",
                     "pl_weight", "noise_std", "cl_weight", "mask_ratio"):
            need(real(getattr(self, name)), f"{name} must be a finite number (got {getattr(self, name)!r})")
        need(whole(self.warmup_epochs), f"warmup_epochs must be a whole number (got {self.warmup_epochs!r})")
        need(isinstance(self.cl_mask_same_user, bool), f"cl_mask_same_user must be True or False (got "
             f"{self.cl_mask_same_user!r})")

        need(self.backbone in BACKBONES, f"backbone {self.backbone!r} is unknown: use one of {', '.join(BACKBONES)}")
        need(0.0 < self.mask_ratio < 1.0, f"mask_ratio must be in (0, 1) (got {self.mask_ratio})")
        need(
            self.item_feature_dim is None or (whole(self.item_feature_dim) and self.item_feature_dim >= 1),
            f"item_feature_dim must be None or a positive integer (got {self.item_feature_dim!r})",
        )

        need(whole(self.cold_items) and self.cold_items >= 0, f"cold_items must be a whole number >= 0 (got "
             f"{self.cold_items!r})")
        need(self.cold_items == 0 or self.item_feature_dim is not None,
             f"cold_items={self.cold_items} needs item features (item_feature_dim): without them a cold item has "
             "no vector")
        for name in ("n_items", "hidden_size", "n_layers", "n_heads", "inner_size", "max_len"):
            value = getattr(self, name)
            need(whole(value) and value >= 1, f"{name} must be a positive integer (got {value!r})")
        need(
            self.hidden_size % self.n_heads == 0,
            f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})",
        )
        need(
            whole(self.reason_steps) and self.reason_steps >= 0,
            f"reason_steps must be an integer >= 0 (got {self.reason_steps!r})",
        )
        need(
            not (self.objective == "base" and self.reason_steps != 0),
            f"objective 'base' is the plain backbone and takes reason_steps=0 (got {self.reason_steps}); "
            "use objective 'erl' or 'prl' for reasoning steps",
        )
        need(self.readout in READOUTS, f"readout {self.readout!r} is unknown: use one of {', '.join(READOUTS)} (a "
             "call may also ask for 'adaptive', with halt_kl set)")
        need(self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is unknown: use one of {', '.join(ACTIVATIONS)}")
        for name in ("dropout", "input_dropout"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0, f"{name} must be in [0, 1) (got {value})")
        for name in ("temperature", "layer_norm_eps", "init_std", "temp_scale"):
            value = getattr(self, name)
            need(value > 0, f"{name} must be > 0 (got {value})")
        for name in ("kl_weight", "pl_weight", "noise_std", "cl_weight", "warmup_epochs"):
            value = getattr(self, name)
            need(value >= 0, f"{name} must be >= 0 (got {value})")
        need(self.input_norm_eps is None or (real(self.input_norm_eps) and self.input_norm_eps > 0),
             f"input_norm_eps must be None or > 0, a finite number (got {self.input_norm_eps!r})")
        need(self.cl_similarity in ("dot", "cosine"), f"cl_similarity must be 'dot' or 'cosine' (got {self.cl_similarity!r})")
        need(self.halt_kl is None or valid_halt_kl(self.halt_kl),
             f"halt_kl must be None or a finite number of nats > 0 (got {self.halt_kl!r})")
        need(self.cl_temperature is None or (real(self.cl_temperature) and self.cl_temperature > 0),
             f"cl_temperature must be None or > 0, a finite number (got {self.cl_temperature!r})")
        need(self.cold_items < self.n_items, f"cold_items ({self.cold_items}) must leave at least one of the "
             f"{self.n_items} items with training interactions")
        need(
            self.pad_item is None or (whole(self.pad_item) and 0 <= self.pad_item < self.n_items),
            f"pad_item must be None or an item id in [0, {self.n_items}) (got {self.pad_item})",
        )
        need(
            not (self.backbone == "bert4rec" and self.max_len < 2),
            f"backbone 'bert4rec' needs max_len >= 2 (one slot holds the mask token; got {self.max_len})",
        )

    @property
    def input_eps(self) -> float:
        """The eps of the input LayerNorm: ``input_norm_eps``, or ``layer_norm_eps`` when that is None."""
        return self.layer_norm_eps if self.input_norm_eps is None else self.input_norm_eps

    @property
    def trained_items(self) -> int:
        """The rows the training losses score: the item table without its ``cold_items`` last rows."""
        return self.n_items - self.cold_items

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ReaRecConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}: this checkpoint was written by another version")
        return cls(**values)


#: Fields a model-size preset sets.
SIZE_FIELDS = ("hidden_size", "n_layers", "n_heads", "inner_size", "max_len")

#: Model sizes by name, for ``--preset`` (options given beside a preset override its values).
#: "paper" is the public code's default size (the ReaRecConfig defaults above).
PRESETS = {
    "quickstart": dict(hidden_size=32, n_layers=2, n_heads=2, inner_size=64, max_len=20),
    "small": dict(hidden_size=64, n_layers=2, n_heads=2, inner_size=256, max_len=50),
    "study": dict(hidden_size=64, n_layers=2, n_heads=2, inner_size=128, max_len=50),
    "paper": {f.name: f.default for f in dataclasses.fields(ReaRecConfig) if f.name in SIZE_FIELDS},
}
#: The preset ``rearec train`` uses when none is given.
DEFAULT_PRESET = "small"
