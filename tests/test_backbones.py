"""The BERT4Rec backbone: RecBole parity, prefix masking of the reasoning tokens, cloze training,
checkpoints."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rearec import ReaRec, ReaRecConfig
from rearec.objectives import cloze_loss, training_loss
from tests.conftest import skip_without

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(deadline=None, max_examples=6, suppress_health_check=[HealthCheck.too_slow])


def bert4rec(seed, n_items=47, hidden=24, heads=2, layers=2, inner=31, max_len=9, reason_steps=3, **extra):
    torch.manual_seed(seed)
    cfg = ReaRecConfig(n_items=n_items, hidden_size=hidden, n_heads=heads, n_layers=layers, inner_size=inner,
                       max_len=max_len, reason_steps=reason_steps, backbone="bert4rec",
                       objective="base" if reason_steps == 0 else "prl", **extra)
    model = ReaRec(cfg).eval()
    with torch.no_grad():  # make biases and LayerNorm affine parameters matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def histories(gen, batch, n_items, longest):
    lengths = torch.randint(1, longest + 1, (batch,), generator=gen)
    lengths[-1] = longest
    return [torch.randint(n_items, (int(n),), generator=gen).tolist() for n in lengths]


# ---------------------------------------------------------------------------------- RecBole parity
def recbole_bert4rec(n_items, hidden, heads, layers, inner, max_len, eps):
    """RecBole 1.2.1's BERT4Rec (its item 0 is padding, item n_items the mask), or a skip."""
    try:
        from recbole.model.sequential_recommender.bert4rec import BERT4Rec
    except Exception as error:  # recbole is installed --no-deps; its imports need colorlog, tensorboard...
        skip_without("recbole", f"RecBole's BERT4Rec does not import here ({error}); pip install rearec[test]")
    config = {
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": max_len,
        "device": "cpu", "n_layers": layers, "n_heads": heads, "hidden_size": hidden, "inner_size": inner,
        "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "hidden_act": "gelu", "layer_norm_eps": eps,
        "mask_ratio": 0.2, "MASK_ITEM_SEQ": "mask_seq", "POS_ITEMS": "pos", "NEG_ITEMS": "neg",
        "MASK_INDEX": "mask_index", "loss_type": "CE", "initializer_range": 0.02,
    }

    class Dataset:
        def num(self, field):
            return n_items

    return BERT4Rec(config, Dataset()).eval()


def recbole_weights_into(model: ReaRec, theirs: dict) -> None:
    """Our own mapping of RecBole BERT4Rec's state_dict onto ours (every tensor used exactly once)."""
    n = model.config.n_items
    mapped = {
        "item_embedding.weight": theirs["item_embedding.weight"][:n],
        "mask_embedding": theirs["item_embedding.weight"][n],
        "position_embedding.weight": theirs["position_embedding.weight"],
        "input_norm.weight": theirs["LayerNorm.weight"], "input_norm.bias": theirs["LayerNorm.bias"],
        "output_head.dense.weight": theirs["output_ffn.weight"], "output_head.dense.bias": theirs["output_ffn.bias"],
        "output_head.norm.weight": theirs["output_ln.weight"], "output_head.norm.bias": theirs["output_ln.bias"],
        "output_bias": theirs["output_bias"],
    }
    roles = {"query": "multi_head_attention.query", "key": "multi_head_attention.key",
             "value": "multi_head_attention.value", "attn_out": "multi_head_attention.dense",
             "attn_norm": "multi_head_attention.LayerNorm", "ffn_in": "feed_forward.dense_1",
             "ffn_out": "feed_forward.dense_2", "ffn_norm": "feed_forward.LayerNorm"}
    for i in range(model.config.n_layers):
        for ours, name in roles.items():
            for part in ("weight", "bias"):
                mapped[f"layers.{i}.{ours}.{part}"] = theirs[f"trm_encoder.layer.{i}.{name}.{part}"]
    used = set(mapped) | {"reasoning_position_embedding.weight"}
    assert used == set(model.state_dict()), set(model.state_dict()) ^ used
    model.load_state_dict({**model.state_dict(), **mapped})


