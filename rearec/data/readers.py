"""Readers for interaction logs.

Every reader returns a :class:`pandas.DataFrame` with one row per interaction, in file order::

    user       category raw user id as text, as written in the file less surrounding whitespace (ids are
                        never parsed as numbers; a Categorical of strings: each distinct id is stored once)
    item       category raw item id, likewise
    timestamp  float64  Unix seconds (numbers are taken as they are; ISO-8601 dates are converted)
    rating     float64  only when the log has a rating column

Supported inputs:

* RecBole atomic ``.inter`` files (:func:`read_atomic`): tab-separated, with a typed header such as
  ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``.
* CSV / TSV / Parquet tables whose columns the user names (:func:`read_table`).

Mistakes in the file or the options raise :class:`~rearec.data.errors.DataError` with a one-line
message that names the problem and the fix.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import lzma
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rearec.data.errors import DataError

__all__ = ["read_atomic", "read_table", "read_interactions", "COLUMNS", "COMPRESSED_SUFFIXES", "open_text", "decompressing",
           "not_utf8_error"]

#: Column names of the frames the readers return (``rating`` only when present).
COLUMNS = ("user", "item", "timestamp", "rating")

# Column names tried, in order and case-insensitively, when a column is not named explicitly.
_GUESSES = {
    "user": ("user", "user_id", "userid", "uid", "reviewer_id", "reviewerid", "customer_id"),
    "item": ("item", "item_id", "itemid", "iid", "movie_id", "movieid", "product_id", "productid",
             "parent_asin", "asin", "business_id"),
    "timestamp": ("timestamp", "time", "ts", "datetime", "date", "unixreviewtime", "event_time"),
    "rating": ("rating", "ratings", "score", "stars", "overall"),
}
_PARAM = {"user": "user_col", "item": "item_col", "timestamp": "time_col", "rating": "rating_col"}


def _option(role: str) -> str:
    """How to name a column, on the command line and in Python: '--user-col (user_col=)'."""
    return f"--{_PARAM[role].replace('_', '-')} ({_PARAM[role]}=)"
_TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
#: The separator of fields separated by runs of spaces or tabs (the one regular expression a separator
#: may be; any other separator of several characters is literal text).
WHITESPACE = r"\s+"
# Compressed text logs (log.csv.gz, data.inter.bz2): the format is the suffix before these.
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
#: Suffixes of compressed text logs, lower case.
COMPRESSED_SUFFIXES = tuple(_COMPRESSED)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_ATOMIC_SUFFIXES = (".inter",)


# ---------------------------------------------------------------------------------------------
# public readers


def read_atomic(
    path: str | os.PathLike,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    rating_col: str | None | bool = None,
) -> pd.DataFrame:
    """Read a RecBole atomic ``.inter`` file.

    Column names are the header's field names without their ``:type`` suffix. ``rating_col=None``
    reads a ``rating`` field when there is one; ``False`` never reads ratings; a name requires
    that field.
    """
    path = _check_file(path)
    with decompressing(path):
        try:
            with open_text(path) as f:
                header = f.readline().rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise not_utf8_error(path, e) from None
    if not header.strip():
        raise DataError(f"{path}: the file is empty; an atomic .inter file starts with a header "
                        "like 'user_id:token<TAB>item_id:token<TAB>timestamp:float'")
    fields = header.split("\t")
    names = []
    for field in fields:
        name, colon, ftype = field.partition(":")
        if not colon or not name or not ftype:
            raise DataError(
                f"{path}: not a RecBole atomic file: header field {field!r} is not 'name:type' "
                "(fields are tab-separated); for a plain CSV/TSV use read_table with the column "
                "names")
        names.append(name)
    if len(set(names)) != len(names):
        raise DataError(f"{path}: the header names a field twice ({', '.join(names)}); "
                        "give every field a distinct name")

    cols = _resolve_columns(names, path, user_col, item_col, time_col, rating_col, guess=False)
    with decompressing(path):
        try:
            raw = _read_text(path, sep="\t", header=None, names=names, skiprows=1,
                             quoting=csv.QUOTE_NONE)
        except UnicodeDecodeError as e:
            raise not_utf8_error(path, e) from None
        except (pd.errors.ParserError, ValueError) as e:
            raise DataError(f"{path}: cannot parse the file as tab-separated atomic data "
                            f"({_one_line(e)}); check that fields are separated by tabs") from None
    return _standardise(raw, cols, path, first_line=2)


def read_table(
    path: str | os.PathLike,
    user_col: str | int | None = None,
    item_col: str | int | None = None,
    time_col: str | int | None = None,
    rating_col: str | int | None | bool = None,
    sep: str | None = None,
    *,
    header: bool = True,
) -> pd.DataFrame:
    """Read a CSV, TSV or Parquet table of interactions.

    The format follows the suffix (``.csv`` comma, ``.tsv``/``.tab`` tab, ``.parquet``/``.pq``);
    ``sep`` overrides it for text files (any suffix; several characters, e.g. ``'::'``, work).
    Columns left as ``None`` are looked up among common names (``user_id``, ``item_id``,
    ``timestamp``, ...); ``rating_col=None`` reads ratings only when such a column exists and
    ``False`` never reads them. ``header=False`` reads a text file without a header row: columns
    are then named by their 0-based position.
    """
    path = _check_file(path)
    suffix = _format_suffix(path)
    if suffix in _PARQUET_SUFFIXES:
        if sep is not None:
            raise DataError(f"{path}: sep= applies to text files, not Parquet; drop sep")
        raw = _read_parquet(path)
        first_line = None
        columns = list(raw.columns)
    else:
        if sep is None:
            if suffix not in _TABLE_SEPARATORS:
                raise DataError(
                    f"{path}: unknown file type {suffix or '(no suffix)'!r}; use .csv, .tsv, "
                    ".parquet or .inter (text ones also compressed: .gz, .bz2, .xz), or pass --sep (sep=, "
                    "e.g. ',' or '::')")
            sep = _TABLE_SEPARATORS[suffix]
        if sep == "":
            raise DataError(f"{path}: sep is empty; pass the field separator, e.g. --sep , (sep=',')")
        with decompressing(path):
            try:
                # Quoted fields are read as quoted (R and spreadsheets quote TSV fields too); a quote that opens
                # and does not close is caught below: an id that spans lines, or a quote open at the end.
                raw = _read_text(path, sep=sep, header=0 if header else None)
                # The header as written: pandas renames a name's second use ('item_id' -> 'item_id.1')
                names = _read_text(path, sep=sep, header=None, nrows=1).iloc[0].tolist() if header else None
            except pd.errors.EmptyDataError:
                raise DataError(f"{path}: the file is empty; it needs a header row and one row per "
                                "interaction") from None
            except UnicodeDecodeError as e:
                raise not_utf8_error(path, e) from None
            except (pd.errors.ParserError, ValueError) as e:
                if "EOF inside string" in str(e):
                    raise DataError(f"{path}: a quote (\") opens in a field and never closes ({_one_line(e)}); fix "
                                    "the quote (double it, \"\", inside a quoted field)") from None
                raise DataError(f"{path}: cannot parse the file with sep={sep!r} ({_one_line(e)}); "
                                "check the separator (pass --sep, sep= in Python)") from None
        first_line = 2 if header else 1
        if len(sep) > 1:  # split by a regular expression, which reads quotes as text: "196" and 196 would differ
            for column in raw.columns:
                quoted = raw[column].str.startswith('"')
                if quoted.any():
                    raise DataError(f"{path}: {_where(int(np.argmax(quoted.to_numpy())), first_line, path)} has a field "
                                    f"in quotes (\"), which sep={sep!r} reads as part of the id (a separator of "
                                    "several characters splits lines without reading quotes): remove the quotes, "
                                    "or use a one-character separator")
        if not header:
            raw.columns = [str(c) for c in range(raw.shape[1])]
        elif all(_looks_numeric(str(c)) for c in names):  # a first line of data, which may repeat a value:
            raw.columns = [str(c).strip() for c in raw.columns]  # refused just below, as data
        else:
            stripped = [str(c).strip() for c in names]
            twice = sorted({c for c in stripped if stripped.count(c) > 1})
            if twice:
                raise DataError(f"{path}: the header names column(s) {', '.join(map(repr, twice))} more than once "
                                "(spaces around names are ignored); give every column a distinct name")
            raw.columns = stripped
        columns = list(raw.columns)
        if header and all(_looks_numeric(c) for c in columns):
            wanted = [c for c in (user_col, item_col, time_col) if c is not None]
            if not wanted or any(str(c) in columns for c in wanted):
                raise DataError(
                    f"{path}: the first line ({', '.join(map(repr, columns))}) looks like data, not a header; "
                    "pass --no-header (header=False) and name the columns by position, e.g. --user-col 0 "
                    "--item-col 1 --time-col 3 (a header of column numbers, as pandas' to_csv writes one, reads "
                    "as data: give the columns names)")
        if header and len(columns) == 1 and sep not in columns[0]:
            # A single column usually means the separator is wrong; say so if a usual one fits.
            for other in (",", "\t", ";", "|", "::"):
                if other != sep and other in columns[0]:
                    raise DataError(
                        f"{path}: found a single column {columns[0]!r} with sep={sep!r}; the "
                        f"file looks {_sep_name(other)}-separated: pass --sep {other!r} (sep={other!r})")
    if not header:
        user_col, item_col, time_col = (None if c is None else str(c)
                                        for c in (user_col, item_col, time_col))
        if rating_col is not None and rating_col is not False:
            rating_col = str(rating_col)
        if None in (user_col, item_col, time_col):
            raise DataError(f"{path}: without a header row name the columns by their 0-based position, e.g. "
                            "--user-col 0 --item-col 1 --time-col 3 (user_col=0, item_col=1, time_col=3)")
    cols = _resolve_columns(columns, path, user_col, item_col, time_col, rating_col, guess=True)
    return _standardise(raw, cols, path, first_line=first_line)


def read_interactions(path: str | os.PathLike, **cols) -> pd.DataFrame:
    """Read an interaction log, choosing the reader by suffix.

    ``.inter`` goes to :func:`read_atomic`, anything else to :func:`read_table`; keyword
    arguments (``user_col``, ``item_col``, ``time_col``, ``rating_col``, ``sep``, ``header``) are
    passed on. ``None`` values are dropped so that each reader keeps its defaults.
    """
    cols = {k: v for k, v in cols.items() if v is not None}
    p = Path(path)
    if _format_suffix(p) in _ATOMIC_SUFFIXES:
        extra = set(cols) - {"user_col", "item_col", "time_col", "rating_col"}
        if extra:
            raise DataError(f"{p}: {', '.join(sorted(extra))} do not apply to atomic .inter "
                            "files (tab-separated with a typed header); drop them")
        return read_atomic(p, **cols)
    return read_table(p, **cols)


# ---------------------------------------------------------------------------------------------
# helpers


def _format_suffix(path: Path) -> str:
    """The suffix that names the format, lower case: '.csv' for log.csv and for log.csv.gz."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def open_text(path: Path, **kw):
    """``path`` opened as UTF-8 text (a leading BOM skipped), decompressed when its suffix says so."""
    opener = _COMPRESSED.get(path.suffix.lower())
    if opener is not None:
        return opener(path, "rt", encoding="utf-8-sig", newline="", **kw)
    return open(path, encoding="utf-8-sig", newline="", **kw)


