"""Interaction filters: rating threshold, k-core, minimum history length.

:func:`filter_interactions` applies, in this order and each only when asked for:

0. always: drop rows whose user or item id is a literal ``NaN`` (a missing value written out as
   text; counted in the report), and count exact duplicate rows: ``dedupe=True`` drops them (one
   copy kept), otherwise the report says how many there are;
1. ``min_rating``: keep interactions with ``rating > min_rating`` (the paper keeps rating > 3 as
   positive feedback);
2. ``k_core``: repeatedly drop users with fewer than ``k_user`` interactions and items with fewer
   than ``k_item`` interactions until both conditions hold for everything left (iterate until
   stable);
3. ``min_history``: drop users with fewer than ``min_history`` interactions (applied once, after
   the k-core, so it can leave items under the k-core threshold again).

Rows keep their file order. The returned :class:`FilterReport` counts what every step removed and
prints as a small table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from rearec.data.errors import DataError

__all__ = ["FilterStep", "FilterReport", "filter_interactions", "NAN_IDS"]

#: Id texts read as a missing value written out (any letter case): such rows are dropped.
NAN_IDS = ("nan",)


@dataclass(frozen=True)
class FilterStep:
    """What one filter saw and left."""

    name: str
    rows_before: int
    users_before: int
    items_before: int
    rows_after: int
    users_after: int
    items_after: int

    @property
    def rows_removed(self) -> int:
        return self.rows_before - self.rows_after

    @property
    def users_removed(self) -> int:
        return self.users_before - self.users_after

    @property
    def items_removed(self) -> int:
        return self.items_before - self.items_after


@dataclass
class FilterReport:
    """Counts before filtering and after each filter; ``str(report)`` is a printable table."""

    rows: int
    users: int
    items: int
    steps: list[FilterStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows_after(self) -> int:
        return self.steps[-1].rows_after if self.steps else self.rows

    @property
    def users_after(self) -> int:
        return self.steps[-1].users_after if self.steps else self.users

    @property
    def items_after(self) -> int:
        return self.steps[-1].items_after if self.steps else self.items

    def to_dict(self) -> dict:
        """JSON-serialisable form (for logs and run records)."""
        return {
            "input": {"rows": self.rows, "users": self.users, "items": self.items},
            "steps": [dict(asdict(s), rows_removed=s.rows_removed, users_removed=s.users_removed,
                           items_removed=s.items_removed) for s in self.steps],
            "output": {"rows": self.rows_after, "users": self.users_after,
                       "items": self.items_after},
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        header = ("filter", "rows", "users", "items", "removed (rows/users/items)")
        lines = [("input", f"{self.rows:,}", f"{self.users:,}", f"{self.items:,}", "")]
        for s in self.steps:
            lines.append((s.name, f"{s.rows_after:,}", f"{s.users_after:,}", f"{s.items_after:,}",
                          f"{s.rows_removed:,} / {s.users_removed:,} / {s.items_removed:,}"))
        if not self.steps:
            lines.append(("(no filter)", "", "", "", ""))
        widths = [max(len(r[c]) for r in [header, *lines]) for c in range(5)]

        def fmt(r):
            return "  ".join([r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in (1, 2, 3)]
                             + [r[4]]).rstrip()

        return "\n".join([fmt(header), *map(fmt, lines), *self.notes])


def _is_nan_id(ids: pd.Series) -> np.ndarray:
    """Rows whose id is missing (NaN, None: a frame built in Python) or reads as a NaN (see NAN_IDS);
    for a Categorical only its categories are read, and code -1 (no category) is missing."""
    if isinstance(ids.dtype, pd.CategoricalDtype):
        names = pd.Series(ids.cat.categories.astype(str))
        bad = np.append(names.str.strip().str.lower().isin(NAN_IDS).to_numpy(), True)  # code -1: no id
        return bad[ids.cat.codes.to_numpy()]
    return ids.isna().to_numpy() | ids.astype(str).str.strip().str.lower().isin(NAN_IDS).to_numpy()


def duplicated_rows(df: pd.DataFrame) -> np.ndarray:
    """``df.duplicated(keep="first")`` as a bool array, at a fraction of its time and memory on large
    logs: one 64-bit hash per row finds the rows whose hash repeats, and only those are compared
    exactly (a hash collision costs a comparison, never a wrong answer)."""
    hashes = pd.util.hash_pandas_object(df, index=False).to_numpy()
    out = np.zeros(len(df), dtype=bool)
    # Hashes that occur twice or more, from one sort (at 20M rows 1.6 s, where a hash table of every
    # row took 3.6 s), then each row's hash looked up among those few.
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if repeated.size == 0:
        return out
    at = np.minimum(np.searchsorted(repeated, hashes), repeated.size - 1)
    maybe = repeated[at] == hashes
    out[maybe] = df[maybe].duplicated(keep="first").to_numpy()
    return out


def _counts(df: pd.DataFrame) -> tuple[int, int, int]:
    return len(df), int(df["user"].nunique()), int(df["item"].nunique())


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"{name} must be a non-negative whole number, got {value!r}; fix {name}")
    return int(value)


def _k_core_thresholds(k_core) -> tuple[int, int]:
    if isinstance(k_core, (tuple, list)):
        if len(k_core) != 2:
            raise DataError(f"k_core must be a number or a (users, items) pair, got {k_core!r}")
        return _check_int(k_core[0], "k_core"), _check_int(k_core[1], "k_core")
    k = _check_int(k_core, "k_core")
    return k, k


def filter_interactions(
    df: pd.DataFrame,
    *,
    min_rating: float | None = None,
    k_core: int | tuple[int, int] | None = None,
    min_history: int | None = None,
    dedupe: bool = False,
) -> tuple[pd.DataFrame, FilterReport]:
    """Filter an interaction frame (as returned by the readers).

    Rows with a literal ``NaN`` user or item id are always dropped (and counted); ``dedupe`` drops
    exact duplicate rows, which are otherwise kept and counted in ``report.notes``.
    ``min_rating``: keep ``rating > min_rating`` (needs a ``rating`` column). ``k_core``: an int for
    both sides or a ``(k_user, k_item)`` pair. ``min_history``: minimum interactions per user.
    ``None`` skips a filter. Returns the filtered frame (file order, fresh index) and the report.
    Raises DataError when a filter removes everything, naming the filter and what to relax.
    """
    report = FilterReport(*_counts(df))
    if len(df) == 0:
        raise DataError("the interaction log is empty; nothing to filter")

    def record(name, before, after):
        step = FilterStep(name, *_counts(before), *_counts(after))
        report.steps.append(step)
        return after

    nan_id = _is_nan_id(df["user"]) | _is_nan_id(df["item"])
    if nan_id.any():
        if nan_id.all():
            raise DataError("every row has a NaN user or item id; check the user and item columns")
        df = record("NaN user/item id", df, df[~nan_id])
    duplicated = duplicated_rows(df)
    if duplicated.any():
        if dedupe:
            df = record("exact duplicates", df, df[~duplicated])
        else:
            report.notes.append(f"{int(duplicated.sum()):,} rows are exact duplicates of an earlier row; "
                                "kept (pass --dedupe to drop them)")

    if min_rating is not None:
        try:
            t = float(min_rating)
        except (TypeError, ValueError):
            raise DataError(f"min_rating must be a number, got {min_rating!r}") from None
        if "rating" not in df.columns:
            raise DataError(f"min_rating={t:g} needs ratings but the data has no rating column; "
                            "pass --rating-col or drop the rating filter with --min-rating none "
                            "(rating_col= / min_rating=None in Python)")
        name = f"rating > {t:g}"
        kept = df[df["rating"].to_numpy() > t]
        if len(kept) == 0:
            raise DataError(f"filter '{name}' removed every interaction (highest rating is "
                            f"{df['rating'].max():g}); lower --min-rating or pass --min-rating none "
                            "(min_rating=None in Python)")
        df = record(name, df, kept)

    if k_core is not None:
        ku, ki = _k_core_thresholds(k_core)
        if ku > 1 or ki > 1:
            name = f"{ku}-core" if ku == ki else f"k-core (users>={ku}, items>={ki})"
            u = pd.factorize(df["user"])[0]
            i = pd.factorize(df["item"])[0]
            keep = np.ones(len(df), dtype=bool)
            while True:
                uc = np.bincount(u[keep], minlength=u.max() + 1)
                ic = np.bincount(i[keep], minlength=i.max() + 1)
                new = keep & (uc[u] >= ku) & (ic[i] >= ki)
                if new.sum() == keep.sum():
                    break
                keep = new
            if not keep.any():
                raise DataError(f"filter '{name}' removed every interaction (no group of users "
                                f"and items is that dense); lower --k-core (k_core=) or drop it")
            df = record(name, df, df[keep])

    if min_history is not None:
        n = _check_int(min_history, "min_history")
        if n > 1:
            name = f"history >= {n}"
            sizes = df.groupby("user", sort=False)["user"].transform("size").to_numpy()
            if not (sizes >= n).any():
                raise DataError(f"filter '{name}' removed every user (the longest history has "
                                f"{int(sizes.max())} interactions); lower --min-history (min_history=)")
            df = record(name, df, df[sizes >= n])

    return df.reset_index(drop=True), report
