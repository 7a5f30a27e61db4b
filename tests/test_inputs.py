"""The rules around a ReaRec call (rearec/inputs.py): ReaRec and FastReaRec accept, refuse and answer alike."""
import math

import numpy as np
import pytest
import torch

from rearec import FastReaRec, ReaRec, ReaRecConfig
from rearec.data import IdMapping
from rearec.inputs import InputRules, top_k_excluding

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(n_items=57, hidden_size=32, n_heads=2, inner_size=48, max_len=12, reason_steps=3)
    cfg.update(overrides)
    return ReaRec(ReaRecConfig(**cfg)).eval()


# Both callers, built from one model: every rule below must hold for each.
CALLERS = {"model": lambda model: model, "engine": FastReaRec.from_model}


@pytest.fixture(params=sorted(CALLERS))
def make(request):
    return CALLERS[request.param]


BAD_INPUTS = [
    ([[1, 2], []], {}, "history 1 is empty"),
    ([], {}, "no histories"),
    ([[1, 2], [3, 57]], {}, "history 1 holds item id 57"),
    ([[-1]], {}, "history 0 holds item id -1"),
    ([[1.5, 2.7]], {}, r"history 0 holds item id 1\.5, not an integer"),
    ([[1, 2], [2.0]], {}, r"history 1 holds item id 2\.0, not an integer"),
    ([[True, False]], {}, "history 0 holds True, a bool"),
    ([[3, np.bool_(True)]], {}, "history 0 holds True, a bool"),
    ([[3, torch.tensor(False)]], {}, "history 0 holds False, a bool"),
    ([[3, torch.tensor(2.0)]], {}, r"history 0 holds item id tensor\(2\.\), not an integer"),
    ([[3, "7"]], {}, "history 0 holds item id '7', not an integer"),
    ([[1, 2]], {"depth": 4}, "depth must be an integer in 0..3"),
    ([[1, 2]], {"depth": -1}, "depth must be an integer in 0..3"),
    ([[1, 2]], {"depth": True}, "depth must be an integer in 0..3"),
    ([[1, 2]], {"raw_ids": True}, "raw_ids=True needs a checkpoint with a raw-id mapping"),
    ([[1, 2]], {"lengths": torch.tensor([2])}, "lengths go with a padded histories tensor"),
    (torch.ones(2, 3), {"lengths": torch.tensor([1, 2])}, "integer tensor of item ids"),
    (torch.ones(2, 3, dtype=torch.bool), {"lengths": torch.tensor([1, 2])}, "integer tensor of item ids"),
    (torch.ones(2, 3, dtype=torch.long), {}, "needs lengths"),
    (torch.ones(3, dtype=torch.long), {"lengths": torch.tensor([1])}, "must be 2-D"),
    (torch.ones(2, 3, dtype=torch.long), {"lengths": torch.tensor([1.0, 2.0])},
     r"lengths must be an integer tensor of shape \(2,\)"),
    (torch.ones(2, 3, dtype=torch.long), {"lengths": torch.tensor([0, 2])}, "history 0 has length 0"),
    # lengths that torch cannot make a tensor of: one line naming them, not torch's own error
    (torch.ones(1, 3, dtype=torch.long), {"lengths": "3"}, r"lengths must be an integer tensor of shape \(1,\), got '3'"),
    (torch.ones(1, 3, dtype=torch.long), {"lengths": [None]}, r"lengths must be .* shape \(1,\), got \[None\]"),
    (torch.ones(1, 3, dtype=torch.long), {"lengths": [2 ** 70]}, r"lengths must be an integer tensor of shape \(1,\)"),
    (torch.ones(1, 3, dtype=torch.long), {"lengths": torch.tensor([5])}, r"history 0 has length 5: lengths must be in 1\.\.3"),
    (torch.tensor([[1, 2, 57]]), {"lengths": torch.tensor([3])}, "history 0 holds item id 57"),
    (torch.zeros(0, 3, dtype=torch.long), {"lengths": torch.zeros(0, dtype=torch.long)}, "no histories"),
    ([[1, 2], 5], {}, "history 1 is not a list of item ids"),
    ([None], {}, "history 0 is not a list of item ids"),
    (7, {}, "histories must be a list of item-id lists or a padded tensor"),
    # a 0-d array or tensor passed the iterable check, then enumerate() raised TypeError (a traceback)
    (np.array(5), {}, r"histories must be a list of item-id lists or a padded tensor, got ndarray of shape \(\)"),
    (torch.tensor(5), {}, r"histories must be 2-D \(batch, slots\), got shape \(\)"),
    ([[1, 2]], {"exclude_seen": "no"}, "exclude_seen must be True or False"),
    ([[1, 2]], {"exclude_seen": 1}, "exclude_seen must be True or False"),
    ([[1, 2]], {"depth": torch.tensor(True)}, "depth must be an integer in 0..3"),
    ([[1, 2]], {"raw_ids": "no"}, "raw_ids must be None, True or False"),
    ([{5, 1, 9}], {}, "history 0 is a set, which has no order"),
    # the container itself unordered: its rows came back in an order the caller could not pair with users
    ({(1, 2, 3), (4, 5)}, {}, "histories is a set, which has no order"),
    ({(1, 2): "u1", (3,): "u2"}, {}, r"histories is a dict: pass a list .*list\(d.values\(\)\)"),
    ([np.array(3)], {}, "history 0 is not a list of item ids"),
    ([[3, 2 ** 70]], {}, r"history 0 holds an item id outside \[0, 57\)"),
]


