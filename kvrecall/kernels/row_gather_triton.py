"""Row gather on the GPU: host tier -> working set (every retrieving policy: LouisKV, Quest, WindowKV).

gather_rows_triton: src [S], src_start [N] int, dst [S'], dst_start [N] int, row_len:
dst[dst_start[i] : dst_start[i] + row_len] = src[src_start[i] : src_start[i] + row_len].

The kernels only do plain pointer loads and stores, so with unified virtual addressing a
pinned (page-locked or cudaHostRegister'ed) host `src` is read straight over PCIe by the
GPU: no staging copy. Elements move as same-width integers, so any 1/2/4/8-byte dtype is
copied bit for bit. Two engines, chosen by a `GatherVariant`:

* "triton" (default; runs under TRITON_INTERPRET=1 too): each program moves ROWS rows of up
  to BLOCK elements per step, 16-byte accesses when every start, row_len and base allows;
  the tile shrinks for small gathers so that every SM gets work (they are latency-bound).
* "cupy" (CUDA only, cupy importable, 16-byte-aligned rows; else the Triton engine runs):
  a CUDA RawKernel where each thread issues VPT independent 16-byte loads before its first
  store, consecutive threads on consecutive vectors, so one warp covers 512 contiguous bytes
  of the flattened rows (several small rows per warp).

`sort=True` first orders the rows by source address (one device sort, no host sync): what
limits small random rows over GiBs of host memory is address translation (every row is a
different 4 KB page), and address order lets page-walk caches and TLB entries serve runs of
neighbouring rows. Rows that are adjacent in host memory (consecutive positions of one
(layer, head) page) then sit next to each other and a warp reads them as one contiguous run:
merging them into longer rows would issue the same PCIe requests (rows >= 128 B are whole
read requests already), so runs need no separate pass.
Measured on an H200 (Triton 3.6, uniform random rows over a 4 GiB pinned pool, one index set
reused): ~51 GB/s for 2-4 KB rows against ~55 GB/s for a contiguous pinned copy, but 8-16 GB/s
for 128-256 B rows at 64K rows; `python -m kvrecall.bench --parts ceilings,gather` compares
the variants with fresh indices per call.
Imported only when Triton is (see `_triton`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kvrecall.kernels import reference

ENGINES = ("triton", "cupy")
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE_BYTES = 16384  # bytes one Triton program moves per step (at most)
_MIN_TILE_BYTES = 2048  # small gathers: tiles shrink to this so that every SM gets a program
_VECTOR_BYTES = 16
_CUPY_THREADS = 256


@dataclass(frozen=True)
class GatherVariant:
    """How the gather runs: `engine` ("triton" or "cupy") and whether rows are first sorted by
    source address (`sort`). The default is what the H200 bench measured fastest."""

    engine: str = "triton"
    sort: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine: expected one of {ENGINES}, got {self.engine!r}")

    @property
    def name(self) -> str:
        return self.engine + ("+sort" if self.sort else "")

    @classmethod
    def parse(cls, name: str) -> GatherVariant:
        """Parse "triton", "triton+sort", "cupy" or "cupy+sort"."""
        engine, _, suffix = name.partition("+")
        if suffix not in ("", "sort"):
            raise ValueError(f"variant: expected ENGINE or ENGINE+sort, got {name!r}")
        return cls(engine, suffix == "sort")


DEFAULT_VARIANT = GatherVariant()


@triton.jit(do_not_specialize=["n_rows"])
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


_CUPY_SOURCE = r"""
template <int VPT>
__global__ void gather_rows_v16(const int4* __restrict__ src, const long long* __restrict__ src_start,
                                int4* __restrict__ dst, const long long* __restrict__ dst_start,
                                long long n_rows, int row_vecs, int elems_per_vec) {
    // The block's span is VPT * blockDim consecutive 16-byte vectors of the flattened rows;
    // every load is issued before the first store, so VPT PCIe reads per thread are in flight.
    const long long total = n_rows * row_vecs;
    const long long base = (long long)blockIdx.x * blockDim.x * VPT + threadIdx.x;
    int4 value[VPT];
    long long where[VPT];
    #pragma unroll
    for (int u = 0; u < VPT; ++u) {
        const long long v = base + (long long)u * blockDim.x;
        where[u] = -1;
        if (v < total) {
            const long long row = v / row_vecs;
            const long long col = v - row * row_vecs;
            value[u] = __ldcs(src + src_start[row] / elems_per_vec + col);
            where[u] = dst_start[row] / elems_per_vec + col;
        }
    }
    #pragma unroll
    for (int u = 0; u < VPT; ++u) {
        if (where[u] >= 0) dst[where[u]] = value[u];
    }
}
"""
_CUPY_VPT = (2, 8)  # few vectors per thread for small gathers (more SMs busy), many for large


@functools.cache
def _cupy_kernels() -> dict[int, Any] | None:
    """The compiled CUDA kernels by VPT, or None where cupy is not importable."""
    try:
        import cupy
    except ImportError:
        return None
    names = {vpt: f"gather_rows_v16<{vpt}>" for vpt in _CUPY_VPT}
    module = cupy.RawModule(code=_CUPY_SOURCE, options=("-std=c++17",), name_expressions=list(names.values()))
    return {vpt: module.get_function(name) for vpt, name in names.items()}


def cupy_available() -> bool:
    """Whether the cupy engine can run here (cupy importable and a CUDA device)."""
    return torch.cuda.is_available() and _cupy_kernels() is not None


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def sort_rows(src_start: torch.Tensor, dst_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (src_start, dst_start) pairs in ascending source order (a device sort, no host sync)."""
    src_sorted, perm = torch.sort(src_start)
    return src_sorted, dst_start[perm]


