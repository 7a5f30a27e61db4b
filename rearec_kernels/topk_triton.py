"""Fused top-K scoring in Triton: two streaming passes over the item table, no (B, N) score matrix,
no host synchronisation (at fixed shapes the whole call can be captured in one CUDA graph).

Called through :mod:`rearec_kernels.topk`, which validates the inputs and owns the limits of this
backend (dtypes, table size); see :mod:`rearec_kernels.topk_reference` for the contract (ties: the
lower item index wins; NaN scores rank below every number, -inf included, and come back as NaN).

Two kinds of score appear below. ``f(b, n)``, the *exact* score, is what the op returns: float32
accumulation of the products of the queries (rounded to a 16-bit table's dtype) and the table rows,
IEEE FMA for float32 tables. ``g(b, n)``, the *fast* score of pass 1, is computed on tensor cores
(TF32 for float32 tables) with other tile shapes. :func:`score_margin` bounds ``|g - f|`` by ``m_b``
for every item (error analysis in its docstring), and everything below rests only on that bound,
never on two passes rounding alike:

1. ``_group_max_kernel`` (tensor cores): the maximum of g over each group of G consecutive items,
   a (B, N / G) float32 array. ``L_b`` = the ``k_eff``-th largest group maximum, ``k_eff = k +
   (#valid exclusions of row b)``: those are g scores of k_eff distinct items, so >= k allowed items
   have ``g >= L_b``, hence ``f >= L_b - m_b``: the row's k-th best allowed f, ``T_b``, is
   >= ``L_b - m_b``. Any item of the answer has ``f >= T_b`` and so ``g >= L_b - 2 m_b``.
2. Item chunks whose group maxima reach ``L_b - 2 m_b`` for some row of a query tile are *active*
   (a few percent of the table); the list of active (chunk, query tile) pairs is compacted on the
   device (cumsum + scatter) and ``_collect_kernel``, a persistent kernel whose programs stride
   through that list, computes f on them and appends every item with ``f >= L_b - m_b`` (a superset
   of the answer, ties at ``T_b`` included) to row b's candidate list: one atomic per row per chunk
   reserves slots, a cumsum inside the tile gives positions. Each candidate is one int64 key: the
   high 32 bits are f's float32 bits made order-preserving as a signed integer (negative floats
   get their magnitude bits flipped; -0.0 is stored as +0.0), the low 32 bits ``2**32 - 1 -
   index``, so one integer comparison orders by (score desc, index asc) -- the contract's tie rule.
3. A row whose list overflows its fixed capacity C (only when more than C items lie within the
   margin of the threshold: massive ties) is redone by ``_fallback_kernel``, which every call
   launches and whose programs return at once unless their row overflowed: one program streams the
   whole table for its row, keeping the best ``K_SEL >= k + M`` keys with an in-register bitonic
   top-k (slow, exact, no host sync). Then, on the device: excluded ids are removed from the
   candidates (a batched ``searchsorted``), ``torch.topk`` over the keys picks the answer, and values
   are decoded from the key bits.

When the table has fewer than ``k + M`` groups, or ``k + M > MAX_SELECT`` (no fallback that wide),
step 1 is skipped and every item is a candidate (capacity N; fewer rows per pass bound the keys to
1 GiB). NaN scores are -inf in the group maxima and collected only where the threshold is -inf;
their keys sit just below -inf's. Inf/NaN inputs make the margin infinite: everything is collected
and the exact fallback answers. Offsets are int64, so N * d may exceed 2**31 (N = 10**7).

Under Triton's interpreter (TRITON_INTERPRET=1) the dot operands are upcast to float32 after the
rounding the GPU would do, because the interpreter computes low-precision dots wrongly.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from rearec_kernels.backend import interpreting, scratch_poisoned

MAX_ROWS = 256  # queries per pass: the group maxima take MAX_ROWS * N / G * 4 bytes
MAX_SELECT = 4096  # the fallback keeps up to this many keys in registers; past it, no filtering
SENTINEL = -(2 ** 63)  # below every real key; decodes to index -1, value -inf
LOW32 = (1 << 32) - 1

_ADVERSARY = contextvars.ContextVar("rearec_topk_adversarial_pass1", default=0.0)


@contextlib.contextmanager
def adversarial_pass1(fraction: float):
    """Tests: inside the block, every pass-1 score is pushed ``fraction`` (in (-1, 1)) of the proven
    margin away from the exact one (one sign per 64 items): the worst case the certificate must survive."""
    token = _ADVERSARY.set(float(fraction))
    try:
        yield
    finally:
        _ADVERSARY.reset(token)


# The last call's rows that overflowed their candidate list and took the fallback (a device tensor,
# read by bench/gpu_check.py; reading it syncs, the op never does).
diagnostics = {"fallback_rows": None}


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
def _score_keys(s, cols):
    """int64 keys ordering by (score desc, index asc): order-preserving score bits << 32 | ~index.
    A NaN score gets the high word one below -inf's, which decodes as a NaN: below every number."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(s != s, -2139095042, ordered)  # -inf orders as -2139095041
    return (ordered.to(tl.int64) << 32) | (4294967295 - cols.to(tl.int64))


