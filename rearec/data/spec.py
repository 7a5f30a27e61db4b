"""DataSpec: where a run's data comes from and every option that shapes it, saved as ``data.json``.

``rearec train`` writes the spec beside the checkpoint; ``evaluate`` and ``recommend`` read it back so
that they see exactly the data the model was trained on. The file format (``FORMAT``)::

    {"format": "rearec.data/1", "source": "/abs/path/log.csv" | "ml-100k",
     "options": {"split": ..., "min_rating": ..., ...},
     "fingerprint": ..., "content_fingerprint": ..., "users": ..., "items": ..., "samples": {"train": ..., "valid": ..., "test": ...}}

Only ``source`` and ``options`` are read back to load the data; ``rearec train --resume`` also checks
both fingerprints (the id mapping's, and the samples' content) against the log as it is now. The rest
describes the data for people.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional, Union

from rearec.data.dataset import load_dataset
from rearec.data.errors import DataError
from rearec.data.movielens import bundled_name
from rearec.data.splits import DEFAULT_FILTER_WINDOW
from rearec.runs import RunFolderError, read_json, write_json

__all__ = ["DataSpec", "DATA_FORMAT"]

DATA_FORMAT = "rearec.data/1"


@dataclass(frozen=True)
class DataSpec:
    """A log file (or ``'ml-100k'``) and the options of :func:`rearec.data.load_dataset`."""

    source: str
    split: str = "temporal"
    min_rating: Union[float, str, None] = "auto"
    k_core: Union[int, tuple, None] = None
    min_history: Optional[int] = None
    dedupe: bool = False
    user_col: Optional[str] = None
    item_col: Optional[str] = None
    time_col: Optional[str] = None
    rating_col: Union[str, bool, None] = None
    sep: Optional[str] = None
    header: bool = True
    sample_filter: str = "window"
    filter_window: int = DEFAULT_FILTER_WINDOW

    @classmethod
    def option_names(cls) -> tuple:
        """Every field but ``source``: the options a command line may set."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "source")

    @classmethod
    def for_source(cls, source: str, **options) -> "DataSpec":
        """A spec for a path (made absolute), ``'ml-100k'`` or ``'ml-1m'``."""
        source = bundled_name(source) or os.path.abspath(os.path.expanduser(source))
        return cls(source=source, **options)

    def replace(self, **options) -> "DataSpec":
        return dataclasses.replace(self, **options)

    def options(self) -> dict:
        out = {name: getattr(self, name) for name in self.option_names()}
        if isinstance(out["k_core"], tuple):
            out["k_core"] = list(out["k_core"])
        return out

    def load(self):
        """The :class:`~rearec.data.SplitData` this spec describes."""
        k_core = tuple(self.k_core) if isinstance(self.k_core, (list, tuple)) else self.k_core
        return load_dataset(self.source, split=self.split, min_rating=self.min_rating, k_core=k_core,
                            min_history=self.min_history, dedupe=self.dedupe, user_col=self.user_col,
                            item_col=self.item_col, time_col=self.time_col, rating_col=self.rating_col,
                            sep=self.sep, header=None if self.header else False,
                            sample_filter=self.sample_filter, filter_window=self.filter_window)

    def same_as(self, other: "DataSpec") -> bool:
        return (self.source, json.dumps(self.options())) == (other.source, json.dumps(other.options()))

    # ------------------------------------------------------------------ the data.json file
    def write(self, path: str, data=None) -> None:
        """Write the spec as JSON (atomically), with a description of ``data`` when given."""
        payload = {"format": DATA_FORMAT, "source": self.source, "options": self.options()}
        if data is not None:
            payload.update({
                "fingerprint": data.mapping.fingerprint(), "content_fingerprint": data.content_fingerprint(),
                "users": data.n_users, "items": data.n_items,
                "samples": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
            })
        write_json(path, payload)

    @classmethod
    def read(cls, path: str) -> "DataSpec":
        """The spec saved in ``path``; DataError when the file is not a rearec data file."""
        try:
            saved = read_json(path, "data file")
        except RunFolderError as error:
            raise DataError(f"{error}; or pass --data") from None
        if not isinstance(saved, dict) or saved.get("format") != DATA_FORMAT or "source" not in saved:
            raise DataError(f"{path} is not a rearec data file (expected format {DATA_FORMAT!r}); "
                            "pass --data with the data options used for training")
        known = set(cls.option_names())
        options = saved.get("options", {})
        if not isinstance(options, dict) or not isinstance(saved["source"], str):
            raise DataError(f"{path} is damaged (its 'options' must be an object and its 'source' a path); pass "
                            "--data with the data options used for training")
        try:
            return cls(source=saved["source"], **{k: v for k, v in options.items() if k in known})
        except (TypeError, ValueError) as error:  # an option edited to a value no DataSpec takes
            raise DataError(f"{path} is damaged ({error}); pass --data with the data options used for "
                            "training") from None
