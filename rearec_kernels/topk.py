"""Fused top-K scoring: the k best items of a whole item table per query, never the (B, N) scores.

``fused_topk(queries, item_table, k, *, scale=1.0, exclude=None, backend=None) -> (values, indices)``

* ``queries`` (B, d) and ``item_table`` (N, d): float32, float16, bfloat16 or float64, same device;
* ``values[b, j] = scale * (queries[b] . item_table[indices[b, j]])``, float32 (float64 when an input
  is float64; CPU and reference backends only), best first; of equal scores the LOWER index wins;
* NaN scores rank below every number, -inf included (ties again to the lower index), and come back
  as NaN: a NaN item appears only when fewer than ``k`` items with a real score remain, and a NaN
  query returns the lowest allowed ids with NaN values;
* ``exclude``: None, or a (B, M) integer tensor of item ids in [0, N) never to return for row b (a
  user's history, a padding item); -1 marks an empty slot, any other id is a ValueError;
* when fewer than ``k`` items remain (k > N, or exclusions), the row ends in index -1, value -inf;
* ``backend``: see :mod:`rearec_kernels.backend` (auto: Triton for CUDA tensors, the blocked CPU
  path for CPU tensors); ``REAREC_KERNEL_BACKEND`` sets the default;
* inputs that require grad (a model's output, its embedding weight) are fine: the results never
  carry a gradient, on every backend.

``prepare_table(item_table, bf16_filter=None) -> PreparedTable``: the per-table work of the CPU path
done once, for a table scored many times (a server's). ``fused_topk`` takes the result wherever it takes
an ``item_table``; the answers are the same up to float32 rounding (a survivor is rescored by its own
float32 dot product, not the GEMM: its score may differ in the last bit, and a near-tie may swap). With
``bf16_filter`` (None: where the CPU has native bf16 dot products, AVX512-BF16 or AMX) a float32 table
gets a bfloat16 copy (half the table's bytes again) that the CPU path scans instead, rescoring its
survivors from the float32 rows: the float32 top-K, with the bf16 GEMM's speed (see
:mod:`rearec_kernels.topk_cpu`); a bf16 table gets its row norms. Other backends use ``.table`` alone.
The copies are a snapshot: a table changed in place afterwards is refused by its version counter,
except through writes that bypass it (``.data``, a NumPy view) and for inference tensors, which have
none; prepare such a table again after changing it.

The full contract, with the reference that implements it plainly, is in
:mod:`rearec_kernels.topk_reference`. Accumulation is float32 for 16-bit inputs; the Triton backend
rounds the queries to a 16-bit table's dtype (tensor-core dot), the CPU backend does not.

Range checks on ``exclude`` read its values, so the Triton backend on CUDA skips them (they would
cost a host sync); ids outside [0, N) are then simply ignored.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from rearec_kernels.backend import Backend, implementation, resolve, values_checkable
from rearec_kernels.checks import check_float_tensor, check_real
from rearec_kernels.topk_reference import compute_dtype

# What the Triton backend takes: 16/32-bit floats (tensor cores; no float64 dot), and item ids that
# fit the kernels' int32 column offsets. The fallback kernel's int32 loop over the table steps
# K_SEL <= MAX_SELECT = 4096 items at a time: its counter must reach N rounded up to K_SEL without
# passing 2**31 - 1 (it would wrap negative and read before the table).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_ITEMS = 2 ** 31 - 4096


def _check(op, queries, item_table, k, exclude) -> int:
    for name, t in (("queries", queries), ("item_table", item_table)):
        check_float_tensor(op, name, t, 2, "2-D")
    if queries.shape[1] != item_table.shape[1]:
        raise ValueError(f"{op}: queries are (B, d) = {tuple(queries.shape)} but item_table is (N, d) = "
                         f"{tuple(item_table.shape)}: d differs")
    if queries.shape[1] == 0:
        raise ValueError(f"{op}: d must be at least 1")
    if queries.device != item_table.device:
        raise ValueError(f"{op}: queries on {queries.device} but item_table on {item_table.device}")
    if isinstance(k, bool):
        raise ValueError(f"{op}: k must be a positive integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"{op}: k must be a positive integer, got {k!r}") from None
    if k < 1:
        raise ValueError(f"{op}: k must be >= 1, got {k}")
    if exclude is not None:
        check_exclude_layout(op, exclude, queries)
    return k


def check_exclude_layout(op: str, exclude, queries: torch.Tensor) -> None:
    """``exclude`` is a (B, M) integer tensor on the device of the (B, d) ``queries`` (its values unread)."""
    if not isinstance(exclude, torch.Tensor):
        raise ValueError(f"{op}: exclude must be None or a (B, M) integer tensor, got {type(exclude).__name__}")
    if exclude.dtype.is_floating_point or exclude.dtype.is_complex or exclude.dtype == torch.bool:
        raise ValueError(f"{op}: exclude must hold integer item ids, got {exclude.dtype}")
    if exclude.dim() != 2 or exclude.shape[0] != queries.shape[0]:
        raise ValueError(f"{op}: exclude must be (B, M) = ({queries.shape[0]}, M), got {tuple(exclude.shape)}")
    if exclude.device != queries.device:
        raise ValueError(f"{op}: exclude on {exclude.device} but queries on {queries.device}")


def check_exclude_ids(op: str, exclude: torch.Tensor, n_items: int) -> None:
    """Every value of ``exclude`` is an item id in [0, ``n_items``) or -1 (an empty slot); reads them."""
    exclude = exclude.to(torch.int64)  # compared as they are, unsigned ids would see -1 as their maximum
    bad = (exclude < -1) | (exclude >= n_items)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: exclude[{row}, {col}] = {int(exclude[row, col])} is not an item id in "
                         f"[0, {n_items}); mark an empty slot with -1")


def _check_triton(op, queries, item_table) -> None:
    for name, t in (("queries", queries), ("item_table", item_table)):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"{op}: the Triton backend takes float32/float16/bfloat16 {name}, got {t.dtype}: "
                             "pass backend='reference' (or 'cpu' for CPU tensors) for float64")
    if item_table.shape[0] > TRITON_MAX_ITEMS:
        raise ValueError(f"{op}: the Triton backend takes up to {TRITON_MAX_ITEMS} items, got "
                         f"{item_table.shape[0]}: split the table and merge the results")


@dataclass(frozen=True)
class PreparedTable:
    """An item table with what the CPU top-K precomputes for it (see :func:`prepare_table`)."""

    table: torch.Tensor
    filter_table: Optional[torch.Tensor] = None  # a float32 table's bfloat16 copy, scanned instead
    filter_norms: Optional[torch.Tensor] = None  # (N,) float32 bounds of the rows' norms (both copies)
    filter_packed: Optional[object] = None  # the scanned bf16 rows as a topk_cpu.PackedTable (or None)
    version: Optional[int] = None  # table._version when the copies were made

    def cpu_extras(self) -> dict:
        if self.filter_norms is None:
            return {}
        if self.version is not None and self.table._version != self.version:  # scores of neither table
            raise ValueError("fused_topk: the item table was changed in place after prepare_table, whose bf16 copy "
                             "and norms still hold the old rows; call prepare_table again (FastReaRec: build the "
                             "engine again)")
        return dict(filter_table=self.filter_table, filter_norms=self.filter_norms, filter_packed=self.filter_packed)


def prepare_table(item_table: torch.Tensor, bf16_filter: Optional[bool] = None,
                  pack_block: Optional[int] = None) -> PreparedTable:
    """``item_table`` (N, d) with the CPU path's per-table work done once; see the module docstring.
    ``bf16_filter``: True / False, or None for "where the CPU has native bf16 dot products".
    ``pack_block`` (tests): rows per block of the packed filter table (default: the CPU path's
    largest item block)."""
    check_float_tensor("prepare_table", "item_table", item_table, 2, "2-D")
    if pack_block is not None:  # a block of no rows (or a negative count) gave every query an empty result
        from rearec_kernels.topk_cpu import CHUNK
        if isinstance(pack_block, bool) or not isinstance(pack_block, int) or pack_block < CHUNK or pack_block % CHUNK:
            raise ValueError(f"prepare_table: pack_block must be a positive multiple of {CHUNK}, got {pack_block!r}")
    if bf16_filter is None:
        from rearec_kernels.packed import native_bf16
        bf16_filter = native_bf16()
    if not bf16_filter or item_table.device.type != "cpu" or item_table.shape[0] == 0 \
            or item_table.dtype not in (torch.float32, torch.bfloat16):
        return PreparedTable(item_table)
    from rearec_kernels.topk_cpu import MAX_ITEM_BLOCK, Bf16Filter, PackedTable
    table = (item_table.detach() if item_table.requires_grad else item_table).contiguous()  # the caller's own tensor when it can
    norms = Bf16Filter.item_norms(table)
    copy = table.to(torch.bfloat16) if table.dtype == torch.float32 else None
    packed = PackedTable.of(copy if copy is not None else table, pack_block or MAX_ITEM_BLOCK)
    # An inference tensor (made under torch.inference_mode) has no version counter to watch.
    return PreparedTable(table, copy, norms, packed, None if table.is_inference() else table._version)


def fused_topk(
    queries: torch.Tensor,
    item_table: Union[torch.Tensor, PreparedTable],
    k: int,
    *,
    scale: float = 1.0,
    exclude: Optional[torch.Tensor] = None,
    backend: "Backend | str | None" = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items of ``item_table`` for each query: ``(values, indices)``, both (B, k).
    See the module docstring."""
    op = "fused_topk"
    prepared = item_table if isinstance(item_table, PreparedTable) else PreparedTable(item_table)
    item_table = prepared.table
    k = _check(op, queries, item_table, k, exclude)
    scale = check_real(op, "scale", scale)
    chosen = resolve(op, backend, queries.device)
    if chosen is Backend.TRITON:
        _check_triton(op, queries, item_table)
    B, N = queries.shape[0], item_table.shape[0]
    if exclude is not None and exclude.numel() > 0 and values_checkable(chosen, queries.device):
        check_exclude_ids(op, exclude, N)

    out_dtype = compute_dtype(queries, item_table)
    if B == 0 or N == 0:
        return (torch.full((B, k), float("-inf"), dtype=out_dtype, device=queries.device),
                torch.full((B, k), -1, dtype=torch.int64, device=queries.device))
    queries = queries.detach().contiguous()
    item_table = item_table.detach().contiguous()
    if exclude is not None:
        exclude = exclude.to(torch.int64).contiguous()
    extras = prepared.cpu_extras() if chosen is Backend.CPU else {}
    return implementation("topk", chosen).fused_topk(queries, item_table, k, scale=scale, exclude=exclude, **extras)