@contextlib.contextmanager
def decompressing(path: Path):
    """Reading a compressed log that cannot be decompressed (damaged, cut short by a copy, or not
    compressed as its suffix says) raises one DataError naming the file; other errors pass through."""
    try:
        yield
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        kind = path.suffix.lower()
        if kind not in _COMPRESSED or (isinstance(e, OSError) and e.errno is not None):  # a real I/O error
            raise
        raise DataError(f"{path}: cannot decompress the file ({_one_line(e)}): it is damaged, cut short, or not "
                        f"{kind[1:]}-compressed; copy it again, or name it after its real format") from None


def _check_file(path) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; pass the interaction file inside it")
    return p


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def not_utf8_error(path: Path, e: UnicodeDecodeError) -> DataError:
    """The error for a text file that is not UTF-8 (latin-1, UTF-16, ...): names the file and fix."""
    try:
        with open(path, "rb") as f:
            utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
    except OSError:
        utf16 = False
    if utf16:
        what = "it is UTF-16"
    else:
        try:
            what = (f"byte 0x{e.object[e.start]:02x} is not UTF-8; latin-1 or another "
                    "encoding?")
        except (IndexError, TypeError):
            what = _one_line(e)
    return DataError(f"{path}: the file is not UTF-8 text ({what}); save {path.name} as UTF-8")


