"""Train/validation/test splits into (history -> next item) samples.

Every interaction after a user's first one is a candidate sample: its *target* is that item and its
*history* is the user's earlier interactions (in the order of :mod:`rearec.data.ordering`). Two
splits:

* :func:`temporal_split` (the paper's protocol): a global split by two cut times ``t1 <= t2``. A
  sample is train / valid / test when its target's timestamp is ``< t1`` / in ``[t1, t2)`` /
  ``>= t2``. Histories reach back over the whole log (a test sample's history can include the
  user's training-period and validation-period items). Which validation and test samples are kept
  is the ``sample_filter`` rule (:data:`SAMPLE_FILTERS`): ``'window'`` (the default, the public
  code's protocol) keeps a sample when its target and every item of the newest ``filter_window``
  history items (the model's ``max_len`` window) were seen in training (as a target or in the
  history of a training sample); ``'strict'`` also requires every older history item to have been
  seen. The others are dropped and counted. Training samples only ever contain interactions from
  before ``t1``. Under ``'window'`` an older, unseen history item is stored as -1: it lies outside
  every batch's window (batches keep the newest ``max_len <= filter_window`` items).
* :func:`leave_one_out_split` (the SASRec / RecBole convention): per user, the last interaction is
  the test target, the second-to-last the validation target, and every earlier interaction that has
  at least one interaction before it is a training sample.

Samples are stored compactly: every user's dense item sequence once (a flat array plus offsets) and
per sample only (user, index of the target in the flat array); histories are cut out when batches
are built.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch

from rearec.data.errors import DataError
from rearec.data.filters import FilterReport
from rearec.data.ids import IdMapping
from rearec.data.ordering import first_appearance_codes, stable_argsort, time_order

__all__ = ["Batch", "SampleSet", "SplitData", "temporal_split", "leave_one_out_split", "SAMPLE_FILTERS",
           "DEFAULT_FILTER_WINDOW"]

#: Rules for dropping temporal validation/test samples with items unseen in training (see above).
SAMPLE_FILTERS = ("window", "strict")
#: The window of the ``'window'`` rule: the study's and the public code's max_len.
DEFAULT_FILTER_WINDOW = 50


class Batch(NamedTuple):
    """One batch of samples; unpacks as ``users, histories, lengths, targets``.

    ``histories[b, :lengths[b]]`` is sample b's history, oldest first (the newest ``max_len``
    items when it is longer); the remaining columns hold the pad value.
    """

    users: torch.Tensor      # (B,) int64 dense user ids
    histories: torch.Tensor  # (B, max_len) int64 dense item ids, right-padded
    lengths: torch.Tensor    # (B,) int64, 1 <= length <= max_len
    targets: torch.Tensor    # (B,) int64 dense item ids


class _Sequences:
    """All users' dense item sequences, stored once.

    ``items[offsets[u]:offsets[u+1]]`` is user u's sequence, oldest first; ``times`` holds the
    matching timestamps. Items outside the id mapping (temporal split: never seen in training) are
    stored as -1; no sample's history or target contains them.
    """

    def __init__(self, items: np.ndarray, offsets: np.ndarray, times: np.ndarray):
        self.items = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))
        self.offsets = torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.int64))
        self.times = np.ascontiguousarray(times, dtype=np.float64)

    def user_items(self, user: int) -> torch.Tensor:
        return self.items[int(self.offsets[user]):int(self.offsets[user + 1])]


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be a whole number >= 1, got {value!r}; fix {name}")
    return int(value)


class SampleSet:
    """A set of (user, history -> target) samples over shared per-user sequences.

    ``len(s)``, ``s.history(i)`` (list of dense item ids, oldest first, untruncated),
    ``s.target(i)``, ``s.user(i)``, ``s.users`` / ``s.targets`` / ``s.history_lengths`` (int64
    tensors over all samples), ``s.batches(...)`` for training and evaluation, ``s.tensors(max_len)``
    for everything at once.
    """

    def __init__(self, store: _Sequences, users: np.ndarray, target_index: np.ndarray,
                 name: str = "samples"):
        self._store = store
        self._users = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))
        self._target_index = torch.from_numpy(np.ascontiguousarray(target_index, dtype=np.int64))
        self.name = name

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"SampleSet({self.name!r}, {len(self):,} samples)"

    # per-sample access -------------------------------------------------------------------------
    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} {self.name} samples")
        return i % n

    def user(self, i: int) -> int:
        """Dense user id of sample i."""
        return int(self._users[self._check_index(i)])

    def target(self, i: int) -> int:
        """Dense item id of sample i's target."""
        return int(self._store.items[self._target_index[self._check_index(i)]])

    def history(self, i: int) -> list[int]:
        """Sample i's full history (dense item ids, oldest first, not truncated)."""
        i = self._check_index(i)
        start = int(self._store.offsets[self._users[i]])
        return self._store.items[start:int(self._target_index[i])].tolist()

    def target_time(self, i: int) -> float:
        """Timestamp of sample i's target interaction."""
        return float(self._store.times[int(self._target_index[self._check_index(i)])])

    # whole-set views ---------------------------------------------------------------------------
    @property
    def users(self) -> torch.Tensor:
        """(N,) int64 dense user ids (for grouping per-sample metrics by user)."""
        return self._users.clone()

    @property
    def targets(self) -> torch.Tensor:
        """(N,) int64 dense target item ids."""
        return self._store.items[self._target_index]

    @property
    def history_lengths(self) -> torch.Tensor:
        """(N,) int64 full (untruncated) history lengths."""
        return self._target_index - self._store.offsets[self._users]

    @property
    def target_times(self) -> np.ndarray:
        """(N,) float64 timestamps of the targets."""
        return self._store.times[self._target_index.numpy()]

    def subset(self, indices) -> "SampleSet":
        """A SampleSet of the given sample positions (sharing the sequences)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return SampleSet(self._store, self._users[idx].numpy(), self._target_index[idx].numpy(),
                         self.name)

    # batching ----------------------------------------------------------------------------------
    def batch(self, indices, max_len: int, pad_value: int = 0) -> Batch:
        """The samples at ``indices`` as one :class:`Batch` (histories truncated to the newest
        ``max_len`` items, right-padded with ``pad_value``)."""
        max_len = _check_positive_int(max_len, "max_len")
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        users = self._users[idx]
        tgt = self._target_index[idx]
        full = tgt - self._store.offsets[users]
        lengths = full.clamp(max=max_len)
        cols = torch.arange(max_len, dtype=torch.int64)
        mask = cols.unsqueeze(0) < lengths.unsqueeze(1)
        src = torch.where(mask, (tgt - lengths).unsqueeze(1) + cols.unsqueeze(0), 0)
        hist = torch.where(mask, self._store.items[src], pad_value)
        return Batch(users, hist, lengths, self._store.items[tgt])

    def batches(self, batch_size: int, max_len: int, shuffle: bool = False,
                generator: torch.Generator | None = None, *, drop_last: bool = False,
                pad_value: int = 0) -> Iterator[Batch]:
        """Yield :class:`Batch` es covering the set once.

        ``shuffle`` draws a permutation with ``torch.randperm(generator=generator)``, so a seeded
        generator gives the same batches every time; without shuffle samples come in set order.
        Tensors are on the CPU (move them to the model's device).
        """
        batch_size = _check_positive_int(batch_size, "batch_size")
        max_len = _check_positive_int(max_len, "max_len")
        n = len(self)
        if shuffle:
            device = generator.device if generator is not None else "cpu"
            order = torch.randperm(n, generator=generator, device=device).cpu()
        else:
            order = torch.arange(n, dtype=torch.int64)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start:start + batch_size], max_len, pad_value)

    def tensors(self, max_len: int, pad_value: int = 0) -> Batch:
        """All samples as one :class:`Batch`, in set order (e.g. for evaluation)."""
        return self.batch(torch.arange(len(self), dtype=torch.int64), max_len, pad_value)


@dataclass
class SplitData:
    """A split dataset: sample sets, id mapping, statistics.

    ``n_items`` is the size of the item vocabulary (every dense id in any sample is below it);
    ``stats`` is a JSON-serialisable dict of counts; ``warnings`` lists notable conditions (e.g. an
    empty validation set) for the caller to print.
    """

    train: SampleSet
    valid: SampleSet
    test: SampleSet
    mapping: IdMapping
    stats: dict
    split: str
    cut_times: tuple[float, float] | None = None
    filter_report: FilterReport | None = None
    warnings: list[str] = field(default_factory=list)
    _store: _Sequences | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return self.mapping.n_items

    @property
    def n_users(self) -> int:
        return self.mapping.n_users

    def content_fingerprint(self) -> str:
        """16 hex digits that change with anything the model would learn or be scored on: the id mapping,
        every user's item sequence, and which positions are train, valid and test samples. Computed once
        (a pass over every array: ~0.3 s at 20M interactions), however many callers ask."""
        if self._fingerprint is not None:
            return self._fingerprint
        digest = hashlib.sha256(self.mapping.fingerprint().encode())
        arrays = [self._store.items, self._store.offsets]
        for samples in (self.train, self.valid, self.test):
            arrays += [samples._users, samples._target_index]
        for array in arrays:
            digest.update(len(array).to_bytes(8, "little"))
            digest.update(array.numpy().tobytes())
        self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def user_history(self, raw_user) -> list[int]:
        """Dense item ids of all of the user's interactions up to the end of the data, oldest
        first (for recommending the user's next item).

        Items outside the vocabulary (temporal split: first seen after the training period and
        never in a training sample) are left out. DataError when the user is not in the data or
        has no interaction with a known item.
        """
        if not self.mapping.has_user(raw_user):
            raise DataError(f"user {str(raw_user)!r} is not in the data ({self.n_users:,} users; "
                            "filters may have removed it); pick a user id from the data")
        u = self.mapping.user_to_dense(raw_user)
        items = self._store.user_items(u)
        items = items[items >= 0].tolist()
        if not items:
            raise DataError(f"user {str(raw_user)!r} has no interaction with an item the model "
                            "knows (all appeared after the training period); pick another user")
        return items

    def summary(self) -> str:
        """A few printable lines: split, sizes, samples per set, drops."""
        s = self.stats
        lines = [f"split: {self.split}"
                 + (f" (cut times {_fmt_time(self.cut_times[0])}, "
                    f"{_fmt_time(self.cut_times[1])})" if self.cut_times else ""),
                 f"users: {s['users']:,}  items: {s['items']:,}  interactions: "
                 f"{s['interactions']:,}",
                 f"samples: train {s['train']:,}  valid {s['valid']:,}  test {s['test']:,}"]
        if self.split == "temporal":
            lines.append(f"dropped (unseen in training, rule {s['sample_filter']!r}): valid "
                         f"{s['valid_dropped']:,}  test {s['test_dropped']:,}; kept by the window rule "
                         f"valid {s['valid_kept_window']:,} test {s['test_kept_window']:,}, by the "
                         f"strict rule valid {s['valid_kept_strict']:,} test "
                         f"{s['test_kept_strict']:,}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _fmt_time(t: float) -> str:
    """A cut time, with its UTC date when it looks like Unix seconds."""
    text = f"{t:.12g}"
    if 1e8 <= t <= 1e10:
        text += " = " + pd.Timestamp(t, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
    return text


# ---------------------------------------------------------------------------------------------
# builders


@dataclass
class _Layout:
    """The log in per-user chronological order, with first-appearance codes."""

    user_codes: np.ndarray    # (n,) per flat position
    user_uniques: np.ndarray  # raw user ids by dense id
    item_codes: np.ndarray    # (n,) codes in order of first appearance in time
    item_uniques: np.ndarray
    times: np.ndarray         # (n,)
    offsets: np.ndarray       # (n_users + 1,)
    positions: np.ndarray     # (n,) index within the user's sequence


def _layout(df: pd.DataFrame) -> _Layout:
    for col in ("user", "item", "timestamp"):
        if col not in df.columns:
            raise DataError(f"the interaction frame has no {col!r} column; read the log with "
                            "rearec.data.read_interactions")
    if len(df) == 0:
        raise DataError("the interaction log is empty; nothing to split")
    # user_time_order's rule, computed here from one sort by time: users and items are numbered
    # by first appearance in time, then a stable sort by user groups the time order per user.
    ts_file = df["timestamp"].to_numpy(dtype=np.float64)
    if not np.isfinite(ts_file).all():
        raise DataError(f"{int((~np.isfinite(ts_file)).sum()):,} interactions have no finite timestamp (NaN or "
                        "inf): fix or drop them before splitting")
    by_time = time_order(df["timestamp"])
    users_in_time, user_uniques = first_appearance_codes(df["user"].array[by_time])
    item_codes_time, item_uniques = first_appearance_codes(df["item"].array[by_time])
    if (users_in_time < 0).any() or (item_codes_time < 0).any():  # factorize's code for a missing id
        raise DataError("some interactions have no user or item id (NaN/None): drop them first "
                        "(rearec.data.filter_interactions does)")
    for what, uniques in (("user", user_uniques), ("item", item_uniques)):
        as_text = pd.Index([str(u) for u in uniques]) if uniques.dtype == object else None
        if as_text is not None and not as_text.is_unique:  # raw ids are text: 1 and "1" would be one id twice
            dup = as_text[as_text.duplicated()][0]
            kinds = sorted({type(u).__name__ for u in uniques if str(u) == dup})
            raise DataError(f"{what} id {dup!r} appears as {' and '.join(kinds)} values, which are one id as text "
                            f"(raw ids are text): give the {what} column one type, e.g. df[{what!r}].astype(str)")
    times = ts_file[by_time]
    del by_time  # at tens of millions of rows every (n,) array is hundreds of MB: free them early
    group = stable_argsort(users_in_time)
    user_codes = users_in_time[group]
    del users_in_time
    item_codes = item_codes_time[group]
    del item_codes_time
    times = times[group]
    del group
    counts = np.bincount(user_codes, minlength=len(user_uniques))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    positions = np.arange(len(df), dtype=np.int64)
    positions -= offsets[user_codes]
    return _Layout(user_codes, user_uniques, item_codes, item_uniques, times, offsets, positions)


def _distinct_users(samples: SampleSet, n_users: int) -> int:
    """Users with at least one sample (a count per user: no sort of every sample's user id)."""
    return int(np.count_nonzero(np.bincount(samples.users.numpy(), minlength=n_users)))


def _sample_set(store, lay: _Layout, mask: np.ndarray, name: str) -> SampleSet:
    idx = np.flatnonzero(mask)
    return SampleSet(store, lay.user_codes[idx], idx, name)


def temporal_split(
    df: pd.DataFrame,
    *,
    cut_times: tuple[float, float] | None = None,
    quantiles: tuple[float, float] = (0.8, 0.9),
    min_eval_history: int = 1,
    sample_filter: str = "window",
    filter_window: int = DEFAULT_FILTER_WINDOW,
) -> SplitData:
    """The paper's global temporal split (see the module docstring).

    ``sample_filter``: ``'window'`` drops a validation/test sample when its target or one of its
    newest ``filter_window`` history items is unseen in training; ``'strict'`` when any item of
    its whole history is. ``stats`` counts the samples each rule would keep (``{set}_kept_window``,
    ``{set}_kept_strict``) whichever is used.

    ``cut_times=(t1, t2)`` in the log's timestamp unit, or else ``quantiles=(q1, q2)`` of all
    interaction timestamps (default 0.8 and 0.9). ``min_eval_history`` additionally drops
    validation/test samples whose history is shorter (the paper's own preprocessing used 5;
    default 1 keeps them all). Item ids cover the items seen in training only; user ids cover all
    users of the log.
    """
    lay = _layout(df)
    if cut_times is not None:
        try:
            t1, t2 = (float(t) for t in cut_times)
        except (TypeError, ValueError):
            raise DataError(f"cut_times must be two timestamps (t1, t2), got {cut_times!r}") \
                from None
        how = f"cut_times=({t1:g}, {t2:g})"
    else:
        try:
            q1, q2 = (float(q) for q in quantiles)
        except (TypeError, ValueError):
            raise DataError(f"quantiles must be two numbers (q1, q2), got {quantiles!r}") \
                from None
        if not 0.0 <= q1 <= q2 <= 1.0:
            raise DataError(f"quantiles must satisfy 0 <= q1 <= q2 <= 1, got ({q1:g}, {q2:g}); "
                            "e.g. quantiles=(0.8, 0.9)")
        t1, t2 = (float(t) for t in np.quantile(lay.times, [q1, q2]))
        how = f"quantiles=({q1:g}, {q2:g})"
    if not (np.isfinite(t1) and np.isfinite(t2)) or t1 > t2:
        raise DataError(f"cut times must be finite with t1 <= t2, got ({t1:g}, {t2:g}); "
                        "swap or fix cut_times")
    min_eval_history = _check_positive_int(min_eval_history, "min_eval_history")
    if sample_filter not in SAMPLE_FILTERS:
        raise DataError(f"unknown sample_filter {sample_filter!r}; use 'window' (the public protocol) "
                        "or 'strict'")
    filter_window = _check_positive_int(filter_window, "filter_window")

    part = (lay.times >= t1).astype(np.int8) + (lay.times >= t2)  # 0 train, 1 valid, 2 test period
    is_sample = lay.positions >= 1
    train_mask = is_sample & (part == 0)
    if not train_mask.any():
        same = (" (every timestamp is the same)"
                if len(lay.times) and lay.times.min() == lay.times.max() else "")
        raise DataError(f"no training sample: no user has two interactions before the first cut "
                        f"time {t1:g} ({how}){same}; split leave-one-out instead (--split loo, "
                        "split='loo'), or move the cuts later (cut_times=, quantiles=)")

    # Training-period interactions form a prefix of each user's sequence; that prefix is covered
    # by training samples (as targets or histories) when it holds at least two interactions.
    n_users = len(lay.user_uniques)
    pre = np.bincount(lay.user_codes[part == 0], minlength=n_users)
    seen_pos = (part == 0) & (pre[lay.user_codes] >= 2)
    seen_code = np.zeros(len(lay.item_uniques), dtype=bool)
    seen_code[lay.item_codes[seen_pos]] = True
    dense_of_code = np.where(seen_code, np.cumsum(seen_code) - 1, -1)
    items = dense_of_code[lay.item_codes]

    n = len(items)
    # A window longer than the log checks every history whole (as 'strict' does): capped at n, it is a
    # number the index arithmetic can hold (a --filter-window past int64 raised OverflowError).
    window = min(filter_window, n)
    # Positions fit int32 below 2^31 rows: half the bytes of these (n,) temporaries and their sums.
    index = np.int32 if n < 2 ** 31 - 1 - window else np.int64
    unseen = np.zeros(n + 1, dtype=index)
    np.cumsum(items < 0, dtype=index, out=unseen[1:])
    starts = lay.offsets.astype(index)[lay.user_codes]
    at = np.arange(n, dtype=index)
    clean_strict = (unseen[at + 1] - unseen[starts]) == 0  # target and whole history seen
    clean_window = (unseen[at + 1] - unseen[np.maximum(starts, at - window)]) == 0
    clean_upto = clean_window if sample_filter == "window" else clean_strict
    del unseen, starts, at  # (n,) each: not kept while the sample sets are built
    target_unseen = items < 0
    history_unseen = ~target_unseen & ~clean_upto
    short = lay.positions < min_eval_history

    store = _Sequences(items, lay.offsets, lay.times)
    stats = {"users": n_users, "items": int(seen_code.sum()), "interactions": n,
             "items_in_log": len(lay.item_uniques), "cut_times": [t1, t2], "cut_rule": how,
             "sample_filter": sample_filter, "filter_window": filter_window}
    sets = {"train": _sample_set(store, lay, train_mask, "train")}
    warnings = []
    for k, name in ((1, "valid"), (2, "test")):
        cand = is_sample & (part == k)
        keep = cand & clean_upto & ~short
        sets[name] = _sample_set(store, lay, keep, name)
        stats[f"{name}_candidates"] = int(cand.sum())
        stats[f"{name}_dropped_unseen_target"] = int((cand & target_unseen).sum())
        stats[f"{name}_dropped_unseen_history"] = int((cand & history_unseen).sum())
        stats[f"{name}_dropped_short_history"] = int((cand & clean_upto & short).sum())
        stats[f"{name}_dropped"] = int(cand.sum() - keep.sum())
        stats[f"{name}_kept_window"] = int((cand & clean_window & ~short).sum())
        stats[f"{name}_kept_strict"] = int((cand & clean_strict & ~short).sum())
        if not keep.any():
            warnings.append(f"the {name} set is empty ({int(cand.sum()):,} candidate samples, "
                            f"all dropped or none in its period); adjust the cut times")
    has_sample = np.zeros(n_users, dtype=bool)
    for name, s in sets.items():
        stats[name] = len(s)
        stats[f"{name}_users"] = _distinct_users(s, n_users)
        has_sample[s.users.numpy()] = True
    stats["users_without_samples"] = int(n_users - has_sample.sum())
    mapping = IdMapping(lay.user_uniques, lay.item_uniques[seen_code])
    return SplitData(sets["train"], sets["valid"], sets["test"], mapping, stats, "temporal",
                     (t1, t2), None, warnings, store)


def leave_one_out_split(df: pd.DataFrame) -> SplitData:
    """Leave-one-out per user (see the module docstring).

    A user with n interactions gives n-3 training samples, one validation and one test sample
    when n >= 3; with n == 2 only a test sample; with n == 1 none. Item ids cover every item of the
    log (RecBole convention), so a test target may be an item never seen in training.
    """
    lay = _layout(df)
    n_users = len(lay.user_uniques)
    length = np.diff(lay.offsets)[lay.user_codes]
    pos = lay.positions
    is_sample = pos >= 1
    test_mask = is_sample & (pos == length - 1)
    valid_mask = is_sample & (pos == length - 2)
    train_mask = is_sample & (pos <= length - 3)
    if not train_mask.any():
        raise DataError("leave-one-out found no training sample: it needs users with at least 4 "
                        "interactions (the last two are validation and test, the first is no target); "
                        "use more data or --min-history 4 (min_history=4)")
    store = _Sequences(lay.item_codes, lay.offsets, lay.times)
    sets = {name: _sample_set(store, lay, m, name)
            for name, m in (("train", train_mask), ("valid", valid_mask), ("test", test_mask))}
    user_len = np.diff(lay.offsets)
    stats = {"users": n_users, "items": len(lay.item_uniques), "interactions": len(pos),
             "users_with_1": int((user_len == 1).sum()), "users_with_2": int((user_len == 2).sum())}
    for name, s in sets.items():
        stats[name] = len(s)
        stats[f"{name}_users"] = _distinct_users(s, n_users)
    warnings = []
    short = stats["users_with_1"] + stats["users_with_2"]
    if short:
        warnings.append(f"{short:,} users have fewer than 3 interactions (no validation sample); "
                        "--min-history 3 (min_history=3) removes them")
    mapping = IdMapping(lay.user_uniques, lay.item_uniques)
    return SplitData(sets["train"], sets["valid"], sets["test"], mapping, stats, "loo", None,
                     None, warnings, store)
