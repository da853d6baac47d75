"""pinned_copy: the kernel moves every element of every dtype like `copy_` (device to pinned
host and back on a GPU; on CPU tensors through Triton's interpreter), and refuses mismatches."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels.pinned_copy import pinned_copy

DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32]


def values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(*shape, generator=generator) * 1000
    return raw > 0 if dtype == torch.bool else raw.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5, 7), (3, 1025), (4, 2048)])
def test_kernel_copies_like_copy(triton_device, dtype, shape) -> None:
    from kvrecall.kernels.pinned_copy_triton import pinned_copy_triton

    src = values(shape, dtype, seed=sum(shape))
    expected = src.clone()
    if triton_device.type == "cuda":
        on_device = torch.zeros(shape, dtype=dtype, device=triton_device)
        pinned_copy_triton(src.pin_memory(), on_device)  # host to device
        back = torch.zeros(shape, dtype=dtype).pin_memory()
        pinned_copy_triton(on_device, back)  # device to host
        torch.cuda.synchronize(triton_device)
        assert torch.equal(on_device.cpu(), expected) and torch.equal(back, expected)
    else:
        dst = torch.zeros(shape, dtype=dtype)
        pinned_copy_triton(src, dst)
        assert torch.equal(dst, expected)


def test_dispatch_takes_copy_where_no_kernel_can_run() -> None:
    src, dst = torch.arange(6, dtype=torch.int64).view(2, 3), torch.zeros(2, 3, dtype=torch.int64)
    pinned_copy(src, dst)  # CPU tensors: the reference
    assert torch.equal(dst, src)


@pytest.mark.parametrize(
    ("src", "dst", "match"),
    [(torch.zeros(3), torch.zeros(4), "differ"), (torch.zeros(3), torch.zeros(3, dtype=torch.int32), "differ"),
     (torch.zeros(4, 4).t(), torch.zeros(4, 4), "contiguous")],
)  # fmt: skip
def test_refuses_mismatches(src, dst, match) -> None:
    with pytest.raises(ValueError, match=match):
        pinned_copy(src, dst)
