"""One training step of the study's ML-1M PRL model on this CPU in three precisions, to see what bf16
costs where the CPU has no native bf16 dot products (AVX512-BF16 or AMX):

    python bench/bf16_cpu_step.py [--steps 4] [--threads 1]

- fp32: no autocast.
- bf16: ``TrainConfig(bf16=True)``'s autocast as it runs (torch's generic fallback on such a CPU).
- bf16-as-fp32: the same autocast under ``rearec_kernels.bf16_products``' mode (every bf16 matrix
  product run as the float32 product of its operands' exact upcasts, rounded back to bf16): the
  fallback's arithmetic in fp32's kernels. The trainer runs bf16 this way on such a CPU.

Measured 2026-12-02 on an AVX2-only AMD EPYC, 1 thread, nothing else running, --steps 5: fp32 640 ms,
bf16 2448 ms, bf16-as-fp32 785 ms per step (B=256, L=50, d=64, 2 layers, K=2, 3,468 items).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rearec import ReaRec, ReaRecConfig  # noqa: E402
from rearec.train import TrainingObjective  # noqa: E402
from rearec_kernels.bf16_products import Bf16ProductsAsFloat32  # noqa: E402
from rearec_kernels.packed import native_bf16  # noqa: E402

ML1M_PRL = dict(n_items=3468, hidden_size=64, n_layers=2, n_heads=2, inner_size=128, dropout=0.2, input_dropout=0.2,
                max_len=50, reason_steps=2, objective="prl", warmup_epochs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(**ML1M_PRL))
    B, L = 256, ML1M_PRL["max_len"]
    histories = torch.randint(1, ML1M_PRL["n_items"], (B, L))
    lengths = torch.randint(5, L + 1, (B,))
    targets = torch.randint(1, ML1M_PRL["n_items"], (B,))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}, "
          f"{args.threads} thread(s)")
    for name, bf16, mode in (("fp32", False, None), ("bf16", True, None), ("bf16-as-fp32", True, Bf16ProductsAsFloat32)):
        objective = TrainingObjective(model, fused_ce=True, bf16=bf16)
        with mode() if mode else contextlib.nullcontext():
            def step():
                model.zero_grad(set_to_none=True)
                objective(histories, lengths, targets, epoch=ML1M_PRL["warmup_epochs"]).backward()

            step()  # warm-up
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
        print(f"{name:>13}: {(time.perf_counter() - start) / args.steps * 1e3:8.0f} ms per training step")


if __name__ == "__main__":
    main()
