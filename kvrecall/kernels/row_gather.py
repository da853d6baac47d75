"""Row gather on the GPU: host tier -> working set (every retrieving policy: LouisKV, Quest, WindowKV).

gather_rows_triton: src [S], src_start [N] int, dst [S'], dst_start [N] int, row_len:
dst[dst_start[i] : dst_start[i] + row_len] = src[src_start[i] : src_start[i] + row_len].

The kernel only does plain pointer loads and stores, so with unified virtual addressing a
pinned (page-locked or cudaHostRegister'ed) host `src` is read straight over PCIe by the
GPU: no staging copy. It is wide for that: each program moves ROWS rows of up to BLOCK
elements per step, with 16-byte accesses when every start, row_len and base address allows.
Elements move as same-width integers, so any 1/2/4/8-byte dtype is copied bit for bit.
Measured on an H200 (Triton 3.6): the kernel alone reads pinned host memory at ~51 GB/s for
256 B to 16 KB rows, against ~55 GB/s for a contiguous pinned-to-device copy; through
`gather_rows`, whose checks take one host round trip per call, ~47 GB/s for 4 KB rows
moved 128 MB at a time.
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels import reference

_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE_BYTES = 16384  # bytes one program moves per step
_VECTOR_BYTES = 16


@triton.jit
def _gather_kernel(
    src_ptr, src_start_ptr, dst_ptr, dst_start_ptr,
    n_rows,
    ROW_LEN: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    src_row = tl.load(src_start_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    dst_row = tl.load(dst_start_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    src_row = tl.multiple_of(src_row, VEC)  # the launcher checked: lets loads be 16 bytes wide
    dst_row = tl.multiple_of(dst_row, VEC)
    for col0 in range(0, ROW_LEN, BLOCK):
        cols = tl.max_contiguous(tl.multiple_of(col0 + tl.arange(0, BLOCK), BLOCK), BLOCK)
        mask = row_mask[:, None] & (cols < ROW_LEN)[None, :]
        values = tl.load(src_ptr + src_row[:, None] + cols[None, :], mask=mask)
        tl.store(dst_ptr + dst_row[:, None] + cols[None, :], values, mask=mask)


def gather_rows_triton(
    src: torch.Tensor,
    src_start: torch.Tensor,
    dst: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
    starts_aligned: bool,
) -> None:
    """Launch on checked arguments (see `kvrecall.kernels.gather_rows`).

    starts_aligned: every start is a multiple of 16 bytes' worth of elements (the caller
    checked it together with the bounds), which allows 16-byte accesses.
    """
    num_rows = src_start.numel()
    if num_rows == 0 or row_len == 0:
        return
    device = dst.device if dst.device.type == "cuda" else src.device
    reachable = all(t.device == device or t.is_pinned() for t in (src, dst))
    if not reachable or src.element_size() not in _BITS_OF_SIZE:
        # Pageable host memory is out of the GPU's reach (and odd widths have no kernel): PyTorch stages it.
        reference.gather_rows(src, src_start, dst, dst_start, row_len)
        return
    vector = _VECTOR_BYTES // src.element_size()
    aligned = starts_aligned and row_len % vector == 0
    aligned = aligned and src.data_ptr() % _VECTOR_BYTES == 0 and dst.data_ptr() % _VECTOR_BYTES == 0
    block = min(triton.next_power_of_2(row_len), _TILE_BYTES // src.element_size())
    rows = max(1, _TILE_BYTES // src.element_size() // block)
    bits = _BITS_OF_SIZE[src.element_size()]
    _gather_kernel[(triton.cdiv(num_rows, rows),)](
        src.view(bits), src_start.to(device), dst.view(bits), dst_start.to(device),
        num_rows,
        ROW_LEN=row_len, ROWS=rows, BLOCK=block, VEC=vector if aligned else 1,
        num_warps=8,
    )  # fmt: skip
