"""Interaction data for ReaRec: reading, filtering, ordering, id mapping and splitting.

Typical use::

    from rearec.data import load_dataset
    data = load_dataset("ml-100k")            # paper preset: rating > 3, temporal split 0.8/0.9
    print(data.filter_report); print(data.summary())
    for users, histories, lengths, targets in data.train.batches(256, max_len=50, shuffle=True,
                                                                 generator=g):
        ...

Nothing here imports the model or the trainer.
"""
from rearec.data.dataset import PAPER_MIN_RATING, SPLITS, load_dataset
from rearec.data.errors import DataError
from rearec.data.filters import FilterReport, FilterStep, filter_interactions
from rearec.data.ids import IdMapping
from rearec.data.movielens import ML100K_NAME, ML1M_NAME, movielens_1m_path, movielens_100k_path
from rearec.data.ordering import user_time_order, sort_by_user_then_time
from rearec.data.readers import read_atomic, read_interactions, read_table
from rearec.data.spec import DATA_FORMAT, DataSpec
from rearec.data.splits import Batch, SampleSet, SplitData, leave_one_out_split, temporal_split

__all__ = [
    "DataError",
    "read_atomic", "read_table", "read_interactions",
    "movielens_100k_path", "movielens_1m_path", "ML100K_NAME", "ML1M_NAME",
    "filter_interactions", "FilterReport", "FilterStep",
    "user_time_order", "sort_by_user_then_time",
    "IdMapping",
    "Batch", "SampleSet", "SplitData", "temporal_split", "leave_one_out_split",
    "load_dataset", "PAPER_MIN_RATING", "SPLITS",
    "DataSpec", "DATA_FORMAT",
]
