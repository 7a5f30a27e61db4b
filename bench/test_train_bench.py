"""Training throughput at MovieLens-1M's shape: one optimizer step of base, ERL and PRL.

The shape of ``rearec train --data ml-1m --preset small`` (3,706 items, hidden 64, 2 layers, 2 heads,
inner 256, max_len 50, batch 256; ERL and PRL at K=2, PRL's contrastive term on), on a fixed batch
whose lengths follow a long-history log (60% full windows). Each step is forward, backward and an
Adam step, as the ``Trainer`` runs it (``TrainingObjective``, fused Adam, the heap set to reuse freed
memory; under ``--bf16`` on a CPU without native bf16 dot products, forward and backward under
``rearec_kernels.bf16_products``); the objectives are timed interleaved (median of rounds), in float32
and under ``--bf16`` mixed precision (``bf16_products`` in the JSON says whether the CPU's own bf16 dot
products or float32 ones ran), and each step time is also projected to an epoch of ML-1M's 1,777
batches (454,846 training samples).

    pytest bench/test_train_bench.py --benchmark-only
    REAREC_BENCH_ROUNDS=2 pytest bench/test_train_bench.py --benchmark-only   # a smoke run
"""
import os

import torch

from rearec import ReaRec, ReaRecConfig
from rearec.config import PRESETS
from rearec.heap import reuse_freed_memory
from rearec.train import TrainingObjective
from rearec_kernels.bf16_products import cpu_bf16_products
from rearec_kernels.packed import native_bf16
from recommend_timing import interleaved_medians  # bench/ is on sys.path (no __init__)

N_ITEMS, BATCH, ML1M_BATCHES = 3706, 256, 1777
OBJECTIVES = ("base", "erl", "prl")


def _step(objective, bf16=False):
    torch.manual_seed(0)
    cfg = dict(PRESETS["small"], n_items=N_ITEMS + 1, pad_item=N_ITEMS, objective=objective, warmup_epochs=0)
    if objective != "base":
        cfg["reason_steps"] = 2
    model = ReaRec(ReaRecConfig(**cfg)).train()
    loss_of = TrainingObjective(model, bf16=bf16)  # the trainer's forward: autocast when bf16
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    L = cfg["max_len"]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, L + 1, (BATCH,), generator=g)
    lengths = torch.where(torch.rand(BATCH, generator=g) < 0.6, torch.full_like(lengths, L), lengths)
    histories = torch.randint(0, N_ITEMS, (BATCH, L), generator=g)
    histories = torch.where(torch.arange(L)[None] < lengths[:, None], histories, torch.full_like(histories, N_ITEMS))
    targets = torch.randint(0, N_ITEMS, (BATCH,), generator=g)
    users = torch.arange(BATCH)

    def step():
        with cpu_bf16_products("cpu", bf16):  # as the Trainer runs a step
            loss = loss_of(histories, lengths, targets, 1, users)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
    return step


def test_training_step_per_objective(benchmark):
    reuse_freed_memory()  # as the Trainer sets it
    precisions = (False, True)
    keys = [(objective, bf16) for bf16 in precisions for objective in OBJECTIVES]
    steps = {key: _step(*key) for key in keys}
    rounds = int(os.environ.get("REAREC_BENCH_ROUNDS", 7))
    median = interleaved_medians(lambda key: steps[key](), keys, repeats=rounds)
    info = dict(PRESETS["small"], n_items=N_ITEMS, batch=BATCH, reason_steps=2, torch_threads=torch.get_num_threads(),
                bf16_products="native" if native_bf16() else "float32 (rearec_kernels.bf16_products)")
    for bf16 in precisions:
        tag = "_bf16" if bf16 else ""
        for objective in OBJECTIVES:
            info[f"ms_step_{objective}{tag}"] = median[(objective, bf16)] * 1e3
            info[f"s_ml1m_epoch_{objective}{tag}"] = median[(objective, bf16)] * ML1M_BATCHES
        info[f"ratio_prl_over_base{tag}"] = median[("prl", bf16)] / median[("base", bf16)]
        info[f"ratio_erl_over_base{tag}"] = median[("erl", bf16)] / median[("base", bf16)]
    benchmark.extra_info.update(info)
    benchmark.pedantic(steps[("base", False)], rounds=1, warmup_rounds=0)