def _sep_name(sep: str) -> str:
    return {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}.get(sep, repr(sep))


def _read_text(path: Path, sep: str, **kw) -> pd.DataFrame:
    """pandas.read_csv with every field as text; rows longer than the header are an error."""
    with warnings.catch_warnings():
        # With index_col=False pandas only warns (and drops data) when a row has extra fields.
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            # pandas reads a separator of several characters as a regular expression: '::' or '||'
            # are meant literally ('**' would not even compile).
            literal = sep if sep == WHITESPACE or len(sep) == 1 else re.escape(sep)
            return pd.read_csv(path, sep=literal, dtype=str, keep_default_na=False, index_col=False,
                               encoding="utf-8-sig", engine="python" if len(sep) > 1 else "c",
                               **kw)
        except pd.errors.ParserWarning:
            raise pd.errors.ParserError("some rows have more fields than the header: a separator inside a "
                                        "field, or one at the end of those rows") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        # self_destruct frees each Arrow column once converted: the table and the frame never
        # both sit in memory whole.
        return pd.read_parquet(path, to_pandas_kwargs={"split_blocks": True, "self_destruct": True})
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow "
                        "(or convert the file to CSV)") from None
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: cannot read the Parquet file ({_one_line(e)}); check that it "
                        "is a valid Parquet file") from None


