"""rearec.distributed with real gloo process groups on the CPU (2 and 3 processes, spawned).

Each spawned group runs a whole list of cases, drawn here from a fresh seed, so that process start-up
(a second or two) is paid once per group. Ranks never stop early on a wrong result: every rank runs
every collective, then raises if anything differed (a rank that stopped would leave the others
waiting in a collective).
"""
import contextlib
import gc
import io
import json
import os
import random
import socket
import traceback
import weakref
from datetime import timedelta

import numpy as np

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rearec.distributed import (ItemShard, batch_shards, gather_cat, merge_topk, shard_range, sharded_topk,
                                sum_across)
from rearec_kernels.topk import fused_topk
from rearec_kernels.topk_reference import fused_topk as fused_topk_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# harness


def init_gloo(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def leave_group() -> None:
    """Free what holds gloo work (DDP reducers in reference cycles), wait for every rank, then leave:
    a rank that destroys its group while a peer is still in a collective can abort the peer."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run_group(worker, world: int, tmp_path, *args) -> None:
    """Run ``worker(rank, world, init_file, *args)`` in ``world`` spawned processes; raise on failure."""
    init_file = str(tmp_path / f"gloo-init-{world}")
    mp.spawn(worker, args=(world, init_file, *args), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------------
# sharded top-k


def draw_topk_cases(seed: int, world: int):
    """Cases (queries, table, k, shard bounds, exclude). Small integer-valued embeddings make exact
    scores and many ties, so the tie rule across shard borders is tested on every case."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(24):
        n = rng.choice([world, 7, 31, 47, 123])
        d = rng.choice([1, 3, 5])
        b = rng.choice([1, 2, 9])
        if i % 3 == 0:  # uneven shards, some of them empty
            cuts = sorted(rng.randint(0, n) for _ in range(world - 1))
        else:
            cuts = [shard_range(n, r, world)[0] for r in range(1, world)]
        bounds = [0, *cuts, n]
        smallest = min(bounds[r + 1] - bounds[r] for r in range(world))
        k = rng.choice([1, 5, smallest + 1, n, n + 3])  # often larger than a shard
        k = max(k, 1)
        span = rng.choice([1, 2, 4])  # small values: many equal scores
        queries = torch.randint(-span, span + 1, (b, d), generator=g).float()
        table = torch.randint(-span, span + 1, (n, d), generator=g).float()
        exclude = None
        if i % 2 == 1:
            m = rng.choice([1, 4, n])
            exclude = torch.randint(-1, n, (b, m), generator=g)  # empty slots (-1) and ids on every shard
        cases.append((queries, table, k, bounds, exclude))
    # Float64 scores with no ties: the values must match too.
    for n in (47, 123):
        bounds = [shard_range(n, r, world)[0] for r in range(world)] + [n]
        cases.append((torch.randn(3, 8, generator=g, dtype=torch.float64),
                      torch.randn(n, 8, generator=g, dtype=torch.float64), 10, bounds, None))
    return cases


def engine_check(seed, checkpoint, failures):
    """FastReaRec.load(shard_items=True) on every rank gives the unsharded engine's recommendations."""
    from rearec.engine import FastReaRec
    whole, sharded = FastReaRec.load(checkpoint), FastReaRec.load(checkpoint, shard_items=True)
    n_items = whole.config.n_items
    if sharded.item_table.shape[0] > -(-n_items // world_size_now()):
        failures.append(f"a sharded engine keeps {sharded.item_table.shape[0]} of {n_items} item rows")
    g = torch.Generator().manual_seed(seed)
    histories = [torch.randint(0, n_items, (int(n),), generator=g).tolist()
                 for n in torch.randint(1, 12, (5,), generator=g)]
    for k, exclude_seen in ((7, True), (n_items + 3, False)):  # k larger than any shard too
        a = whole.recommend(histories, k=k, exclude_seen=exclude_seen, raw_ids=False)
        b = sharded.recommend(histories, k=k, exclude_seen=exclude_seen, raw_ids=False)
        if not torch.equal(a.items, b.items) or not torch.allclose(a.scores, b.scores, atol=1e-5):
            failures.append(f"sharded engine differs from the whole engine (k={k})")


def world_size_now() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def topk_worker(rank, world, init_file, seed, out_dir):
    if world == 2:  # the same group also checks DDP gradients (one process start-up for both)
        gradient_check(rank, world, init_file, seed, out_dir)
    else:
        init_gloo(rank, world, init_file)
    failures = []
    for i, (queries, table, k, bounds, exclude) in enumerate(draw_topk_cases(seed, world)):
        start, stop = bounds[rank], bounds[rank + 1]
        values, indices = sharded_topk(queries, table[start:stop], k, start, exclude=exclude)
        whole = fused_topk(queries, table, k, exclude=exclude)
        reference = fused_topk_reference(queries, table, k, scale=1.0, exclude=exclude)
        for name, (ref_values, ref_indices) in (("fused_topk", whole), ("reference", reference)):
            if not torch.equal(indices, ref_indices) or not torch.allclose(values, ref_values, rtol=1e-12,
                                                                          atol=0):
                failures.append(f"case {i} (n={table.shape[0]}, k={k}, bounds={bounds}): differs from {name}")
    # Embedding lookups through an ItemShard equal F.embedding of the whole table.
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(31, 6, generator=g)
    table[3, 0] = float("inf")  # a non-finite row must not leak into the other rows
    ids = torch.randint(0, 31, (4, 9), generator=g)
    shard = ItemShard.of(table)
    if not torch.equal(shard.embed(ids), torch.nn.functional.embedding(ids, table)):
        failures.append("ItemShard.embed differs from F.embedding over the whole table")
    tiny = torch.randn(world - 1, 6, generator=g)  # fewer rows than ranks: the last rank owns none
    tiny_ids = torch.randint(0, world - 1, (3, 4), generator=g)
    if not torch.equal(ItemShard.of(tiny).embed(tiny_ids), torch.nn.functional.embedding(tiny_ids, tiny)):
        failures.append("ItemShard.embed with an empty shard differs from F.embedding")
    q = torch.randn(5, 6, generator=g)
    table[3, 0] = 0.0
    shard = ItemShard.of(table)
    if not torch.equal(shard.topk(q, 40)[1], fused_topk(q, table, 40)[1]):
        failures.append("ItemShard.topk differs from fused_topk over the whole table")
    # gather_cat and sum_across: rank r contributes r + 1 values (ranks of different lengths), every rank
    # gets them all in rank order, with no padding between them.
    mine = torch.arange(rank + 1, dtype=torch.int64) + 10 * rank
    expected = torch.cat([torch.arange(r + 1, dtype=torch.int64) + 10 * r for r in range(world)])
    if not torch.equal(gather_cat(mine), expected):
        failures.append(f"gather_cat gave {gather_cat(mine).tolist()}, not {expected.tolist()}")
    if sum_across([1.0, float(rank)]) != [float(world), float(sum(range(world)))]:
        failures.append("sum_across differs from the sum over ranks")
    # A rank whose own rows are wrong (the last rank's are one column short) left the other ranks waiting
    # in the all-gather: now every rank raises, and the group goes on working.
    start, stop = shard_range(31, rank, world)
    rows = table[start:stop, :5] if rank == world - 1 else table[start:stop]
    try:
        sharded_topk(q, rows, 4, start)
        failures.append("a rank's malformed rows went unnoticed")
    except ValueError as error:
        if rank < world - 1 and f"rank(s) {world - 1} could not score their rows" not in str(error):
            failures.append(f"rank {rank} raised {error!r}")
    if not torch.equal(sharded_topk(q, table[start:stop], 4, start)[1], fused_topk(q, table, 4)[1]):
        failures.append("sharded_topk after a failed call differs from fused_topk")
    engine_check(seed, os.path.join(out_dir, "model.safetensors"), failures)
    leave_group()
    assert not failures, f"rank {rank}, seed {seed}: " + "; ".join(failures)
    os._exit(0)  # skip interpreter teardown: gloo's threads may abort it ("terminate called ...")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_topk_equals_whole_table_and_ddp_gradients_equal_one_process(world, tmp_path):
    """Top-k with 2 and 3 ranks, and FastReaRec.load(shard_items=True); with 2
    ranks also: the first step's gradient averaged by DDP over a global batch split in two equals one
    process's gradient of that batch, for base, ERL and PRL."""
    from rearec.config import ReaRecConfig
    from rearec.model import ReaRec
    torch.manual_seed(world)
    ReaRec(ReaRecConfig(n_items=31, hidden_size=16, n_layers=2, n_heads=2, inner_size=32, max_len=12,
                        objective="prl", reason_steps=2)).save(str(tmp_path / "model.safetensors"))
    run_group(topk_worker, world, tmp_path, random.randrange(2**31), str(tmp_path))
    if world == 2:
        worst = json.loads((tmp_path / "gradients.json").read_text())
        print("largest |DDP gradient - one-process gradient|:", worst)
        assert set(worst) == set(GRADIENT_CASES)
        assert all(v <= 1e-5 for v in worst.values()), worst


def test_sharded_topk_without_a_group_is_the_shard_shifted():
    g = torch.Generator().manual_seed(1)
    q, table = torch.randn(4, 5, generator=g), torch.randn(47, 5, generator=g)
    values, indices = sharded_topk(q, table[10:30], 7, 10)
    ref_values, ref_indices = fused_topk(q, table[10:30], 7)
    assert torch.equal(indices, ref_indices + 10) and torch.equal(values, ref_values)


def test_merge_topk_orders_by_value_then_lower_index_and_pads():
    values = torch.tensor([[1.0, 2.0, -0.0, float("-inf"), 2.0, 0.0, float("-inf")]])
    indices = torch.tensor([[9, 8, 4, 6, 3, 2, -1]])
    v, i = merge_topk(values, indices, 9)
    assert i.tolist() == [[3, 8, 9, 2, 4, 6, -1, -1, -1]]
    assert v[0, :6].tolist() == [2.0, 2.0, 1.0, 0.0, 0.0, float("-inf")]
    assert torch.isinf(v[0, 6:]).all()


def test_merge_topk_ranks_nan_below_every_number_as_fused_topk_does():
    g = torch.Generator().manual_seed(3)
    q, table = torch.randn(3, 4, generator=g), torch.randn(10, 4, generator=g)
    table[7] = float("nan")  # a NaN item: last but one real item for every query
    table[2, 0] = float("-inf")  # scores of +-inf for some queries
    want = fused_topk(q, table, 10)
    halves = [fused_topk(q, table[:5], 10), fused_topk(q, table[5:], 10)]
    values = torch.cat([halves[0][0], halves[1][0]], dim=1)
    indices = torch.cat([halves[0][1], torch.where(halves[1][1] >= 0, halves[1][1] + 5, halves[1][1])], dim=1)
    got = merge_topk(values, indices, 10)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=0, atol=0)
    assert torch.equal(sharded_topk(q, table, 10, 0)[1], want[1])


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "k must be a positive integer"),
    (dict(k=True), "k must be a positive integer, got True"),
    (dict(k=torch.tensor(True)), r"k must be a positive integer, got tensor\(True\)"),
    (dict(item_offset=-1), "item_offset must be a non-negative integer"),
    (dict(item_offset=2.0), r"item_offset must be a non-negative integer \(.*\), got 2.0"),
    (dict(local_items=torch.zeros(5)), "local_items must be"),
    # ids outside every shard were dropped silently, and float ids taken: fused_topk's errors
    (dict(exclude=torch.tensor([[99], [1]]), n_items=9), r"exclude\[0, 0\] = 99 is not an item id in \[0, 9\)"),
    (dict(exclude=torch.tensor([[1], [-3]])), r"exclude\[1, 0\] = -3 is not an item id"),
    (dict(exclude=torch.tensor([[1.0], [2.0]])), "exclude must hold integer item ids"),
    (dict(exclude=torch.tensor([1, 2])), r"exclude must be \(B, M\)"),
])
def test_sharded_topk_rejects_bad_input(bad, match):
    args = dict(queries=torch.zeros(2, 3), local_items=torch.zeros(5, 3), k=2, item_offset=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sharded_topk(**args)


def test_sharded_topk_takes_numpy_and_tensor_integers():
    q, table = torch.randn(2, 3), torch.randn(5, 3)
    want = sharded_topk(q, table, 2, 4)
    for k, offset in ((np.int64(2), np.int32(4)), (torch.tensor(2), torch.tensor(4))):
        got = sharded_topk(q, table, k, offset)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_a_sharded_engine_built_under_inference_mode_keeps_one_copy_of_its_shard(backbone):
    """Under torch.inference_mode the engine copies its scoring table (a plain tensor for the top-K's
    per-table cache); with shard_items the shard went on scoring the original, the copy held for nothing."""
    from rearec import FastReaRec, ReaRec, ReaRecConfig
    model = ReaRec(ReaRecConfig(n_items=30, hidden_size=16, n_heads=2, inner_size=16, max_len=5,
                                backbone=backbone)).eval()
    with torch.inference_mode():
        engine = FastReaRec.from_model(model, shard_items=True)
    assert engine.scoring_table is engine.scoring_shard.local and engine.item_table is engine.input_shard.local
    assert not engine.scoring_table.is_inference()
    assert torch.equal(engine.recommend([[1, 2]], k=5).items, FastReaRec.from_model(model).recommend([[1, 2]], k=5).items)


def test_item_shard_embed_refuses_ids_outside_the_table_and_of_keeps_no_graph():
    """embed returned rows of zeros for ids no rank owns, where F.embedding raises; of() kept the autograd
    graph back to a Parameter table, so the whole table could not be freed."""
    table = torch.nn.Parameter(torch.randn(10, 4))
    shard = ItemShard.of(table)
    assert torch.equal(shard.embed(torch.tensor([[3, 9]])), table.detach()[[3, 9]][None])
    for bad in (10, -1):
        with pytest.raises(IndexError, match=f"item id {bad} is outside the sharded table's \\[0, 10\\)"):
            shard.embed(torch.tensor([1, bad]))
    alive = weakref.ref(table)
    del table
    gc.collect()
    assert alive() is None and not shard.local.requires_grad


@pytest.mark.parametrize("world", [1, 3, 200])
def test_sharded_test_evaluation_is_the_whole_evaluation(markov_log, world, monkeypatch):
    """evaluate_sharded: each rank ranks its shard (an empty one when there are more ranks than samples);
    the shards, in rank order, are the ranks of every sample, and the report of the gathered ranks is
    evaluate()'s. Simulated rank by rank in one process (the two-process test runs it for real)."""
    from rearec import ReaRec, ReaRecConfig, distributed
    from rearec.data import load_dataset
    from rearec.evaluate import evaluate, step_ranks
    from rearec.train import evaluate_sharded

    data = load_dataset(markov_log, split="loo")
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(n_items=data.n_items, hidden_size=16, n_heads=2, inner_size=16, max_len=8))
    model.train()
    want, full = evaluate(model, data.test), step_ranks(model, data.test)
    model.train()
    parts = {}  # rank -> its shard's ranks, per name in call order

    def gather(x, rank):  # records this rank's shard, returns what every rank's would gather
        parts.setdefault(rank, []).append(x)
        return list(full.values())[len(parts[rank]) - 1]

    monkeypatch.setattr(distributed, "world_size", lambda group=None: world)
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "gather_cat", lambda x, rank=rank: gather(x, rank))
        assert evaluate_sharded(model, data.test, (5, 10, 20, 50)) == want
        assert model.training  # left as it was
    for i, name in enumerate(full):
        assert torch.equal(torch.cat([parts[r][i] for r in range(world)]), full[name]), name
    assert sum(len(parts[r][0]) > 0 for r in range(world)) == min(world, len(data.test))


