"""FastReaRec against ReaRec's reference path and the paper's golden outputs."""
import random
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec import ReaRec, ReaRecConfig
from rearec.data import IdMapping
from rearec.engine import FastReaRec
from rearec_kernels.backend import triton_available

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
            with torch.no_grad():
                reference = model.scores(model.readout(expected, readout))  # (B, N): every item's score
            for exclude_seen in (False, True):
                want = model.recommend(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen)
                have = engine.recommend(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen)
                finite = torch.isfinite(want.scores)
                assert torch.allclose(have.scores[finite], want.scores[finite], atol=1e-4, rtol=1e-5)
                # Items may differ only between near-equal scores: the engine's picks score as well
                # as the model's under the model's own scores. The -1 tails (nothing left) agree.
                picked = reference.gather(1, have.items.clamp(min=0))
                assert torch.allclose(picked[finite], want.scores[finite], atol=1e-4, rtol=1e-5)
                assert torch.equal(have.items[~finite], want.items[~finite])


def test_engine_matches_golden(golden):
    engine = FastReaRec.from_official_checkpoint(golden["state_dict"], n_heads=golden["config"]["num_heads"])
    histories = golden["histories"]
    assert (engine.reasoning_states(histories) - golden["reasoning_states"]).abs().max() < 1e-5
    assert (engine.reasoning_states(histories, depth=1) - golden["reasoning_states_1step"]).abs().max() < 1e-5
    assert torch.equal(engine.recommend(histories, k=20).items, golden["prl_top20"])
    assert torch.equal(engine.recommend(histories, k=20, readout="mean").items, golden["erl_top20"])
    pad = golden["config"]["pad_id"]
    assert not (engine.recommend(histories, k=pad).items == pad).any()  # the padding row is never served
    with pytest.raises(ValueError, match=f"history 0 holds item id {pad}, which is the model's padding item"):
        engine.recommend([[pad]])
    for flag in (False, True):  # the constructor's options reach it from here too
        plain = FastReaRec.from_official_checkpoint(golden["state_dict"], n_heads=golden["config"]["num_heads"],
                                                    bf16_filter=flag)
        assert (plain.scoring_index.filter_table is None) == (not flag)


def test_model_and_engine_break_ties_and_rank_nan_alike():
    """ReaRec.recommend ranked with torch.topk: equal scores in no set order and NaN first, where fused_topk
    (the engine) puts the lower id first and NaN last. Every item equal: the engine gave 0, 1, 2, the
    model 33, 34, 35; both now follow the contract."""
    torch.manual_seed(1)
    model = ReaRec(ReaRecConfig(n_items=40, hidden_size=16, n_heads=2, inner_size=16, max_len=5, reason_steps=1)).eval()
    histories = [[1, 2, 3], [7]]
    with torch.no_grad():
        model.item_embedding.weight[:] = model.item_embedding.weight[5]
    for exclude_seen in (False, True):
        want = torch.tensor([[0, 4, 5], [0, 1, 2]]) if exclude_seen else torch.tensor([[0, 1, 2]] * 2)
        assert torch.equal(model.recommend(histories, k=3, exclude_seen=exclude_seen).items, want)
        assert torch.equal(FastReaRec.from_model(model).recommend(histories, k=3, exclude_seen=exclude_seen).items, want)
    with torch.no_grad():
        model.item_embedding.weight[torch.arange(0, 40, 2)] = float("nan")  # every even item scores NaN
        model.item_embedding.weight[3] = model.item_embedding.weight[1] * 2
    recs = model.recommend([[9]], k=40)
    assert recs.items[0, :20].tolist()[:2] in ([1, 3], [3, 1]) and recs.items[0, 20:].tolist() == list(range(0, 40, 2))
    assert torch.equal(recs.items, FastReaRec.from_model(model).recommend([[9]], k=40).items)


