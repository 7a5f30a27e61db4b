"""FLOP counts of ReaRec inference as ``FastReaRec`` computes it, for floors and roofline ratios in
benchmarks (2 FLOPs per multiply-add).

The engine's prefill runs every layer but the last over every history token; the last layer
projects every token's keys and values (the reasoning steps attend to them) but its attention and
the rest of the layer run for the newest token alone, whose output is r_0. Each reasoning step is one
token through every layer. Scoring is one pass of the user vectors over the item table.
"""


def layer_flops_per_token(hidden: int, inner: int) -> float:
    """One token through one layer's linear maps: Q, K, V and output projections, feed-forward in and
    out (attention's QKᵀ and PV left out)."""
    return 2 * (4 * hidden * hidden + 2 * hidden * inner)


def kv_and_query_flops_per_token(hidden: int) -> float:
    """One token's Q, K and V projections (the engine's one fused GEMM)."""
    return 2 * 3 * hidden * hidden


def tail_flops_per_token(hidden: int, inner: int) -> float:
    """One token's output projection and feed-forward (the layer after attention)."""
    return layer_flops_per_token(hidden, inner) - kv_and_query_flops_per_token(hidden)


def prefill_linear_flops(tokens: float, hidden: int, inner: int, n_layers: int) -> float:
    """The linear maps of prefilling ``tokens`` (>= 1) history tokens of one user: every layer but the
    last for every token, the last layer's Q/K/V for every token and its tail for the newest only."""
    return (tokens * ((n_layers - 1) * layer_flops_per_token(hidden, inner) + kv_and_query_flops_per_token(hidden))
            + tail_flops_per_token(hidden, inner))


def step_linear_flops(hidden: int, inner: int, n_layers: int) -> float:
    """One reasoning step of one user: one token through every layer's linear maps."""
    return n_layers * layer_flops_per_token(hidden, inner)


def recommend_flops(batch: int, history_len: int, depth: int, hidden: int, inner: int, n_layers: int,
                    n_items: int) -> dict:
    """FLOPs of one recommend call over full histories of ``history_len`` items, by part:
    {"layers": prefill and ``depth`` steps (linear maps and attention, which counts the keys each query
    sees), "scoring": the pass over the item table}; their sum is the call's."""
    def attention(keys: float) -> float:
        return 2 * 2 * hidden * keys  # QKᵀ and PV over all heads

    causal_keys = history_len * (history_len + 1) / 2  # keys seen by all history queries of a layer
    prefill = (prefill_linear_flops(history_len, hidden, inner, n_layers)
               + (n_layers - 1) * attention(causal_keys) + attention(history_len))  # last layer: newest query only
    steps = sum(step_linear_flops(hidden, inner, n_layers) + n_layers * attention(history_len + s)
                for s in range(1, depth + 1))
    return {"layers": batch * (prefill + steps), "scoring": batch * 2 * n_items * hidden}
