"""quest_page_bounds / quest_page_scores: Triton vs reference, and Quest's upper-bound property."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels._checks import FLOAT_DTYPES

MakeTensor = Callable[..., torch.Tensor]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "tokens", "dim", "page"),
    [(1, 1, 1, 1), (2, 53, 20, 16), (3, 64, 16, 16), (2, 40, 130, 7), (2, 30, 8, 64), (2, 0, 8, 16)],
)
def test_page_bounds_match_reference(
    triton_device: torch.device,
    randn: MakeTensor,
    dtype: torch.dtype,
    batch: int,
    tokens: int,
    dim: int,
    page: int,
) -> None:
    keys = randn(tokens, batch, tokens, dim, dtype=dtype)
    got = K.quest_page_bounds(keys, page, impl="triton")
    want = K.quest_page_bounds(keys, page, impl="reference")
    for got_bound, want_bound in zip(got, want, strict=True):
        assert got_bound.dtype == dtype and got_bound.shape == (batch, -(-tokens // page), dim)
        assert torch.equal(got_bound, want_bound)  # min / max are exact


def test_page_bounds_of_a_strided_view(triton_device: torch.device, randn: MakeTensor) -> None:
    keys = randn(1, 4, 30, 24)[::2, :, :16]
    got = K.quest_page_bounds(keys, 8, impl="triton")
    want = K.quest_page_bounds(keys.contiguous(), 8, impl="reference")
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "heads", "pages", "dim"),
    [(1, 1, 1, 1), (2, 4, 37, 20), (3, 8, 70, 64), (2, 3, 5, 130), (2, 4, 0, 16)],
)
def test_page_scores_match_reference(
    triton_device: torch.device,
    randn: MakeTensor,
    close: Callable[..., None],
    dtype: torch.dtype,
    batch: int,
    heads: int,
    pages: int,
    dim: int,
) -> None:
    query = randn(1, batch, heads, dim, dtype=dtype)
    a, b = randn(2, batch, pages, dim, dtype=dtype), randn(3, batch, pages, dim, dtype=dtype)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    generator = torch.Generator().manual_seed(4)
    valid = (torch.rand(batch, pages, generator=generator) > 0.2).to(triton_device)
    got = K.quest_page_scores(query, kmin, kmax, valid, impl="triton")
    close(got, K.quest_page_scores(query, kmin, kmax, valid, impl="reference"), dtype)


def test_reference_scores_equal_quests_formula(device: torch.device, randn: MakeTensor) -> None:
    query = randn(5, 2, 3, 12)
    kmin, kmax = K.quest_page_bounds(randn(6, 2, 50, 12), 8)
    valid = torch.ones(2, 7, dtype=torch.bool, device=device)
    valid[0, 3] = False
    q = query[:, :, None, :]  # [B, G, 1, D]
    literal = torch.maximum(q * kmin[:, None], q * kmax[:, None]).sum(-1).amax(dim=1)
    literal[0, 3] = float("-inf")
    torch.testing.assert_close(K.quest_page_scores(query, kmin, kmax, valid), literal)


def test_page_score_bounds_every_key_of_the_page(device: torch.device, randn: MakeTensor) -> None:
    keys, query = randn(7, 3, 45, 16), randn(8, 3, 4, 16)
    kmin, kmax = K.quest_page_bounds(keys, 10)
    scores = K.quest_page_scores(query, kmin, kmax, torch.ones(3, 5, dtype=torch.bool, device=device))
    logits = torch.einsum("bgd,btd->bgt", query, keys).amax(dim=1)  # best head per token
    for page in range(5):
        best_in_page = logits[:, page * 10 : (page + 1) * 10].amax(dim=1)
        assert (scores[:, page] >= best_in_page - 1e-5).all()
    assert (kmin <= kmax).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: K.quest_page_bounds(torch.zeros(2, 8, 4, device=d), 0), "page_size"),
        (lambda d: K.quest_page_bounds(torch.zeros(8, 4, device=d), 4), "keys: expected 3 dims"),
        (
            lambda d: K.quest_page_scores(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.zeros(2, 6, 4, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            "kmax: shape",
        ),
        (
            lambda d: K.quest_page_scores(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.ones(2, 4, dtype=torch.bool, device=d),
            ),
            "valid: shape",
        ),
        (
            lambda d: K.quest_page_scores(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 3, device=d),
                torch.zeros(2, 5, 3, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            "kmin: dim 2",
        ),
        (
            lambda d: K.quest_page_scores(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.zeros(2, 5, 4, dtype=torch.int8, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            "kmax: dtype",
        ),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)