def test_graph_buckets_are_counted_without_the_plain_buffer_set():
    """With CUDA graphs a thread keeps MAX_GRAPH_BUCKETS_PER_THREAD buckets, least recent dropped; the one
    buffer set of calls without graphs (adaptive readout) sat in the same pool, counted as a bucket and
    could be dropped for one. Exercised on CPU: the pool's bookkeeping needs no GPU."""
    from rearec.engine import MAX_GRAPH_BUCKETS_PER_THREAD
    engine = FastReaRec.from_model(ReaRec(ReaRecConfig(n_items=20, hidden_size=8, n_heads=2, inner_size=8,
                                                       max_len=3, reason_steps=1)).eval())
    plain = engine._buffers(3, per_bucket=False)
    buckets = [1 << i for i in range(MAX_GRAPH_BUCKETS_PER_THREAD + 2)]
    for b in buckets:
        engine._buffers(b, per_bucket=True)
    pool = engine._local.buffers
    assert pool["rows"] is plain and sorted(k for k in pool if k != "rows") == buckets[2:]


def test_the_engine_uses_the_input_layernorm_eps():
    """The input LayerNorm's eps (``input_norm_eps``) may differ from the layers' (an official checkpoint's):
    the engine applies each where the model does."""
    torch.manual_seed(3)
    config = ReaRecConfig(n_items=30, hidden_size=16, n_heads=2, inner_size=16, max_len=5, reason_steps=2,
                          layer_norm_eps=1e-5, input_norm_eps=0.5)
    model = ReaRec(config).eval()
    histories = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    want = model.reasoning_states(histories)
    same_eps = ReaRec(ReaRecConfig(**dict(config.to_dict(), input_norm_eps=None)))
    same_eps.load_state_dict(model.state_dict())
    assert (same_eps.eval().reasoning_states(histories) - want).abs().max() > 1e-3  # the eps matters here
    assert (FastReaRec.from_model(model).reasoning_states(histories) - want).abs().max() < 1e-5


