"""Fused top-K scoring in Triton: two streaming passes over the item table, no (B, N) score matrix.

Called through :mod:`rearec_kernels.topk`, which validates and makes the inputs contiguous; see
:mod:`rearec_kernels.topk_reference` for the contract (ties: the lower item index wins).

A top-K of up to 1024 per row does not fit in registers next to a GEMM tile, so the selection is
split into a threshold pass, a collection pass, and an exact selection over the few survivors:

1. ``_group_max_kernel``: one program per (BLOCK_B queries) x (BLOCK_N items) tile computes the
   scores with ``tl.dot`` (float32 accumulation) and stores only the maximum of each group of G
   consecutive items: a (B, N / G) float32 array, G >= 8 (at most 1/8 of the score matrix, usually
   1/32). Host: ``L[b]`` = the k_eff[b]-th largest group maximum, with
   ``k_eff[b] = k + (#valid exclusions of row b) + SLACK``. Those k_eff group maxima are the scores
   of k_eff distinct items, of which at most #exclusions are excluded, so at least k allowed items
   score >= L[b]: L[b] is a lower bound of the row's true k-th best score. Because the best items
   rarely share a group, it is also nearly tight: about k_eff items per row score >= L[b].
2. ``_collect_kernel``: runs only on the (query tile, item chunk) pairs where some row's group
   maximum reaches its L (a few percent of the table for small B), recomputes those scores and
   appends every score >= L[b] to row b's candidate list, using one atomic per row per chunk to
   reserve slots and a cumsum inside the tile for positions. Each candidate is one int64 key:
   the high 32 bits are the score's float32 bits made order-preserving as a signed integer
   (negative floats get their magnitude bits flipped; -0.0 is stored as +0.0), the low 32 bits are
   ``2**32 - 1 - index``, so one integer comparison orders by (score desc, index asc) -- exactly
   the contract's tie rule -- and keys are unique (indices go up to 2**32 - 1 >> 10**7).
3. Host: excluded ids are removed from the candidates (a batched ``searchsorted`` against each
   row's sorted exclusion list), and ``torch.topk`` over the (B, C) keys picks the answer; values
   are decoded from the key bits, so they are the kernel's float32 scores exactly.

Exactness does not rest on the two passes computing bitwise-identical scores: after step 3 a row is
certified when it holds >= k allowed candidates (then its k-th best is >= L, so every item that
could beat it was collected) or when nothing was filtered (L = -inf). A row that fails (never seen
in practice; SLACK absorbs last-ulp differences between the passes' tile shapes) is recomputed
with L = -inf. A candidate list that overflows its capacity C is detected through the atomic
counters and the collection pass is rerun with the exact size. When the table has fewer than
G_MIN * k_eff items, step 1 is skipped and every item is a candidate (such tables are small).

Precision: float32 tables use IEEE-exact ``tl.dot`` (no TF32) with float32 queries; float16 and
bfloat16 tables run on tensor cores with the queries rounded to the table's dtype, accumulating in
float32. Under Triton's interpreter (TRITON_INTERPRET=1) the operands are upcast to float32 after
that same rounding, because the interpreter computes low-precision dots wrongly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from rearec_kernels.backend import interpreting

SLACK = 8
MAX_ROWS = 256  # queries per call of the two passes: group maxima take MAX_ROWS * N / G * 4 bytes
SENTINEL = -(2 ** 63)  # below every real key; decodes to index -1, value -inf
LOW32 = (1 << 32) - 1

# Tests set this to fill intermediate buffers with garbage first, so that any slot a kernel should
# have written but did not shows up in the results.
poison_buffers = False
# Slow-path counters (for GPU checks): collection passes rerun for overflowing candidate lists,
# and rows recomputed because the certificate failed.
stats = {"capacity_reruns": 0, "certificate_rows": 0}


@triton.jit
def _tile_scores(Q, E, rows, cols, B, N, D, stride_q, stride_e, scale,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """scale * (Q[rows] . E[cols]) as a float32 (len(rows), len(cols)) tile; -0.0 becomes +0.0."""
    row_ok = rows < B
    col_ok = cols < N
    q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_q
    e_ptrs = E + cols.to(tl.int64)[:, None] * stride_e  # int64: N * d exceeds 2**31 at N = 10**7
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        e = tl.load(e_ptrs + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            e = e.to(tl.float32)
        acc = tl.dot(q, tl.trans(e), acc, input_precision=DOT_PRECISION)
    s = acc * scale
    return tl.where(s == 0.0, 0.0, s)


@triton.jit
def _group_max_kernel(
    Q, E, Gmax, B, N, D, stride_q, stride_e, scale, n_groups, n_qtiles,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid, query tiles fastest: the tiles sharing an item tile run together and share it in L2.
    pid = tl.program_id(0)
    pid_b = pid % n_qtiles
    pid_n = pid // n_qtiles
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s = _tile_scores(Q, E, rows, cols, B, N, D, stride_q, stride_e, scale,
                     BLOCK_B, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
    s = tl.where((cols < N)[None, :], s, float("-inf"))
    gmax = tl.max(tl.reshape(s, (BLOCK_B, BLOCK_N // G, G)), axis=2)
    groups = pid_n * (BLOCK_N // G) + tl.arange(0, BLOCK_N // G)
    ptrs = Gmax + rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
    tl.store(ptrs, gmax, mask=(rows < B)[:, None])


@triton.jit
def _collect_kernel(
    Q, E, Thr, Work, Cand, Count, B, N, D, stride_q, stride_e, scale, capacity,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    w = tl.program_id(0)
    chunk = tl.load(Work + 2 * w)
    qtile = tl.load(Work + 2 * w + 1)
    rows = qtile * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    row_ok = rows < B
    s = _tile_scores(Q, E, rows, cols, B, N, D, stride_q, stride_e, scale,
                     BLOCK_B, CHUNK, BLOCK_D, UPCAST, DOT_PRECISION)
    thr = tl.load(Thr + rows, mask=row_ok, other=float("inf"))
    hit = (s >= thr[:, None]) & (cols < N)[None, :] & row_ok[:, None]
    hit_i = hit.to(tl.int32)
    n_row = tl.sum(hit_i, axis=1)
    base = tl.atomic_add(Count + rows, n_row, mask=row_ok & (n_row > 0))
    pos = base[:, None] + tl.cumsum(hit_i, axis=1) - 1
    # Order-preserving key: (score bits as a monotone signed int32) << 32 | (2**32 - 1 - index).
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    low = tl.full((CHUNK,), 4294967295, tl.int64) - cols.to(tl.int64)
    keys = (ordered.to(tl.int64) << 32) | low[None, :]
    ptrs = Cand + rows.to(tl.int64)[:, None] * capacity + pos
    tl.store(ptrs, keys, mask=hit & (pos < capacity))


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def config(B: int, d: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the two kernels. One small config when interpreting."""
    if interpreting():
        return dict(BLOCK_B=16, BLOCK_N=32, BLOCK_D=16, G_MIN=8, G_MAX=32, CHUNK_MIN=16, BLOCK_B2=16,
                    w1=1, s1=1, w2=1, s2=1)
    wide = dtype != torch.float32  # tensor cores; float32 IEEE dots run on FMA units
    block_b = min(128 if wide else 64, max(16, _next_pow2(B)))
    return dict(
        BLOCK_B=block_b,
        BLOCK_N=128,
        BLOCK_D=min(64 if wide else 32, max(16, _next_pow2(d))),
        G_MIN=8, G_MAX=32, CHUNK_MIN=32,
        # Pass 2 takes 32 query rows: a chunk is fetched for all rows of its tile, so small tiles
        # skip more of the table when B is large.
        BLOCK_B2=min(32, max(16, _next_pow2(B))),
        w1=8 if block_b >= 64 else 4, s1=3 if wide else 2,
        w2=4, s2=2,
    )