def test_shard_range_covers_every_row_once():
    for n in (0, 1, 7, 31, 123):
        for world in (1, 2, 3, 5):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        shard_range(10, 3, 3)


# ---------------------------------------------------------------------------------------------
# DDP training


#: Gradient-check cases: name -> (backbone, objective, reasoning steps).
GRADIENT_CASES = {"base": ("sasrec", "base", 0), "erl": ("sasrec", "erl", 2), "prl": ("sasrec", "prl", 2),
                  "erl-k0": ("sasrec", "erl", 0), "bert4rec-base": ("bert4rec", "base", 0),
                  "bert4rec-prl": ("bert4rec", "prl", 2)}


def tiny_config(case: str):
    from rearec.config import ReaRecConfig
    backbone, objective, steps = GRADIENT_CASES[case]
    return ReaRecConfig(n_items=23, hidden_size=16, n_layers=2, n_heads=2, inner_size=32, max_len=7,
                        objective=objective, reason_steps=steps, dropout=0.0, input_dropout=0.0,
                        noise_std=0.3, cl_weight=0.5, warmup_epochs=0, backbone=backbone, mask_ratio=0.4)


def deterministic_noise(t):
    """Stands in for torch.randn_like: PRL's noise, as a function of the row, so that one process and
    two ranks draw the same noise for the same sample."""
    return torch.sin(t.detach() * 13.0 + 1.0)