def test_engine_triton_backend(device):
    """The Triton kernels inside the whole engine: through the interpreter on CPU, compiled on CUDA
    (with CUDA graphs, and without)."""
    seed = int(torch.randint(1 << 30, (1,)))
    torch.manual_seed(seed)
    model = ReaRec(ReaRecConfig(n_items=40, hidden_size=32, n_heads=2, inner_size=16, max_len=6, reason_steps=2)).eval()
    histories = ragged(3, 40, 6, torch.Generator().manual_seed(seed + 1))
    want = model.reasoning_states(histories)
    for cuda_graphs in ((True, False) if device.type == "cuda" else (False,)):
        engine = FastReaRec.from_model(model, device=device, backend="triton", cuda_graphs=cuda_graphs)
        assert (engine.reasoning_states(histories).cpu() - want).abs().max() < 1e-5, f"seed={seed}"
        got, expected = engine.recommend(histories, k=5), model.recommend(histories, k=5)
        torch.testing.assert_close(got.scores.cpu(), expected.scores, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
        assert torch.equal(got.items.cpu(), expected.items), f"seed={seed}"


@pytest.mark.parametrize("backend, graphed", [(None, True), ("triton", True), ("reference", False)])
def test_engine_decides_cuda_graphs_without_a_gpu(backend, graphed):
    """Whether an engine on CUDA replays its reasoning steps from graphs is decided by the decode
    attention's backend. CPU CI never reaches that decision (it asks for CUDA first), so it runs here
    with the engine's device set to CUDA by hand: it once called the backend resolver without the op's
    name, and every CUDA call failed with a TypeError."""
    model = ReaRec(ReaRecConfig(n_items=20, hidden_size=16, n_heads=2, inner_size=16, max_len=4, reason_steps=1)).eval()
    kwargs = {} if backend is None else {"backend": backend}
    engine = FastReaRec.from_model(model, **kwargs)
    assert engine._graphed() is False  # on CPU: never
    engine.device = torch.device("cuda")
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    assert engine._graphed() is graphed
    engine.cuda_graphs = False
    assert engine._graphed() is False


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


def test_bf16_filter_serves_the_float32_answer():
    # A float32 engine with the bf16 copy of its table answers as the one without: the same items, the
    # float32 scores (rescored from the float32 rows: equal up to summation order).
    seed = int(torch.randint(1 << 30, (1,)))
    torch.manual_seed(seed)
    model = ReaRec(ReaRecConfig(n_items=3000, hidden_size=64, n_heads=2, inner_size=64, max_len=12, reason_steps=2)).eval()
    gen = torch.Generator().manual_seed(seed)
    histories = ragged(9, 3000, 12, gen)
    plain, filtered = (FastReaRec.from_model(model, bf16_filter=flag) for flag in (False, True))
    assert plain.scoring_index.filter_table is None and filtered.scoring_index.filter_table is not None
    for depth in (0, 2):
        for exclude_seen in (False, True):
            want = plain.recommend(histories, k=20, depth=depth, exclude_seen=exclude_seen)
            got = filtered.recommend(histories, k=20, depth=depth, exclude_seen=exclude_seen)
            torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")
            # Items equal, except where two scores are too close for the rounding to order them.
            s = want.scores
            gap = torch.full_like(s, float("inf"))
            gap[:, 1:] = (s[:, 1:] - s[:, :-1]).abs()
            gap[:, :-1] = torch.minimum(gap[:, :-1], gap[:, 1:].clone())
            gap[:, -1] = 0.0  # the k-th may trade places with the (k+1)-th, unseen here
            differ = got.items != want.items
            assert (gap[differ] <= 1e-5).all(), f"seed={seed}: items differ where scores do not tie"
    with pytest.raises(ValueError, match="bf16_filter must be None"):
        FastReaRec.from_model(model, bf16_filter="yes")
    # The other flags too: cuda_graphs="false" was truthy (graphs on), shard_items=1 sharded.
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        FastReaRec.from_model(model, cuda_graphs="false")
    with pytest.raises(ValueError, match="shard_items must be True or False"):
        FastReaRec.from_model(model, shard_items=1)
    assert FastReaRec.from_model(model, bf16_filter=np.False_).scoring_index.filter_table is None


# Each user's KL per step (1..K-1): 0 halts it there, 1 goes on; the engine's own KL is replaced by this
# schedule, so that every branch of the shrinking decode batch is reached on purpose.
HALT_SCHEDULES = {
    "mixed": {1: [0, 1, 0, 1, 1], 2: [None, 1, None, 1, 0]},  # users 0, 2 leave at 1; user 4, later, at 2
    "all at step 1": {1: [0, 0, 0, 0, 0]},
    "none": {1: [1, 1, 1, 1, 1], 2: [1, 1, 1, 1, 1]},
    "one user": {1: [1], 2: [0]},
}


@pytest.mark.parametrize("schedule", list(HALT_SCHEDULES))
def test_adaptive_readout_maps_halted_users_back_by_schedule(schedule, monkeypatch):
    """The global index of a user that halts after others left (user 4 at step 2, once users 0 and 2 are
    gone) is where local indexing would go wrong; the seeded test above reaches it only by chance."""
    kls = HALT_SCHEDULES[schedule]
    B = len(kls[1])
    torch.manual_seed(3)
    model = ReaRec(ReaRecConfig(n_items=50, hidden_size=16, n_heads=2, inner_size=16, max_len=6, reason_steps=3,
                                halt_kl=0.5)).eval()
    histories = ragged(B, 50, 6, torch.Generator().manual_seed(3))
    with torch.no_grad():
        states = model.reasoning_states(histories)  # (B, K+1, d): every step of every user
    engine = FastReaRec.from_model(model)
    calls = []

    def scheduled_kl(newer, older, chunk=8192):
        calls.append(len(newer))
        s = len(calls)
        who = torch.cdist(newer.float(), states[:, s]).argmin(1)  # the users still in the decode batch
        return torch.tensor([float(kls[s][int(u)]) for u in who], dtype=torch.float64)

    monkeypatch.setattr(engine, "_step_kl", scheduled_kl)
    vectors, steps = engine.adaptive_states(histories)
    want_steps = [next((s for s in (1, 2) if kls.get(s) and kls[s][b] == 0), 3) for b in range(B)]
    assert steps.tolist() == want_steps
    torch.testing.assert_close(vectors, states[torch.arange(B), steps], rtol=1e-5, atol=1e-5)
    # the decode batch shrinks as users halt: each step's KL is computed for the users still going on
    assert calls == [B, sum(s > 1 for s in want_steps)][:len(calls)] and len(calls) == (1 if schedule == "all at step 1" else 2)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_adaptive_readout_matches_the_model(backbone):
    # readout="adaptive": the engine decides step by step (halted users leave the decode batch, the KL
    # streams over the table in chunks) what ReaRec.halting_readout decides from all steps at once.
    seed = int(torch.randint(1 << 30, (1,)))
    torch.manual_seed(seed)
    model = ReaRec(ReaRecConfig(n_items=20000, hidden_size=32, n_heads=2, inner_size=32, max_len=12, reason_steps=3,
                                backbone=backbone, temperature=0.01)).eval()
    gen = torch.Generator().manual_seed(seed)
    histories = ragged(24, 20000, 12, gen)
    states = model.reasoning_states(histories)
    with torch.no_grad():
        log_p = torch.log_softmax(model.scores(states).double(), dim=-1)
    kl = (log_p[:, 1:].exp() * (log_p[:, 1:] - log_p[:, :-1])).sum(-1)[:, :-1]  # the decisions that matter
    # eps in the widest gap between KL values (no rounding can flip a decision) that leaves between a
    # quarter and three quarters of the users halting at step 1
    values = kl.flatten().sort().values
    gaps = [(float(values[j + 1] - values[j]), float(values[j] + values[j + 1]) / 2) for j in range(len(values) - 1)]
    fair = [(gap, eps) for gap, eps in gaps if 6 <= int((kl[:, 0] < eps).sum()) <= 18]
    model.config.halt_kl = max(fair)[1]
    want_vectors, want_steps = model.halting_readout(states, model.config.halt_kl)
    assert 6 <= int((want_steps == 1).sum()) <= 18 and (want_steps > 1).any(), f"seed={seed}"
    engine = FastReaRec.from_model(model)
    got_vectors, got_steps = engine.adaptive_states(histories)
    assert torch.equal(got_steps, want_steps), f"seed={seed}"
    torch.testing.assert_close(got_vectors, want_vectors, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    want = model.recommend(histories, k=10, readout="adaptive", exclude_seen=True)
    got = engine.recommend(histories, k=10, readout="adaptive", exclude_seen=True)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    assert (got.items == want.items).float().mean() > 0.99, f"seed={seed}"
    # The direction, KL(p_s || p_{s-1}): an eps between a user's KL and its reverse halts that user
    # one way only (the two are close for close distributions, so the gaps above cannot tell).
    reverse = (log_p[:, :-1].exp() * (log_p[:, :-1] - log_p[:, 1:])).sum(-1)[:, 0]
    apart = torch.where(kl[:, 0] > 1e-4, (kl[:, 0] - reverse).abs() / kl[:, 0], -1.0)
    candidates = [float(kl[u, 0] + reverse[u]) / 2 for u in apart.argsort(descending=True).tolist() if apart[u] > 0.01]
    eps = next(e for e in candidates if (kl - e).abs().min() > 1e-3 * e)  # no KL value near it
    model.config.halt_kl = eps
    assert torch.equal(engine.adaptive_states(histories)[1], model.halting_readout(states, eps)[1]), f"seed={seed}"
    model.config.halt_kl = max(fair)[1]
    for depth in (0, 1):  # a shallower call halts within it (depth 0: at step 0)
        assert torch.equal(engine.adaptive_states(histories, depth=depth)[1],
                           model.halting_readout(states[:, :depth + 1], model.config.halt_kl)[1])
    want = model.recommend(histories, k=10, depth=0, readout="adaptive")
    got = engine.recommend(histories, k=10, depth=0, readout="adaptive")
    assert torch.equal(want.items, model.recommend(histories, k=10, depth=0).items)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_adaptive_readout_when_scores_move_far_between_steps():
    """Large weights (init_std 0.3) move items' scores by far more than float32's exp range between
    steps (scaled drops of 27-144 here): the engine's streamed KL must still be the model's, not NaN
    (then no such user ever halted), and every halting decision and recommendation the same."""
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(n_items=5000, hidden_size=64, n_heads=2, inner_size=64, max_len=10, reason_steps=2,
                                init_std=0.3)).eval()
    g = torch.Generator().manual_seed(1)
    histories = [torch.randint(5000, (8,), generator=g).tolist() for _ in range(16)]
    states = model.reasoning_states(histories)
    with torch.no_grad():
        log_p = torch.log_softmax(model.scores(states).double(), dim=-1)
    kl = (log_p[:, 1].exp() * (log_p[:, 1] - log_p[:, 0])).sum(-1)
    assert ((kl > 0.1) & (kl < 1.0)).any() and (kl > 1.0).any()  # users on both sides of halt_kl below
    model.config.halt_kl = 1.0
    engine = FastReaRec.from_model(model, session_cache_mb=0)
    assert torch.equal(engine.adaptive_states(histories)[1], model.halting_readout(states, 1.0)[1])
    want, got = model.recommend(histories, k=5, readout="adaptive"), engine.recommend(histories, k=5, readout="adaptive")
    assert torch.equal(got.items, want.items)


def test_streamed_kl_when_a_step_moves_every_score_alike():
    """Item rows sharing a component, and two steps' user vectors that differ along it: every score
    moves by the same 7-43 nats, which leaves the distribution (nearly) unchanged. The streamed KL must
    stay the float64 one: exp(-20) rounded to 0 beside 1 made it -inf (and such users halted at once)."""
    torch.manual_seed(1)
    model = ReaRec(ReaRecConfig(n_items=200, hidden_size=32, n_heads=2, inner_size=24, max_len=8)).eval()
    with torch.no_grad():
        model.item_embedding.weight.copy_(0.02 * torch.randn(200, 32))
        model.item_embedding.weight[:, 0] += 1.0  # every item: e_0 plus a little noise
    engine = FastReaRec.from_model(model, session_cache_mb=0)
    older = torch.randn(6, 32)
    newer = older.clone()
    newer[:, 0] += torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])  # scores move by delta / 0.07 nats
    got = engine._step_kl(newer, older)  # one chunk; below, chunks of 7 rows (the top item moves between them)
    table = model.item_embedding.weight.double()
    log_new = torch.log_softmax(newer.double() @ table.T / model.config.temperature, dim=-1)
    log_old = torch.log_softmax(older.double() @ table.T / model.config.temperature, dim=-1)
    want = (log_new.exp() * (log_new - log_old)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(engine._step_kl(newer, older, chunk=7), want, rtol=1e-4, atol=1e-7)


def test_adaptive_readout_needs_halt_kl():
    model = ReaRec(ReaRecConfig(n_items=50, hidden_size=16, n_heads=2, inner_size=16, max_len=8, reason_steps=2)).eval()
    for call in (lambda: model.recommend([[1, 2]], readout="adaptive"),
                 lambda: FastReaRec.from_model(model).recommend([[1, 2]], readout="adaptive")):
        with pytest.raises(ValueError, match="config.halt_kl"):
            call()
    with pytest.raises(ValueError, match="halt_kl must be None or a finite number of nats > 0"):
        ReaRecConfig(n_items=50, halt_kl=-1.0)
    with pytest.raises(ValueError, match="readout 'adaptive'"):
        ReaRecConfig(n_items=50, readout="adaptive")


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


@pytest.mark.parametrize("pad_item", [0, 7, 19])
def test_profile_draws_real_items_for_any_padding_item(pad_item, monkeypatch):
    """profile_latency swapped random ids equal to pad_item for 0, which is the padding item itself when
    pad_item is 0: recommend refused the history (a crash for such a checkpoint, e.g. at N=1682, B=256)."""
    from rearec.profile import profile_latency
    model = ReaRec(ReaRecConfig(n_items=20, hidden_size=8, n_heads=2, inner_size=8, max_len=6, reason_steps=1,
                                pad_item=pad_item)).eval()
    engine = FastReaRec.from_model(model)
    seen = []
    real_recommend = engine.recommend
    monkeypatch.setattr(engine, "recommend", lambda histories, **kw: seen.append(histories.clone())
                        or real_recommend(histories, **kw))
    rows = profile_latency(engine, [0, 1], [64], repeats=1)
    assert len(rows) == 2 and seen
    drawn = torch.cat([h.flatten() for h in seen])
    assert not (drawn == pad_item).any() and set(drawn.tolist()) == set(range(20)) - {pad_item}


def test_an_engine_on_cuda_without_an_index_keeps_the_gpu_current_when_it_was_built(monkeypatch):
    """device="cuda" named each calling thread's current GPU: a batcher worker (cuda:0 current) put its
    inputs and caches beside no weights when the engine was built with cuda:1 current. The engine pins
    the index it was built with; other devices stay as they are."""
    from rearec.engine import pin_cuda_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert pin_cuda_index(torch.device("cuda")) == torch.device("cuda", 1)
    assert pin_cuda_index(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert pin_cuda_index(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: left for torch to refuse
    assert pin_cuda_index(torch.device("cuda")) == torch.device("cuda")
