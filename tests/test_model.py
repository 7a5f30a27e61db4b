"""ReaRec model and objectives: golden parity with the paper's public code, semantics, training, errors."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rearec import ReaRec, ReaRecConfig
from rearec.data import IdMapping
from rearec.objectives import objective_loss, training_loss
from tests.synthetic import markov_sequences, next_item_samples

def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(n_items=57, hidden_size=32, n_heads=2, inner_size=48, max_len=12, reason_steps=3)
    cfg.update(overrides)
    return ReaRec(ReaRecConfig(**cfg)).eval()


def random_histories(n, n_items, max_len, seed=0, longest=None):
    g = torch.Generator().manual_seed(seed)
    longest = longest or max_len
    return [torch.randint(n_items, (int(torch.randint(1, longest + 1, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------- golden parity
# tests/golden/: outputs of the paper's public code (scripts/make_golden.py); see its README.
def official_model(golden, **overrides):
    return ReaRec.from_official_checkpoint(golden["state_dict"], n_heads=golden["config"]["num_heads"], **overrides)


def test_the_official_input_layernorm_keeps_its_fixed_eps(golden, tmp_path):
    """The public code's ReaRec wrapper builds its input LayerNorm without passing on layer_norm_eps: 1e-12
    whatever the run's. A layer_norm_eps override changed that one too (states moved by up to 7.5e-3)."""
    model = official_model(golden, layer_norm_eps=1e-5)
    norms = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert norms.pop("input_norm") == 1e-12 and norms and set(norms.values()) == {1e-5}
    model.save(str(tmp_path / "m.safetensors"))
    assert ReaRec.load(str(tmp_path / "m.safetensors")).input_norm.eps == 1e-12  # saved with the model
    assert official_model(golden, layer_norm_eps=1e-5, input_norm_eps=1e-5).input_norm.eps == 1e-5
    assert ReaRec(ReaRecConfig(n_items=5, layer_norm_eps=1e-5)).input_norm.eps == 1e-5  # ours: one eps by default
    with pytest.raises(ValueError, match="input_norm_eps must be None or > 0"):
        ReaRecConfig(n_items=5, input_norm_eps=0.0)


def test_golden_comes_from_the_pinned_public_code(golden):
    assert golden["source"]["repository"] == "TangJiakai/ReaRec"
    assert golden["source"]["commit"].startswith("7f46432")
    model = official_model(golden)
    config = golden["config"]
    assert not model.training and model.config.pad_item == config["pad_id"] == config["n_items"] - 1
    assert (model.config.reason_steps, model.config.hidden_size, model.config.inner_size, model.config.max_len) == (
        config["reason_step"], config["emb_size"], config["inner_size"], config["max_len"])


def test_golden_reasoning_states(golden):
    model = official_model(golden)
    states = model.reasoning_states(golden["histories"])
    assert states.shape == golden["reasoning_states"].shape
    assert (states - golden["reasoning_states"]).abs().max() < 1e-5
    one_step = model.reasoning_states(golden["histories"], depth=1)
    assert (one_step - golden["reasoning_states_1step"]).abs().max() < 1e-5


def test_golden_logits_and_top20(golden):
    model = official_model(golden)
    histories = golden["histories"]
    states = model.reasoning_states(histories)
    with torch.no_grad():
        assert (model.scores(model.readout(states, "last")) - golden["prl_logits"]).abs().max() < 1e-5
        assert (model.scores(model.readout(states, "mean")) - golden["erl_logits"]).abs().max() < 1e-5
    assert torch.equal(model.recommend(histories, k=20).items, golden["prl_top20"])
    assert torch.equal(model.recommend(histories, k=20, readout="mean").items, golden["erl_top20"])


def test_golden_from_path(golden, tmp_path):
    path = tmp_path / "official.pt"
    torch.save(golden["state_dict"], path)  # the public code saves its state_dict with torch.save
    model = ReaRec.from_official_checkpoint(str(path), n_heads=golden["config"]["num_heads"])
    assert (model.reasoning_states(golden["histories"]) - golden["reasoning_states"]).abs().max() < 1e-5


