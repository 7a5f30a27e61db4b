"""rearec.selectors: each selector against a plain loop, a planted signal that a fitted selector must
find, the placebo's step distribution, and bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rearec.selectors import HaltingRule, StepData, evaluate_selectors, fit_selectors, ndcg


def random_data(rng, steps, n):
    return StepData(ranks=rng.integers(1, 60, (steps, n)), entropy=rng.uniform(1, 5, (steps, n)),
                    kl=rng.exponential(0.1, (steps - 1, n)), history_length=rng.integers(1, 200, n))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 47), st.floats(0.0, 0.3))
def test_halting_against_a_loop(seed, steps, n, eps):
    kl = np.random.default_rng(seed).exponential(0.1, (steps - 1, n))
    got = HaltingRule(eps).steps(kl)
    for i in range(n):
        expected = steps - 1
        for s in range(1, steps):
            if kl[s - 1, i] < eps:
                expected = s
                break
        assert got[i] == expected


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.integers(5, 123))
def test_fixed_step_and_rows_against_definitions(seed, steps, n):
    rng = np.random.default_rng(seed)
    valid, test = random_data(rng, steps, n), random_data(rng, steps, n + 3)
    fitted = fit_selectors(valid)
    means = [ndcg(valid.ranks[s], 20).mean() for s in range(steps)]
    assert means[fitted["fixed"]] == max(means)
    out = evaluate_selectors(valid, test)
    assert out["fixed"]["ndcg@20"] == pytest.approx(ndcg(test.ranks[fitted["fixed"]], 20).mean())
    chosen = np.argmin(test.entropy, axis=0)
    expected = np.mean([ndcg(test.ranks[chosen[i], i], 10) for i in range(n + 3)])
    assert out["min-entropy"]["ndcg@10"] == pytest.approx(expected)
    expected_min_entropy20 = np.mean([ndcg(test.ranks[chosen[i], i], 20) for i in range(n + 3)])
    # the readout is the last step by default, and gap closed is (selector - readout) / (oracle - readout)
    readout, oracle = ndcg(test.ranks[-1], 20).mean(), ndcg(test.ranks.min(0), 20).mean()
    assert out["readout"]["ndcg@20"] == pytest.approx(readout)
    if oracle > readout:
        assert out["min-entropy"]["gap_closed"] == pytest.approx((expected_min_entropy20 - readout) / (oracle - readout))
    oracle = test.ranks.min(0)
    assert out["oracle"]["ndcg@20"] == pytest.approx(ndcg(oracle, 20).mean())
    for name in ("fixed", "min-entropy", "kl-halt", "learned", "random"):
        assert out[name]["ndcg@20"] <= out["oracle"]["ndcg@20"] + 1e-12
    # The placebo draws the best adaptive selector's steps in random order: the same mean step and cost.
    like = out["random"]["like"]
    assert out["random"]["mean_step"] == pytest.approx(out[like]["mean_step"])
    assert out["random"]["steps_computed"] == out[like]["steps_computed"]
    # kl-halt: eps is the best of the candidate thresholds on validation (each scored with a plain loop
    # over samples), and its test row is that threshold's halting steps, found again by a loop.
    def halting_ndcg(data, eps):
        picked = []
        for i in range(data.ranks.shape[1]):
            step = next((s for s in range(1, steps) if data.kl[s - 1, i] < eps), steps - 1)
            picked.append(ndcg(data.ranks[step, i], 20))
        return float(np.mean(picked))

    def halting_steps(data, eps):
        return [next((s for s in range(1, steps) if data.kl[s - 1, i] < eps), steps - 1)
                for i in range(data.ranks.shape[1])]

    eps = out["kl-halt"]["eps"]
    for candidate in list(np.quantile(valid.kl, np.linspace(0, 1, 41))) + [np.inf]:
        assert halting_ndcg(valid, eps) >= halting_ndcg(valid, candidate) - 1e-12
    assert out["kl-halt"]["ndcg@20"] == pytest.approx(halting_ndcg(test, eps))
    # Cost per sample: a fixed step s runs s steps, min-entropy and learned compare all K, kl-halt runs
    # until it halts.
    K = steps - 1
    assert out["fixed"]["steps_computed"] == fitted["fixed"]
    assert out["min-entropy"]["steps_computed"] == K and out["learned"]["steps_computed"] == K
    assert out["kl-halt"]["steps_computed"] == pytest.approx(np.mean(halting_steps(test, eps)))
    assert out["readout"]["steps_computed"] == K


def planted(rng, n):
    """Step 1 is right (rank 1) exactly when its entropy is below step 0's; else step 0 is."""
    entropy = rng.uniform(1, 5, (2, n))
    good1 = entropy[1] < entropy[0]
    ranks = np.where(good1, [[50], [1]], [[1], [50]])
    return StepData(ranks, entropy, rng.exponential(0.1, (1, n)), rng.integers(1, 100, n))


