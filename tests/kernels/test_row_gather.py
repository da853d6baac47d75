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


VARIANTS = ["triton", "triton+sort", "cupy", "cupy+sort"]


def gather_with(
    variant: str,
    src: torch.Tensor,
    src_start: torch.Tensor,
    dst: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
) -> None:
    """The launcher with an explicit variant, on arguments checked as `gather_rows` checks them."""
    from kvrecall.kernels._checks import check_rows
    from kvrecall.kernels.row_gather_triton import GatherVariant, gather_rows_triton

    vector = max(1, 16 // src.element_size())
    aligned = check_rows(src_start, dst_start, row_len, src.numel(), dst.numel(), vector)
    gather_rows_triton(src, src_start, dst, dst_start, row_len, aligned, GatherVariant.parse(variant))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("dtype", "n_rows", "row_len", "align"),
    [
        (torch.bfloat16, 1, 8, 8),
        (torch.bfloat16, 300, 64, 8),  # 128-byte rows, aligned: the vector paths
        (torch.float32, 77, 36, 4),
        (torch.int64, 9, 1000, 2),  # rows wider than a small tile
        (torch.float16, 50, 13, 1),  # unaligned: the cupy engine falls back to Triton
        (torch.uint8, 0, 16, 16),
    ],
)
def test_variants_match_reference(
    triton_device: torch.device, variant: str, dtype: torch.dtype, n_rows: int, row_len: int, align: int
) -> None:
    src = filled(dtype, 20000, n_rows, triton_device)
    src_start, dst_start = random_rows(n_rows + 1, n_rows, row_len, src.numel(), align)
    dst_len = int(dst_start.max()) + row_len + 3 if n_rows else 8
    got = torch.zeros(dst_len, dtype=dtype, device=triton_device)
    want = torch.zeros_like(got)
    gather_with(variant, src, src_start.to(triton_device), got, dst_start.to(triton_device), row_len)
    K.gather_rows(src, src_start, want, dst_start, row_len, impl="reference")
    assert torch.equal(got, want)


def test_sort_rows_keeps_each_source_with_its_destination(device: torch.device) -> None:
    from kvrecall.kernels._triton import triton_importable

    if not triton_importable():
        pytest.skip("triton is not importable")
    from kvrecall.kernels.row_gather_triton import sort_rows

    src = torch.tensor([40, 8, 8, 0, 24], device=device)
    dst = torch.tensor([0, 1, 2, 3, 4], device=device)
    src_sorted, dst_sorted = sort_rows(src, dst)
    assert src_sorted.tolist() == [0, 8, 8, 24, 40]
    assert sorted(zip(src_sorted.tolist(), dst_sorted.tolist(), strict=True)) == sorted(
        zip(src.tolist(), dst.tolist(), strict=True)
    )


@pytest.mark.parametrize(
    ("name", "message"), [("numba", "engine"), ("triton+shuffle", "variant"), ("", "engine")]
)
def test_variant_names_are_validated(name: str, message: str) -> None:
    from kvrecall.kernels._triton import triton_importable

    if not triton_importable():
        pytest.skip("triton is not importable")
    from kvrecall.kernels.row_gather_triton import GatherVariant

    with pytest.raises(ValueError, match=message):
        GatherVariant.parse(name)
    assert GatherVariant.parse("cupy+sort") == GatherVariant("cupy", sort=True)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("row_bytes", "n_rows"), [(128, 65536), (256, 3000), (4096, 100), (48, 1000)])
def test_variants_read_pinned_host_memory(variant: str, row_bytes: int, n_rows: int) -> None:
    from kvrecall.kernels.row_gather_triton import cupy_available

    if variant.startswith("cupy") and not cupy_available():
        pytest.skip("cupy is not importable: the cupy engine cannot be checked here")
    row_len = row_bytes // 2
    src = filled(torch.bfloat16, 1 << 24, 3, torch.device("cpu")).pin_memory()
    src_start, dst_start = random_rows(4, n_rows, row_len, src.numel(), 8)
    dst = torch.zeros(int(dst_start.max()) + row_len, dtype=torch.bfloat16, device="cuda")
    gather_with(variant, src, src_start.cuda(), dst, dst_start.cuda(), row_len)
    want = torch.zeros(dst.numel(), dtype=torch.bfloat16)
    K.gather_rows(src, src_start, want, dst_start, row_len, impl="reference")
    assert torch.equal(dst.cpu().view(torch.int16), want.view(torch.int16))