def _empty(shape, dtype, device, poison):
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_buffers:
        t.fill_(poison)
    return t


def decode(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 scores, int64 indices); SENTINEL -> (-inf, -1)."""
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    values = bits.view(torch.float32)
    indices = LOW32 - (keys & LOW32)
    empty = keys == SENTINEL
    values = torch.where(empty, torch.full_like(values, float("-inf")), values)
    indices = torch.where(empty, torch.full_like(indices, -1), indices)
    return values, indices


def fused_topk_triton(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    scale: float = 1.0,
    exclude: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if item_table.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"the triton backend takes float32/float16/bfloat16 item tables, not {item_table.dtype}: "
            "pass backend='cpu' or 'reference' for float64")
    if queries.dtype == torch.float64:
        raise ValueError("the triton backend takes float32/float16/bfloat16 queries, not float64")
    q = queries.to(item_table.dtype).contiguous()
    parts = []
    for b0 in range(0, q.shape[0], MAX_ROWS):  # bounds the (rows, N / G) group maxima
        ex = exclude[b0:b0 + MAX_ROWS] if exclude is not None else None
        parts.append(_select_keys(q[b0:b0 + MAX_ROWS], item_table, int(k), float(scale), ex, force_all=False))
    return decode(parts[0] if len(parts) == 1 else torch.cat(parts))


def _select_keys(q, table, k, scale, exclude, force_all):
    """(B, k) int64 keys of the answer, best first."""
    B, d = q.shape
    N = table.shape[0]
    device = q.device
    cfg = config(B, d, table.dtype)
    common = dict(UPCAST=interpreting(), DOT_PRECISION="ieee" if table.dtype == torch.float32 else "tf32")

    n_ex = torch.zeros(B, dtype=torch.int64, device=device)
    if exclude is not None and exclude.numel() > 0:
        n_ex = ((exclude >= 0) & (exclude < N)).sum(dim=1)
    k_eff = k + n_ex + SLACK
    k_eff_max = int(k_eff.max())

    # Group size: the largest power of two in [G_MIN, G_MAX] leaving >= 4 k_eff groups.
    G = cfg["G_MAX"]
    while G > cfg["G_MIN"] and -(-N // G) < 4 * k_eff_max:
        G //= 2
    chunk = max(G, cfg["CHUNK_MIN"])
    BN = max(cfg["BLOCK_N"], chunk)
    n_tiles = -(-N // BN)
    n_groups = n_tiles * (BN // G)
    n_chunks = n_tiles * (BN // chunk)
    filtered = not force_all and -(-N // G) >= k_eff_max

    qt1 = -(-B // cfg["BLOCK_B"])
    if filtered:
        gmax = _empty((B, n_groups), torch.float32, device, float("nan"))
        _group_max_kernel[(qt1 * n_tiles,)](
            q, table, gmax, B, N, d, q.stride(0), table.stride(0), scale, n_groups, qt1,
            BLOCK_B=cfg["BLOCK_B"], BLOCK_N=BN, BLOCK_D=cfg["BLOCK_D"], G=G,
            num_warps=cfg["w1"], num_stages=cfg["s1"], **common)
        top = torch.topk(gmax, min(k_eff_max, n_groups), dim=1).values
        thr = top.gather(1, (k_eff - 1).clamp(max=top.shape[1] - 1)[:, None]).squeeze(1)
        thr = torch.where(k_eff > n_groups, torch.full_like(thr, float("-inf")), thr)
        chunk_max = gmax.view(B, n_chunks, chunk // G).amax(dim=2)
        active = chunk_max >= thr[:, None]  # (B, n_chunks)
    else:
        thr = torch.full((B,), float("-inf"), dtype=torch.float32, device=device)
        active = torch.zeros(B, n_chunks, dtype=torch.bool, device=device)
        active[:, : -(-N // chunk)] = True

    B2 = cfg["BLOCK_B2"]
    qt2 = -(-B // B2)
    act = torch.zeros(qt2 * B2, n_chunks, dtype=torch.bool, device=device)
    act[:B] = active
    work = act.view(qt2, B2, n_chunks).any(dim=1).t().nonzero().to(torch.int32).contiguous()  # (W, 2): chunk, qtile

    if thr.isinf().logical_and(thr < 0).any():
        capacity = N
    else:
        capacity = 2 * k_eff_max + 2 * chunk
    capacity = max(min(capacity, N), 1)
    while True:
        cand = _empty((B, capacity), torch.int64, device, 0x5A5A5A5A5A5A5A5A)
        count = torch.zeros(B, dtype=torch.int32, device=device)
        if work.shape[0] > 0:
            _collect_kernel[(work.shape[0],)](
                q, table, thr, work, cand, count, B, N, d, q.stride(0), table.stride(0), scale, capacity,
                BLOCK_B=B2, CHUNK=chunk, BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["w2"], num_stages=cfg["s2"], **common)
        need = int(count.max()) if B > 0 else 0
        if need <= capacity:
            break
        capacity = need  # ties at the threshold overflowed the lists: rerun with room for all
        stats["capacity_reruns"] += 1

    slot_used = torch.arange(capacity, device=device)[None, :] < count[:, None].to(torch.int64)
    keys = torch.where(slot_used, cand, torch.full_like(cand, SENTINEL))
    if exclude is not None and exclude.numel() > 0:
        keys = _drop_excluded(keys, exclude)
    if capacity < k:
        keys = torch.cat([keys, keys.new_full((B, k - capacity), SENTINEL)], dim=1)
    out = torch.topk(keys, k, dim=1).values

    if not force_all:
        # Certificate: k allowed candidates per row, or the row was not filtered at all.
        short = ((keys != SENTINEL).sum(dim=1) < k) & torch.isfinite(thr)
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            stats["certificate_rows"] += rows.numel()
            ex = exclude[rows] if exclude is not None else None
            out[rows] = _select_keys(q[rows].contiguous(), table, k, scale, ex, force_all=True)
    return out


def _drop_excluded(keys: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    ex_sorted = torch.sort(exclude.to(torch.int64), dim=1).values
    idx = LOW32 - (keys & LOW32)
    pos = torch.searchsorted(ex_sorted, idx).clamp(max=ex_sorted.shape[1] - 1)
    hit = (ex_sorted.gather(1, pos) == idx) & (keys != SENTINEL)
    return torch.where(hit, torch.full_like(keys, SENTINEL), keys)