def test_learned_and_min_entropy_find_a_planted_signal():
    rng = np.random.default_rng(0)
    out = evaluate_selectors(planted(rng, 400), planted(rng, 301))
    assert out["min-entropy"]["gap_closed"] == pytest.approx(1.0)
    assert out["learned"]["gap_closed"] > 0.9
    assert out["fixed"]["gap_closed"] < 0.7
    assert abs(out["random"]["gap_closed"]) < 0.8 * out["learned"]["gap_closed"]


def test_placebo_draws_the_best_selectors_steps_in_random_order():
    """When 80% of samples want step 1 and entropy says which, the placebo (the best selector's steps,
    shuffled over samples) lands on a sample's good step with the probability of that step's share:
    expected NDCG@20 = 0.8 * 0.8 + 0.2 * 0.2 = 0.68 here, computed per sample from the chosen steps' mix."""
    rng = np.random.default_rng(1)

    def skewed(n):
        good1 = rng.uniform(size=n) < 0.8
        entropy = np.where(good1, [[3.0], [1.0]], [[1.0], [3.0]]) + rng.uniform(0, 0.5, (2, n))
        ranks = np.where(good1, [[50], [1]], [[1], [50]])
        return StepData(ranks, entropy, rng.exponential(0.1, (1, n)), rng.integers(1, 100, n))

    test = skewed(500)
    out = evaluate_selectors(skewed(400), test)
    best = out["random"]["like"]
    assert out[best]["gap_closed"] == pytest.approx(1.0)  # min-entropy finds every good step
    share = np.array([(np.argmin(test.entropy, axis=0) == s).mean() for s in range(2)])
    expected = np.mean([sum(share[s] * ndcg(test.ranks[s, i], 20) for s in range(2)) for i in range(500)])
    assert out["random"]["ndcg@20"] == pytest.approx(expected, abs=0.03)  # 20 draws of 500 samples
    assert out["random"]["mean_step"] == pytest.approx(share[1])


def test_learned_finds_a_history_length_signal():
    """Step 1 is right exactly for histories longer than 100 items, and entropy and KL are noise: only
    the history length can tell the steps apart, so the learned selector must use it."""
    rng = np.random.default_rng(0)

    def lengths_decide(n):
        length = rng.integers(1, 200, n)
        ranks = np.where(length > 100, [[50], [1]], [[1], [50]])
        return StepData(ranks, rng.uniform(1, 5, (2, n)), rng.exponential(0.1, (1, n)), length)

    out = evaluate_selectors(lengths_decide(600), lengths_decide(401))
    assert out["learned"]["gap_closed"] > 0.75  # 0.82: the regularised fit's soft boundary errs near it
    assert out["fixed"]["gap_closed"] < 0.7 and out["min-entropy"]["gap_closed"] < 0.7