def _resolve_columns(columns: Sequence[str], path: Path, user_col, item_col, time_col,
                     rating_col, *, guess: bool) -> dict[str, str]:
    """Map our column names to the file's, raising DataError for names that do not exist."""
    columns = [str(c) for c in columns]
    listing = ", ".join(repr(c) for c in columns)
    wanted = {"user": user_col, "item": item_col, "timestamp": time_col, "rating": rating_col}
    out: dict[str, str] = {}
    for role, name in wanted.items():
        if role == "rating" and name is False:
            continue
        if name is None or name is True:
            if not guess and role != "rating":
                raise DataError(f"{path}: no column given for {role}; pass {_option(role)}")
            candidates = _GUESSES[role] if guess else ("rating",)
            # every column of each name, in any case: 'user_id' and 'USER_ID' are two candidates, not one
            matches = [c for g in candidates for c in columns if c.lower() == g]
            if len(matches) > 1:
                raise DataError(f"{path}: columns {' and '.join(map(repr, matches))} could each hold the "
                                f"{'timestamps' if role == 'timestamp' else role + 's' if role == 'rating' else role + ' ids'}; "
                                f"pass {_option(role)} to name the one to use"
                                + ("" if role != "rating" else " (or --rating-col none)"))
            found = matches[0] if matches else None
            if found is None:
                if role == "rating":
                    continue  # ratings are optional
                raise DataError(f"{path}: cannot tell which column holds the {role} ids; "
                                f"pass {_option(role)} (columns are: {listing})"
                                if role != "timestamp" else
                                f"{path}: cannot tell which column holds the timestamps; "
                                f"pass {_option(role)} (columns are: {listing})")
            out[role] = found
            continue
        name = str(name)
        if name not in columns:
            raise DataError(f"{path}: no column {name!r} ({_option(role)}); columns are: "
                            f"{listing}")
        out[role] = name
    used = [out[r] for r in ("user", "item", "timestamp") if r in out]
    if len(set(used)) != len(used):
        raise DataError(f"{path}: user, item and time columns must differ (got "
                        f"{', '.join(repr(c) for c in used)}); pass distinct column names")
    return out