@pytest.mark.parametrize("objective", ["prl", "erl"])
def test_golden_losses(golden, objective):
    model = official_model(golden, objective=objective)
    hidden, items = golden["loss_hidden_states"], golden["state_dict"]["item_emb.weight"]
    batch = len(golden["labels"])
    noisy = hidden[batch:] if objective == "prl" else None
    loss = objective_loss(model.config, hidden[:batch], items, golden["labels"], noisy)
    expected = golden[f"{objective}_loss"]
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_golden_pad_item_never_recommended(golden):
    model = official_model(golden)
    n_items, pad = golden["config"]["n_items"], golden["config"]["pad_id"]
    recs = model.recommend(golden["histories"], k=n_items)
    assert recs.items.shape == (len(golden["histories"]), n_items)
    assert (recs.items[:, :-1] != pad).all() and torch.isfinite(recs.scores[:, :-1]).all()
    assert (recs.items[:, -1] == -1).all() and (recs.scores[:, -1] == -math.inf).all()  # nothing left
    with pytest.raises(ValueError, match=f"history 1 holds item id {pad}, which is the model's padding item"):
        model.recommend([[1, 2], [3, pad]])


# ---------------------------------------------------------------------------- semantics
def full_recompute_states(model, history, depth):
    """Independent reference: rerun the whole token sequence (history + reasoning tokens) at every
    step with a plain causal mask, as the public code does, and read the newest token."""
    d = model.config.hidden_size
    items = torch.tensor(history)
    tokens = model.input_norm(model.item_embedding(items) + model.position_embedding.weight[: len(history)])
    states = []
    for s in range(depth + 1):
        x = tokens[None]
        T = x.shape[1]
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
        for layer in model.layers:
            x = layer(x, causal)
        states.append(x[0, -1])
        if s < depth:
            new = model.input_norm(x[0, -1] + model.reasoning_position_embedding.weight[s])
            tokens = torch.cat([tokens, new[None]])
    return torch.stack(states)


@given(st.integers(0, 2**31 - 1))
@settings(deadline=None, max_examples=5)
@torch.no_grad()
def test_one_token_per_step_equals_full_recompute(seed):
    model = small_model(seed=1)
    histories = random_histories(9, 57, 12, seed=seed)
    states = model.reasoning_states(histories)
    for b, history in enumerate(histories):
        assert (states[b] - full_recompute_states(model, history, 3)).abs().max() < 1e-5


def test_noisy_copy_against_full_recompute(monkeypatch):
    """PRL's noisy copy: its step-s input is the CLEAN r_{s-1} + reason_pos plus noise, and it attends
    to its own history and earlier (noisy) reasoning tokens. Dropout off, the noise a fixed function of
    the token (standing in for torch.randn_like), against the full-sequence reference."""
    model = small_model(seed=2, dropout=0.0, input_dropout=0.0).train()
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.sin(7.0 * t))
    histories = random_histories(6, 57, 12, seed=3)
    padded, lengths = model.prepare_histories(histories)
    with torch.no_grad():
        clean, noisy = model.forward_with_noisy_copy(padded, lengths, noise_std=0.3)
    for b, history in enumerate(histories):
        want = full_recompute_states(model, history, 3)
        assert (clean[b] - want).abs().max() < 1e-5
        assert (noisy[b, 0] - want[0]).abs().max() < 1e-5  # r_0: the same history, no dropout
        items = torch.tensor(history)
        tokens = model.input_norm(model.item_embedding(items) + model.position_embedding.weight[: len(history)])
        for s in range(1, 4):
            token = want[s - 1] + model.reasoning_position_embedding.weight[s - 1]
            tokens = torch.cat([tokens, model.input_norm(token + 0.3 * torch.sin(7.0 * token))[None]])
            x = tokens[None]
            causal = torch.tril(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool))[None, None]
            for layer in model.layers:
                x = layer(x, causal)
            assert (noisy[b, s] - x[0, -1]).abs().max() < 1e-5
        assert (noisy[b, 1:] - clean[b, 1:]).abs().max() > 1e-3  # the noise reached the copy
    # With dropout on, each run draws its own masks, over the history too.
    model = small_model(seed=2, dropout=0.3, input_dropout=0.3).train()
    clean, noisy = model.forward_with_noisy_copy(padded, lengths, noise_std=1e-12)
    assert (clean[:, 0] - noisy[:, 0]).abs().max() > 1e-3


