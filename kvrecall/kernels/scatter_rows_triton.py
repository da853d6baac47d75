"""scatter_rows' kernel (see scatter_rows.py): one program per ROWS rows, each row's K and V
moved as integers of the rows' width, BLOCK_W at a time (16-byte accesses where the rows are
8-byte words: a row of 128 bf16 is 32 words). Imported only when Triton is (see `_triton`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE_BYTES = 16384  # bytes of K (and as many of V) a program moves


@triton.jit
def _scatter_kernel(rows, targets, keys, values, first, count, half, W, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    keep = k < count
    where = tl.load(targets + first + k, mask=keep, other=0)
    w = tl.arange(0, BLOCK_W)
    for start in range(0, W, BLOCK_W):
        col = start + w
        mask = keep[:, None] & (col < W)[None, :]
        src = (first + k)[:, None] * W + col[None, :]
        dst = where[:, None] * W + col[None, :]
        tl.store(keys + dst, tl.load(rows + src, mask=mask), mask=mask)
        tl.store(values + dst, tl.load(rows + half * W + src, mask=mask), mask=mask)


def scatter_rows_triton(
    rows: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, count: int,
    half: int,
) -> None:  # fmt: skip
    W, size = rows.shape[1], rows.element_size()
    if size < 8 and (W * size) % 8 == 0:  # whole 8-byte words: the same bits, wider accesses
        W, bits = W * size // 8, torch.int64
    else:
        bits = _BITS[size]
    rows, keys, values = (t.view(bits).view(-1) for t in (rows, keys, values))
    block_w = min(triton.next_power_of_2(W), max(1, _TILE_BYTES // rows.element_size()))
    rows_per = max(1, _TILE_BYTES // rows.element_size() // block_w)
    _scatter_kernel[(triton.cdiv(count, rows_per),)](
        rows, targets, keys, values, first, count, half, W, ROWS=rows_per, BLOCK_W=block_w, num_warps=4,
    )  # fmt: skip