@triton.jit
def _group_max_kernel(
    Q, E, Gmax, Margin, B, N, D, stride_q, stride_e, scale, n_groups, n_qtiles, adversary,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ADVERSARIAL: tl.constexpr,
):
    # 1-D grid, query tiles fastest: the tiles sharing an item tile run together and share it in L2.
    pid = tl.program_id(0)
    pid_b = pid % n_qtiles
    pid_n = pid // n_qtiles
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s = _tile_scores(Q, E, rows, cols, B, N, D, stride_q, stride_e, scale,
                     BLOCK_B, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
    if ADVERSARIAL:  # tests only: g = f +- adversary * m_b, one sign per 64 items (whole chunks)
        m = tl.load(Margin + rows, mask=rows < B, other=0.0)
        sign = ((cols[None, :] // 64) % 2).to(tl.float32) * 2.0 - 1.0
        s = s + adversary * m[:, None] * sign
    s = tl.where((cols < N)[None, :] & (s == s), s, float("-inf"))  # NaN ranks below -inf
    gmax = tl.max(tl.reshape(s, (BLOCK_B, BLOCK_N // G, G)), axis=2)
    groups = pid_n * (BLOCK_N // G) + tl.arange(0, BLOCK_N // G)
    ptrs = Gmax + rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
    tl.store(ptrs, gmax, mask=(rows < B)[:, None])


@triton.jit
def _collect_kernel(
    Q, E, Lo, Work, WorkCount, Cand, Count, B, N, D, stride_q, stride_e, scale, capacity, n_qtiles,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Persistent: the work list's length lives on the device, so the grid is fixed.
    total = tl.load(WorkCount)
    for w in range(tl.program_id(0), total, tl.num_programs(0)):
        item = tl.load(Work + w)
        chunk = item // n_qtiles
        qtile = item % n_qtiles
        rows = qtile * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        row_ok = rows < B
        s = _tile_scores(Q, E, rows, cols, B, N, D, stride_q, stride_e, scale,
                         BLOCK_B, CHUNK, BLOCK_D, UPCAST, DOT_PRECISION)
        lo = tl.load(Lo + rows, mask=row_ok, other=float("inf"))
        # NaN scores rank last: they can belong to the answer only when the threshold is -inf.
        hit = (s >= lo[:, None]) | ((s != s) & (lo == float("-inf"))[:, None])
        hit = hit & (cols < N)[None, :] & row_ok[:, None]
        hit_i = hit.to(tl.int32)
        n_row = tl.sum(hit_i, axis=1)
        base = tl.atomic_add(Count + rows, n_row, mask=row_ok & (n_row > 0))
        pos = base[:, None] + tl.cumsum(hit_i, axis=1) - 1
        ptrs = Cand + rows.to(tl.int64)[:, None] * capacity + pos
        tl.store(ptrs, _score_keys(s, cols[None, :]), mask=hit & (pos < capacity))


@triton.jit
def _fallback_kernel(
    Q, E, Cand, Count, N, D, stride_q, stride_e, scale, capacity,
    K_SEL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row b's best K_SEL keys over the whole table, for rows whose candidate list overflowed."""
    b = tl.program_id(0).to(tl.int64)
    if tl.load(Count + b) > capacity:
        best = tl.full((K_SEL,), -9223372036854775808, tl.int64)
        for n0 in range(0, N, K_SEL):
            cols = n0 + tl.arange(0, K_SEL)
            col_ok = cols < N
            acc = tl.zeros((K_SEL,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                q = tl.load(Q + b * stride_q + offs_d, mask=d_ok, other=0.0).to(tl.float32)
                e = tl.load(E + cols.to(tl.int64)[:, None] * stride_e + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(e * q[None, :], axis=1)
            s = acc * scale
            s = tl.where(s == 0.0, 0.0, s)
            keys = tl.where(col_ok, _score_keys(s, cols), -9223372036854775808)
            best = tl.topk(tl.reshape(tl.join(best, keys), (2 * K_SEL,)), K_SEL)
        tl.store(Cand + b * capacity + tl.arange(0, K_SEL), best)
        tl.store(Count + b, K_SEL)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def config(B: int, d: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the kernels for B query rows of width d over a ``dtype`` table.

    Pass 1 always runs on tensor cores (TF32 for float32 tables); pass 2 computes exact scores, on
    FMA units for float32 tables, so it takes fewer query rows there (a chunk is fetched for every
    row of its tile: small tiles skip more of the table). One small config when interpreting.
    """
    if interpreting():
        return dict(BLOCK_B=16, BLOCK_N=32, BLOCK_D=16, G_MIN=8, G_MAX=32, CHUNK_MIN=16,
                    BLOCK_B2=16, BLOCK_D2=16, w1=1, s1=1, w2=1, s2=1, w3=1, programs_per_sm=1)
    fp32 = dtype == torch.float32
    block_b = min(128, max(16, _next_pow2(B)))
    return dict(
        BLOCK_B=block_b,
        BLOCK_N=128,
        BLOCK_D=min(32 if fp32 else 64, max(16, _next_pow2(d))),
        G_MIN=8, G_MAX=32, CHUNK_MIN=32,
        BLOCK_B2=16 if fp32 else min(32, max(16, _next_pow2(B))),
        BLOCK_D2=min(32, max(16, _next_pow2(d))),
        w1=8 if block_b >= 64 else 4, s1=3,
        w2=4, s2=2,
        w3=8,
        programs_per_sm=8,
    )


def selection_size(k: int, n_exclude: int) -> int:
    """K_SEL: the keys the fallback keeps per row, a power of two >= k + exclusion slots, >= 128 so
    that few variants of its (slow to compile) in-register top-k exist."""
    return max(128, _next_pow2(k + n_exclude))


_FMA_ERROR = 2.0 ** -21  # per summand: 4x float32's unit round-off, room for truncating adders
_TF32_ERROR = 2.0 ** -8  # per product: TF32 keeps 10 mantissa bits of each operand (2x room)


def _nan_as_minus_inf(bound: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(bound), torch.full_like(bound, float("-inf")), bound)


def score_margin(q: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
    """(B,) float32 ``m_b`` with ``|g(b, n) - f(b, n)| <= m_b`` for every item n.

    Both scores sum the same d products (exact in float32 for 16-bit operands) in some order with
    float32 additions, each off by at most one unit round-off of the partial sum (truncating adders
    included), so each is within ``d * u * sum_i |q_i e_i|`` of the real dot product (u = 2**-23;
    :data:`_FMA_ERROR` takes 4u and d + 16 terms). A float32 table's TF32 pass 1 also rounds each
    operand to 10 mantissa bits: each product is off by at most ``2 * 2**-10 + 2**-20`` relative
    (:data:`_TF32_ERROR` doubles it). ``sum_i |q_i e_i| <= ||q_b|| * max_n ||e_n||``
    (Cauchy-Schwarz); the final multiply by ``scale`` adds one more rounding, and an absolute term
    covers flushed subnormals. Table rows holding a NaN score NaN in both passes and are left out
    of the maximum.
    """
    d = q.shape[1]
    per_sum = (d + 16) * _FMA_ERROR
    c = 2 * per_sum + (_TF32_ERROR if table.dtype == torch.float32 else 0.0)
    q_norm = torch.linalg.vector_norm(q, dim=1, dtype=torch.float32)
    margin = (q_norm * _table_norm_max(table)) * (c * abs(scale)) + (d + 2) * 2.0 ** -120 * max(abs(scale), 1.0)
    # An infinite or NaN bound (inf/NaN inputs): collect everything, i.e. the exact fallback.
    return torch.nan_to_num(margin, nan=float("inf"))


_norm_cache: dict = {}


def _table_norm_max(table: torch.Tensor) -> torch.Tensor:
    """max_n ||table[n]||, a 0-d float32 device tensor, computed once per table version.

    Keyed by the tensor object, its version counter (bumped by in-place writes), storage and shape.
    A CUDA graph captured while the value is cached keeps using it: capture after the table is final.
    A value computed during a capture is not cached: it exists only once the graph is replayed.
    Nor is an inference tensor's (made under ``torch.inference_mode``): it has no version counter, so
    an in-place write could not be seen; its maximum is computed on every call.
    """
    key = id(table)
    sig = None if table.is_inference() else (table._version, table.data_ptr(), tuple(table.shape),
                                             tuple(table.stride()), table.dtype)
    hit = _norm_cache.get(key)
    if sig is not None and hit is not None and hit[0]() is table and hit[1] == sig:
        return hit[2]
    norms = torch.linalg.vector_norm(table, dim=1, dtype=torch.float32)
    value = torch.where(norms.isnan(), torch.zeros_like(norms), norms).amax()
    if sig is None or (table.is_cuda and torch.cuda.is_current_stream_capturing()):
        return value
    _norm_cache[key] = (weakref.ref(table, lambda _, key=key: _norm_cache.pop(key, None)), sig, value)
    return value


def _empty(shape, dtype, device, poison):
    t = torch.empty(shape, dtype=dtype, device=device)
    if scratch_poisoned():
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


def fused_topk(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    scale: float = 1.0,
    exclude: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The contract of :func:`rearec_kernels.topk.fused_topk`; inputs already checked and contiguous."""
    q = queries.to(item_table.dtype).contiguous()
    if exclude is not None and exclude.shape[1] == 0:
        exclude = None
    M = exclude.shape[1] if exclude is not None else 0
    rows = MAX_ROWS  # bounds the (rows, N / G) group maxima
    if selection_size(k, M) > MAX_SELECT:  # no fallback that large: every item is a candidate,
        rows = max(1, min(MAX_ROWS, (1 << 27) // max(1, item_table.shape[0])))  # <= 1 GiB of keys
    parts = []
    for b0 in range(0, q.shape[0], rows):
        ex = exclude[b0:b0 + rows] if exclude is not None else None
        parts.append(_select_keys(q[b0:b0 + rows], item_table, int(k), float(scale), ex))
    return decode(parts[0] if len(parts) == 1 else torch.cat(parts))


def _select_keys(q, table, k, scale, exclude):
    """(B, k) int64 keys of the answer, best first. Only device work: no value is read back."""
    B, d = q.shape
    N = table.shape[0]
    device = q.device
    cfg = config(B, d, table.dtype)
    upcast = interpreting()
    M = exclude.shape[1] if exclude is not None else 0
    k_sel = k + M  # the best k + M keys hold the best k allowed ones

    # Group size: the largest power of two in [G_MIN, G_MAX] leaving >= 4 (k + M) groups.
    G = cfg["G_MAX"]
    while G > cfg["G_MIN"] and -(-N // G) < 4 * k_sel:
        G //= 2
    chunk = max(G, cfg["CHUNK_MIN"])
    BN = max(cfg["BLOCK_N"], chunk)
    n_tiles = -(-N // BN)
    n_groups = n_tiles * (BN // G)
    n_chunks = n_tiles * (BN // chunk)
    # Enough groups holding items for any row's k_eff, and a fallback that fits in registers.
    filtered = -(-N // G) >= k_sel and selection_size(k, M) <= MAX_SELECT

    B2 = cfg["BLOCK_B2"]
    qt2 = -(-B // B2)
    if filtered:
        margin = score_margin(q, table, scale)
        k_eff = torch.full((B,), k, dtype=torch.int64, device=device)
        if exclude is not None:
            k_eff += ((exclude >= 0) & (exclude < N)).sum(dim=1)
        qt1 = -(-B // cfg["BLOCK_B"])
        gmax = _empty((B, n_groups), torch.float32, device, float("nan"))
        adversary = _ADVERSARY.get()
        _group_max_kernel[(qt1 * n_tiles,)](
            q, table, gmax, margin, B, N, d, q.stride(0), table.stride(0), scale, n_groups, qt1,
            adversary,
            BLOCK_B=cfg["BLOCK_B"], BLOCK_N=BN, BLOCK_D=cfg["BLOCK_D"], G=G, UPCAST=upcast,
            DOT_PRECISION="tf32", ADVERSARIAL=adversary != 0.0,
            num_warps=cfg["w1"], num_stages=cfg["s1"])
        top = torch.topk(gmax, k_sel, dim=1).values
        threshold = top.gather(1, (k_eff - 1)[:, None]).squeeze(1)  # L_b
        # f >= L_b - m_b holds every answer item (module docstring). A k-th best score of +inf with an
        # infinite margin gives inf - inf = NaN, which no score passes: read it as -inf (collect all).
        collect_lo = _nan_as_minus_inf(threshold - margin)
        chunk_max = gmax.view(B, n_chunks, chunk // G).amax(dim=2)
        active = torch.zeros(qt2 * B2, n_chunks, dtype=torch.bool, device=device)
        active[:B] = chunk_max >= _nan_as_minus_inf(threshold - 2 * margin)[:, None]
        capacity = min(N, max(2 * k_sel + 4 * chunk, selection_size(k, M)))
    else:
        collect_lo = torch.full((B,), float("-inf"), dtype=torch.float32, device=device)
        active = torch.zeros(qt2 * B2, n_chunks, dtype=torch.bool, device=device)
        active[:B, : -(-N // chunk)] = True
        capacity = N  # every item is a candidate: no list can overflow

    # Compact the active (chunk, query tile) pairs on the device, chunk-major: the query tiles that
    # share a chunk run together and share it in L2.
    flags = active.view(qt2, B2, n_chunks).any(dim=1).t().reshape(-1)
    n_pairs = flags.numel()
    ends = torch.cumsum(flags, dim=0)
    work_count = ends[-1:].to(torch.int32)
    work = torch.empty(n_pairs + 1, dtype=torch.int32, device=device)
    dest = torch.where(flags, ends - 1, torch.full_like(ends, n_pairs))
    work.scatter_(0, dest, torch.arange(n_pairs, dtype=torch.int32, device=device))

    cand = _empty((B, capacity), torch.int64, device, 0x5A5A5A5A5A5A5A5A)
    count = torch.zeros(B, dtype=torch.int32, device=device)
    _collect_kernel[(_persistent_programs(device, n_pairs, cfg["programs_per_sm"]),)](
        q, table, collect_lo, work, work_count, cand, count, B, N, d, q.stride(0), table.stride(0), scale,
        capacity, qt2,
        BLOCK_B=B2, CHUNK=chunk, BLOCK_D=cfg["BLOCK_D2"], UPCAST=upcast,
        DOT_PRECISION="ieee" if table.dtype == torch.float32 else "tf32",
        num_warps=cfg["w2"], num_stages=cfg["s2"])
    if capacity < N:
        diagnostics["fallback_rows"] = (count > capacity).sum()
        k_sel_pow2 = selection_size(k, M)
        _fallback_kernel[(B,)](
            q, table, cand, count, N, d, q.stride(0), table.stride(0), scale, capacity,
            K_SEL=k_sel_pow2, BLOCK_D=max(1, min(16, 8192 // k_sel_pow2)), num_warps=cfg["w3"])
    else:
        diagnostics["fallback_rows"] = None

    slot_used = torch.arange(capacity, device=device)[None, :] < count[:, None]
    keys = torch.where(slot_used, cand, torch.full_like(cand, SENTINEL))
    if exclude is not None:
        keys = _drop_excluded(keys, exclude)
    if capacity < k:
        keys = torch.cat([keys, keys.new_full((B, k - capacity), SENTINEL)], dim=1)
    return torch.topk(keys, k, dim=1).values


_sm_counts: dict = {}


def _persistent_programs(device: torch.device, n_pairs: int, per_sm: int) -> int:
    """Grid of the persistent collection kernel: enough programs to fill the GPU, no more than pairs."""
    if device.type != "cuda":
        return max(1, min(n_pairs, 3))  # interpreter: a few programs, each striding through the list
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(n_pairs, per_sm * _sm_counts[index]))


def _drop_excluded(keys: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    ex_sorted = torch.sort(exclude.to(torch.int64), dim=1).values
    idx = LOW32 - (keys & LOW32)
    pos = torch.searchsorted(ex_sorted, idx).clamp(max=ex_sorted.shape[1] - 1)
    hit = (ex_sorted.gather(1, pos) == idx) & (keys != SENTINEL)
    return torch.where(hit, torch.full_like(keys, SENTINEL), keys)