@pytest.mark.parametrize("histories, kwargs, message", BAD_INPUTS)
def test_bad_input_names_the_problem(make, histories, kwargs, message):
    caller = make(small_model())
    if "exclude_seen" not in kwargs:  # recommend's own argument
        with pytest.raises(ValueError, match=message):
            caller.reasoning_states(histories, **kwargs)
    with pytest.raises(ValueError, match=message):
        caller.recommend(histories, **kwargs)


@pytest.mark.parametrize("k", [0, -3, True, 2.0, "5", None, torch.tensor(2.0), torch.tensor(True), np.True_])
def test_bad_k_is_refused(make, k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        make(small_model()).recommend([[1, 2]], k=k)


def test_readout_is_checked(make):
    with pytest.raises(ValueError, match="readout 'max' is unknown: use 'last', 'mean' or 'adaptive'"):
        make(small_model()).recommend([[1, 2]], readout="max")


def test_padding_item_in_a_history_is_refused(make):
    caller = make(small_model(pad_item=56))
    message = "history 1 holds item id 56, which is the model's padding item"
    with pytest.raises(ValueError, match=message):
        caller.recommend([[3, 4], [5, 56, 6]])
    with pytest.raises(ValueError, match=message):
        caller.recommend(torch.tensor([[3, 4, 0], [5, 56, 6]]), lengths=[2, 3])
    caller.recommend(torch.tensor([[3, 56]]), lengths=torch.tensor([1]))  # in a padded slot it is padding


def test_integer_ids_of_numpy_and_torch_types_are_accepted(make):
    caller = make(small_model(seed=3))
    plain = caller.reasoning_states([[4, 9, 2]])
    assert torch.equal(caller.reasoning_states([np.array([4, 9, 2])]), plain)
    assert torch.equal(caller.reasoning_states([[torch.tensor(4), np.int32(9), 2]]), plain)
    assert torch.equal(caller.reasoning_states(torch.tensor([[4, 9, 2]], dtype=torch.int32), lengths=[3]), plain)


def test_raw_ids_through_the_mapping(make):
    model = small_model(seed=19)
    items = [f"i{n}" for n in range(57)]
    model.id_mapping = IdMapping(["u0"], items)
    caller = make(model)
    raw = caller.recommend([["i3", "i7"], ["i50"]], k=5, exclude_seen=True)
    dense = caller.recommend([[3, 7], [50]], k=5, exclude_seen=True, raw_ids=False)
    assert torch.equal(raw.items, dense.items) and torch.equal(raw.scores, dense.scores)
    assert raw.raw_items == [[items[i] for i in row] for row in dense.items.tolist()]
    assert dense.raw_items == raw.raw_items  # raw ids come back whenever there is a mapping
    tensor = caller.recommend(torch.tensor([[3, 7]]), k=5, lengths=[2])  # a tensor holds dense ids
    assert torch.equal(tensor.items, caller.recommend([["i3", "i7"]], k=5).items)
    with pytest.raises(ValueError, match="history 1: item 'nope' is not in the data"):
        caller.recommend([["i3"], ["i4", "nope"], ["bad"]])
    with pytest.raises(ValueError, match="history 1 is empty"):
        caller.recommend([["i3"], []])
    newest = [f"i{n}" for n in range(12)]  # max_len items: an unknown older item is cut, not looked up
    assert torch.equal(caller.reasoning_states([["nope"] + newest]), caller.reasoning_states([newest]))
    with pytest.raises(ValueError, match="raw ids come as lists"):
        caller.recommend(torch.tensor([[3]]), lengths=[1], raw_ids=True)
    # numpy booleans are flags as Python's are (exclude_seen took them, raw_ids refused them)
    flagged = caller.recommend([[3, 7], [50]], k=5, exclude_seen=np.True_, raw_ids=np.False_)
    assert torch.equal(flagged.items, dense.items)
    assert torch.equal(caller.recommend([["i3", "i7"], ["i50"]], k=5, exclude_seen=True, raw_ids=np.True_).items,
                       raw.items)


def test_raw_ids_in_tensor_and_array_rows(make):
    """Numeric raw ids given as 1-D tensor or numpy rows are looked up by their value, as a list's are
    (they were looked up as the text 'tensor(103)' and refused as not in the data)."""
    model = small_model(seed=21)
    model.id_mapping = IdMapping(["u0"], [str(100 + n) for n in range(57)])
    caller = make(model)
    want = caller.recommend([[103, 107], [150]], k=5, exclude_seen=True)
    for row in (torch.tensor, np.array, lambda ids: torch.tensor(ids, dtype=torch.int32)):
        got = caller.recommend([row([103, 107]), row([150])], k=5, exclude_seen=True)
        assert torch.equal(got.items, want.items) and got.raw_items == want.raw_items


def test_padded_slots_are_not_read(make):
    """A padded tensor's slots past each length may hold anything (-1, ids past the table): they are
    neither checked nor used, so the answer is that of the history alone."""
    caller = make(small_model(seed=4))
    padded = torch.tensor([[3, -1, 999], [5, 9, 2]])
    got = caller.recommend(padded, k=5, lengths=torch.tensor([1, 3]))
    want = caller.recommend([[3], [5, 9, 2]], k=5)
    assert torch.equal(got.items, want.items) and torch.allclose(got.scores, want.scores, atol=1e-6)


def test_raw_items_are_none_where_no_item_is_left(make):
    """With a mapping, exclusions and k past the items left: raw_items holds None exactly where items
    is -1, and the mapped raw id everywhere else."""
    model = small_model(seed=2, n_items=9)
    names = [f"i{n}" for n in range(9)]
    model.id_mapping = IdMapping(["u0"], names)
    recs = make(model).recommend([["i1", "i2", "i3"]], k=9, exclude_seen=True)
    items = recs.items[0].tolist()
    assert items.count(-1) == 3 and items[-3:] == [-1, -1, -1]
    assert recs.raw_items[0] == [names[i] if i >= 0 else None for i in items]


def test_a_mapping_of_other_data_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="the id mapping has 3 items but the model's item table has 57 rows"):
        model.id_mapping = IdMapping(["u0"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="id mapping is unusable: not a saved rearec id mapping"):
        model.id_mapping = {"items": ["a"], "users": ["u"]}


def test_a_mapping_without_the_padding_item_needs_it_last(make):
    """A mapping of N - 1 raw ids (none for the padding item) fits a padding item in the last row only.
    With the padding item elsewhere, it was accepted and the last row, a real item, came back with raw
    id None (and raw id 'i0' meant the padding item)."""
    names = [f"i{n}" for n in range(12)]
    model = small_model(seed=9, n_items=13, pad_item=0)
    with pytest.raises(ValueError, match=r"the id mapping has 12 items.*last row \(12\); this model's is 0"):
        model.id_mapping = IdMapping(["u0"], names)
    model = small_model(seed=9, n_items=13, pad_item=12)
    model.id_mapping = IdMapping(["u0"], names)
    recs = make(model).recommend([["i1", "i2"]], k=13)
    items = recs.items[0].tolist()
    assert items[-1] == -1 and 12 not in items  # the padding item is never served
    assert recs.raw_items[0] == [names[i] for i in items[:-1]] + [None]


def test_exclusion_leaves_minus_one_tail_in_both(make):
    model = small_model(seed=8, n_items=13, pad_item=12)
    histories = [[1, 2, 3, 1], [4]]
    recs = make(model).recommend(histories, k=20, exclude_seen=True)
    assert recs.items.shape == (2, 13)  # k is capped at the table size
    for b, history in enumerate(histories):
        left = 12 - len(set(history))  # every item but the padding item and the history
        assert set(recs.items[b, :left].tolist()) == set(range(12)) - set(history)
        assert (recs.items[b, left:] == -1).all() and (recs.scores[b, left:] == -math.inf).all()
        assert torch.isfinite(recs.scores[b, :left]).all()


def test_exclude_seen_covers_items_older_than_the_window(make):
    """exclude_seen leaves out every item of a history, also those older than max_len (the model
    reads only the newest max_len), and checks them; the scores are those of the window alone."""
    model = small_model(seed=9, n_items=57, max_len=4)
    caller = make(model)
    histories = [list(range(1, 40)), [5, 6]]
    recs = caller.recommend(histories, k=57, exclude_seen=True)
    for b, history in enumerate(histories):
        kept = [i for i in recs.items[b].tolist() if i >= 0]
        assert set(kept) == set(range(57)) - set(history)
    window = caller.recommend([h[-4:] for h in histories], k=57)
    for b, history in enumerate(histories):  # the same ranking as the window's, seen items removed
        assert [i for i in window.items[b].tolist() if i not in history] == [i for i in recs.items[b].tolist() if i >= 0]
    padded = torch.zeros(2, 39, dtype=torch.long)
    padded[0], padded[1, :2] = torch.arange(1, 40), torch.tensor([5, 6])
    as_tensor = caller.recommend(padded, lengths=torch.tensor([39, 2]), k=57, exclude_seen=True)
    assert torch.equal(as_tensor.items, recs.items)
    with pytest.raises(ValueError, match="history 0 holds item id 57"):
        caller.recommend([[57] + list(range(1, 10))], exclude_seen=True)
    assert caller.recommend([[57] + list(range(1, 10))]).items.shape == (1, 10)  # outside the window: unread


def test_top_k_excluding_matches_a_plain_sort():
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(5, 31, generator=gen)
    exclude = torch.randint(-1, 31, (5, 7), generator=gen)
    values, items = top_k_excluding(scores, 31, exclude)
    for b in range(5):
        banned = set(exclude[b].tolist()) - {-1}
        keep = [n for n in range(31) if n not in banned]
        want = sorted(keep, key=lambda n: -scores[b, n].item())
        assert items[b, : len(keep)].tolist() == want
        assert torch.equal(values[b, : len(keep)], scores[b, want])
        assert (items[b, len(keep):] == -1).all() and (values[b, len(keep):] == -math.inf).all()


def test_rules_are_public_for_other_callers():
    rules = InputRules(small_model().config)
    assert rules.depth() == 3 and rules.depth(0) == 0 and rules.readout() == "last" and rules.k(100) == 57
    assert rules.depth(np.int64(2)) == 2 and rules.k(np.int32(5)) == 5 and type(rules.k(np.int32(5))) is int
    request = rules.request([[5, 6, 7], [8]], k=4, depth=1, exclude_seen=True)
    assert request.histories.tolist() == [[5, 6, 7], [8, 0, 0]] and request.lengths.tolist() == [3, 1]
    assert (request.depth, request.k, request.readout) == (1, 4, "last")
    assert request.exclude.tolist() == [[5, 6, 7], [8, -1, -1]]