def test_bad_input():
    with pytest.raises(ValueError, match="at least two steps"):
        StepData(np.ones((1, 3)), np.ones((1, 3)), np.ones((0, 3)), np.ones(3))
    with pytest.raises(ValueError, match="shapes disagree"):
        StepData(np.ones((2, 3)), np.ones((2, 4)), np.ones((1, 3)), np.ones(3))
    # KLs given (N, S-1) instead of (S-1, N): a reshape made them fit, their values scrambled
    with pytest.raises(ValueError, match=r"kl \(3, 2\) \(need \(2, 3\)\)"):
        StepData(np.ones((3, 3)), np.ones((3, 3)), np.arange(6.0).reshape(3, 2), np.ones(3))
    assert StepData(np.ones((2, 3)), np.ones((2, 3)), np.arange(3.0), np.ones(3)).kl.shape == (1, 3)  # K=1, flat
    assert HaltingRule(0.5).steps([[0.1, 0.9, 0.2]]).tolist() == [1, 1, 1]  # a list, as any array-like


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 9))
def test_model_halting_readout_matches_the_selector(seed, steps, batch):
    """ReaRec.halting_readout picks, per user, the step the kl-halt selector picks from the study's outputs."""
    import torch

    from rearec import ReaRec, ReaRecConfig
    from rearec.study import step_outputs

    torch.manual_seed(seed)
    model = ReaRec(ReaRecConfig(n_items=23, hidden_size=8, n_layers=1, n_heads=2, inner_size=8, max_len=6,
                                objective="prl", reason_steps=steps, init_std=0.5)).eval()
    lengths = torch.randint(1, 7, (batch,))
    histories = torch.where(torch.arange(6)[None] < lengths[:, None], torch.randint(0, 23, (batch, 6)), 0)
    targets = torch.randint(0, 23, (batch,))

    class Samples:  # the two SampleSet methods step_outputs uses
        def __len__(self):
            return batch

        def batches(self, batch_size, max_len):
            yield None, histories, lengths, targets

    out = step_outputs(model, Samples())
    kl = np.asarray(out["kl"])
    values = np.unique(kl)  # a threshold between two observed KLs, so that most users sit clearly on one side
    eps = float((values[len(values) // 2 - 1] + values[len(values) // 2]) / 2) if len(values) > 1 else float(values[0]) / 2
    with torch.no_grad():
        states = model(histories, lengths)
        vectors, chosen = model.halting_readout(states, eps)
    far = np.abs(kl - eps) > 1e-3 * max(eps, 1e-6)  # away from the threshold (JSON keeps 3 digits)
    expected = HaltingRule(eps).steps(kl)
    decided = far.all(axis=0)
    assert decided.mean() > 0.5 and np.array_equal(chosen.numpy()[decided], expected[decided])
    assert torch.equal(vectors, states[torch.arange(batch), chosen])


def test_halting_needs_a_kl_strictly_below_eps():
    """KL(p_s || p_{s-1}) exactly at eps does not halt, in the selector and in ReaRec.halting_readout
    (identical consecutive states: a KL of exactly 0 against eps = 0)."""
    import torch

    from rearec import ReaRec, ReaRecConfig

    kl = np.array([[0.1, 0.1, 0.0], [0.05, 0.1, 0.0]])  # (S-1, N)
    assert HaltingRule(0.1).steps(kl).tolist() == [2, 2, 1]
    assert HaltingRule(0.0).steps(kl).tolist() == [2, 2, 2]
    model = ReaRec(ReaRecConfig(n_items=11, hidden_size=8, n_layers=1, n_heads=2, inner_size=8, max_len=4,
                                objective="erl", reason_steps=2)).eval()
    torch.manual_seed(0)
    s0, s2 = torch.randn(3, 8), torch.randn(3, 8)
    states = torch.stack([s0, s0, s2], dim=1)  # step 1 repeats step 0: KL exactly 0
    with torch.no_grad():
        assert model.halting_readout(states, 0.0)[1].tolist() == [2, 2, 2]
        assert model.halting_readout(states, 1e-300)[1].tolist() == [1, 1, 1]
