"""rearec.stats: the clustered hierarchical bootstrap against a brute-force enumeration of every
resample on tiny cases, its seed spread against the unbiased seed variance, Holm against its
definition, and bad input."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rearec.stats import bootstrap_gain, gain_summary, holm, user_averaged


def exact_distribution(a, b, users, relative=True, paired_seeds=False):
    """Every equally likely resample (ordered user draws x seed draws), by brute force: the gains. On
    each user draw, an arm's S per-seed metrics are spread from their mean by sqrt(S / (S - 1)) first."""
    ids = sorted(set(users.tolist()))
    gains = []
    seed_draws_a = list(itertools.product(range(a.shape[0]), repeat=a.shape[0]))
    seed_draws_b = seed_draws_a if paired_seeds else list(itertools.product(range(b.shape[0]), repeat=b.shape[0]))

    def spread(per_seed):
        n = len(per_seed)
        center = sum(per_seed) / n
        return [center + (m - center) * (n / (n - 1)) ** 0.5 for m in per_seed] if n > 1 else per_seed

    for drawn_users in itertools.product(ids, repeat=len(ids)):
        rows = np.concatenate([np.flatnonzero(users == u) for u in drawn_users])
        per_seed_a = spread([a[s, rows].mean() for s in range(a.shape[0])])
        per_seed_b = spread([b[s, rows].mean() for s in range(b.shape[0])])
        for sa in seed_draws_a:
            for sb in ([sa] if paired_seeds else seed_draws_b):
                ma = np.mean([per_seed_a[s] for s in sa])
                mb = np.mean([per_seed_b[s] for s in sb])
                gains.append(ma / mb - 1 if relative else ma - mb)
    return np.array(gains)


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 3), st.integers(1, 2), st.integers(1, 2), st.booleans())
def test_bootstrap_matches_brute_force_enumeration(seed, n_users, seeds_a, seeds_b, paired):
    rng = np.random.default_rng(seed)
    if paired:
        seeds_b = seeds_a
    per_user = rng.integers(1, 4, n_users)
    users = np.repeat(np.arange(n_users) * 7 + 3, per_user)  # odd ids, uneven cluster sizes
    rng.shuffle(users)
    a = rng.uniform(0.1, 1.0, (seeds_a, users.size))
    b = rng.uniform(0.1, 1.0, (seeds_b, users.size))
    exact = exact_distribution(a, b, users, paired_seeds=paired)
    rounds = 20_000
    reps = bootstrap_gain(a, b, users, rounds=rounds, seed=seed, paired_seeds=paired)
    se = exact.std() / np.sqrt(rounds)
    assert abs(reps.mean() - exact.mean()) < 5 * se + 1e-12
    assert abs(reps.std() - exact.std()) < 0.05 * exact.std() + 1e-12
    for q in np.quantile(exact, [0.1, 0.5, 0.9]) + 1e-9:  # the CDFs agree (just above an atom: rounding)
        assert abs((reps <= q).mean() - (exact <= q).mean()) < 0.02


@pytest.mark.parametrize("n_seeds", [2, 3, 5])
def test_the_seed_draw_varies_the_mean_as_fresh_seeds_would(n_seeds):
    """Seeds drawn with replacement vary their mean by (S - 1) / S of s^2 / S (half at S = 2: ML-1M's
    PRL had two seeds); spread first, the seed draw's variance is s^2 / S. Here users add nothing (each
    seed scores every sample alike), so the replicates' variance is the seed draw's alone."""
    rng = np.random.default_rng(n_seeds)
    users = rng.integers(0, 7, 40)
    levels = rng.uniform(0.1, 0.3, n_seeds)
    a = np.repeat(levels[:, None], users.size, axis=1)
    b = np.full((1, users.size), 0.2)
    reps = bootstrap_gain(a, b, users, rounds=40_000, seed=3, relative=False)
    want = levels.var(ddof=1) / n_seeds
    assert reps.var() == pytest.approx(want, rel=0.05)
    assert reps.mean() == pytest.approx(levels.mean() - 0.2, abs=3 * want ** 0.5 / 200)
    # One seed: nothing to spread, and no seed variance.
    assert np.allclose(bootstrap_gain(a[:1], b, users, rounds=50, relative=False), levels[0] - 0.2)


def test_a_relative_gain_over_a_spread_out_mean_at_or_below_zero_is_undefined():
    """Spreading two seeds (0 and 1) by sqrt(2) puts one below zero: a base drawing it twice has a
    negative mean, whose ratio is no gain. The summary says undefined, never an interval from it."""
    users = np.arange(6)
    b = np.array([[0.0] * 6, [1.0] * 6])
    s = gain_summary(np.full((1, 6), 0.5), b, users, rounds=400)
    assert s["gain"] == pytest.approx(0.0) and np.isnan(s["low"]) and np.isnan(s["p"])
    assert not s["p_at_floor"]


def test_a_p_value_at_its_floor_says_so():
    """No replicate on the other side of zero: p is 2/(rounds+1), a bound the report prints as such."""
    users = np.arange(20) % 5
    s = gain_summary(np.full((2, 20), 0.6), np.full((2, 20), 0.3), users, rounds=999)
    assert s["p"] == pytest.approx(2 / 1000) and s["p_at_floor"] is True
    rng = np.random.default_rng(2)
    a = rng.uniform(0.2, 1.0, (2, 20))
    s = gain_summary(a, a + rng.normal(0, 0.2, a.shape), users, rounds=999, relative=False)
    assert s["p"] > 2 / 1000 and s["p_at_floor"] is False


