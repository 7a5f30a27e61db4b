"""FLOP counts of ReaRec inference, for floors and roofline ratios in benchmarks."""


def linear_flops_per_token(hidden: int, inner: int, n_layers: int) -> float:
    """FLOPs of one token's projections (Q, K, V, output) and feed-forward (in and out) through every
    layer, attention's QKᵀ and PV left out: what every prefilled token and every reasoning step costs
    at least (2 FLOPs per multiply-add)."""
    return n_layers * 2 * (4 * hidden * hidden + 2 * hidden * inner)


def recommend_flops(batch: int, history_len: int, depth: int, hidden: int, inner: int, n_layers: int,
                    n_items: int) -> float:
    """FLOPs of one recommend call: prefill over the history, ``depth`` one-token steps, and scoring
    against the whole item table (2 FLOPs per multiply-add; attention counts the keys each query sees)."""
    per_token_linear = linear_flops_per_token(hidden, inner, 1)

    def attention(keys: float) -> float:
        return 2 * 2 * hidden * keys  # QKᵀ and PV over all heads

    causal_keys = history_len * (history_len + 1) / 2  # keys seen by all history queries together
    prefill = n_layers * (history_len * per_token_linear + attention(causal_keys))
    steps = sum(n_layers * (per_token_linear + attention(history_len + s)) for s in range(1, depth + 1))
    scoring = 2 * n_items * hidden
    return batch * (prefill + steps + scoring)