def test_depth_is_prefix_and_padded_input_matches_lists():
    model = small_model(seed=2)
    histories = random_histories(7, 57, 12, seed=3)
    full = model.reasoning_states(histories)
    for depth in range(4):
        assert torch.allclose(model.reasoning_states(histories, depth=depth), full[:, : depth + 1], atol=1e-6)
    lengths = torch.tensor([len(h) for h in histories])
    padded = torch.full((7, 15), 9)  # wider than max_len is fine; the pad value is ignored
    for b, h in enumerate(histories):
        padded[b, : len(h)] = torch.tensor(h)
    assert torch.allclose(model.reasoning_states(padded, lengths=lengths), full, atol=1e-6)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_forward_refuses_histories_wider_than_max_len(backbone):
    """forward takes the training batches as they are: wider than max_len, SASRec failed inside the
    position add (a size mismatch) and BERT4Rec cut each row silently; both now name the fix."""
    model = ReaRec(ReaRecConfig(n_items=20, hidden_size=8, n_heads=2, inner_size=8, max_len=4, reason_steps=1,
                                backbone=backbone))
    with pytest.raises(ValueError, match="histories are 6 slots wide but max_len is 4"):
        model(torch.randint(1, 19, (2, 6)), torch.tensor([6, 3]))
    assert model(torch.randint(1, 19, (2, 4)), torch.tensor([4, 3])).shape == (2, 2, 8)


def test_long_history_keeps_newest_items():
    model = small_model(seed=4)
    long = list(range(30))
    assert torch.allclose(model.reasoning_states([long]), model.reasoning_states([long[-12:]]), atol=1e-6)
    padded = torch.tensor([long])
    assert torch.allclose(
        model.reasoning_states(padded, lengths=torch.tensor([30])), model.reasoning_states([long[-12:]]), atol=1e-6
    )


def test_padding_is_never_attended():
    model = small_model(seed=5)
    history = [3, 14, 15, 9]
    a = torch.tensor([history + [0] * 8])
    b = torch.tensor([history + [56] * 8])
    lengths = torch.tensor([4])
    assert torch.equal(model.reasoning_states(a, lengths=lengths), model.reasoning_states(b, lengths=lengths))


def test_dropout_off_in_eval_on_in_train():
    model = small_model(seed=6, dropout=0.5)
    histories = random_histories(5, 57, 12, seed=7)
    assert torch.equal(model.reasoning_states(histories), model.reasoning_states(histories))
    padded, lengths = model.prepare_histories(histories)
    model.train()
    assert not torch.equal(model(padded, lengths), model(padded, lengths))
    assert model.training  # reasoning_states restores the mode it found
    model.reasoning_states(histories)
    assert model.training


def test_recommend_exclude_seen_and_shapes():
    model = small_model(seed=8)
    histories = random_histories(6, 57, 12, seed=9)
    recs = model.recommend(histories, k=57, exclude_seen=True)
    for b, h in enumerate(histories):
        left = 57 - len(set(h))
        assert set(recs.items[b, :left].tolist()) == set(range(57)) - set(h)
        assert (recs.items[b, left:] == -1).all() and (recs.scores[b, left:] == -math.inf).all()
    assert recs.items.dtype == torch.int64 and recs.scores.dtype == torch.float32
    assert (recs.scores[:, :-1] >= recs.scores[:, 1:]).all()
    assert recs.raw_items is None  # no id mapping


# ---------------------------------------------------------------------------- objectives & training
@pytest.mark.parametrize("objective", ["erl", "prl"])
def test_gradients_reach_reasoning_positions(objective):
    model = small_model(seed=10, objective=objective, warmup_epochs=0).train()
    histories, lengths = model.prepare_histories(random_histories(8, 57, 12, seed=11))
    loss = training_loss(model, histories, lengths, torch.randint(57, (8,)), epoch=0)
    loss.backward()
    grad = model.reasoning_position_embedding.weight.grad
    assert grad is not None and (grad.abs().sum(dim=1) > 0).all()


def test_prl_contrastive_term_waits_for_warmup():
    # A high temperature makes the InfoNCE term clearly positive on an untrained model.
    model = small_model(seed=12, objective="prl", warmup_epochs=1, dropout=0.0, input_dropout=0.0, temperature=100.0).train()
    histories, lengths = model.prepare_histories(random_histories(8, 57, 12, seed=13))
    targets = torch.randint(57, (8,))
    torch.manual_seed(0)
    before = training_loss(model, histories, lengths, targets, epoch=0)
    after = training_loss(model, histories, lengths, targets, epoch=1)
    assert after > before + 1.0  # the InfoNCE term (about log 8) joins once warm-up has passed


