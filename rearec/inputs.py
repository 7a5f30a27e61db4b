"""The rules around a ReaRec call, shared by the model (``ReaRec``) and the engine (``FastReaRec``).

Both answer ``recommend(histories, k, depth, readout, exclude_seen, lengths, raw_ids)`` and
``reasoning_states(...)``; this module is the one place that decides what those arguments may be and
what comes back:

* histories: a list of item-id lists (oldest first), or a right-padded integer tensor (B, T) with
  ``lengths`` (B,). Longer histories keep their newest ``max_len`` items. With a raw-id mapping
  (saved with the checkpoint) lists hold raw ids, matched as text through
  :class:`rearec.data.ids.IdMapping`; tensors always hold dense ids.
* every check is a ValueError naming the history row and the fix: an empty history, an id outside
  the item table, the model's padding item, a float or bool id, a bad ``k``, ``depth`` or ``readout``;
* exclusion: the padding item and, if asked (``exclude_seen=True``), every item of the user's history,
  also those older than the model's window, are never recommended, as one padded id tensor
  (:func:`exclusion_ids`) that every top-k path takes;
* results: :class:`Recommendations`, with raw ids too whenever the model has a mapping.

Use it through :class:`InputRules`, built once per model: ``rules = InputRules(config, id_mapping)``.
"""
from __future__ import annotations

import operator
import reprlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from rearec.config import CALL_READOUTS, ReaRecConfig, valid_halt_kl
from rearec.data.errors import DataError
from rearec.data.ids import IdMapping
from rearec_kernels.topk_reference import top_k_of_scores

Histories = Union[Sequence[Sequence], torch.Tensor]

__all__ = [
    "Histories", "InputRules", "Recommendations", "Request", "check_k", "check_readout", "exclusion_ids",
    "newest_items", "prepare_histories", "check_flag", "resolve_depth", "top_k_excluding",
]


@dataclass
class Recommendations:
    """Top-k items per user, best first.

    ``items`` (B, k) int64 dense ids and ``scores`` (B, k) float32; when fewer than k items remain
    (exclusions), a row ends in id -1 with score -inf. ``raw_items`` (B lists of k) holds the same
    items as raw ids when the model has a raw-id mapping (None in the -1 slots), else it is None.
    """

    items: torch.Tensor
    scores: torch.Tensor
    raw_items: Optional[list] = None


# ---------------------------------------------------------------------------------- scalar checks
def as_integer(value) -> Optional[int]:
    """``value`` as an int if it is an integer (Python, numpy or torch; never a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:  # a float, a string, a float tensor...
        return None


def check_flag(value, name: str, optional: bool = False) -> Optional[bool]:
    """``value`` as a bool: True or False (Python or numpy), or None when ``optional``; anything else is a
    one-line ValueError naming ``name`` (1 and "no" are not flags)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be {'None, ' if optional else ''}True or False, got {value!r}")


def resolve_depth(depth, reason_steps: int) -> int:
    """The number of reasoning steps to run: ``depth`` checked against 0..K, or K when None."""
    if depth is None:
        return reason_steps
    value = as_integer(depth)
    if value is None or not 0 <= value <= reason_steps:
        raise ValueError(f"depth must be an integer in 0..{reason_steps} (this model has K={reason_steps} "
                         f"reasoning steps), got {depth!r}")
    return value


def check_k(k) -> int:
    """``k`` as an int: a positive integer (a bool is not one; numpy and torch integers are)."""
    value = as_integer(k)
    if value is None or value < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return value


def check_readout(readout: Optional[str], default: str, halt_kl: Optional[float] = None) -> str:
    """``readout`` ("last", "mean", or "adaptive" when ``halt_kl`` is set), or ``default`` when None."""
    readout = default if readout is None else readout
    if readout not in CALL_READOUTS:
        raise ValueError(f"readout {readout!r} is unknown: use 'last', 'mean' or 'adaptive'")
    if readout == "adaptive" and halt_kl is not None and not valid_halt_kl(halt_kl):
        raise ValueError(f"config.halt_kl must be a finite number of nats > 0 for readout 'adaptive', got {halt_kl!r}")
    if readout == "adaptive" and halt_kl is None:
        raise ValueError("readout 'adaptive' stops each user at the first step whose item distribution moved less "
                         "than config.halt_kl nats; this model has none: set model.config.halt_kl (rearec study "
                         "fits it on validation: the kl-halt eps), or use 'last' or 'mean'")
    return readout


