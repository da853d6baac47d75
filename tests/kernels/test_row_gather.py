"""gather_rows: Triton vs reference, bit-exact copies, bounds, and the pinned-host (UVA) path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


def random_rows(
    seed: int, n_rows: int, row_len: int, src_len: int, align: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source starts anywhere (multiples of `align`), destination rows disjoint and shuffled."""
    generator = torch.Generator().manual_seed(seed)
    src_start = torch.randint(0, (src_len - row_len) // align + 1, (n_rows,), generator=generator) * align
    stride = -(-row_len // align) * align
    dst_start = torch.randperm(n_rows, generator=generator) * stride + align
    return src_start, dst_start


def filled(dtype: torch.dtype, numel: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=generator).to(device=device, dtype=dtype)
    return torch.randint(0, 100, (numel,), generator=generator).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_rows", "row_len", "align"),
    [(1, 1, 1), (5, 33, 1), (7, 64, 16), (40, 24, 8), (3, 1000, 4), (0, 16, 1)],
)
def test_matches_reference(
    triton_device: torch.device, dtype: torch.dtype, n_rows: int, row_len: int, align: int
) -> None:
    src = filled(dtype, 3000, n_rows + row_len, triton_device)
    src_start, dst_start = random_rows(row_len, n_rows, row_len, src.numel(), align)
    dst_len = int(dst_start.max()) + row_len + 5 if n_rows else 10
    got = torch.zeros(dst_len, dtype=dtype, device=triton_device)
    want = torch.zeros_like(got)
    K.gather_rows(src, src_start.to(triton_device), got, dst_start.to(triton_device), row_len, impl="triton")
    K.gather_rows(src, src_start, want, dst_start, row_len, impl="reference")
    assert torch.equal(got, want)


def test_copies_bits_exactly_nan_payloads_included(triton_device: torch.device) -> None:
    src = torch.arange(64, dtype=torch.int32, device=triton_device)
    src[3] = 0x7FC00001  # a NaN with a payload, when read as float32
    src = src.view(torch.float32)
    dst = torch.zeros(64, device=triton_device)
    starts = torch.tensor([0, 32], device=triton_device)
    K.gather_rows(src, starts, dst, starts.flip(0), 32, impl="triton")
    assert torch.equal(dst.view(torch.int32)[32:], src.view(torch.int32)[:32])


def test_reference_writes_only_the_rows(device: torch.device) -> None:
    src = torch.arange(20.0, device=device)
    dst = torch.full((12,), -1.0, device=device)
    K.gather_rows(src, torch.tensor([2, 15], device=device), dst, torch.tensor([8, 1], device=device), 3)
    assert dst.tolist() == [-1, 15, 16, 17, -1, -1, -1, -1, 2, 3, 4, -1]


def test_zero_length_rows_are_a_no_op(device: torch.device) -> None:
    dst = torch.zeros(4, device=device)
    K.gather_rows(
        torch.ones(4, device=device),
        torch.tensor([9], device=device),
        dst,
        torch.tensor([9], device=device),
        0,
    )
    assert (dst == 0).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda d: K.gather_rows(
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                torch.zeros(8, dtype=torch.float16, device=d),
                torch.tensor([0], device=d),
                4,
            ),
            "dst: dtype",
        ),
        (
            lambda d: K.gather_rows(
                torch.zeros(2, 4, device=d),
                torch.tensor([0], device=d),
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                4,
            ),
            "src: expected 1 dims",
        ),
        (
            lambda d: K.gather_rows(
                torch.zeros(8, device=d),
                torch.tensor([0.0], device=d),
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                4,
            ),
            "src_start: dtype",
        ),
        (
            lambda d: K.gather_rows(
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                torch.zeros(8, device=d),
                torch.tensor([0, 4], device=d),
                4,
            ),
            "dst_start: dim 0",
        ),
        (
            lambda d: K.gather_rows(
                torch.zeros(8, device=d),
                torch.tensor([5], device=d),
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                4,
            ),
            "src_start: rows span",
        ),
        (
            lambda d: K.gather_rows(
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                torch.zeros(8, device=d),
                torch.tensor([-1], device=d),
                4,
            ),
            "dst_start: rows span",
        ),
        (
            lambda d: K.gather_rows(
                torch.zeros(16, device=d)[::2],
                torch.tensor([0], device=d),
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                4,
            ),
            "src: innermost",
        ),
        (
            lambda d: K.gather_rows(
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                torch.zeros(8, device=d),
                torch.tensor([0], device=d),
                -2,
            ),
            "row_len",
        ),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("align", [1, 8])
def test_gathers_from_pinned_host_memory_into_cuda(dtype: torch.dtype, align: int) -> None:
    src = filled(dtype, 1 << 20, 1, torch.device("cpu")).pin_memory()
    src_start, dst_start = random_rows(2, 300, 1024, src.numel(), align)
    dst = torch.zeros(int(dst_start.max()) + 1024, dtype=dtype, device="cuda")
    K.gather_rows(src, src_start, dst, dst_start, 1024)  # auto: the kernel reads host memory over UVA
    want = torch.zeros(dst.numel(), dtype=dtype)
    K.gather_rows(src, src_start, want, dst_start, 1024, impl="reference")
    assert torch.equal(dst.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pageable_host_source_falls_back_to_a_staged_copy() -> None:
    src = torch.randn(4096)  # not pinned: out of the GPU's reach
    dst = torch.zeros(2048, device="cuda")
    starts = torch.tensor([0, 1024])
    K.gather_rows(src, starts + 7, dst, starts, 1024, impl="triton")
    torch.testing.assert_close(dst.cpu(), torch.cat([src[7:1031], src[1031:2055]]))
