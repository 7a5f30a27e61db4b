"""Tests for rearec.metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rearec.metrics import per_sample_metrics, ranking_metrics, target_ranks

SCORES = torch.tensor([[0.1, 0.5, 0.3, 0.5, 0.2],
                       [1.0, 1.0, 1.0, 0.0, 0.0]])
TARGETS = torch.tensor([2, 0])


def test_ranks_count_strictly_greater_scores():
    # Row 0: two items (0.5, 0.5) beat 0.3 -> rank 3. Row 1: ties do not count -> rank 1.
    assert target_ranks(SCORES, TARGETS).tolist() == [3, 1]


def test_ranks_with_padded_exclusions_and_target_never_excluded():
    exclude = torch.tensor([[1, -1, -1], [-1, -1, -1]])
    assert target_ranks(SCORES, TARGETS, exclude).tolist() == [2, 1]
    # The target (2) is listed but still counts as a candidate; item 3 is excluded.
    exclude = torch.tensor([[2, 3], [0, 4]])
    assert target_ranks(SCORES, TARGETS, exclude).tolist() == [2, 1]
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = mask[0, 3] = True
    assert target_ranks(SCORES, TARGETS, mask).tolist() == [2, 1]


def test_ranks_nan_handling():
    scores = torch.tensor([[float("nan"), 1.0, 2.0], [1.0, float("nan"), 0.5]])
    # A NaN target gets the worst rank; a NaN competitor never outranks the target.
    assert target_ranks(scores, torch.tensor([0, 2])).tolist() == [3, 2]
    assert target_ranks(scores, torch.tensor([0, 2]),
                        torch.tensor([[1], [-1]])).tolist() == [2, 2]


def test_ranks_match_sorting_without_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 100, generator=g)
    targets = torch.randint(0, 100, (16,), generator=g)
    order = scores.argsort(dim=1, descending=True)
    expected = (order == targets[:, None]).nonzero()[:, 1] + 1
    assert torch.equal(target_ranks(scores, targets), expected)


def test_ranks_bad_input():
    with pytest.raises(ValueError, match=r"target ids must be in 0\.\."):
        target_ranks(SCORES, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="1 targets for 2 rows of scores"):
        target_ranks(SCORES, torch.tensor([0]))
    with pytest.raises(ValueError, match="exclude holds item id 7 >= n_items="):
        target_ranks(SCORES, TARGETS, torch.tensor([[7], [0]]))
    with pytest.raises(ValueError, match="targets must be integer item ids, got torch.float32"):
        target_ranks(SCORES, torch.tensor([2.7, 0.0]))  # not silently item 2
    assert torch.equal(target_ranks(SCORES.numpy(), TARGETS), target_ranks(SCORES, TARGETS))
    with pytest.raises(ValueError, match="ranks hold NaN"):
        ranking_metrics(torch.tensor([1.0, float("nan")]), (5,))
    assert ranking_metrics(torch.tensor([1, 3]), np.int64(2)) == ranking_metrics(torch.tensor([1, 3]), (2,))


def test_ranking_metrics_hand_computed():
    ranks = torch.tensor([1, 3, 12])
    m = ranking_metrics(ranks, ks=(5, 20))
    assert list(m) == ["recall@5", "recall@20", "ndcg@5", "ndcg@20", "mrr@5", "mrr@20"]
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["recall@20"] == pytest.approx(1.0)
    assert m["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(13)) / 3)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 3)
    # Boundary: rank == k counts.
    assert ranking_metrics(torch.tensor([10]), ks=(10,))["recall@10"] == 1.0
    assert ranking_metrics(torch.tensor([11]), ks=(10,))["ndcg@10"] == 0.0
    assert set(ranking_metrics(ranks)) == {f"{n}@{k}" for n in ("recall", "ndcg", "mrr")
                                           for k in (5, 10, 20, 50)}
    with pytest.raises(ValueError, match="empty"):
        ranking_metrics(torch.tensor([], dtype=torch.int64))
    assert ranking_metrics(ranks, 20) == ranking_metrics(ranks, (20,))  # one cutoff alone
    for bad in (2.0, "20", None, True, (0,), ()):  # one line naming ks, not a TypeError from iterating
        with pytest.raises(ValueError, match="ks must be positive integers"):
            ranking_metrics(ranks, bad)


def test_per_sample_metrics():
    per = per_sample_metrics(torch.tensor([1, 3, 12]), ks=(10,))
    assert per["recall@10"].tolist() == [1.0, 1.0, 0.0]
    assert per["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert per["mrr@10"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    # The average of the per-sample values is the aggregate metric.
    assert ranking_metrics(torch.tensor([1, 3, 12]), ks=(10,))["mrr@10"] == pytest.approx(
        float(per["mrr@10"].mean()))


def test_evaluation_excludes_the_whole_history(tmp_path):
    """``exclude_history``: no item of a sample's history gets a rank, also those older than the
    model's window (max_len 3 here, histories up to 19 items); each target's rank is then one plus
    the count of items outside its history (target excluded too) that score above it."""
    from rearec import ReaRec, ReaRecConfig
    from rearec.data.spec import DataSpec
    from rearec.evaluate import step_ranks
    from tests.synthetic import write_log

    data = DataSpec.for_source(write_log(tmp_path / "log.csv", n_users=30, n_items=25, length=20)).load()
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(n_items=data.n_items, hidden_size=16, n_heads=2, inner_size=16, max_len=3,
                                reason_steps=1)).eval()
    samples = data.test
    assert int(samples.history_lengths.max()) > 3 * model.config.max_len
    got = step_ranks(model, samples, batch_size=7, exclude_history=True, all_steps=False)["readout"]
    with torch.no_grad():
        _, histories, lengths, targets = samples.tensors(model.config.max_len)
        scores = model.scores(model.readout(model(histories, lengths)))
    for i in range(len(samples)):
        seen = set(samples.history(i)) - {samples.target(i)}
        above = [item for item in range(data.n_items) if item not in seen and scores[i, item] > scores[i, targets[i]]]
        assert got[i] == 1 + len(above), i