@given(st.integers(0, 2**31 - 1), st.sampled_from([(1, 8), (2, 12), (3, 8)]), st.integers(1, 3),
       st.integers(2, 13), st.integers(1, 9))
@settings(**SETTINGS)
def test_bert4rec_matches_recbole(seed, heads_dim, layers, max_len, batch):
    heads, head_dim = heads_dim
    n_items, hidden, inner, eps = 31, heads * head_dim, 23, 1e-12
    torch.manual_seed(seed)
    theirs = recbole_bert4rec(n_items, hidden, heads, layers, inner, max_len, eps)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = ReaRecConfig(n_items=n_items, hidden_size=hidden, n_heads=heads, n_layers=layers, inner_size=inner,
                       max_len=max_len, layer_norm_eps=eps, backbone="bert4rec", objective="base",
                       temperature=1.0, pad_item=0, dropout=0.0, input_dropout=0.0)
    ours = ReaRec(cfg).eval()
    recbole_weights_into(ours, theirs.state_dict())

    # RecBole's input: right-padded sequences of ids 1..n-1, lengths >= 2. Its prediction appends the
    # mask token and drops the sequence's first column, so it sees items 2..n + mask: ours gets those.
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (batch,), generator=gen)
    seq = torch.randint(1, n_items, (batch, max_len), generator=gen)
    seq[torch.arange(max_len)[None, :] >= lengths[:, None]] = 0
    with torch.no_grad():
        want = theirs.full_sort_predict({"item_id_list": seq, "item_length": lengths})
        ours_histories = [row[1:n].tolist() for row, n in zip(seq, lengths.tolist())]
        states = ours.reasoning_states(ours_histories, depth=0)
        got = ours.scores(ours.readout(states))
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------- prefix masking
def full_sequence_reference(model: ReaRec, history: list, depth: int):
    """Step by step, WITHOUT a cache: the whole sequence (history slots + reasoning tokens so far) goes
    through every layer under the prefix mask. -> (encoder states r_0..r_depth (depth+1, d), each
    step's per-layer history outputs: list over steps of list over layers of (T, d))."""
    cfg = model.config
    slots = history[-(cfg.max_len - 1):]
    T = len(slots) + 1
    x = torch.cat([model.item_embedding.weight[slots], model.mask_embedding[None]])
    x = model.input_norm(x + model.position_embedding.weight[:T])
    tokens, states, history_outputs = [], [], []
    for s in range(depth + 1):
        n = T + len(tokens)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        allowed[:T, :T] = True  # history: bidirectional, never a reasoning token
        for j in range(T, n):  # reasoning token: the whole history and reasoning tokens up to itself
            allowed[j, : j + 1] = True
        h = torch.cat([x] + tokens)[None]
        outputs = []
        for layer in model.layers:
            h = layer(h, allowed[None, None])
            outputs.append(h[0, :T])
        history_outputs.append(outputs)
        r = h[0, T - 1] if s == 0 else h[0, -1]
        states.append(r)
        if s < depth:
            tokens.append(model.input_norm(r + model.reasoning_position_embedding.weight[s])[None])
    return torch.stack(states), history_outputs


