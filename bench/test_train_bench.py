"""Training throughput at MovieLens-1M's shape: one optimizer step of base, ERL and PRL.

The shape of ``rearec train --data ml-1m --preset small`` (3,706 items, hidden 64, 2 layers, 2 heads,
inner 256, max_len 50, batch 256; ERL and PRL at K=2, PRL's contrastive term on), on a fixed batch
whose lengths follow a long-history log (60% full windows). Each step is forward, backward and an
Adam step; the objectives are timed interleaved (median of rounds), and each step time is also
projected to an epoch of ML-1M's 1,777 batches (454,846 training samples).

    pytest bench/test_train_bench.py --benchmark-only
    REAREC_BENCH_ROUNDS=2 pytest bench/test_train_bench.py --benchmark-only   # a smoke run
"""
import os

import torch

from rearec import ReaRec, ReaRecConfig
from rearec.config import PRESETS
from rearec.objectives import training_loss
from recommend_timing import interleaved_medians  # bench/ is on sys.path (no __init__)

N_ITEMS, BATCH, ML1M_BATCHES = 3706, 256, 1777
OBJECTIVES = ("base", "erl", "prl")


def _step(objective):
    torch.manual_seed(0)
    cfg = dict(PRESETS["small"], n_items=N_ITEMS + 1, pad_item=N_ITEMS, objective=objective, warmup_epochs=0)
    if objective != "base":
        cfg["reason_steps"] = 2
    model = ReaRec(ReaRecConfig(**cfg)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    L = cfg["max_len"]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, L + 1, (BATCH,), generator=g)
    lengths = torch.where(torch.rand(BATCH, generator=g) < 0.6, torch.full_like(lengths, L), lengths)
    histories = torch.randint(0, N_ITEMS, (BATCH, L), generator=g)
    histories = torch.where(torch.arange(L)[None] < lengths[:, None], histories, torch.full_like(histories, N_ITEMS))
    targets = torch.randint(0, N_ITEMS, (BATCH,), generator=g)
    users = torch.arange(BATCH)

    def step():
        loss = training_loss(model, histories, lengths, targets, epoch=1, users=users)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def test_training_step_per_objective(benchmark):
    steps = {objective: _step(objective) for objective in OBJECTIVES}
    rounds = int(os.environ.get("REAREC_BENCH_ROUNDS", 7))
    median = interleaved_medians(lambda objective: steps[objective](), OBJECTIVES, repeats=rounds)
    info = dict(PRESETS["small"], n_items=N_ITEMS, batch=BATCH, reason_steps=2, torch_threads=torch.get_num_threads())
    for objective in OBJECTIVES:
        info[f"ms_step_{objective}"] = median[objective] * 1e3
        info[f"s_ml1m_epoch_{objective}"] = median[objective] * ML1M_BATCHES
    info["ratio_prl_over_base"] = median["prl"] / median["base"]
    info["ratio_erl_over_base"] = median["erl"] / median["base"]
    benchmark.extra_info.update(info)
    benchmark.pedantic(steps["base"], rounds=1, warmup_rounds=0)
