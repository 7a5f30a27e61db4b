"""Fused top-K scoring on CPU: a blocked GEMM with a running per-row top-K, never the (B, N) scores.

Called through :mod:`rearec_kernels.topk` (which validates and makes inputs contiguous); see
:mod:`rearec_kernels.topk_reference` for the contract.

Why this beats ``torch.mm`` + ``torch.topk``: the GEMM runs near the sgemm peak either way; what is
slow is ``topk`` reading every score (several ns per element) and the (B, N) matrix round-tripping
through DRAM. Here the items are streamed in blocks of NB rows; each block's scores land in one
preallocated (NB, QB) buffer (items x queries: MKL runs ``E_blk @ q^T`` faster than ``q @ E_blk^T``)
that stays in cache, and a row's running threshold -- its current k-th best score -- discards
almost all of a block with two cheap vectorised passes:

1. ``amax`` over each query's chunks of W consecutive items gives (NB/W, QB) chunk maxima; a chunk
   can hold a candidate only if its maximum beats the row's threshold;
2. only the few surviving chunks are gathered and filtered element-wise; the survivors are merged
   into the running top-K by a stable sort over (k + a few) columns, for the touched rows only.
   While few candidates arrive, they pile up over up to 8 blocks before a merge (the threshold then
   lags a little, which only lets more candidates through).

On random data a row meets about k * ln(N / k) candidates in all (a thousand out of a million).
A row for which a block holds many candidates (the first blocks, or adversarial item orders) takes
a dense detour: the k-th largest of its chunk maxima, ``v``, is a lower bound of the block's k-th
best score (k distinct items reach it), and only the chunks and scores ``>= v`` go on -- about k
chunks, since the best items rarely share one -- so the merge never sorts a whole block. (With
fewer than k chunks in the block, ``v`` is the block's k-th best itself, from ``topk``.)

Exactness (ties broken by the lower index): blocks are visited in increasing item order, so every
item already held has a lower index than any item of the current block. A new item can enter only
with a score STRICTLY greater than the row's k-th best (equal loses the tie); within a block the
dense detour keeps scores ``>=`` a lower bound of the block's k-th value (equal may still win).
The merge sees the held items first and the candidates in ascending index order, so a stable
descending sort by value yields exactly (value desc, index asc).

NaN and -inf: a chunk maximum is NaN when a score in the chunk is (``amax`` propagates NaN); only
then are the block's NaN scores set to -inf, so a NaN never hides its neighbours. The scan keeps
scores strictly above -inf only, so a row ends the scan short of k items exactly when fewer than k
allowed items have a score above -inf; such rows (rare: k close to N, heavy exclusions, NaN or -inf
scores) get their tail from ``_fill_bottom``, one more pass over the table for those rows alone:
their -inf items, then their NaN items, each in index order.

bfloat16 tables (CPUs with AVX512-BF16 or AMX): the heavy pass runs as a bf16 x bf16 GEMM (oneDNN;
products exact, float32 accumulation, the output rounded to bf16), much faster than the float32
GEMM on such CPUs and half the bytes per item, and is only a filter. Its error against the exact float32 score ``v`` of every (row b,
item n) is bounded from the inputs (``Bf16Filter``): ``|a - v| <= 2^-8 |a| + c_b ||e_n|| + t_b``,
where ``a`` is the approximate score, ``2^-8 |a|`` the bf16 rounding of the output, ``c_b`` collects
the rounding of the query to bf16 (``||q_bf16 - q||``) and both float32 accumulations (``d u ||q||``
each, u = 2^-24: any summation order), and ``t_b`` covers flushed subnormals. Every comparison
with a threshold ``T`` of the exact domain (the running k-th best, a detour's floor) is moved down
to the least ``a`` that ``v >= T`` allows; the survivors -- those that might enter, typically a few
dozen per row and block -- are rescored exactly (float32 dot products of the upcast bf16 rows)
before the merge, which therefore sees exact values only and decides exactly as above. Inputs the
bound cannot cover (non-finite entries, scores that could overflow) take the float32 path. Float16
tables always do: the CPU has no fast float16 GEMM.

A float32 table can be filtered through a bfloat16 COPY of it (``filter_table``, made once by
:func:`rearec_kernels.topk.prepare_table`): the GEMM scans the copy and the survivors are rescored from
the float32 rows, so the answer is the float32 table's (exact top-K, float32 scores) at the bf16
pass's speed. The bound gains the copy's rounding, ``|(bf16(e) - e) . q| <= 2^-8 ||e|| ||q||``, and the
norms bound both rows (``filter_norms``, precomputed with the copy).

For query blocks of up to ``PACKED_MAX_QUERIES`` rows, ``prepare_table`` also keeps the scanned
bf16 rows packed once into oneDNN's GEMM layout (:class:`PackedTable`): ``torch.mm`` repacks a bf16
operand on every call, which for a few queries costs more than the product itself. The packed GEMM
is the same product bit for bit, so nothing else changes; with it the filter pays from one query on
(``FILTER_MIN_QUERIES`` applies to the unpacked copy only).

Threads: every op runs on torch's intra-op threads as set by the caller; nothing here changes a
process-wide setting, so concurrent calls from several threads are safe.

Extra memory: the (NB, QB) score block (16 MB: QB * NB <= 2**22 elements), a 16 MB (NB, d) staging
block when the table is not already in the compute dtype (not on the bf16 path, which keeps an
8 MB bf16 score block and the table's (N,) row norms instead), the (B, k) running results, and
candidate lists bounded by the score block (a table where everything ties can take a few score
blocks more). Queries are processed QB <= 256 rows at a time (balanced), which
reads the table ceil(B / 256) times. A single query is scored as two identical columns: MKL's
one-column GEMM (a GEMV) runs at a third of the bandwidth.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from rearec_kernels import packed as packed_gemm
from rearec_kernels.backend import scratch_poisoned
from rearec_kernels.packed import native_bf16
from rearec_kernels.topk_reference import compute_dtype

# QB * NB: a 16 MB float32 score block. It stays in the 32 MB L3 here, and big blocks mean few
# GEMM calls: each is a parallel region, and on a shared machine every region waits for a
# descheduled worker (2**21 ran 1.6x slower than 2**22 under contention, equal when quiet).
SCORE_BLOCK_ELEMS = 1 << 22
MAX_QUERY_BLOCK = 256
MAX_ITEM_BLOCK = 1 << 18
STAGE_ELEMS = 1 << 22  # NB * d: the 16 MB staging block that converts 16-bit tables to float32
# Temporaries of the bf16 path (row norms, rescoring) are made in pieces of this many elements:
# 2 MB of float32 each, reused from the heap; one large temporary per call costs fresh pages.
PIECE_ELEMS = 1 << 19
CHUNK = 32  # W: consecutive items per chunk maximum
# A float32 table's bf16 copy pays from this many queries on (here: 8 queries 8.1 -> 4.7 ms at N=50k,
# d=256, 2 threads); for one or two, the float32 GEMM of two columns is faster (2.9 vs 4.1 ms). A
# packed copy (PackedTable) pays from one query (1.9 against 2.4 ms).
FILTER_MIN_QUERIES = 4
HEAVY_DIV = 4  # dense detour when a row's live chunks hold more than NB / HEAVY_DIV (and 4k) scores
# Query blocks of up to this many rows run the bf16 filter GEMM on the pre-packed table
# (``PackedTable``), whose scores come out queries x items; the chunk maxima then read them strided,
# which stays cheap up to here (16 queries: 0.29 against 0.16 ms at N=50k; 64: 3.3 against 0.34).
PACKED_MAX_QUERIES = 16


def _is_power_of_two(x: float) -> bool:
    if x == 0.0 or not math.isfinite(x):
        return False
    return math.frexp(abs(x))[0] == 0.5


def plan(B: int, N: int, d: int, staged: bool) -> Tuple[int, int]:
    """(QB, NB): balanced query blocks of at most 256 rows; item blocks of a multiple of CHUNK.

    Few queries get long item blocks (up to 2**18 items for B <= 16): the (NB, QB) score block stays
    small, and fewer blocks mean fewer GEMM calls and parallel regions.
    """
    n_qblocks = max(1, -(-B // MAX_QUERY_BLOCK))
    qb = -(-B // n_qblocks)
    nb = SCORE_BLOCK_ELEMS // max(qb, 1)
    nb = min(MAX_ITEM_BLOCK, max(CHUNK, nb))
    if staged:
        nb = min(nb, max(CHUNK, STAGE_ELEMS // d))
    nb = min(nb, -(-N // CHUNK) * CHUNK)  # no point in a block larger than the table
    nb = max(CHUNK, nb // CHUNK * CHUNK)
    return qb, nb


class PackedTable:
    """A bf16 table's rows packed once for oneDNN's GEMM (:mod:`rearec_kernels.packed`), in blocks
    of ``block`` rows: ``torch.mm`` on a bf16 table repacks it on every call, which for a few
    queries costs more than the product. The products are the same bf16 GEMM bit for bit, so
    ``Bf16Filter``'s bound holds unchanged. Each block's rows are padded with zero rows to a multiple
    of CHUNK; ``scores`` gives their (QB, padded rows) bf16 scores. Memory: the bf16 rows again (the
    plain copy stays, for larger query blocks).
    """

    def __init__(self, block: int, parts: tuple):
        self.block, self.parts = block, parts

    @staticmethod
    def available() -> bool:
        return packed_gemm.available()

    @classmethod
    def of(cls, table: torch.Tensor, block: int = MAX_ITEM_BLOCK) -> Optional["PackedTable"]:
        """``table`` (N, d) bfloat16 packed in blocks of ``block`` rows (a multiple of CHUNK), or None
        where packing is not available here."""
        if table.dtype != torch.bfloat16 or table.device.type != "cpu" or table.shape[0] == 0 \
                or block % CHUNK or not cls.available():
            return None
        parts = []
        for start in range(0, table.shape[0], block):
            rows = table[start:start + block]
            pad = -rows.shape[0] % CHUNK
            if pad:
                rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
            parts.append(packed_gemm.pack(rows.contiguous()))
        return cls(block, tuple(parts))

    def scores(self, start: int, q: torch.Tensor) -> torch.Tensor:
        """(QB, padded rows) bf16 scores of the block starting at item ``start`` for bf16 queries ``q``."""
        return packed_gemm.product(q, self.parts[start // self.block])


class Bf16Filter:
    """The bf16 filter pass of one query block: approximate scores and their proven error bound.

    For row b and item n, with ``a`` the bf16 GEMM's score and ``v`` the exact float32 one (a
    float32 dot product of the float32 query and the upcast row, times ``post_scale``),
    ``|a - v| <= 2^-8 |a| + c_b ||e_n|| + t_b`` (see the module docstring); ``c_b`` and ``t_b``
    are computed in float64 with slack for their own rounding, ``||e_n||`` is inflated likewise.
    """

    U = 2.0 ** -24       # float32 unit roundoff
    U_OUT = 2.0 ** -8    # bf16 unit roundoff: the GEMM's output rounding, relative to the output
    SLACK = 2.0 ** -30   # relative slack over the float64 arithmetic of the bounds themselves

    def __init__(self, q, table, post_scale, item_norms, score_buf, exact_table=None, packed=None):
        """``table``: the bf16 rows the GEMM scans; ``exact_table``: the float32 rows they round
        (None: ``table`` itself is the exact table), which rescoring reads; ``item_norms`` bound the
        norms of both; ``packed``: ``table`` as a ``PackedTable`` whose blocks are the scan's."""
        self.q, self.table, self.post_scale, self.norms = q, table, post_scale, item_norms
        self.exact = table if exact_table is None else exact_table
        self.buf = score_buf
        self.packed = packed
        d = q.shape[1]
        qs = q * post_scale if post_scale is not None else q  # the scaled query, float32
        self.qh = qs.to(torch.bfloat16)
        qs64, qh64 = qs.double(), self.qh.double()
        nq = torch.linalg.vector_norm(qs64, dim=1) * (1 + 2.0 ** -20)  # >= |scale| ||q||
        nh = torch.linalg.vector_norm(qh64, dim=1)
        gamma = 1.01 * d * self.U  # any float32 summation order of d products (d u < 0.01)
        c = (torch.linalg.vector_norm(qh64 - qs64, dim=1) + self.U * nq   # q rounded to bf16
             + gamma * nh                                               # bf16 GEMM accumulation
             + (gamma + 2 * self.U) * nq)                               # the exact rescoring
        if exact_table is not None:
            c = c + self.U_OUT * nq                                      # the table's bf16 copy
        self.c = c * 1.01
        emax = float(item_norms.max()) if item_norms.numel() else 0.0
        # Subnormals: oneDNN flushes inputs, products and sums below 2^-126 to zero.
        self.t = 2.0 ** -120 * (2 * d + 2 + math.sqrt(d) * (nh + emax))
        self.block_norm = 0.0

    @staticmethod
    def item_norms(table):
        """(N,) float32 upper bounds of the rows' Euclidean norms (computed in blocks: no N x d copy);
        for a float32 table, also of its bf16 copy's rows (each entry rounds by at most 2^-8)."""
        d = table.shape[1]
        out = torch.empty(table.shape[0], dtype=torch.float32)
        step = max(1, PIECE_ELEMS // d)
        for s in range(0, table.shape[0], step):
            torch.linalg.vector_norm(table[s:s + step], dim=1, dtype=torch.float32, out=out[s:s + step])
        out.mul_(1 + d * 2.0 ** -22 + 2.0 ** -20)  # the norm's own float32 rounding
        return out if table.dtype == torch.bfloat16 else out.mul_(1 + 2.0 ** -8 + 2.0 ** -20)

    @staticmethod
    def covered(q_all, item_norms, post_scale) -> bool:
        """Whether the bound holds: finite inputs, no score near overflow, d u small."""
        d = q_all.shape[1]
        if d * Bf16Filter.U > 0.005 or not bool(torch.isfinite(q_all).all()):
            return False
        emax = float(item_norms.max())
        nq = float(torch.linalg.vector_norm(q_all.double(), dim=1).max()) * abs(post_scale or 1.0)
        # nq bounded alone too: with an all-zero table (emax 0) a scaled query past float32's range
        # (scale 1e39) passed, became inf, and its bounds NaN: no chunk stayed live, no item came back.
        return math.isfinite(emax) and nq <= 2.0 ** 100 and nq * emax <= 2.0 ** 100

    def block_scores(self, start, nb, poison):
        """(nbp, QB) bf16 approximate scores of items start .. start + nb - 1 (padding rows -inf)."""
        QB = self.q.shape[0]
        nbp = -(-nb // CHUNK) * CHUNK
        if self.packed is not None:  # a fresh (QB, nbp) product, seen as items x queries (strided)
            ST = self.packed.scores(start, self.qh).t()
        else:
            ST = self.buf[: nbp * QB].view(nbp, QB)
            if poison:
                self.buf.fill_(float("nan"))
            torch.mm(self.table[start:start + nb], self.qh.t(), out=ST[:nb])
        if nbp > nb:
            ST[nb:].fill_(float("-inf"))
        self.block_norm = float(self.norms[start:start + nb].max()) * (1 + 2.0 ** -20)
        return ST

    def _error(self, rows):
        """(R,) float64: the bound's c_b ||e_n|| + t_b for every item of the current block."""
        c, t = (self.c, self.t) if rows is None else (self.c[rows], self.t[rows])
        return c * self.block_norm + t

    def exact_at_least(self, a, rows=None):
        """float64 lower bounds of the exact scores of items whose approximate scores are >= ``a``."""
        a = a.double()
        return a - (self.U_OUT + self.SLACK) * a.abs() - self._error(rows)

    def lowest_passing(self, T, rows=None, strict=False):
        """float32 L such that an item of this block with exact score >= ``T`` has ``a >= L``
        (``strict``: ``a > L``, and -inf stays -inf, so -inf scores never pass)."""
        T = T.double()
        y = T - self._error(rows) - self.SLACK * T.abs()
        # a + 2^-8 |a| >= y  <=>  a >= y / (1 + 2^-8) (y >= 0) or y / (1 - 2^-8) (y < 0)
        low = torch.where(y >= 0, y / (1 + self.U_OUT), y / (1 - self.U_OUT))
        L = low.float()
        down = torch.full_like(L, float("-inf"))
        L = torch.where(L.double() > low, torch.nextafter(L, down), L)  # round toward -inf
        return torch.nextafter(L, down) if strict else L

    def rescore(self, rows, items):
        """Exact float32 scores of (row, item) pairs: what the float32 path computes for them."""
        v = torch.empty(rows.numel(), dtype=torch.float32)
        step = max(1, PIECE_ELEMS // self.q.shape[1])
        for s in range(0, rows.numel(), step):
            r, n = rows[s:s + step], items[s:s + step]
            # index_select: several times faster than advanced indexing for whole rows
            rows_e = self.exact.index_select(0, n).float()
            torch.sum(rows_e.mul_(self.q.index_select(0, r)), dim=1, out=v[s:s + step])
        return v * self.post_scale if self.post_scale is not None else v


def fused_topk(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    scale: float = 1.0,
    exclude: Optional[torch.Tensor] = None,
    block_items: Optional[int] = None,
    bf16_scan: Optional[bool] = None,
    filter_table: Optional[torch.Tensor] = None,
    filter_norms: Optional[torch.Tensor] = None,
    filter_packed: Optional[PackedTable] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; ``block_items`` (tests) forces item blocks of that many rows;
    ``bf16_scan`` (tests) forces the bf16 filter pass on or off for bf16 tables (None: on where the
    CPU has native bf16 dot products). ``filter_table`` (a float32 table's bf16 copy) and
    ``filter_norms`` (``Bf16Filter.item_norms`` of the table) come from ``prepare_table``: with them
    a float32 table is filtered through its copy (``bf16_scan=False`` turns that off too).
    ``filter_packed`` (also from ``prepare_table``): the bf16 rows the filter scans (the copy, or a
    bf16 table itself) as a ``PackedTable``, used for query blocks of up to PACKED_MAX_QUERIES rows."""
    if queries.shape[0] == 1 and item_table.shape[0] > 0:
        # MKL runs the one-column GEMM (a GEMV) at a third of the memory bandwidth that it reaches
        # with two columns: score a duplicate row alongside and keep the first.
        ex2 = exclude.expand(2, -1) if exclude is not None else None
        v, i = fused_topk(queries.expand(2, -1), item_table, k, scale=scale, exclude=ex2, block_items=block_items,
                          bf16_scan=bf16_scan, filter_table=filter_table, filter_norms=filter_norms,
                          filter_packed=filter_packed)
        return v[:1].clone(), i[:1].clone()
    dtype = compute_dtype(queries, item_table)
    B, d = queries.shape
    N = item_table.shape[0]
    scale = float(scale)
    scan_table, exact_table = item_table, None  # what the bf16 GEMM scans; the rows it rounds
    if filter_table is not None and item_table.dtype == torch.float32 and bf16_scan is not False \
            and (B >= FILTER_MIN_QUERIES or bf16_scan or filter_packed is not None):
        scan_table, exact_table, bf16_scan = filter_table, item_table, True
    elif bf16_scan is None:
        bf16_scan = native_bf16()
    bf16_scan = bf16_scan and scan_table.dtype == torch.bfloat16 and dtype == torch.float32 and N > 0
    staged = item_table.dtype != dtype and not bf16_scan
    qb, nb_max = plan(B, N, d, staged)
    packed = filter_packed if bf16_scan and qb <= PACKED_MAX_QUERIES and block_items is None else None
    if packed is not None:  # the scan's blocks are the packed ones
        nb_max = packed.block
    if block_items is not None:  # tests: force many (and ragged) blocks on small tables
        nb_max = max(CHUNK, int(block_items) // CHUNK * CHUNK)

    # A power-of-two scale commutes exactly with the dot product, so it is folded into the queries,
    # unless that overflows or pushes a nonzero entry below the smallest normal number (which would
    # round it); any other scale is applied to each score block, like the reference.
    q_all = queries.to(dtype)
    fold = _is_power_of_two(scale) and scale != 1.0
    if fold:
        folded = q_all * scale
        finite = torch.isfinite(q_all)
        overflow = (finite & ~torch.isfinite(folded)).any()
        underflow = (finite & (q_all != 0) & (folded.abs() < torch.finfo(dtype).tiny)).any()
        fold = not bool(overflow | underflow)
        if fold:
            q_all = folded
    q_all = q_all.contiguous()
    post_scale = None if fold or scale == 1.0 else scale

    best_v = torch.full((B, k), float("-inf"), dtype=dtype)
    best_i = torch.full((B, k), -1, dtype=torch.int64)
    if N == 0 or B == 0:
        return best_v, best_i

    item_norms = None
    if bf16_scan:
        item_norms = filter_norms if filter_norms is not None else Bf16Filter.item_norms(item_table)
    if bf16_scan and not Bf16Filter.covered(q_all, item_norms, post_scale):
        # Non-finite entries or scores that could overflow: the bound does not hold; score in float32.
        return fused_topk(queries, item_table, k, scale=scale, exclude=exclude, block_items=block_items,
                          bf16_scan=False)
    # (A packed filter writes fresh products instead.)
    score_buf = torch.empty(0 if packed is not None else qb * nb_max, dtype=torch.bfloat16 if bf16_scan else dtype)
    stage = torch.empty(nb_max, d, dtype=dtype) if staged else None  # dtype conversion
    block_starts = list(range(0, N, nb_max))

    poison = scratch_poisoned()
    for q0 in range(0, B, qb):
        q1 = min(B, q0 + qb)
        q = q_all[q0:q1]
        bv, bi = best_v[q0:q1], best_i[q0:q1]  # views: merged in place
        ex_rows, ex_cols, ex_bounds = _exclusions(exclude, q0, q1, N, block_starts + [N])
        if bf16_scan:
            # Every score is finite here (``covered``), so a short row holds all its allowed items:
            # no -inf or NaN items for ``_fill_bottom`` to add.
            scorer = Bf16Filter(q, scan_table, post_scale, item_norms, score_buf, exact_table, packed)
            _scan(q, item_table, k, post_scale, bv, bi, score_buf, stage, nb_max, block_starts,
                  ex_rows, ex_cols, ex_bounds, poison, scorer)
            continue
        _scan(q, item_table, k, post_scale, bv, bi, score_buf, stage, nb_max, block_starts,
              ex_rows, ex_cols, ex_bounds, poison)
        short = (bi[:, k - 1] < 0).nonzero().squeeze(1)
        if short.numel() > 0:
            ex = exclude[q0:q1][short] if exclude is not None else None
            bv[short], bi[short] = _fill_bottom(q[short], item_table, post_scale, bv[short], bi[short], ex,
                                                score_buf, stage, nb_max, poison)
    return best_v, best_i


def _exclusions(exclude, q0, q1, N, bounds):
    """Excluded (row, item) pairs of query rows [q0, q1), sorted by item, and each block's slice."""
    if exclude is None or exclude.numel() == 0:
        return None, None, None
    ex = exclude[q0:q1]
    ok = (ex >= 0) & (ex < N)
    rows, slots = ok.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None, None, None
    items = ex[rows, slots]
    items, order = torch.sort(items)
    rows = rows[order]
    cut = torch.searchsorted(items, torch.tensor(bounds, dtype=torch.int64)).tolist()
    return rows, items, cut


def _block_scores(q, table, start, nb, post_scale, score_buf, stage, poison):
    """(nbp, QB) scores of items start .. start + nb - 1 (rows) for the queries ``q`` (columns), in
    ``score_buf``; nbp rounds nb up to a multiple of CHUNK, the padding rows hold -inf.

    ``poison`` (tests): the buffers are refilled with NaN first, so a score the GEMM failed to write
    would be dropped (NaN counts as no score) and show up as a wrong result.
    """
    QB = q.shape[0]
    nbp = -(-nb // CHUNK) * CHUNK
    ST = score_buf[: nbp * QB].view(nbp, QB)
    if poison:  # every block, so stale scores of the previous block cannot pass either
        score_buf.fill_(float("nan"))
        if stage is not None:
            stage.fill_(float("nan"))
    # ST[:nb] is contiguous: a ragged last block needs no copy. The GEMM is E_blk @ q^T, items x
    # queries: MKL runs it faster than q @ E_blk^T.
    if stage is None:
        torch.mm(table[start:start + nb], q.t(), out=ST[:nb])
    else:
        E = stage[:nb]
        E.copy_(table[start:start + nb])
        torch.mm(E, q.t(), out=ST[:nb])
    if post_scale is not None:
        ST.mul_(post_scale)
    if nbp > nb:
        ST[nb:].fill_(float("-inf"))  # after the scale: 0 * -inf would be NaN
    return ST


def _chunk_max(chunks: torch.Tensor) -> torch.Tensor:
    """(nch, W, QB) -> (nch, QB): the maximum over each chunk's W items (NaN propagates, as in amax).

    ``torch.amax`` over the middle dimension is slow when few queries make the rows narrow (at
    QB = 16 and W = 32, 3-5x slower than here); halving the chunk with ``torch.maximum`` until one
    item is left is faster up to 16 float32 (32 bfloat16) columns, amax beyond.
    """
    nch, W, QB = chunks.shape
    if QB > (32 if chunks.dtype == torch.bfloat16 else 16) or W & (W - 1):
        return torch.amax(chunks, dim=1)
    while W > 1:
        W //= 2
        chunks = torch.maximum(chunks[:, :W], chunks[:, W:2 * W])
    return chunks[:, 0]


def _scan(q, table, k, post_scale, best_v, best_i, score_buf, stage, nb_max, block_starts,
          ex_rows, ex_cols, ex_bounds, poison, approx=None):
    """The running top-k of rows ``q`` over all blocks, merged into ``best_v``, ``best_i`` in place.
    ``approx`` (a ``Bf16Filter``): the blocks' scores are its bf16 approximations, every threshold
    is lowered by its error bound and the survivors are rescored exactly before the merge."""
    QB = q.shape[0]
    N = table.shape[0]
    W = CHUNK
    neg_inf = float("-inf")
    thr = best_v[:, k - 1].clone()  # running k-th best: -inf until k items are held
    pending, n_pending = [], 0
    merge_at = max(QB * k // 4, 1024)
    for blk, start in enumerate(block_starts):
        nb = min(nb_max, N - start)
        if approx is None:
            ST = _block_scores(q, table, start, nb, post_scale, score_buf, stage, poison)
            lim = thr
        else:
            ST = approx.block_scores(start, nb, poison)
            lim = approx.lowest_passing(thr, strict=True)
        nbp = ST.shape[0]
        nch = nbp // W
        if ex_rows is not None:
            lo, hi = ex_bounds[blk], ex_bounds[blk + 1]
            if hi > lo:
                ST[ex_cols[lo:hi] - start, ex_rows[lo:hi]] = neg_inf

        chunks = ST.view(nch, W, QB)
        cmax = _chunk_max(chunks)  # (nch, QB): max of each query's W consecutive items
        if bool(cmax.isnan().any()):  # NaN scores: the lowest of all, so -inf here (see the top)
            ST.masked_fill_(ST.isnan(), neg_inf)
            cmax = _chunk_max(chunks)
        live = cmax > lim
        # Dense detour for rows with many live chunks: keep only scores >= the block's k-th value.
        heavy = live.sum(dim=0) * W > max(4 * k, nbp // HEAVY_DIV)
        floor = None
        if bool(heavy.any()):
            hr = heavy.nonzero().squeeze(1)
            every = hr.numel() == QB  # e.g. the first block
            kk = min(k, nb)
            if nch >= kk:
                # The kk-th largest chunk maximum: kk distinct items score >= it, so it is a lower
                # bound of the block's kk-th best, and a tight one (top items rarely share a chunk).
                kth = torch.topk(cmax if every else cmax[:, hr], kk, dim=0, sorted=False).values
            else:  # too few chunks: the block's own kk-th best
                kth = torch.topk(ST if every else ST[:, hr], kk, dim=0, sorted=False).values
            kth = kth.amin(dim=0)
            if approx is not None:  # the block's kk-th exact score is >= a bound; the least a it allows
                kth = approx.lowest_passing(approx.exact_at_least(kth, hr), hr)
            if every:
                floor = kth
                live &= cmax >= floor
            else:
                floor = torch.full((QB,), neg_inf, dtype=kth.dtype)
                floor[hr] = kth
                live[:, hr] &= cmax[:, hr] >= kth
        pairs = live.t().nonzero()  # (P, 2): (row, chunk), row-major: rows, then items, ascend
        if pairs.numel() == 0:
            continue
        prow, pch = pairs[:, 0], pairs[:, 1]
        vals = chunks[pch, :, prow]  # (P, W)
        keep = vals > lim[prow, None]
        if floor is not None:
            keep &= vals >= floor[prow, None]
        p, j = keep.nonzero(as_tuple=True)
        if p.numel() == 0:
            continue
        rows, items = prow[p], start + pch[p] * W + j
        pending.append((rows, vals[p, j] if approx is None else approx.rescore(rows, items), items))
        n_pending += p.numel()
        # Merging costs a sort; while few candidates arrive, let them pile up over several blocks
        # (the threshold just lags: a lower threshold only lets more candidates through).
        if n_pending >= merge_at or len(pending) >= 8:
            _merge(pending, best_v, best_i, thr, k)
            pending, n_pending = [], 0
    if pending:
        _merge(pending, best_v, best_i, thr, k)


def _fill_bottom(q, table, post_scale, best_v, best_i, exclude, score_buf, stage, nb_max, poison):
    """Complete rows that the scan left short of k items; it holds all their allowed items scoring
    above -inf, in order. Appends their allowed -inf items, then their NaN items, each in index
    order, while room is left. Completes ``best_v``, ``best_i`` (R, k) in place and returns them."""
    R, k = best_i.shape
    N = table.shape[0]
    held = (best_i >= 0).sum(dim=1)
    # Not candidates: excluded items, and items already held (in case a score rounds to -inf here).
    skip_r, skip_c = (best_i >= 0).nonzero(as_tuple=True)
    skip_rows, skip_items = [skip_r], [best_i[skip_r, skip_c]]
    if exclude is not None:
        er, ec = ((exclude >= 0) & (exclude < N)).nonzero(as_tuple=True)
        skip_rows.append(er)
        skip_items.append(exclude[er, ec])
    skip_rows, skip_items = torch.cat(skip_rows), torch.cat(skip_items)

    # Kind 0: -inf scores, kind 1: NaN scores. room[kind]: (R,) how many more of that kind may be used.
    room = [k - held, k - held]
    found = []  # (rows, kind, items, values), each list in index order
    for start in range(0, N, nb_max):
        nb = min(nb_max, N - start)
        S = _block_scores(q, table, start, nb, post_scale, score_buf, stage, poison)[:nb]  # (nb, R)
        candidate = torch.ones_like(S, dtype=torch.bool)
        here = (skip_items >= start) & (skip_items < start + nb)
        candidate[skip_items[here] - start, skip_rows[here]] = False
        for kind, mask in enumerate((torch.isneginf(S), S.isnan())):
            mask &= candidate
            mask &= mask.to(torch.int32).cumsum(0, dtype=torch.int32) <= room[kind][None, :]  # the first ones
            room[kind] -= mask.sum(dim=0)
            item, row = mask.nonzero(as_tuple=True)  # by item, then row
            if item.numel():
                found.append((row, torch.full_like(row, kind), item + start, S[item, row]))
        if not bool((room[0] > 0).any()):  # -inf items fill every row: NaN items are not needed
            break
    if not found:
        return best_v, best_i
    rows, kind, items, vals = (torch.cat(parts) for parts in zip(*found))
    order = torch.sort(rows * 2 + kind, stable=True).indices  # by row, -inf before NaN, then index
    rows, items, vals = rows[order], items[order], vals[order]
    _, counts = torch.unique_consecutive(rows, return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    col = held[rows] + torch.arange(rows.numel()) - first
    fits = col < k
    best_v[rows[fits], col[fits]] = vals[fits]
    best_i[rows[fits], col[fits]] = items[fits]
    return best_v, best_i


def _merge(pending, best_v, best_i, thr, k):
    """Merge candidate lists (each grouped by row, ascending index within a row; lists in block
    order) into the running top-k of the rows they touch, and update those rows' thresholds."""
    if len(pending) == 1:
        rows, cand_v, cand_i = pending[0]
    else:
        rows = torch.cat([p[0] for p in pending])
        order = torch.sort(rows, stable=True).indices  # by row; blocks, then items, stay ascending
        rows = rows[order]
        cand_v = torch.cat([p[1] for p in pending])[order]
        cand_i = torch.cat([p[2] for p in pending])[order]
    rows_u, counts = torch.unique_consecutive(rows, return_counts=True)
    R = rows_u.numel()
    width = k + int(counts.max())
    pad_v = torch.full((R, width), float("-inf"), dtype=best_v.dtype)
    pad_i = torch.full((R, width), -1, dtype=torch.int64)
    pad_v[:, :k] = best_v[rows_u]
    pad_i[:, :k] = best_i[rows_u]
    local = torch.repeat_interleave(torch.arange(R), counts)
    first = torch.cumsum(counts, 0) - counts
    col = k + torch.arange(rows.numel()) - first[local]
    pad_v[local, col] = cand_v
    pad_i[local, col] = cand_i
    top_v, order = torch.sort(pad_v, dim=1, descending=True, stable=True)
    top_v = top_v[:, :k]
    best_v[rows_u] = top_v
    best_i[rows_u] = pad_i.gather(1, order[:, :k])
    thr[rows_u] = top_v[:, k - 1]