@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(0, 4))
@settings(**SETTINGS)
def test_reasoning_follows_the_prefix_mask_and_changes_no_history_state(seed, length, steps):
    model = bert4rec(seed, reason_steps=steps)
    history = torch.randint(model.config.n_items, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        want, history_outputs = full_sequence_reference(model, history, steps)
        got = model.reasoning_states([history])[0]
        assert (got - model.output_states(want)).abs().max() <= 1e-5
    # Adding reasoning tokens changes no history slot, at any layer (up to the rounding of a longer
    # softmax row: the masked keys add exact zeros, in another summation order).
    for outputs in history_outputs[1:]:
        for layer_output, first in zip(outputs, history_outputs[0]):
            assert (layer_output - first).abs().max() <= 1e-6


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 12), min_size=2, max_size=5), st.integers(1, 3))
@settings(**SETTINGS)
def test_a_ragged_batch_at_depth_follows_the_prefix_mask_row_by_row(seed, lengths, steps):
    """The padded, ragged batch (where padding keys must stay out of every reasoning token's view) against
    the uncached reference of each history alone."""
    model = bert4rec(seed, reason_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    histories = [torch.randint(model.config.n_items, (n,), generator=gen).tolist() for n in lengths]
    with torch.no_grad():
        got = model.reasoning_states(histories)
        for row, history in zip(got, histories):
            want, _ = full_sequence_reference(model, history, steps)
            assert (row - model.output_states(want)).abs().max() <= 1e-5


def test_a_new_item_changes_every_earlier_state():
    """Why no cache may keep a BERT4Rec history: bidirectional attention lets a new item change the
    states of every earlier slot (SASRec's causal ones stay)."""
    model = bert4rec(3, reason_steps=0)
    with torch.no_grad():
        short = full_sequence_reference(model, [5, 6, 7], 0)[1][0][-1]
        longer = full_sequence_reference(model, [5, 6, 7, 8], 0)[1][0][-1]
    assert (short[:3] - longer[:3]).abs().min() > 0


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("objective", ["base", "erl", "prl"])
def test_training_loss_runs_cloze_and_the_objective(objective):
    torch.manual_seed(0)
    cfg = ReaRecConfig(n_items=37, hidden_size=16, n_heads=2, inner_size=24, max_len=7, objective=objective,
                       backbone="bert4rec", warmup_epochs=0)
    model = ReaRec(cfg)
    padded = torch.randint(37, (5, 7))
    lengths, targets = torch.tensor([1, 3, 7, 6, 2]), torch.randint(37, (5,))
    loss = training_loss(model, padded, lengths, targets, epoch=5)
    loss.backward()
    assert torch.isfinite(loss) and model.mask_embedding.grad.abs().sum() > 0
    assert model.output_bias.grad.abs().sum() > 0
    if objective != "base":
        assert model.reasoning_position_embedding.weight.grad.abs().sum() > 0


def test_cloze_loss_is_cross_entropy_at_the_masked_slots():
    model = bert4rec(1, reason_steps=0, max_len=6)
    model.train()
    model.config.dropout = model.config.input_dropout = 0.0
    for layer in model.layers:
        layer.dropout = 0.0
    padded = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 0, 0, 0, 0]])
    lengths, targets = torch.tensor([6, 2]), torch.tensor([11, 12])
    got = cloze_loss(model, padded, lengths, targets, generator=torch.Generator().manual_seed(4))
    # The same draw by hand: sequences are the newest 6 of history + target.
    sequences = torch.tensor([[4, 5, 6, 7, 8, 11], [9, 10, 12, 0, 0, 0]])
    seq_lengths = torch.tensor([6, 3])
    draw = torch.rand(2, 6, generator=torch.Generator().manual_seed(4)) < model.config.mask_ratio
    masked = draw & (torch.arange(6)[None] < seq_lengths[:, None])
    for b in range(2):
        if not masked[b].any():
            masked[b, seq_lengths[b] - 1] = True
    logits = []
    for b in range(2):  # one row at a time, each masked slot through the full-sequence model
        x = torch.where(masked[b, : seq_lengths[b], None], model.mask_embedding,
                        model.item_embedding.weight[sequences[b, : seq_lengths[b]]])
        h = model.input_norm(x + model.position_embedding.weight[: seq_lengths[b]])[None]
        for layer in model.layers:
            h = layer(h, None)
        out = model.output_head(h[0, masked[b, : seq_lengths[b]]])
        logits.append(out @ model.item_embedding.weight.T / model.config.temperature + model.output_bias)
    want = torch.nn.functional.cross_entropy(torch.cat(logits), sequences[masked])
    assert abs(float(got.detach()) - float(want.detach())) < 1e-5