def gather_rows_triton(
    src: torch.Tensor,
    src_start: torch.Tensor,
    dst: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
    starts_aligned: bool,
    variant: GatherVariant | None = None,
) -> None:
    """Launch on checked arguments (see `kvrecall.kernels.gather_rows`); never synchronises.

    starts_aligned: every start is a multiple of 16 bytes' worth of elements (the caller
    checked it together with the bounds), which allows 16-byte accesses. variant: engine and
    order (default `DEFAULT_VARIANT`).
    """
    variant = variant or DEFAULT_VARIANT
    num_rows = src_start.numel()
    if num_rows == 0 or row_len == 0:
        return
    device = dst.device if dst.device.type == "cuda" else src.device
    reachable = all(t.device == device or t.is_pinned() for t in (src, dst))
    if not reachable or src.element_size() not in _BITS_OF_SIZE:
        # Pageable host memory is out of the GPU's reach (and odd widths have no kernel): PyTorch stages it.
        reference.gather_rows(src, src_start, dst, dst_start, row_len)
        return
    src_start, dst_start = src_start.to(device), dst_start.to(device)
    if variant.sort:
        src_start, dst_start = sort_rows(src_start, dst_start)
    vector = _VECTOR_BYTES // src.element_size()
    aligned = starts_aligned and row_len % vector == 0
    aligned = aligned and src.data_ptr() % _VECTOR_BYTES == 0 and dst.data_ptr() % _VECTOR_BYTES == 0
    if variant.engine == "cupy" and aligned and device.type == "cuda" and cupy_available():
        _launch_cupy(src, src_start, dst, dst_start, row_len, device)
        return
    _launch_triton(src, src_start, dst, dst_start, row_len, vector if aligned else 1, device)


def _launch_triton(
    src: torch.Tensor,
    src_start: torch.Tensor,
    dst: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
    vector: int,
    device: torch.device,
) -> None:
    num_rows, size = src_start.numel(), src.element_size()
    total_bytes = num_rows * row_len * size
    # Small gathers are latency-bound: spread them over twice as many programs as SMs.
    tile = max(
        _MIN_TILE_BYTES, min(_TILE_BYTES, triton.next_power_of_2(total_bytes // (2 * _sm_count(device))))
    )
    block = min(triton.next_power_of_2(row_len), max(vector, tile // size))
    rows = max(1, tile // size // block)
    bits = _BITS_OF_SIZE[size]
    _gather_kernel[(triton.cdiv(num_rows, rows),)](
        src.view(bits), src_start, dst.view(bits), dst_start,
        num_rows,
        ROW_LEN=row_len, ROWS=rows, BLOCK=block, VEC=vector,
        num_warps=8 if tile >= 8192 else 4,
    )  # fmt: skip


def _launch_cupy(
    src: torch.Tensor,
    src_start: torch.Tensor,
    dst: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
    device: torch.device,
) -> None:
    import cupy

    kernels = _cupy_kernels()
    assert kernels is not None
    elems_per_vec = _VECTOR_BYTES // src.element_size()
    row_vecs = row_len // elems_per_vec
    total = src_start.numel() * row_vecs
    vpt = _CUPY_VPT[-1] if total >= 2 * _sm_count(device) * _CUPY_THREADS * _CUPY_VPT[-1] else _CUPY_VPT[0]
    blocks = -(-total // (_CUPY_THREADS * vpt))
    src_start, dst_start = src_start.to(torch.int64), dst_start.to(torch.int64)
    args = (
        cupy.uint64(src.data_ptr()), cupy.uint64(src_start.data_ptr()),
        cupy.uint64(dst.data_ptr()), cupy.uint64(dst_start.data_ptr()),
        cupy.int64(src_start.numel()), cupy.int32(row_vecs), cupy.int32(elems_per_vec),
    )  # fmt: skip
    with (
        cupy.cuda.Device(device.index or 0),
        cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream),
    ):
        kernels[vpt]((blocks,), (_CUPY_THREADS,), args)
