"""pinned_copy's kernel: one program per BLOCK elements, loads from `src` and stores to `dst`
(either may be pinned host memory, reached over PCIe). Elements are moved as unsigned integers
of their width, so every dtype (bool included) takes the same kernel."""

import torch
import triton
import triton.language as tl

BLOCK = 1024
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=keep), mask=keep)


def pinned_copy_triton(src: torch.Tensor, dst: torch.Tensor) -> None:
    bits = _BITS[src.element_size()]
    n = src.numel()
    _copy_kernel[(triton.cdiv(n, BLOCK),)](src.view(-1).view(bits), dst.view(-1).view(bits), n, BLOCK=BLOCK)