def test_absolute_gain_and_summary():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 3, 31)
    a = rng.uniform(0, 1, (2, 31)) + 0.5
    b = rng.uniform(0, 1, (2, 31))
    exact = exact_distribution(a, b, users, relative=False)
    reps = bootstrap_gain(a, b, users, rounds=20_000, seed=1, relative=False)
    assert abs(reps.mean() - exact.mean()) < 5 * exact.std() / np.sqrt(20_000)
    s = gain_summary(a, b, users, rounds=2000, relative=False)
    assert s["gain"] == pytest.approx(a.mean() - b.mean())
    assert s["low"] < s["gain"] < s["high"] and s["low"] > 0 and s["p"] < 0.01


def test_summary_interval_and_p_value_against_their_definitions():
    """The 95% interval is the 2.5th..97.5th percentile of the exact resampling distribution (checked
    against the brute-force enumeration, so a 50% interval or a shifted one fails), and the p-value is
    two-sided: twice the share of the replicates on the far side of zero (counting the observed one)."""
    rng = np.random.default_rng(11)
    users = np.repeat([3, 5, 8], [2, 3, 2])
    a = rng.uniform(0.2, 1.0, (2, users.size))
    b = a + rng.normal(0.0, 0.15, a.shape)  # a gain near zero: the p-value lands well inside (0, 1)
    rounds = 20_000
    s = gain_summary(a, b, users, rounds=rounds, seed=4, relative=False)
    exact = exact_distribution(a, b, users, relative=False)
    low, high = np.quantile(exact, [0.025, 0.975])
    width = high - low
    assert abs(s["low"] - low) < 0.05 * width and abs(s["high"] - high) < 0.05 * width
    far_side = min((exact <= 0).mean(), (exact >= 0).mean())  # the exact share on the far side of zero
    assert 0.1 < 2 * far_side < 0.9  # the case is one where one- and two-sided p-values differ visibly
    assert s["p"] == pytest.approx(2 * far_side, abs=0.02)


def test_identical_arms_and_determinism():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 9, 47)
    a = rng.uniform(0, 1, (3, 47))
    assert np.allclose(bootstrap_gain(a, a, users, rounds=300, paired_seeds=True), 0.0)
    assert np.array_equal(bootstrap_gain(a, a[::-1], users, rounds=300, seed=5),
                          bootstrap_gain(a, a[::-1], users, rounds=300, seed=5))
    assert not np.array_equal(bootstrap_gain(a, a[::-1], users, rounds=300, seed=5),
                              bootstrap_gain(a, a[::-1], users, rounds=300, seed=6))  # the seed is used


def test_holm_against_definition():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, rng.integers(1, 7)))
        adjusted = holm(p + [None])
        assert adjusted[-1] is None
        order = np.argsort(p)
        m = len(p)
        expected = np.maximum.accumulate([min(1.0, (m - r) * p[i]) for r, i in enumerate(order)])
        assert np.allclose([adjusted[i] for i in order], expected)


def test_holm_leaves_an_undefined_test_out():
    """A NaN p (an undefined test) made sorted() order the others arbitrarily and min(1, NaN) = 1 swallowed
    them: holm([nan, .01, .02]) was [1, 1, 1]. It stays NaN and the others are corrected among themselves."""
    nan = float("nan")
    for ps, want in (([nan, 0.01, 0.02], [None, 0.02, 0.02]), ([0.01, nan, 0.02], [0.02, None, 0.02]),
                     ([0.03, nan, 0.01, None], [0.03, None, 0.02, None])):
        got = holm(ps)
        for g, w, p in zip(got, want, ps):
            assert (g is None) if p is None else (np.isnan(g) if w is None else g == pytest.approx(w))


def test_a_relative_gain_over_a_zero_mean_has_no_interval_or_p():
    """Replicates where the base's mean is 0 are inf or NaN: counted on neither side of zero, they gave a
    'significant' p (0.00995 at 200 rounds, gain and interval NaN)."""
    users = np.arange(4)
    zero = np.zeros((1, 4))
    s = gain_summary(zero, zero, users, rounds=200)
    assert np.isnan(s["gain"]) and np.isnan(s["low"]) and np.isnan(s["high"]) and np.isnan(s["p"])
    b = np.array([[0.0, 0.0, 0.0, 1.0]])  # 0 on every resample without user 3, about a third of them
    s = gain_summary(np.full((1, 4), 0.5), b, users, rounds=200)
    assert s["gain"] == pytest.approx(1.0) and np.isnan(s["p"]) and np.isnan(s["low"])
    assert gain_summary(np.full((1, 4), 0.5), zero, users, rounds=200, relative=False)["p"] < 0.05  # defined


def test_user_averaged():
    users = np.array([4, 4, 4, 9])
    values = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert user_averaged(values, users) == pytest.approx(0.5)
    assert user_averaged(values[:1], users) == pytest.approx(0.5)


def test_bad_input():
    with pytest.raises(ValueError, match="same samples"):
        bootstrap_gain(np.ones((1, 3)), np.ones((1, 4)), np.arange(3))
    with pytest.raises(ValueError, match="one user id per sample"):
        bootstrap_gain(np.ones((1, 3)), np.ones((1, 3)), np.arange(4))
    with pytest.raises(ValueError, match="paired_seeds"):
        bootstrap_gain(np.ones((2, 3)), np.ones((1, 3)), np.arange(3), paired_seeds=True)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_gain(np.full((1, 3), np.nan), np.ones((1, 3)), np.arange(3))