def deterministic_cloze_draws(sequences, generator=None):
    """Stands in for rearec.objectives.cloze_draws: BERT4Rec's mask draws as a function of the row's
    items and the slot, the same for a sample in one process and on its rank."""
    slots = torch.arange(sequences.shape[1], dtype=torch.float64)
    return torch.frac((torch.sin(sequences.double() * 12.9898 + slots * 78.233) * 43758.5453).abs()).float()


def gradient_check(rank, world, init_file, seed, out_dir, objectives=tuple(GRADIENT_CASES)):
    """Leaves the gloo group started (the caller goes on with it)."""
    import rearec.objectives
    from rearec.model import ReaRec
    from rearec.train import TrainingObjective, distributed_objective
    real_randn_like, torch.randn_like = torch.randn_like, deterministic_noise
    rearec.objectives.cloze_draws = deterministic_cloze_draws
    g = torch.Generator().manual_seed(seed)
    B = 9  # odd: the ranks' shards differ by one row
    lengths = torch.randint(1, 8, (B,), generator=g)
    histories = torch.randint(0, 23, (B, 7), generator=g) * (torch.arange(7) < lengths[:, None])
    targets = torch.randint(0, 23, (B,), generator=g)
    lo, hi = shard_range(B, rank, world)
    # One process, the whole batch (computed before the group exists: no collective is involved).
    reference = {}
    for objective in objectives:
        torch.manual_seed(seed)
        model = ReaRec(tiny_config(objective))
        TrainingObjective(model)(histories, lengths, targets, 5).backward()
        reference[objective] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    init_gloo(rank, world, init_file)
    worst = {}
    for objective in objectives:
        torch.manual_seed(seed)
        model = ReaRec(tiny_config(objective))
        ddp = distributed_objective(TrainingObjective(model), "cpu")  # as the Trainer wraps it
        assert ddp.forward_sync_buffers is False  # item_features, the one buffer, is constant: never re-sent
        loss = ddp(histories[lo:hi], lengths[lo:hi], targets[lo:hi], 5)
        (loss * ((hi - lo) * world / B)).backward()  # as the Trainer weighs a rank's share
        diffs = [(p.grad - reference[objective][n]).abs().max().item() if p.grad is not None else float("inf")
                 for n, p in model.named_parameters() if n in reference[objective]]
        worst[objective] = max(diffs)
    torch.randn_like = real_randn_like
    if rank == 0:
        with open(os.path.join(out_dir, "gradients.json"), "w") as f:
            json.dump(worst, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_worker(rank, world, port, argv, die_in_epoch, result_dir, save_fails_in_epoch=None, save_dies=False,
               native_bf16=None, last_rank_argv=None):
    """A torchrun-like process: the environment torchrun sets, then ``rearec.cli.main`` (the last rank with
    ``last_rank_argv`` instead of ``argv``, when given). ``die_in_epoch``:
    the last rank crashes in that epoch; ``save_fails_in_epoch``: rank 0 cannot write that epoch's state
    (with ``save_dies``, rank 0 crashes there); ``native_bf16``: what the CPU probe answers, if given."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if native_bf16 is not None:
        from rearec_kernels import packed
        packed.native_bf16 = lambda: native_bf16
    import rearec.train as train_module
    from rearec.cli import main
    if die_in_epoch is not None and rank == world - 1:
        real_loss = train_module.training_loss

        def dying_loss(model, histories, lengths, targets, epoch=0, **options):
            if epoch == die_in_epoch:
                os._exit(17)  # a crash: no clean-up, no message
            return real_loss(model, histories, lengths, targets, epoch, **options)

        train_module.training_loss = dying_loss
    if save_fails_in_epoch is not None and rank == 0:
        real_save = train_module.Trainer._save_state

        def failing_save(self, next_epoch):
            if next_epoch == save_fails_in_epoch + 1:
                if save_dies:
                    os._exit(17)
                raise OSError(28, "No space left on device")
            return real_save(self, next_epoch)

        train_module.Trainer._save_state = failing_save
    if last_rank_argv is not None and rank == world - 1:
        argv = last_rank_argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
    except BaseException:  # not one line on stderr: keep the traceback for the test's message
        err.write(traceback.format_exc())
        code = 99
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(err.getvalue())
    os._exit(code)  # as rearec.cli.run_and_exit: no interpreter shutdown beside a dead peer


def run_torchrun_like(argv, world, result_dir, die_in_epoch=None, timeout=120, save_fails_in_epoch=None,
                      save_dies=False, native_bf16=None, last_rank_argv=None):
    """Start ``world`` processes as torchrun would; returns their exit codes (rank order)."""
    last_rank_argv = None if last_rank_argv is None else [str(a) for a in last_rank_argv]
    ctx = mp.start_processes(cli_worker, args=(world, free_port(), [str(a) for a in argv], die_in_epoch,
                                               str(result_dir), save_fails_in_epoch, save_dies, native_bf16,
                                               last_rank_argv),
                             nprocs=world, join=False, start_method="spawn")
    codes = []
    for p in ctx.processes:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


TRAIN = ["--objective", "base", "--hidden-size", "16", "--layers", "1", "--heads", "1", "--inner-size", "32",
         "--max-len", "8", "--batch-size", "32", "--lr", "0.01", "--dropout", "0", "--input-dropout", "0",
         "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def markov_log(tmp_path_factory):
    from tests.synthetic import write_log
    return write_log(tmp_path_factory.mktemp("ddp-data") / "log.csv", n_users=60, n_items=12, length=8)


def epochs_of(folder):
    return [line for line in (folder / "train.log").read_text().splitlines() if line.startswith("epoch")]


def valid_scores(folder):
    state = torch.load(folder / "train_state.pt", weights_only=True)
    return [h["ndcg@20"] for h in json.loads(state["history"])], [h["loss"] for h in json.loads(state["history"])]


def test_two_processes_train_like_one_survive_a_dead_rank_and_resume(markov_log, tmp_path, capsys):
    """2 gloo processes train 2 epochs, then the last rank dies in epoch 2; resumed, they finish epoch 2.
    The same global batches as one process: the same losses and scores up to float rounding (dropout
    is off, so no random stream differs between one process and two)."""
    from rearec.cli import main
    single, crashed = tmp_path / "single", tmp_path / "crashed"
    assert main(["train", "--data", markov_log, "--epochs", "3", "--out", str(single), *TRAIN]) == 0
    capsys.readouterr()
    codes = run_torchrun_like(["train", "--data", markov_log, "--epochs", "3", "--out", crashed, *TRAIN], 2,
                              tmp_path, die_in_epoch=2)
    message = (tmp_path / "rank0.txt").read_text()
    assert codes[1] == 17 and codes[0] == 3, (codes, message)
    assert "another process of this run failed" in message and "--resume" in message
    assert len(message.strip().splitlines()) == 1
    assert len(epochs_of(crashed)) == 2 and (crashed / "model.safetensors").is_file()
    assert not [p.name for p in crashed.iterdir() if p.name.startswith("tmp-")]
    (one_scores, one_losses), (two_scores, two_losses) = valid_scores(single), valid_scores(crashed)
    assert np.allclose(two_losses, one_losses[:2], rtol=1e-4) and np.allclose(two_scores, one_scores[:2], atol=1e-3)
    # Resumed under DDP it finishes as the run without the crash did.
    assert run_torchrun_like(["train", "--data", markov_log, "--epochs", "3", "--out", crashed, "--resume",
                              *TRAIN], 2, tmp_path) == [0, 0], (tmp_path / "rank0.txt").read_text()
    two_scores, two_losses = valid_scores(crashed)
    assert np.allclose(two_losses, one_losses, rtol=1e-4) and np.allclose(two_scores, one_scores, atol=1e-3)
    assert len(epochs_of(crashed)) == 3
    # The test samples were ranked half by each rank and gathered (rank 0 alone used to evaluate them, the
    # other rank waiting in a barrier that times out after 30 minutes): the metrics of one process.
    one, two = (json.loads((run / "test_metrics.json").read_text())["metrics"] for run in (single, crashed))
    assert one["n_samples"] == two["n_samples"] and one.keys() == two.keys()
    for name in ("readout", "r0", "oracle"):
        assert one[name] == pytest.approx(two[name], abs=1e-3), name


def test_bf16_through_float32_products_under_ddp_trains_like_one_process(markov_log, tmp_path, monkeypatch, capfd):
    """bf16 on a CPU without native bf16 dot products (the probe forced): each step's forward and backward,
    DDP's gradient averaging inside it, run under rearec_kernels.bf16_products; 2 processes train as 1."""
    from rearec.cli import main
    from rearec_kernels import packed

    monkeypatch.setattr(packed, "native_bf16", lambda: False)
    single, two = tmp_path / "single", tmp_path / "two"
    argv = ["train", "--data", markov_log, "--epochs", "2", "--bf16", *TRAIN]
    assert main([*argv, "--out", str(single)]) == 0
    assert "float32 products of the bf16 operands" in capfd.readouterr().out
    assert run_torchrun_like([*argv, "--out", two], 2, tmp_path, native_bf16=False) == [0, 0], \
        (tmp_path / "rank0.txt").read_text()
    assert "float32 products of the bf16 operands" in capfd.readouterr().out  # the processes' stdout
    (one_scores, one_losses), (two_scores, two_losses) = valid_scores(single), valid_scores(two)
    assert np.allclose(two_losses, one_losses, rtol=1e-3) and np.allclose(two_scores, one_scores, atol=1e-2)


def test_a_failed_save_on_rank_0_is_known_to_every_rank(markov_log, tmp_path):
    """Rank 0 cannot write epoch 1's state: it says why (exit 2); the other rank does not claim epoch 1
    saved (it said 'epochs 0..1 are saved') but names rank 0's failure, with the way on (exit 3)."""
    out = tmp_path / "run"
    codes = run_torchrun_like(["train", "--data", markov_log, "--epochs", "3", "--out", out, *TRAIN], 2, tmp_path,
                              save_fails_in_epoch=1)
    first, second = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert codes == [2, 3], (codes, first, second)
    assert "No space left on device" in first
    assert "rank 0 could not save epoch 1" in second and "--resume" in second and "0..1" not in second
    assert len(second.strip().splitlines()) == 1
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1  # epoch 0 is what is saved


def test_rank_0_dying_while_it_saves_is_named_with_the_way_on(markov_log, tmp_path):
    """Rank 0 crashes inside epoch 1's save: the other rank's message said only that another process
    failed, without what rank 0 was doing, what is saved or --resume."""
    out = tmp_path / "run"
    codes = run_torchrun_like(["train", "--data", markov_log, "--epochs", "3", "--out", out, *TRAIN], 2, tmp_path,
                              save_fails_in_epoch=1, save_dies=True)
    second = (tmp_path / "rank1.txt").read_text()
    assert codes == [17, 3], (codes, second)
    assert "while rank 0 was to save epoch 1" in second and "epochs 0..0 are saved" in second
    assert "--resume" in second and len(second.strip().splitlines()) == 1


def test_ranks_that_read_different_logs_or_resume_different_states_stop_with_one_line(markov_log, tmp_path):
    """Every rank loads the log and reads the resume state itself: a rank with another copy of the log, or
    a stale copy of the run folder, trained on with a wrong gradient average (or waited in mismatched
    collectives for the 30-minute timeout). Now every rank stops at once, naming what differs."""
    from rearec.cli import main
    from tests.synthetic import write_log
    other = write_log(tmp_path / "other.csv", n_users=61, n_items=12, length=8)
    argv = ["train", "--data", markov_log, "--epochs", "1", "--out", tmp_path / "a", *TRAIN]
    codes = run_torchrun_like(argv, 2, tmp_path, timeout=60,
                              last_rank_argv=["train", "--data", other, "--epochs", "1", "--out", tmp_path / "a", *TRAIN])
    texts = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert codes == [3, 3], (codes, texts)
    for text in texts:
        assert "the data (--data's users, items and interactions) differs between the processes (rank(s) 1" in text
        assert len(text.strip().splitlines()) == 1
    # Two run folders at different epochs: a resume that would start the ranks at epochs 1 and 2.
    for out, epochs in (("a", "1"), ("b", "2")):
        assert main(["train", "--data", markov_log, "--epochs", epochs, "--out", str(tmp_path / out), "--overwrite",
                     *TRAIN]) == 0
    resume = ["--epochs", "3", "--resume", *TRAIN]
    codes = run_torchrun_like(["train", "--data", markov_log, "--out", tmp_path / "a", *resume], 2, tmp_path, timeout=60,
                              last_rank_argv=["train", "--data", markov_log, "--out", tmp_path / "b", *resume])
    texts = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert codes == [3, 3], (codes, texts)
    for text in texts:
        assert "the training state resumed from" in text and "differs between the processes" in text
        assert len(text.strip().splitlines()) == 1


def test_cl_mask_same_user_under_several_processes_is_refused_before_training(monkeypatch):
    """The option runs in one process only; under torchrun it failed when the contrastive term first
    switched on, after the warm-up epochs had trained."""
    from rearec import ReaRec, ReaRecConfig, distributed
    from rearec.train import TrainConfig, Trainer
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    model = ReaRec(ReaRecConfig(n_items=10, hidden_size=8, n_heads=2, inner_size=8, max_len=4, cl_mask_same_user=True))
    with pytest.raises(ValueError, match="cl_mask_same_user runs in one process only"):
        Trainer(model, None, TrainConfig(progress=False), "unused")


def test_ddp_construction_failing_for_a_dead_peer_is_one_line(monkeypatch):
    """DDP's constructor broadcasts rank 0's weights: a peer that died before it (e.g. out of memory while
    moving its model) gave the survivor gloo's RuntimeError and a traceback."""
    import rearec.train as train_module
    from rearec import ReaRec, ReaRecConfig, distributed

    def dead_peer(*args, **options):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(train_module, "DistributedDataParallel", dead_peer)
    model = ReaRec(ReaRecConfig(n_items=10, hidden_size=8, n_heads=2, inner_size=8, max_len=4))
    with pytest.raises(distributed.RankFailure, match="rank 0: another process of this run failed before training"):
        train_module.distributed_objective(train_module.TrainingObjective(model), "cpu")


def test_a_launcher_without_local_rank_is_refused_on_cuda(monkeypatch):
    """Without LOCAL_RANK every rank of a machine took cuda:0 (NCCL then fails on duplicate GPUs)."""
    from rearec import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in (("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device was called"))
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but LOCAL_RANK unset; launch with torchrun"):
        distributed.init_from_env("cuda")
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match="LOCAL_RANK='first' is not a number"):
        distributed.init_from_env("cuda")