@pytest.mark.usefixtures("triton_on_cpu_needs_interpreter", "poisoned_kernel_outputs")
@pytest.mark.parametrize("objective", ["base", "erl", "prl"])
def test_training_step_through_the_triton_attention_equals_sdpa(objective):
    """What runs on CUDA: step 0 through the Triton attention's forward and backward kernels (here on
    CPU tensors under the interpreter) gives the SDPA path's loss and every parameter's gradient."""
    seed = int(torch.randint(1 << 30, (1,)))
    print("seed", seed)
    model = small_model(seed=seed % 1000, objective=objective, warmup_epochs=0, dropout=0.0, input_dropout=0.0,
                        reason_steps=0 if objective == "base" else 2).train()
    histories, lengths = model.prepare_histories(random_histories(6, 57, 12, seed=seed))
    targets = torch.randint(57, (6,))
    results = {}
    for backend in (None, "triton"):
        model.attention_backend = backend
        assert model.uses_attention_kernel(torch.device("cpu")) == (backend == "triton")
        model.zero_grad()
        torch.manual_seed(seed)  # PRL's noisy copy
        loss = training_loss(model, histories, lengths, targets, epoch=0)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (want_loss, want), (got_loss, got) = results[None], results["triton"]
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert want.keys() == got.keys() and "layers.0.query.weight" in got
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), (name, (got[name] - grad).abs().max())


def test_attention_kernel_choice():
    assert not small_model().uses_attention_kernel(torch.device("cpu"))  # CPU: SDPA by default
    assert small_model().uses_attention_kernel(torch.device("cuda"))  # CUDA: the Triton kernels
    bert = small_model(backbone="bert4rec")
    bert.attention_backend = "triton"
    assert not bert.uses_attention_kernel(torch.device("cuda"))  # bidirectional: SDPA


def test_zero_reasoning_steps_trains_with_every_objective():
    for objective in ("base", "erl", "prl"):
        model = small_model(seed=14, objective=objective, reason_steps=0, warmup_epochs=0).train()
        histories, lengths = model.prepare_histories(random_histories(8, 57, 12, seed=15))
        loss = training_loss(model, histories, lengths, torch.randint(57, (8,)), epoch=5)
        assert torch.isfinite(loss)
        loss.backward()
        assert model.recommend([[1, 2]], k=3).items.shape == (1, 3)


def recall_at_10(model, histories, lengths, targets):
    recs = model.recommend(histories, k=10, lengths=lengths)
    return (recs.items == targets[:, None]).any(dim=1).float().mean().item()


