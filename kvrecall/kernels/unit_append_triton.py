"""append_units on the GPU: one program per (table, row) writes the row's new unit and its
candidates; each table's tensors are addressed at element offsets from the first table's
(one address space), so any number of tables is one launch. Imported only when Triton is."""

import torch
import triton
import triton.language as tl

from kvrecall.kernels._triton import next_power_of_2

_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Per table: element offsets of reps, sizes, valid, position from the first table's, then its
# unit column, token column, first position and length.
TABLE_FIELDS = tl.constexpr(8)
# Candidates written per loop step: one compiled variant whatever a segment's length (a length
# picking the block would compile a new kernel inside a boundary the warm-up did not meet).
_BLOCK_M = 256


@triton.jit(do_not_specialize=["rows", "U", "M"])
def _append_kernel(
    reps_ptr, sizes_ptr, valid_ptr, position_ptr, src_ptr, tables_ptr,
    rows, U, M, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    table = tables_ptr + s * TABLE_FIELDS
    column, first, start, length = tl.load(table + 4), tl.load(table + 5), tl.load(table + 6), tl.load(table + 7)
    cols = tl.arange(0, BLOCK_D)
    rep = tl.load(src_ptr + (s * rows + b) * D + cols, mask=cols < D)
    tl.store(reps_ptr + tl.load(table) + (b * U + column) * D + cols, rep, mask=cols < D)
    tl.store(sizes_ptr + tl.load(table + 1) + b * U + column, length.to(tl.int32))
    tl.store(valid_ptr + tl.load(table + 2) + b * U + column, (length > 0).to(tl.int8))
    candidates = b * M + first
    for j0 in range(0, length, BLOCK_M):
        j = j0 + tl.arange(0, BLOCK_M)
        ok = j < length
        tl.store(position_ptr + tl.load(table + 3) + candidates + j, (start + j).to(tl.int32), mask=ok)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_OF_SIZE[t.element_size()])


def append_units_triton(tables, reps, unit_column, token_column, starts, lengths) -> bool:
    """Launch on checked arguments (see `kvrecall.kernels.append_units`); False (nothing
    written) where the tables are not at whole-element distances or the dtype has no
    same-width integer."""
    if reps.element_size() not in _BITS_OF_SIZE:
        return False
    firsts = [_bits(tables[0][0]), tables[0][1], tables[0][2].view(torch.int8), *tables[0][3:]]
    rows_meta = []
    for i, table in enumerate(tables):
        offsets = []
        for tensor, first in zip([_bits(table[0]), table[1], table[2].view(torch.int8), *table[3:]], firsts, strict=True):
            gap = tensor.data_ptr() - first.data_ptr()
            if gap % tensor.element_size():
                return False
            offsets.append(gap // tensor.element_size())
        rows_meta.append([*offsets, unit_column[i], token_column[i], starts[i], lengths[i]])
    meta = torch.tensor(rows_meta, dtype=torch.int64)
    if reps.is_cuda:  # through pinned memory: no wait for the stream
        meta = meta.pin_memory().to(reps.device, non_blocking=True)
    rows, units, dim = tables[0][0].shape
    _append_kernel[(len(tables), rows)](
        *firsts, _bits(reps.contiguous()), meta, rows, units, tables[0][3].shape[1],
        D=dim, BLOCK_D=next_power_of_2(dim), BLOCK_M=_BLOCK_M, num_warps=4,
    )  # fmt: skip
    return True