def test_a_sharded_engine_refuses_a_request_batcher_and_the_bf16_filter():
    from rearec import FastReaRec, ReaRec, ReaRecConfig
    from rearec.serving import RequestBatcher
    model = ReaRec(ReaRecConfig(n_items=30, hidden_size=16, n_heads=2, inner_size=16, max_len=5)).eval()
    with pytest.raises(ValueError, match="shard_items=True cannot serve behind a RequestBatcher"):
        RequestBatcher(FastReaRec.from_model(model, shard_items=True))
    with pytest.raises(ValueError, match="leave bf16_filter out"):
        FastReaRec.from_model(model, shard_items=True, bf16_filter=True)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_a_sharded_engine_cuts_its_rows_before_they_move(backbone, monkeypatch):
    """With shard_items the whole table went to the serving device (and dtype) first, two or three of them for
    BERT4Rec, before the shard was cut: on a GPU, the table that fits no device ran out of memory there.
    The shard is now cut from the model's own tables; only its rows are converted."""
    import rearec.engine as engine_module
    from rearec import FastReaRec, ReaRec, ReaRecConfig, distributed
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "rank", lambda group=None: 1)
    seen = []
    real_of = ItemShard.of

    def recording_of(table, group=None):
        seen.append(table.dtype)
        return real_of(table, group)

    monkeypatch.setattr(engine_module.ItemShard, "of", staticmethod(recording_of))
    model = ReaRec(ReaRecConfig(n_items=31, hidden_size=16, n_heads=2, inner_size=16, max_len=5,
                                backbone=backbone)).eval()
    engine = FastReaRec.from_model(model, dtype=torch.bfloat16, shard_items=True)
    assert seen and set(seen) == {torch.float32}  # the model's tables, not converted copies
    rows = 31 + (backbone == "bert4rec")  # BERT4Rec's input table ends with the mask token
    start, stop = shard_range(rows, 1, 2)
    want = model.item_table().detach()
    if backbone == "bert4rec":
        want = torch.cat([want, model.mask_embedding.detach()[None]])
    assert engine.item_table.dtype == torch.bfloat16 and torch.equal(engine.item_table, want[start:stop].bfloat16())
    assert engine.input_shard.offset == start and engine.input_shard.n_items == rows