# ---------------------------------------------------------------------------------- checkpoints and config
def test_checkpoint_records_the_backbone_and_old_ones_load_as_sasrec(tmp_path):
    model = bert4rec(2)
    path = tmp_path / "b.safetensors"
    model.save(path)
    loaded = ReaRec.load(path)
    assert loaded.config.backbone == "bert4rec"
    histories_ = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert torch.equal(loaded.reasoning_states(histories_), model.reasoning_states(histories_))

    from safetensors import safe_open
    from safetensors.torch import save_file

    sasrec = ReaRec(ReaRecConfig(n_items=11, hidden_size=8, n_heads=2, inner_size=8, max_len=5))
    sasrec.save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["config"])
    for key in ("backbone", "mask_ratio", "item_feature_dim"):  # as written before backbones existed
        del config[key]
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
    assert ReaRec.load(path).config.backbone == "sasrec"


def test_bad_backbone_settings_are_named():
    with pytest.raises(ValueError, match="backbone 'gru4rec' is unknown"):
        ReaRecConfig(n_items=5, backbone="gru4rec")
    with pytest.raises(ValueError, match="needs max_len >= 2"):
        ReaRecConfig(n_items=5, backbone="bert4rec", max_len=1)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        ReaRecConfig(n_items=5, backbone="bert4rec", mask_ratio=1.0)
    with pytest.raises(ValueError, match="masked_item_states is BERT4Rec's cloze task"):
        ReaRec(ReaRecConfig(n_items=5, max_len=3)).masked_item_states(None, None, None)


