"""Synthetic interaction logs of any size, with the skew of real ones, for scale tests and benchmarks.

``synthetic_log(n_rows, seed=0)`` returns a frame; ``write_synthetic_log(path, n_rows, seed=0)``
writes Parquet (``.parquet``) or CSV (``.csv``) block by block, so a 50M-row log never sits in
memory at once. Columns: ``user_id`` and ``item_id`` (int64 raw ids), ``timestamp`` (int64 Unix
seconds), ``rating`` (int8, 1..5). The same arguments give the same rows, byte for byte.

The shape of the data:

* history lengths are heavy-tailed: user u gets ``1 + share_u`` rows, shares proportional to a
  Pareto(``length_tail``) draw, so a few users have thousands of rows and most have a handful;
* items follow a Zipf law: the r-th most popular item is drawn with probability ∝ r^-``item_skew``
  (popularity rank and item id are unrelated: ids are a random permutation of the ranks);
* each user is active over a random sub-window of three years; interactions fall uniformly in it,
  and each user's rows are written oldest first (ties possible: timestamps are whole seconds);
* users are written in blocks of about a million rows; items may repeat within a user.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from rearec.data.errors import DataError
from rearec.runs import atomic_write

__all__ = ["synthetic_log", "write_synthetic_log", "SYNTHETIC_COLUMNS"]

SYNTHETIC_COLUMNS = ("user_id", "item_id", "timestamp", "rating")
_BLOCK_ROWS = 1 << 20  # rows per generated block (fixed: the output must not depend on it)
_START = 1_500_000_000  # 2017-07-14, Unix seconds
_WINDOW = 3 * 365 * 86_400


def _check(n_rows, n_users, n_items, item_skew, length_tail):
    for name, v in (("n_rows", n_rows), ("n_users", n_users), ("n_items", n_items)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DataError(f"{name} must be a whole number >= 1, got {v!r}")
    if n_users > n_rows:
        raise DataError(f"n_users ({n_users:,}) exceeds n_rows ({n_rows:,}): every user needs a row; "
                        "lower n_users")
    if not item_skew >= 0:
        raise DataError(f"item_skew must be >= 0 (0 = uniform items), got {item_skew!r}")
    if not length_tail > 0:
        raise DataError(f"length_tail must be > 0 (smaller = heavier tail), got {length_tail!r}")


def _history_lengths(rng, n_rows, n_users, length_tail) -> np.ndarray:
    """Per-user row counts, each >= 1, summing to exactly n_rows, Pareto-distributed shares."""
    weight = rng.pareto(length_tail, n_users)  # Lomax: many light users, a few very heavy ones
    extra = (n_rows - n_users) * weight / weight.sum()
    lengths = np.floor(extra).astype(np.int64)
    short = (n_rows - n_users) - int(lengths.sum())
    if short:  # hand the rounding remainder to the largest fractional parts
        lengths[np.argpartition(lengths - extra, short - 1)[:short]] += 1
    return lengths + 1


def _blocks(n_rows, n_users, n_items, seed, item_skew, length_tail) -> Iterator[pd.DataFrame]:
    _check(n_rows, n_users, n_items, item_skew, length_tail)
    root = np.random.SeedSequence(seed)
    setup_seq, *block_seqs = root.spawn(2 + n_rows // _BLOCK_ROWS)  # at most one block per _BLOCK_ROWS rows
    rng = np.random.default_rng(setup_seq)
    lengths = _history_lengths(rng, n_rows, n_users, length_tail)
    item_of_rank = rng.permutation(n_items).astype(np.int64) + 1
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -float(item_skew))
    cdf /= cdf[-1]
    activity = rng.uniform(0.05, 1.0, n_users) * _WINDOW  # seconds each user is active
    first = _START + rng.uniform(0.0, 1.0, n_users) * (_WINDOW - activity)
    ends = np.cumsum(lengths)
    # Block b holds the users whose last row falls in rows [b * _BLOCK_ROWS, (b + 1) * _BLOCK_ROWS).
    cuts = np.unique(np.searchsorted(ends, np.arange(_BLOCK_ROWS, n_rows, _BLOCK_ROWS), side="left") + 1)
    bounds = [0, *[int(c) for c in cuts if 0 < c < n_users], n_users]
    for b, (u0, u1) in enumerate(zip(bounds, bounds[1:])):
        brng = np.random.default_rng(block_seqs[b])
        users = np.repeat(np.arange(u0, u1, dtype=np.int64), lengths[u0:u1])
        n = len(users)
        rank = np.minimum(np.searchsorted(cdf, brng.random(n), side="right"), n_items - 1)
        times = np.floor(first[users] + brng.random(n) * activity[users]).astype(np.int64)
        order = np.lexsort((times, users))  # per user, oldest first
        yield pd.DataFrame({
            "user_id": users[order] + 1,
            "item_id": item_of_rank[rank[order]],
            "timestamp": times[order],
            "rating": brng.integers(1, 6, n, dtype=np.int8),
        })


def _defaults(n_rows, n_users, n_items):
    return (n_users if n_users is not None else max(1, n_rows // 20),
            n_items if n_items is not None else max(1, n_rows // 100))


def synthetic_log(n_rows: int, *, n_users: int | None = None, n_items: int | None = None, seed: int = 0,
                  item_skew: float = 1.1, length_tail: float = 1.5) -> pd.DataFrame:
    """A synthetic log of exactly ``n_rows`` interactions as one frame (see the module docstring).

    Defaults: ``n_users = n_rows // 20`` (mean history 20), ``n_items = n_rows // 100``.
    """
    n_users, n_items = _defaults(n_rows, n_users, n_items)
    return pd.concat(list(_blocks(n_rows, n_users, n_items, seed, item_skew, length_tail)),
                     ignore_index=True)


def write_synthetic_log(path: str | os.PathLike, n_rows: int, *, n_users: int | None = None,
                        n_items: int | None = None, seed: int = 0, item_skew: float = 1.1,
                        length_tail: float = 1.5) -> Path:
    """Write :func:`synthetic_log`'s rows to ``path`` (``.parquet``/``.pq`` or ``.csv``) one block at
    a time (about a million rows in memory at once); returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise DataError(f"{path}: write_synthetic_log writes .parquet or .csv; change the suffix")
    n_users, n_items = _defaults(n_rows, n_users, n_items)
    blocks = _blocks(n_rows, n_users, n_items, seed, item_skew, length_tail)
    def write(tmp: str) -> None:
        if suffix == ".csv":
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                for i, block in enumerate(blocks):
                    block.to_csv(f, index=False, header=i == 0)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        writer = None
        try:
            for block in blocks:
                table = pa.Table.from_pandas(block, preserve_index=False)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()

    # A temporary file of its own (several processes may write the same log at once), renamed onto path.
    atomic_write(str(path), write)
    return path
