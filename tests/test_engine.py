"""FastReaRec against ReaRec's reference path and the paper's golden outputs."""
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec import ReaRec, ReaRecConfig
from rearec.data import IdMapping
from rearec.engine import FastReaRec
from tests.test_model import GOLDEN, golden_histories

SETTINGS = dict(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])


def ragged(n, n_items, longest, gen):
    lengths = torch.randint(1, longest + 1, (n,), generator=gen)
    lengths[0] = 1
    lengths[-1] = longest
    return [torch.randint(n_items, (int(length),), generator=gen).tolist() for length in lengths]


@st.composite
def models(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 16, 24]))
    torch.manual_seed(seed)
    cfg = ReaRecConfig(
        n_items=draw(st.integers(5, 300)), hidden_size=heads * head_dim, n_heads=heads,
        n_layers=draw(st.integers(1, 3)), inner_size=draw(st.integers(8, 64)),
        max_len=draw(st.integers(1, 20)), reason_steps=draw(st.integers(0, 4)),
        hidden_act=draw(st.sampled_from(["gelu", "relu", "swish"])),
    )
    model = ReaRec(cfg).eval()
    with torch.no_grad():  # make LayerNorm affine parameters and biases matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, torch.Generator().manual_seed(seed)


@given(models(), st.integers(1, 33))
@settings(**SETTINGS)
def test_engine_matches_reference_every_depth_and_readout(drawn, batch):
    model, gen = drawn
    engine = FastReaRec.from_model(model)
    histories = ragged(batch, model.config.n_items, model.config.max_len + 3, gen)
    k = min(20, model.config.n_items)
    for depth in range(model.config.reason_steps + 1):
        expected = model.reasoning_states(histories, depth=depth)
        got = engine.reasoning_states(histories, depth=depth)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-5
        for readout in ("last", "mean"):
            for exclude_seen in (False, True):
                want = model.recommend(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen)
                have = engine.recommend(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen)
                finite = torch.isfinite(want.scores)
                assert torch.equal(have.items[finite], want.items[finite])
                assert torch.allclose(have.scores[finite], want.scores[finite], atol=1e-4, rtol=1e-5)


def test_engine_matches_golden():
    if not os.path.exists(GOLDEN):
        pytest.skip("golden file not beside this checkout")
    golden = torch.load(GOLDEN, weights_only=True)
    engine = FastReaRec.from_official_checkpoint(golden["state_dict"], n_heads=2)
    histories = golden_histories(golden)
    assert (engine.reasoning_states(histories) - golden["reasoning_states"]).abs().max() < 1e-5
    assert (engine.reasoning_states(histories, depth=1) - golden["reasoning_states_1step"]).abs().max() < 1e-5
    assert torch.equal(engine.recommend(histories, k=20).items, golden["prl_top20"])
    assert torch.equal(engine.recommend(histories, k=20, readout="mean").items, golden["erl_top20"])
    assert not (engine.recommend(histories, k=299).items == 299).any()  # the padding row is never served


def test_engine_triton_backend_under_interpreter():
    torch.manual_seed(3)
    model = ReaRec(ReaRecConfig(n_items=40, hidden_size=32, n_heads=2, inner_size=16, max_len=6, reason_steps=2)).eval()
    engine = FastReaRec.from_model(model, backend="triton")
    histories = ragged(3, 40, 6, torch.Generator().manual_seed(4))
    assert (engine.reasoning_states(histories) - model.reasoning_states(histories)).abs().max() < 1e-5
    assert torch.equal(engine.recommend(histories, k=5).items, model.recommend(histories, k=5).items)


def test_engine_is_safe_to_share_between_threads():
    torch.manual_seed(5)
    model = ReaRec(ReaRecConfig(n_items=200, hidden_size=32, n_heads=2, inner_size=32, max_len=12, reason_steps=3)).eval()
    engine = FastReaRec.from_model(model)
    gen = torch.Generator().manual_seed(6)
    batches = [ragged(int(torch.randint(1, 9, (1,), generator=gen)), 200, 12, gen) for _ in range(12)]
    depths = [i % 4 for i in range(12)]
    serial = [engine.recommend(b, k=10, depth=d).items for b, d in zip(batches, depths)]
    results = [None] * 12
    barrier = threading.Barrier(4)

    def worker(offset):
        barrier.wait()
        for _ in range(3):
            for i in range(offset, 12, 4):
                results[i] = engine.recommend(batches[i], k=10, depth=depths[i]).items

    threads = [threading.Thread(target=worker, args=(o,)) for o in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(serial, results):
        assert torch.equal(want, got)


def test_engine_raw_ids_and_checkpoint(tmp_path):
    torch.manual_seed(7)
    model = ReaRec(ReaRecConfig(n_items=30, hidden_size=16, n_heads=2, inner_size=16, max_len=8, reason_steps=2)).eval()
    items = [f"item-{i}" for i in range(30)]
    model.save(tmp_path / "m.safetensors", id_mapping=IdMapping(["u"], items))
    engine = FastReaRec.load(tmp_path / "m.safetensors", cuda_graphs=False)
    recs = engine.recommend([["item-3", "item-7"], ["item-29"]], k=4, exclude_seen=True)
    dense = model.recommend([[3, 7], [29]], k=4, exclude_seen=True)  # the model has no mapping
    assert torch.equal(recs.items, dense.items)
    assert recs.raw_items == [[items[i] for i in row] for row in dense.items.tolist()]
    with pytest.raises(ValueError, match="item 'nope'"):
        engine.recommend([["nope"]])
    assert torch.equal(engine.recommend([[3, 7]], k=4, raw_ids=False).items, model.recommend([[3, 7]], k=4).items)