def _where(i: int, first_line: int | None, path: Path) -> str:
    """Where row i of the table is: 'line N' of a text file, 'row N' of a Parquet file. Only called
    for an error message: the file is read again, because pandas skips blank lines, so that row i is
    the i-th non-blank line after the header. (A quoted field that spans lines still shifts it.)"""
    if first_line is None:
        return f"row {i + 1}"
    try:
        with open_text(path, errors="replace") as f:
            rows = -1
            for number, line in enumerate(f, start=1):
                if number >= first_line and line.strip("\r\n"):
                    rows += 1
                    if rows == i:
                        return f"line {number}"
    except OSError:
        pass
    return f"data row {i + 1}"


def _looks_numeric(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return True


def _ids(s: pd.Series, role: str, path: Path, first_line) -> pd.Categorical:
    """Raw ids as strings, as written less surrounding whitespace (' a' and 'a' are one id; integers stay
    integers: 7 -> '7').

    A Categorical: one small integer code per row and each distinct id once as text, so that tens
    of millions of rows do not hold tens of millions of strings; integer ids become text only once
    per distinct id.
    """
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        # Whole numbers read as floats (a Parquet column, say) are integer ids, each by its own value
        # (10.0 -> '10' whatever the other rows hold), while float64 holds them exactly (|v| < 2^53);
        # other values keep their float text ('2.5'; larger whole ones too: int64 would merge them)
        whole = np.isfinite(v) & (v == np.round(v)) & (np.abs(v) < 2.0 ** 53)
        if whole.all():
            s = pd.Series(v.astype(np.int64), index=s.index)
        elif whole.any():
            text = s.astype(str).to_numpy(dtype=object)
            text[whole] = v[whole].astype(np.int64).astype(str)
            text[np.isnan(v)] = None  # missing, as before
            s = pd.Series(text, index=s.index)
    if pd.api.types.is_integer_dtype(s.dtype) and not s.isna().any():
        codes, uniques = pd.factorize(s.to_numpy())
        return pd.Categorical.from_codes(codes, categories=pd.Index(uniques.astype(str)))
    missing = s.isna().to_numpy()
    text = s.astype(str).str.strip()
    broken = text.str.contains("[\r\n]", regex=True).to_numpy(dtype=bool, na_value=False)
    if broken.any():
        i = int(np.flatnonzero(broken)[0])
        raise DataError(f"{path}: the {role} id of {_where(i, first_line, path)} spans several lines ({text.iloc[i][:40]!r}...): "
                        "a quote (\") that opens there and never closes swallows the rows after it, or "
                        "the id holds a line break; fix the quote (double it, \"\", inside a quoted field) "
                        "or remove the line break")
    missing = missing | (text == "").to_numpy(dtype=bool, na_value=True)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DataError(f"{path}: {_where(i, first_line, path)} has no {role} id "
                        f"({int(missing.sum())} rows in all); remove those rows or fill them")
    return pd.Categorical(text)


def _timestamps(s: pd.Series, path: Path, first_line) -> np.ndarray:
    """Timestamps as float64: numbers as they are, ISO-8601 dates as Unix seconds (UTC)."""
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        dt = pd.to_datetime(s, utc=True)
        return _unix_seconds(dt, path, first_line)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        text = s.astype(str).str.strip()
        empty = (text == "").to_numpy() | s.isna().to_numpy()
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise DataError(f"{path}: {_where(i, first_line, path)} has no timestamp "
                            f"({int(empty.sum())} rows in all); remove those rows or fill them")
        num = pd.to_numeric(text, errors="coerce")
        v = num.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(v)
        if bad.any():
            if bad.all():
                try:
                    dt = pd.to_datetime(text, utc=True, format="ISO8601")
                except (ValueError, TypeError, OverflowError):
                    dt = None
                if dt is not None:
                    return _unix_seconds(dt, path, first_line)
                # One value spoils the ISO parse: name the first that does not parse alone.
                parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
                bad = parsed.isna().to_numpy() if not parsed.isna().all() else bad
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}: cannot parse timestamp {text.iloc[i]!r} at {_where(i, first_line, path)}; "
                "timestamps must be numbers (e.g. Unix seconds) or ISO-8601 dates "
                "(e.g. 2024-05-01T12:00:00), all in one form")
    bad = ~np.isfinite(v)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: {_where(i, first_line, path)} has a missing or non-finite timestamp "
                        f"({int(bad.sum())} rows in all); remove those rows or fill them")
    numeric = pd.api.types.is_numeric_dtype(s.dtype)
    _check_exact_order(s if numeric else num, v, path, None if numeric else text)
    return v