# ---------------------------------------------------------------------------------- histories
def _item_id(value, row: int) -> int:
    """One dense item id from a list: an int (or numpy/torch integer), never a float or bool."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"history {row} holds {bool(value)}, a bool: item ids are integers")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"history {row} holds item id {value!r}, not an integer: item ids are integers "
                         "(convert floats explicitly, or pass raw ids with a checkpoint that has an id mapping)"
                         ) from None


def _check_ids(padded: torch.Tensor, lengths: torch.Tensor, n_items: int, pad_item: Optional[int]) -> None:
    valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
    bad = valid & ((padded < 0) | (padded >= n_items))
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"history {b} holds item id {int(padded[b, t])}: ids must be in [0, {n_items})")
    if pad_item is not None:
        hits = valid & (padded == pad_item)
        if hits.any():
            b = int(hits.nonzero()[0, 0])
            raise ValueError(f"history {b} holds item id {pad_item}, which is the model's padding item (the "
                             "padding row of a public-code checkpoint), not a real item; remove it")


def _history_rows(histories, what: str):
    """(b, list) for each history of a list of histories, ``what`` naming the list's kind in the error;
    ValueError for a container, or a row, that is not a list (a str is one). A 1-D tensor or array row
    comes back as Python scalars (a raw id 103 must read as "103", not "tensor(103)")."""
    if isinstance(histories, (str, bytes)) or not hasattr(histories, "__iter__") or \
            (isinstance(histories, (np.ndarray, torch.Tensor)) and histories.ndim == 0):
        raise ValueError(f"histories must be {what}, got {type(histories).__name__}"
                         + (" of shape ()" if isinstance(histories, (np.ndarray, torch.Tensor)) else ""))
    if isinstance(histories, (set, frozenset)):  # rows would come back in an order no caller knows
        raise ValueError(f"histories is a {type(histories).__name__}, which has no order: pass a list with one "
                         "history per user, in the order the results should come back")
    if isinstance(histories, Mapping):  # iterating it gives its keys
        raise ValueError(f"histories is a {type(histories).__name__}: pass a list with one history per user "
                         "(e.g. list(d.values()), in the order the results should come back)")
    for b, history in enumerate(histories):
        if isinstance(history, (str, bytes)) or not hasattr(history, "__iter__") or \
                (isinstance(history, (np.ndarray, torch.Tensor)) and history.ndim != 1):
            raise ValueError(f"history {b} is not a list of item ids (got {type(history).__name__}): pass one "
                             "list per user")
        if isinstance(history, (set, frozenset, dict)):
            raise ValueError(f"history {b} is a {type(history).__name__}, which has no order: pass the items as a "
                             "list, oldest first")
        yield b, history.tolist() if isinstance(history, (np.ndarray, torch.Tensor)) else list(history)


def newest_items(padded: torch.Tensor, lengths: torch.Tensor, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded histories (B, T) with lengths (B,) -> each row's newest ``max_len`` items, (B,
    min(T, max_len)) right-padded, and their lengths."""
    if padded.shape[1] <= max_len:
        return padded, lengths
    start = (lengths - max_len).clamp(min=0)
    cols = start[:, None] + torch.arange(max_len, device=padded.device)
    return padded.gather(1, cols.clamp(max=padded.shape[1] - 1)), lengths.clamp(max=max_len)


