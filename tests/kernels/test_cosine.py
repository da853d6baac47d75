"""cosine_similarity: Triton vs reference, and the reference's semantics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels._checks import FLOAT_DTYPES

MakeTensor = Callable[..., torch.Tensor]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "heads", "dim"), [(1, 1, 1), (3, 5, 20), (2, 7, 300), (4, 33, 64), (0, 3, 8), (2, 0, 8)]
)
def test_matches_reference(
    triton_device: torch.device,
    randn: MakeTensor,
    close: Callable[..., None],
    dtype: torch.dtype,
    batch: int,
    heads: int,
    dim: int,
) -> None:
    a = randn(1, batch, heads, dim, dtype=dtype)
    b = (a.float() + 0.5 * randn(2, batch, heads, dim)).to(dtype)
    close(K.cosine_similarity(a, b, impl="triton"), K.cosine_similarity(a, b, impl="reference"), dtype)


def test_strided_inputs(triton_device: torch.device, randn: MakeTensor, close: Callable[..., None]) -> None:
    a = randn(3, 4, 6, 32)[:, ::2, :16]
    b = randn(4, 8, 3, 16)[::2]
    close(K.cosine_similarity(a, b, impl="triton"), K.cosine_similarity(a.contiguous(), b.contiguous()))


def test_reference_semantics(device: torch.device, randn: MakeTensor) -> None:
    a = randn(5, 2, 3, 16)
    torch.testing.assert_close(K.cosine_similarity(a, a), torch.ones(2, 3, device=device))
    torch.testing.assert_close(K.cosine_similarity(a, -3 * a), -torch.ones(2, 3, device=device))
    want = torch.nn.functional.cosine_similarity(a, a.roll(1, dims=1), dim=-1)
    torch.testing.assert_close(K.cosine_similarity(a, a.roll(1, dims=1)), want)
    zeros = torch.zeros(2, 3, 16, device=device)
    assert (K.cosine_similarity(zeros, a) == 0).all()  # eps keeps it finite


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda d: K.cosine_similarity(torch.zeros(2, 3, 4, device=d), torch.zeros(2, 3, 5, device=d)),
            "b: shape",
        ),
        (
            lambda d: K.cosine_similarity(torch.zeros(2, 3, device=d), torch.zeros(2, 3, device=d)),
            "a: expected 3 dims",
        ),
        (
            lambda d: K.cosine_similarity(
                torch.zeros(2, 3, 4, device=d), torch.zeros(2, 3, 4, dtype=torch.int64, device=d)
            ),
            "b: dtype",
        ),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)