def _check_exact_order(numbers: pd.Series, v: np.ndarray, path: Path, text: pd.Series | None = None) -> None:
    """Integer timestamps past 2^53 (nanoseconds since 1970, say) are rounded in float64: a DataError if
    two different ones became equal, so that events are never silently put in the wrong order. ``text``: the
    timestamps as written, for the whole numbers among them that pandas read as floats (past uint64, or in
    a column that also holds a fraction)."""
    if not len(v) or np.abs(v).max() < 2.0 ** 53:
        return
    if pd.api.types.is_integer_dtype(numbers.dtype):
        exact, rounded = numbers.to_numpy(), v  # int64 or uint64, every digit kept
    elif text is not None:
        whole = (np.abs(v) >= 2.0 ** 53) & text.str.fullmatch(r"[+-]?\d+").to_numpy(dtype=bool)
        exact, rounded = np.array([int(t) for t in text[whole]], dtype=object), v[whole]
    else:
        return
    if len(np.unique(exact)) != len(np.unique(rounded)):
        raise DataError(f"{path}: integer timestamps past 2^53 (up to {exact.max()}) differ by less than float64 "
                        "can tell apart, which would mix up the order of events; store them in coarser units "
                        "(e.g. microseconds or seconds)")


def _unix_seconds(dt: pd.Series, path: Path, first_line) -> np.ndarray:
    bad = dt.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: {_where(i, first_line, path)} has a missing timestamp "
                        f"({int(bad.sum())} rows in all); remove those rows or fill them")
    epoch = pd.Timestamp(0, tz="UTC").as_unit(dt.dt.unit)  # in the dates' own unit: far dates stay in range
    try:
        secs = (dt - epoch) / pd.Timedelta(seconds=1)
    except (OverflowError, pd.errors.OutOfBoundsDatetime, pd.errors.OutOfBoundsTimedelta) as e:
        raise DataError(f"{path}: a date is out of the range that can be converted to seconds ({_one_line(e)}); "
                        "fix or remove it") from None
    return secs.to_numpy(dtype=np.float64)


def _ratings(s: pd.Series, path: Path, first_line) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(v)
    else:
        text = s.astype(str).str.strip()
        v = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(v)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: {_where(i, first_line, path)} has a missing or non-numeric rating "
                        f"({int(bad.sum())} rows in all); fix those rows, or pass "
                        "--rating-col none (rating_col=False) to ignore ratings")
    return v


def _standardise(raw: pd.DataFrame, cols: dict[str, str], path: Path, first_line) -> pd.DataFrame:
    if len(raw) == 0:
        raise DataError(f"{path}: no interactions (only a header); the file needs one row per "
                        "interaction")
    data = {
        "user": _ids(raw[cols["user"]], "user", path, first_line),
        "item": _ids(raw[cols["item"]], "item", path, first_line),
        "timestamp": _timestamps(raw[cols["timestamp"]], path, first_line),
    }
    if "rating" in cols:
        data["rating"] = _ratings(raw[cols["rating"]], path, first_line)
    return pd.DataFrame(data)