def test_train_under_world_size_without_torchrun_is_a_clear_error(markov_log, tmp_path, capsys, monkeypatch):
    from rearec.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["train", "--data", markov_log, "--out", str(tmp_path / "o"), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "launch with torchrun" in err and len(err.strip().splitlines()) == 1


def test_more_ranks_per_machine_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node 4 on a 2-GPU machine: torch.cuda.set_device raised a traceback on every
    rank. The rank says how many GPUs there are and what to launch, before touching the device."""
    from rearec import distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "3"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device was called"))
    with pytest.raises(ValueError, match=r"LOCAL_RANK=3 but this machine has 2 GPU\(s\).*--nproc_per_node 2"):
        distributed.init_from_env("cuda")


@pytest.mark.parametrize("n, batch_size, world", [(47, 8, 2), (31, 5, 3), (123, 10, 3), (7, 7, 1)])
def test_batch_shards_split_one_process_batches(n, batch_size, world):
    """The ranks' shares of each batch are disjoint, near-equal, and together the batch one process
    draws from the same generator (a final batch smaller than the world is skipped)."""
    seed = random.randrange(2**31)
    one = list(batch_shards(n, batch_size, torch.Generator().manual_seed(seed), 0, 1))
    shards = [list(batch_shards(n, batch_size, torch.Generator().manual_seed(seed), r, world)) for r in range(world)]
    kept = [b for b, size in one if size >= world]
    assert all(len(s) == len(kept) for s in shards)
    for j, whole in enumerate(kept):
        parts = [shards[r][j][0] for r in range(world)]
        assert torch.equal(torch.cat(parts), whole) and all(shards[r][j][1] == len(whole) for r in range(world))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_batch_smaller_than_world_is_an_error():
    with pytest.raises(ValueError, match="--batch-size 2 is smaller than the 3 processes"):
        list(batch_shards(10, 2, torch.Generator().manual_seed(0), 0, 3))
    with pytest.raises(ValueError, match="the training set has 2 sample.s., fewer than the 3 processes"):
        list(batch_shards(2, 8, torch.Generator().manual_seed(0), 0, 3))  # no step at all, loss shown as 0