@pytest.mark.parametrize("objective", ["base", "erl", "prl"])
def test_each_objective_learns_a_sequential_task(objective):
    torch.manual_seed(0)
    seqs = markov_sequences(n_users=256, n_items=40, length=10, seed=21)
    train_h, train_l, train_t = next_item_samples(seqs[:200])
    test_h, test_l, test_t = seqs[200:, :-1], torch.full((56,), 9), seqs[200:, -1]
    cfg = ReaRecConfig(
        n_items=40, hidden_size=32, n_heads=2, inner_size=32, max_len=10, objective=objective,
        dropout=0.1, input_dropout=0.1, warmup_epochs=1,
    )
    model = ReaRec(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for epoch in range(6):
        model.train()
        order = torch.randperm(len(train_t), generator=g)
        total = 0.0
        for batch in order.split(128):
            loss = training_loss(model, train_h[batch], train_l[batch], train_t[batch], epoch=epoch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total)
    # PRL's annealed terms stay near log N by design, so "falls" is a looser bound than for CE alone.
    assert losses[-1] < 0.8 * losses[0], losses
    popular = torch.bincount(train_t, minlength=40).topk(10).indices
    baseline = torch.isin(test_t, popular).float().mean().item()
    recall = recall_at_10(model.eval(), test_h, test_l, test_t)
    assert recall > baseline + 0.2, (recall, baseline)


# ---------------------------------------------------------------------------- config & bad input
def test_config_defaults_and_validation():
    assert ReaRecConfig(n_items=10).reason_steps == 2
    assert ReaRecConfig(n_items=10, objective="base").reason_steps == 0
    assert ReaRecConfig(n_items=10, objective="erl").readout == "mean"
    assert ReaRecConfig(n_items=10, objective="prl").readout == "last"
    with pytest.raises(ValueError, match="divisible"):
        ReaRecConfig(n_items=10, hidden_size=30, n_heads=4)
    with pytest.raises(ValueError, match="objective"):
        ReaRecConfig(n_items=10, objective="xyz")
    with pytest.raises(ValueError, match="reason_steps=0"):
        ReaRecConfig(n_items=10, objective="base", reason_steps=2)


# ---------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(tmp_path):
    model = small_model(seed=16)
    mapping = IdMapping(["u"], [f"item {n}" for n in range(57)]).to_dict()
    path = tmp_path / "model.safetensors"
    model.save(path, id_mapping=mapping)
    loaded = ReaRec.load(path)
    assert loaded.config == model.config and loaded.id_mapping == mapping and not loaded.training
    assert model.id_mapping is None  # saving with a mapping does not change the model
    histories = random_histories(4, 57, 12, seed=17)
    assert torch.equal(loaded.reasoning_states(histories, raw_ids=False), model.reasoning_states(histories))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
    assert torch.equal(ReaRec.load(tmp_path).item_table(), model.item_table())  # a run folder holding it
    with pytest.raises(ValueError, match="does not exist; pass a model.safetensors or the run folder"):
        ReaRec.load(tmp_path / "missing")


def test_load_keeps_the_saved_float_dtype(tmp_path):
    model = small_model(seed=21).to(torch.bfloat16)
    model.save(tmp_path / "bf16.safetensors")
    loaded = ReaRec.load(tmp_path / "bf16.safetensors")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    small_model(seed=21).save(tmp_path / "fp32.safetensors")
    assert {p.dtype for p in ReaRec.load(tmp_path / "fp32.safetensors").parameters()} == {torch.float32}


def rewrite_metadata(path, **changes):
    """Rewrite a saved checkpoint with some metadata entries replaced (None removes one)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})
    return meta


def test_load_rejects_mismatched_or_foreign_files(tmp_path):
    from safetensors.torch import save_file

    model = small_model(seed=18)
    path = tmp_path / "m.safetensors"
    model.save(path)
    config = model.config.to_dict()
    rewrite_metadata(path, config=json.dumps(dict(config, inner_size=64)))  # no longer matches the weights
    with pytest.raises(ValueError, match=rf"{path}: weight layers\.0\.ffn_in\.(weight|bias) has shape"):
        ReaRec.load(path)
    rewrite_metadata(path, config=json.dumps(config)[:-7])  # cut short: corrupt JSON
    with pytest.raises(ValueError, match=rf"{path}: metadata entry 'config' is not valid JSON \(\w"):
        ReaRec.load(path)
    rewrite_metadata(path, config=json.dumps(dict(config, n_layrs=2)))
    with pytest.raises(ValueError, match=rf"{path}: metadata entry 'config' is not a valid model config: unknown "
                                         r"config keys \['n_layrs'\]"):
        ReaRec.load(path)
    rewrite_metadata(path, config=None)
    with pytest.raises(ValueError, match=rf"{path}: the checkpoint's metadata has no 'config' entry"):
        ReaRec.load(path)
    rewrite_metadata(path, config=json.dumps(config), id_mapping='{"users": [')
    with pytest.raises(ValueError, match=rf"{path}: metadata entry 'id_mapping' is not valid JSON"):
        ReaRec.load(path)
    rewrite_metadata(path, id_mapping=json.dumps(IdMapping(["u"], ["a", "b"]).to_dict()))
    with pytest.raises(ValueError, match=rf"{path}: metadata entry 'id_mapping': the id mapping has 2 items but "
                                         "the model's item table has 57 rows"):
        ReaRec.load(path)
    for entry in ("5", "[1]", '"abc"'):  # valid JSON, not an object: once an AttributeError traceback
        rewrite_metadata(path, id_mapping=entry)
        with pytest.raises(ValueError, match=rf"{path}: metadata entry 'id_mapping': the model's id mapping is "
                                             "unusable: not a saved rearec id mapping"):
            ReaRec.load(path)
    rewrite_metadata(path, id_mapping=None, format_version="2")  # written by a later rearec
    with pytest.raises(ValueError, match=rf"{path} is a rearec checkpoint of format version '2', but this rearec "
                                         r"reads version '1'; load it with the rearec version that wrote it"):
        ReaRec.load(path)
    rewrite_metadata(path, format_version=None)
    with pytest.raises(ValueError, match="format version None"):
        ReaRec.load(path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a rearec checkpoint"):
        ReaRec.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        ReaRec.load(tmp_path / "missing.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable rearec checkpoint"):
        ReaRec.load(tmp_path / "garbage.safetensors")


def test_official_loader_names_bad_keys(golden, tmp_path):
    state = dict(golden["state_dict"])
    broken = dict(state)
    del broken["model.LayerNorm.bias"]
    with pytest.raises(ValueError, match="missing weight model.LayerNorm.bias"):
        ReaRec.from_official_checkpoint(broken)
    broken = dict(state, **{"item_emb.weight": state["item_emb.weight"].flatten()})
    with pytest.raises(ValueError, match=r"weight item_emb\.weight has shape \(\d+,\); a 2-D tensor was expected"):
        ReaRec.from_official_checkpoint(broken)
    broken = dict(state, extra_thing=torch.zeros(3))
    with pytest.raises(ValueError, match="unexpected weight.*extra_thing"):
        ReaRec.from_official_checkpoint(broken)
    # A layer tensor missing from both copies of their encoder: named as in their file, and ours.
    broken = {k: v for k, v in state.items() if not k.endswith("layer.0.feed_forward.dense_2.weight")}
    with pytest.raises(ValueError, match=r"missing weight\(s\) trm_encoder\.layer\.0\.feed_forward\.dense_2\.weight "
                                         r"\(our layers\.0\.ffn_out\.weight\)"):
        ReaRec.from_official_checkpoint(broken)
    # Missing from the first copy only: the second copy (one module registered twice) is used.
    broken = {k: v for k, v in state.items() if k != "trm_encoder.layer.0.feed_forward.dense_2.weight"}
    assert torch.equal(ReaRec.from_official_checkpoint(broken).layers[0].ffn_out.weight,
                       state["trm_encoder.layer.0.feed_forward.dense_2.weight"])
    inner = state["trm_encoder.layer.1.feed_forward.dense_2.weight"].shape[1]
    hidden = state["item_emb.weight"].shape[1]
    broken = dict(state)
    broken["trm_encoder.layer.1.feed_forward.dense_2.weight"] = torch.zeros(hidden, inner - 1)
    broken["model.transformer.layer.1.feed_forward.dense_2.weight"] = torch.zeros(hidden, inner - 1)
    path = tmp_path / "theirs.pt"
    torch.save(broken, path)
    with pytest.raises(ValueError, match=rf"official checkpoint {path}: weight trm_encoder\.layer\.1\.feed_forward\."
                                         rf"dense_2\.weight \(our layers\.1\.ffn_out\.weight\) has shape "
                                         rf"\({hidden}, {inner - 1}\), but the config needs \({hidden}, {inner}\)"):
        ReaRec.from_official_checkpoint(path)
    broken = dict(state)
    broken["trm_encoder.layer.1.feed_forward.dense_2.weight"] = torch.zeros(hidden, inner)
    with pytest.raises(ValueError, match="trm_encoder.layer.1.feed_forward.dense_2.weight and its twin "
                                         "model.transformer.layer.1.feed_forward.dense_2.weight differ"):
        ReaRec.from_official_checkpoint(broken)
    broken = dict(state)
    nan = state["model.reason_pos_emb.weight"].clone()
    nan[1, 2] = float("nan")
    broken["model.reason_pos_emb.weight"] = nan
    with pytest.raises(ValueError, match="model.reason_pos_emb.weight holds NaN"):
        ReaRec.from_official_checkpoint(broken)
    with pytest.raises(ValueError, match="divisible"):
        ReaRec.from_official_checkpoint(state, n_heads=5)
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=rf"official checkpoint {tmp_path / 'list.pt'} holds a list, not a state_dict"):
        ReaRec.from_official_checkpoint(tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not exist; check the path of the public code"):
        ReaRec.from_official_checkpoint(tmp_path / "nothing.pt")


# ---------------------------------------------------------------------------- real slots
def test_real_slots_pack_pad_and_positions_against_loops():
    from rearec.model import RealSlots

    lengths = torch.tensor([3, 1, 4, 2])
    L = 5
    x = torch.randn(4, L, 2)
    slots = RealSlots(lengths, L)
    packed = slots.pack(x)
    expected = torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())])
    P = len(expected)
    assert torch.equal(packed[:P], expected) and packed.shape[0] == slots.rows >= P
    packed[P:] = float("nan")  # the extra rows: nothing reads them
    padded = slots.pad(packed)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(padded[b, :n], x[b, :n]) and not padded[b, n:].any()
    at = torch.tensor([[2, 0], [0, 3], [3, 1], [1, 4]])  # slots 3 of row 1 and 4 of row 3 are padding
    positions = slots.positions(at)
    for b in range(4):
        for m in range(2):
            t = int(at[b, m])
            if t < lengths[b]:
                assert torch.equal(packed[positions[b, m]], x[b, t])
            else:  # a placeholder inside the row
                assert int(positions[b, m]) == int(lengths[:b].sum())
    for P in (1, 15, 16, 17, 31, 32, 33, 100, 9600, 12_800):  # rows: at most 1/16 more, few sizes
        rows = RealSlots(torch.tensor([P, 0]), P).rows  # B * L = 2P: room to round up
        assert P <= rows <= P * 17 / 16 and rows % (1 << max(P.bit_length() - 5, 0)) == 0
        assert RealSlots(torch.tensor([P]), P).rows == P  # never more than B * L
    assert len({RealSlots(torch.tensor([P, 0]), P).rows for P in range(9000, 10000)}) == 3


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_padding_never_reaches_a_real_slot(backbone):
    from rearec.model import RealSlots

    """Step 0 on a ragged batch whose padding slots hold NaN (and dropout on, so the per-token work
    draws masks): every real slot's output, key and value is finite and, with dropout off, equals each
    history run alone without padding; the gradient at padding is exactly 0."""
    model = small_model(seed=40, backbone=backbone, dropout=0.0, input_dropout=0.0).train()
    lengths = torch.tensor([5, 1, 12, 7, 3, 9])  # 37 real slots: packed with one extra row
    B, L, d = lengths.shape[0], 12, model.config.hidden_size
    x = torch.randn(B, L, d)
    real = torch.arange(L)[None, :] < lengths[:, None]
    poisoned = x.masked_fill(~real[..., None], float("nan")).requires_grad_()
    assert RealSlots(lengths, L).rows == 38
    out, keys, values, _ = model._encode(poisoned, lengths)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.equal(poisoned.grad[~real], torch.zeros_like(poisoned.grad[~real]))
    for b, n in enumerate(lengths.tolist()):
        alone = x[b:b + 1, :n].clone().requires_grad_()
        out_b, keys_b, values_b, _ = model._encode(alone, lengths[b:b + 1])
        (out_b * weights[b:b + 1]).sum().backward()
        torch.testing.assert_close(out[b:b + 1], out_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(poisoned.grad[b, :n], alone.grad[0], atol=1e-5, rtol=1e-5)
        for i in range(len(keys)):
            torch.testing.assert_close(keys[i][b, :, :n], keys_b[i][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[i][b, :, :n], values_b[i][0], atol=1e-5, rtol=1e-5)
    # Dropout on: the per-token masks are drawn for the real slots only; still no NaN anywhere real.
    noisy = small_model(seed=40, backbone=backbone, dropout=0.3, input_dropout=0.2).train()
    out, keys, values, _ = noisy._encode(poisoned.detach(), lengths)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(k[b, :, :n]).all() for k in keys + values for b, n in enumerate(lengths.tolist()))


def test_config_refuses_what_it_cannot_build_or_train():
    """Infinite floats, bools or fractions where whole numbers go, a string where a number goes, and a
    non-bool switch: one ValueError each (some built a model that scored everything 0, or turned an
    option on by being truthy)."""
    base = dict(n_items=10, hidden_size=8, n_heads=2, inner_size=8, max_len=5)
    for bad in (dict(temperature=float("inf")), dict(kl_weight=float("inf")), dict(init_std=float("inf")),
                dict(dropout="0.1"), dict(cl_temperature=float("inf")), dict(pad_item=1.5), dict(pad_item=False),
                dict(n_heads=True), dict(item_feature_dim=True), dict(warmup_epochs=1.5),
                dict(cl_mask_same_user="no")):
        with pytest.raises(ValueError, match=next(iter(bad))):  # the message names the field
            ReaRecConfig(**{**base, **bad})


def test_official_state_dict_with_non_string_keys_is_one_error(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({0: torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="keys are weight names, but 0 is a int"):
        ReaRec.from_official_checkpoint(str(path))
