"""rearec.flops against what the engine really runs: PyTorch's FLOP counter over FastReaRec's calls
(its linear maps are addmm GEMMs; attention runs in kernels the counter does not see, so attention's
share is checked against a count by hand)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rearec import ReaRec, ReaRecConfig
from rearec.engine import FastReaRec
from rearec.flops import prefill_linear_flops, recommend_flops, step_linear_flops

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n_layers", [1, 2])
def test_linear_flops_are_the_engines_gemms(n_layers):
    d, inner, L, N, B = 32, 48, 10, 500, 4
    torch.manual_seed(0)
    model = ReaRec(ReaRecConfig(n_items=N, hidden_size=d, n_layers=n_layers, n_heads=2, inner_size=inner,
                                max_len=L, reason_steps=3)).eval()
    engine = FastReaRec.from_model(model, bf16_filter=False)
    histories, lengths = torch.randint(1, N, (B, L)), torch.full((B,), L)
    for depth in range(4):
        engine.reasoning_states(histories, depth=depth, lengths=lengths)  # warm: nothing is counted twice
        with FlopCounterMode(display=False) as counter:
            engine.reasoning_states(histories, depth=depth, lengths=lengths)
        linear = B * (prefill_linear_flops(L, d, inner, n_layers) + depth * step_linear_flops(d, inner, n_layers))
        assert counter.get_total_flops() == linear, depth
        # The attention share: QKᵀ and PV (2 x 2 x d per key) over the causal keys of every layer but the
        # last, the newest query's L keys in the last, and L + s keys for step s in every layer.
        by_hand = 4 * d * ((n_layers - 1) * L * (L + 1) // 2 + L + n_layers * sum(L + s for s in range(1, depth + 1)))
        assert recommend_flops(B, L, depth, d, inner, n_layers, N)["layers"] == linear + B * by_hand
    with FlopCounterMode(display=False) as counter:
        model.scores(torch.randn(B, d))
    assert recommend_flops(B, L, 0, d, inner, n_layers, N)["scoring"] == counter.get_total_flops()
