"""Raw user/item ids <-> dense integer ids.

Dense item ids are ``0 .. n_items-1`` and dense user ids ``0 .. n_users-1``; no id is reserved for
padding (padded positions are marked by sequence lengths instead). Raw ids are strings. The
mapping is saved with model checkpoints (:meth:`IdMapping.to_dict`) so that recommendations come
back as raw ids, and :meth:`IdMapping.fingerprint` tells whether a checkpoint was trained on the
same data.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from rearec.data.errors import DataError

__all__ = ["IdMapping"]

_FORMAT = "rearec.IdMapping/1"


def _as_index(values: Sequence[str], what: str, source: str) -> pd.Index:
    idx = pd.Index(np.asarray([str(v) for v in values], dtype=object), dtype=object)
    if not idx.is_unique:
        dup = idx[idx.duplicated()][0]
        raise DataError(f"{source}: {what} id {dup!r} appears twice; the id mapping is corrupt, "
                        "rebuild it from the data")
    return idx


def _dense_array(dense) -> np.ndarray:
    """Dense ids as an int64 array; a DataError for floats or bools (1.7 must not become id 1)."""
    if hasattr(dense, "detach"):  # torch tensor
        dense = dense.detach().cpu().numpy()
    values = np.asarray(dense)
    if values.dtype.kind not in "iu" and values.size:
        if values.dtype == object and all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
                                          for v in values.reshape(-1)):
            return values.astype(np.int64).reshape(-1)
        raise DataError(f"dense ids must be integers, got {values.dtype} values (e.g. {values.reshape(-1)[:3].tolist()})")
    return values.astype(np.int64).reshape(-1)


def _raw_list(raws, what: str) -> list:
    """The raw ids of an iterable; a single str (or bytes) is refused, not split into characters."""
    if isinstance(raws, (str, bytes)):
        raise DataError(f"{what}s_to_dense takes a list of raw ids, got the single id {raws!r}: pass [{raws!r}], "
                        f"or use {what}_to_dense")
    return list(raws)


class IdMapping:
    """Bidirectional map between raw (string) and dense (int) ids for users and items.

    ``IdMapping(users, items)``: the position of a raw id in its sequence is its dense id.
    Raw ids passed to the ``*_to_dense`` methods may be str or int (ints are matched as text).
    """

    def __init__(self, users: Iterable, items: Iterable, *, _source: str = "IdMapping"):
        self._users = _as_index(list(users), "user", _source)
        self._items = _as_index(list(items), "item", _source)
        self._fingerprint: str | None = None

    # sizes and listings -----------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return len(self._users)

    @property
    def n_items(self) -> int:
        return len(self._items)

    @property
    def users(self) -> list[str]:
        """Raw user ids in dense order (a copy)."""
        return self._users.tolist()

    @property
    def items(self) -> list[str]:
        """Raw item ids in dense order (a copy)."""
        return self._items.tolist()

    def has_user(self, raw) -> bool:
        return str(raw) in self._users

    def has_item(self, raw) -> bool:
        return str(raw) in self._items

    # raw -> dense ------------------------------------------------------------------------------
    def _lookup(self, index: pd.Index, raws, what: str, n: int) -> np.ndarray:
        keys = [str(r) for r in raws]
        dense = index.get_indexer(keys).astype(np.int64) if keys else np.zeros(0, np.int64)
        missing = np.flatnonzero(dense < 0)
        if len(missing):
            first = keys[missing[0]]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"{what} {first!r}{more} is not in the data ({n:,} {what}s known); check the id "
                "- ids are matched as text, and filters may have removed it")
        return dense

    def user_to_dense(self, raw) -> int:
        return int(self._lookup(self._users, [raw], "user", self.n_users)[0])

    def item_to_dense(self, raw) -> int:
        return int(self._lookup(self._items, [raw], "item", self.n_items)[0])

    def users_to_dense(self, raws: Iterable) -> np.ndarray:
        """int64 array of dense user ids; DataError naming the first unknown raw id."""
        return self._lookup(self._users, _raw_list(raws, "user"), "user", self.n_users)

    def items_to_dense(self, raws: Iterable) -> np.ndarray:
        """int64 array of dense item ids; DataError naming the first unknown raw id."""
        return self._lookup(self._items, _raw_list(raws, "item"), "item", self.n_items)

    # dense -> raw ------------------------------------------------------------------------------
    @staticmethod
    def _check_range(dense: np.ndarray, n: int, what: str) -> None:
        bad = (dense < 0) | (dense >= n)
        if bad.any():
            raise IndexError(f"dense {what} id {int(dense[bad][0])} out of range 0..{n - 1}")

    def user_to_raw(self, dense: int) -> str:
        return self.users_to_raw([dense])[0]

    def item_to_raw(self, dense: int) -> str:
        return self.items_to_raw([dense])[0]

    def users_to_raw(self, dense) -> list[str]:
        """Raw ids for dense user ids (list, array or tensor); IndexError when out of range."""
        d = _dense_array(dense)
        self._check_range(d, self.n_users, "user")
        return self._users[d].tolist()

    def items_to_raw(self, dense) -> list[str]:
        """Raw ids for dense item ids (list, array or tensor); IndexError when out of range."""
        d = _dense_array(dense)
        self._check_range(d, self.n_items, "item")
        return self._items[d].tolist()

    # persistence and identity -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable form: ``{"format", "users", "items", "fingerprint"}``."""
        return {"format": _FORMAT, "users": self.users, "items": self.items,
                "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, d: dict) -> "IdMapping":
        """Inverse of :meth:`to_dict`; DataError when the dict is not a saved mapping."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT or not isinstance(
                d.get("users"), list) or not isinstance(d.get("items"), list):
            raise DataError("not a saved rearec id mapping (expected format "
                            f"{_FORMAT!r}); the checkpoint is from another tool or corrupt")
        m = cls(d["users"], d["items"], _source="saved id mapping")
        saved = d.get("fingerprint")
        if saved is not None and saved != m.fingerprint():
            raise DataError("saved id mapping does not match its fingerprint; the checkpoint is "
                            "corrupt, retrain or restore it")
        return m

    def fingerprint(self) -> str:
        """16 hex digits identifying the exact users and items and their dense order."""
        if self._fingerprint is None:
            blob = json.dumps([self.users, self.items], ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8")
            self._fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        return self._fingerprint

    def check_same(self, other: "IdMapping", what: str = "the checkpoint") -> None:
        """DataError unless ``other`` is the same mapping (same data, same dense order)."""
        if self != other:
            raise DataError(
                f"{what} was trained on other data (id mapping {other.fingerprint()}: "
                f"{other.n_users:,} users, {other.n_items:,} items; this data "
                f"{self.fingerprint()}: {self.n_users:,} users, {self.n_items:,} items); use the "
                "same data file and filter/split options as for training")

    def __eq__(self, other) -> bool:
        if not isinstance(other, IdMapping):
            return NotImplemented
        return (self.n_users == other.n_users and self.n_items == other.n_items
                and self._users.equals(other._users) and self._items.equals(other._items))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return (f"IdMapping(n_users={self.n_users}, n_items={self.n_items}, "
                f"fingerprint={self.fingerprint()})")