# ---------------------------------------------------------------------------------- command line
def test_cli_trains_and_evaluates_a_bert4rec_model_and_checks_the_backbone(tmp_path, capsys):
    from rearec.cli import main
    from rearec.runs import MODEL_FILE
    from tests.synthetic import write_log

    log = write_log(tmp_path / "log.csv")
    out = tmp_path / "run"
    tiny = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--inner-size", "16", "--max-len", "6",
            "--batch-size", "64", "--no-progress"]
    assert main(["train", "--data", str(log), "--objective", "erl", "--reason-steps", "1", "--epochs", "1",
                 "--backbone", "bert4rec", "--out", str(out), *tiny]) == 0
    assert ReaRec.load(out / MODEL_FILE).config.backbone == "bert4rec"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--backbone", "bert4rec", "--no-progress"]) == 0
    assert "bert4rec erl" in capsys.readouterr().out
    assert main(["recommend", "--checkpoint", str(out), "--user", "u1", "-k", "3", "--backbone", "bert4rec"]) == 0
    assert "u1" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(out), "--backbone", "sasrec", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "is a bert4rec model, not sasrec" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- kernels: bidirectional prefill
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@given(data=st.data())
@settings(deadline=None, max_examples=5, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_bidirectional_prefill_matches_plain_attention(backend, data):
    from rearec_kernels.attention import prefill_attention
    from rearec_kernels.kv_cache import KVCache

    B = data.draw(st.integers(1, 5))
    L = data.draw(st.sampled_from([1, 7, 19, 31]))
    H = data.draw(st.integers(1, 3))
    Dh = data.draw(st.sampled_from([8, 13, 16]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(B, L, H, Dh, generator=gen) for _ in range(3))
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    lengths[0] = L
    if backend != "cpu":  # padding may hold anything (the CPU path assumes it finite)
        padding = torch.arange(L)[None, :] >= lengths[:, None]
        for t in (q, k, v):
            t[padding] = float("nan")
    cache = KVCache.allocate(1, B, H, L + 2, Dh)
    out = torch.full((B, L, H, Dh), float("nan"))
    got = prefill_attention(q, k, v, lengths, cache, 0, backend=backend, out=out, causal=False)
    for b, n in enumerate(lengths.tolist()):  # every valid token attends to every valid token
        heads = [t[b, :n].transpose(0, 1).double() for t in (q, k, v)]
        weights = torch.softmax(heads[0] @ heads[1].transpose(1, 2) / Dh ** 0.5, dim=-1)
        assert (got[b, :n] - (weights @ heads[2]).transpose(0, 1)).abs().max() <= 1e-5
        assert (got[b, n:] == 0).all()
        assert torch.equal(cache.keys[0, b, :, :n], k[b, :n].transpose(0, 1))
        assert torch.equal(cache.values[0, b, :, :n], v[b, :n].transpose(0, 1))


def test_prefill_causal_flag_is_checked():
    from rearec_kernels.attention import prefill_attention

    x = torch.randn(1, 3, 1, 8)
    with pytest.raises(ValueError, match="causal must be True or False"):
        prefill_attention(x, x, x, torch.tensor([3]), causal="no")


# ---------------------------------------------------------------------------------- engine
def check_engine_against_model(backend, seed, batch, features, reason_steps=3, max_len=9):
    from rearec.engine import FastReaRec

    extra = {}
    if features:
        extra = dict(item_feature_dim=5)
    torch.manual_seed(seed)
    cfg = ReaRecConfig(n_items=47, hidden_size=24, n_heads=3, n_layers=2, inner_size=31, max_len=max_len,
                       reason_steps=reason_steps, backbone="bert4rec", objective="prl", **extra)
    model = ReaRec(cfg, item_features=torch.randn(47, 5) if features else None).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    engine = FastReaRec.from_model(model, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    batch_histories = histories(gen, batch, cfg.n_items, cfg.max_len + 2)
    for depth in range(cfg.reason_steps + 1):
        want = model.reasoning_states(batch_histories, depth=depth)
        got = engine.reasoning_states(batch_histories, depth=depth)
        assert (got - want).abs().max() <= 1e-5
        for readout in ("last", "mean"):
            with torch.no_grad():
                scores = model.scores(model.readout(want, readout))
            have = engine.recommend(batch_histories, k=7, depth=depth, readout=readout, exclude_seen=True)
            expected = model.recommend(batch_histories, k=7, depth=depth, readout=readout, exclude_seen=True)
            assert (have.scores - expected.scores).abs().max() <= 1e-4 * max(1.0, float(scores.abs().max()))
            # Each returned item's score is the model's score of that item.
            assert (have.scores - scores.gather(1, have.items)).abs().max() <= 1e-4 * max(1.0, float(scores.abs().max()))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.booleans())
@settings(deadline=None, max_examples=6, suppress_health_check=[HealthCheck.too_slow])
def test_engine_matches_the_model_at_every_depth(backend, seed, batch, features):
    check_engine_against_model(backend, seed, batch, features)


def test_engine_matches_the_model_with_triton_kernels():
    """The Triton kernels (in the interpreter here: one small case)."""
    check_engine_against_model("triton", seed=11, batch=2, features=True, reason_steps=1, max_len=5)


def test_engine_recomputes_bert4rec_histories_instead_of_caching_them():
    """A returning user's new item changes every earlier state, so nothing may be reused: results with
    ``users=`` equal the model's on the grown history, and the session cache stays empty."""
    from rearec.engine import FastReaRec

    model = bert4rec(5, reason_steps=2)
    engine = FastReaRec.from_model(model, session_cache_mb=64)
    assert engine.session_cache is None and not engine.causal_history
    history = [3, 1, 4, 1, 5]
    for new_item in (9, 2, 6, 5):
        got = engine.reasoning_states([history], users=["alice"])
        assert (got - model.reasoning_states([history])).abs().max() <= 1e-5
        history = history + [new_item]
    assert engine.cache_stats()["hits"] == 0 and engine.cache_stats()["bytes"] == 0
    sasrec = FastReaRec.from_model(ReaRec(ReaRecConfig(n_items=11, hidden_size=8, n_heads=2, inner_size=8,
                                                       max_len=5)), session_cache_mb=64)
    assert sasrec.session_cache is not None  # the causal backbone keeps its cache