def prepare_histories(histories: Histories, lengths=None, *, n_items: int, max_len: Optional[int],
                      pad_item: Optional[int] = None, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Validated dense histories -> (right-padded int64 (B, T ≤ max_len), lengths (B,)) on ``device``.

    ``histories``: a list of item-id lists (oldest first), or a right-padded integer tensor (B, T) with
    ``lengths`` (B,); padded slots may hold anything (they come back as 0). Raises ValueError naming
    the row for an empty history, an id outside [0, n_items), the padding item ``pad_item``, or an id
    that is not an integer (floats and bools are refused, not rounded). Longer histories keep their
    newest ``max_len`` items (every item when ``max_len`` is None); only the items kept are checked.
    """
    if isinstance(histories, torch.Tensor):
        if histories.dtype == torch.bool or histories.dtype.is_floating_point or histories.dtype.is_complex:
            raise ValueError(f"histories must be an integer tensor of item ids (got dtype {histories.dtype})")
        if histories.dim() != 2:
            raise ValueError(f"histories must be 2-D (batch, slots), got shape {tuple(histories.shape)}")
        if lengths is None:
            raise ValueError("a padded histories tensor needs lengths: pass lengths=(B,) valid items per row")
        if histories.shape[0] == 0:
            raise ValueError("no histories given")
        shape_error = f"lengths must be an integer tensor of shape ({histories.shape[0]},)"
        try:
            lengths = torch.as_tensor(lengths, device=histories.device)
        except (TypeError, ValueError, RuntimeError, OverflowError):  # a str, None, an int past int64...
            raise ValueError(f"{shape_error}, got {reprlib.repr(lengths)}") from None
        if (lengths.shape != (histories.shape[0],) or lengths.dtype == torch.bool
                or lengths.dtype.is_floating_point or lengths.dtype.is_complex):
            raise ValueError(shape_error)
        for b, n in enumerate(lengths.tolist()):
            if not 1 <= n <= histories.shape[1]:
                raise ValueError(f"history {b} has length {n}: lengths must be in 1..{histories.shape[1]} "
                                 "(empty histories cannot be scored)")
        padded, lens = histories.long(), lengths.long()
        if max_len is not None:
            padded, lens = newest_items(padded, lens, max_len)
    else:
        if lengths is not None:
            raise ValueError("lengths go with a padded histories tensor; lists carry their own lengths")
        rows = []
        for b, history in _history_rows(histories, "a list of item-id lists or a padded tensor"):
            if not history:
                raise ValueError(f"history {b} is empty: every user needs at least one item")
            if max_len is not None:
                history = history[-max_len:]
            if not all(type(x) is int for x in history):  # the common case stays one quick pass
                history = [_item_id(x, b) for x in history]
            rows.append(history)
        if not rows:
            raise ValueError("no histories given")
        lens = torch.tensor([len(r) for r in rows])
        padded = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
        for b, row in enumerate(rows):
            try:
                padded[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            except (RuntimeError, ValueError, OverflowError):  # an int beyond int64 (torch's error varies)
                raise ValueError(f"history {b} holds an item id outside [0, {n_items})") from None
    _check_ids(padded, lens, n_items, pad_item)
    valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < lens[:, None]
    padded = torch.where(valid, padded, torch.zeros_like(padded))
    return padded.to(device), lens.to(device)


# ---------------------------------------------------------------------------------- exclusion
def exclusion_ids(padded: torch.Tensor, lengths: torch.Tensor, pad_item: Optional[int], exclude_history: bool):
    """Item ids never to rank, as a padded (B, M) tensor with -1 in empty slots (the form ``fused_topk``
    and ``target_ranks`` take): the padding item if the table has one, and the history if asked. None
    when there is nothing to exclude."""
    columns = []
    if pad_item is not None:
        columns.append(torch.full((padded.shape[0], 1), pad_item, dtype=torch.long, device=padded.device))
    if exclude_history:
        valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
        columns.append(torch.where(valid, padded, torch.full_like(padded, -1)))
    return torch.cat(columns, dim=1) if columns else None


def top_k_excluding(scores: torch.Tensor, k: int, exclude: Optional[torch.Tensor]):
    """The plain-PyTorch top-k over a (B, N) score matrix with the same contract as ``fused_topk``
    (ties to the lower id, NaN below every number): ids in ``exclude`` (from :func:`exclusion_ids`)
    never appear; a row with fewer than k items left ends in id -1, score -inf. -> (scores, items),
    each (B, min(k, N)) (``recommend`` caps k first)."""
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if exclude is not None:
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(exclude)
        kept = exclude >= 0
        allowed[rows[kept], exclude[kept]] = False
    return top_k_of_scores(scores, min(k, scores.shape[1]), allowed)


# ---------------------------------------------------------------------------------- per model
@dataclass
class Request:
    """One checked ``recommend`` call: dense ``histories`` (B, T) int64 right-padded with ``lengths``
    (B,), the ``depth``, ``k`` (capped at the table size) and ``readout`` to use, and ``exclude``, the
    ids never to return (a padded (B, M) tensor, -1 in empty slots, or None)."""

    histories: torch.Tensor
    lengths: torch.Tensor
    depth: int
    k: int
    readout: str
    exclude: Optional[torch.Tensor]


class InputRules:
    """Every rule of one model's calls: its item table size, history length, padding item, K, default
    readout and optional raw-id mapping. Built once per model; immutable; safe to share.

    ``id_mapping``: None, an :class:`IdMapping`, or its saved dict form (``IdMapping.to_dict()``).
    """

    def __init__(self, config: ReaRecConfig, id_mapping: "IdMapping | dict | None" = None):
        self.n_items = config.n_items
        self.max_len = config.max_len
        self.pad_item = config.pad_item
        self.reason_steps = config.reason_steps
        self.default_readout = config.readout
        self.config = config  # read live: halt_kl may be set after the model is built
        if id_mapping is not None and not isinstance(id_mapping, IdMapping):  # its dict form, or not a mapping
            try:
                id_mapping = IdMapping.from_dict(id_mapping)
            except DataError as error:
                raise ValueError(f"the model's id mapping is unusable: {error}") from None
        if id_mapping is not None:
            real = self.n_items - (self.pad_item is not None)
            if id_mapping.n_items not in (self.n_items, real):
                raise ValueError(f"the id mapping has {id_mapping.n_items} items but the model's item table has "
                                 f"{self.n_items} rows: the mapping belongs to other data")
            # Without a raw id for the padding item, dense ids 0..N-2 are the real items only when the
            # padding item is the table's last row (as in public-code checkpoints).
            if id_mapping.n_items != self.n_items and self.pad_item != self.n_items - 1:
                raise ValueError(f"the id mapping has {id_mapping.n_items} items, one per item but the padding item, "
                                 f"which fits a padding item in the table's last row ({self.n_items - 1}); this "
                                 f"model's is {self.pad_item}: give the mapping a raw id for every row of the table")
        self.mapping: Optional[IdMapping] = id_mapping
        self._raw_items = id_mapping.items if id_mapping is not None else None  # dense id -> raw id

    def depth(self, depth: Optional[int] = None) -> int:
        """``depth`` checked against 0..K (K when None)."""
        return resolve_depth(depth, self.reason_steps)

    def readout(self, readout: Optional[str] = None) -> str:
        """``readout`` checked ("last", "mean" or "adaptive"; the model's own when None)."""
        return check_readout(readout, self.default_readout, self.config.halt_kl)

    def k(self, k) -> int:
        """``k`` checked, and capped at the item table's size."""
        return min(check_k(k), self.n_items)

    def uses_raw_ids(self, histories: Histories, raw_ids: Optional[bool]) -> bool:
        """Whether ``histories`` hold raw ids: ``raw_ids`` when given, else lists do when there is a
        mapping; tensors never do."""
        raw_ids = check_flag(raw_ids, "raw_ids", optional=True)
        if raw_ids is None:
            return self.mapping is not None and not isinstance(histories, torch.Tensor)
        if raw_ids and self.mapping is None:
            raise ValueError("raw_ids=True needs a checkpoint with a raw-id mapping; this model has none")
        if raw_ids and isinstance(histories, torch.Tensor):
            raise ValueError("raw ids come as lists of ids; a tensor holds dense ids (pass raw_ids=False)")
        return bool(raw_ids)

    def histories(self, histories: Histories, lengths=None, *, raw_ids: Optional[bool] = None,
                  device="cpu", whole: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validated dense (right-padded int64 (B, T ≤ max_len), lengths (B,)) on ``device``; raw ids
        (see :meth:`uses_raw_ids`) go through the id mapping first. ``whole``: every item of each
        history, not only its newest max_len."""
        max_len = None if whole else self.max_len
        if self.uses_raw_ids(histories, raw_ids):
            histories = self._to_dense(histories, max_len)
        return prepare_histories(histories, lengths, n_items=self.n_items, max_len=max_len,
                                 pad_item=self.pad_item, device=device)

    def _to_dense(self, histories, max_len: Optional[int]) -> list:
        """Raw-id lists -> dense-id lists (each cut to its newest ``max_len`` items unless None), in one lookup."""
        rows = [history if max_len is None else history[-max_len:]
                for _, history in _history_rows(histories, "a list of raw-id lists")]
        try:
            dense = self.mapping.items_to_dense([raw for row in rows for raw in row])
        except DataError:
            for b, row in enumerate(rows):  # find the first row at fault, and name it
                try:
                    self.mapping.items_to_dense(row)
                except DataError as error:
                    raise ValueError(f"history {b}: {error}") from None
            raise
        ends = np.cumsum([len(row) for row in rows])
        return [part.tolist() for part in np.split(dense, ends[:-1])] if rows else []

    def request(self, histories: Histories, *, k=10, depth: Optional[int] = None, readout: Optional[str] = None,
                exclude_seen: bool = False, lengths=None, raw_ids: Optional[bool] = None, device="cpu") -> Request:
        """Checks every argument of ``recommend`` (depth, k, readout, exclude_seen, then the histories)
        -> a :class:`Request`. ``exclude_seen`` excludes every item of each history, also those older
        than the model's window (the whole history is checked then)."""
        depth, k, readout = self.depth(depth), self.k(k), self.readout(readout)
        exclude_seen = check_flag(exclude_seen, "exclude_seen")
        whole, whole_lengths = self.histories(histories, lengths, raw_ids=raw_ids, device=device,
                                              whole=bool(exclude_seen))
        padded, lens = newest_items(whole, whole_lengths, self.max_len)
        return Request(padded, lens, depth, k, readout, self.exclusion(whole, whole_lengths, exclude_seen))

    def exclusion(self, padded: torch.Tensor, lengths: torch.Tensor, exclude_seen: bool) -> Optional[torch.Tensor]:
        """Ids never to recommend to each row (see :func:`exclusion_ids`)."""
        return exclusion_ids(padded, lengths, self.pad_item, exclude_seen)

    def recommendations(self, items: torch.Tensor, scores: torch.Tensor) -> Recommendations:
        """The result of ``recommend``: float32 scores, and raw ids when there is a mapping."""
        recs = Recommendations(items=items, scores=scores.float())
        if self._raw_items is not None:
            names = self._raw_items
            recs.raw_items = [[names[i] if 0 <= i < len(names) else None for i in row] for row in items.tolist()]
        return recs
