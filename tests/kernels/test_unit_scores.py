"""score_units: Triton vs reference, and the reference's semantics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels._checks import FLOAT_DTYPES

MakeTensor = Callable[..., torch.Tensor]


def random_valid(seed: int, batch: int, units: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, units, generator=generator) > 0.25).to(device)


@pytest.mark.parametrize("agg", ["max", "sum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "heads", "units", "dim"),
    [(1, 1, 1, 1), (2, 3, 37, 20), (3, 8, 130, 64), (2, 17, 5, 130), (2, 4, 0, 16), (2, 72, 40, 32)],  # 72: a chunk
)
def test_matches_reference(
    triton_device: torch.device,
    randn: MakeTensor,
    close: Callable[..., None],
    agg: str,
    dtype: torch.dtype,
    batch: int,
    heads: int,
    units: int,
    dim: int,
) -> None:
    query = randn(1, batch, heads, dim, dtype=dtype)
    reps = randn(2, batch, units, dim, dtype=dtype)
    valid = random_valid(3, batch, units, triton_device)
    got = K.score_units(query, reps, valid, agg, impl="triton")
    close(got, K.score_units(query, reps, valid, agg, impl="reference"), dtype)


@pytest.mark.parametrize("agg", ["max", "sum"])
@pytest.mark.parametrize("query_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("batch", "heads", "units", "dim"), [(1, 1, 1, 16), (2, 3, 37, 20), (3, 8, 130, 128), (2, 40, 70, 64)])
@pytest.mark.parametrize("blocks", [(64, 4), (128, 8)])
def test_fp8_reps_match_reference(
    triton_device: torch.device, randn: MakeTensor, close: Callable[..., None], monkeypatch: pytest.MonkeyPatch,
    agg: str, query_dtype: torch.dtype, batch: int, heads: int, units: int, dim: int, blocks: tuple[int, int],
) -> None:  # fmt: skip
    """A unit table stored in float8 e4m3 (the daemon's unit_reps_dtype fp8): the kernel widens
    the reps to the query's dtype, exactly (every e4m3 value is a bf16 and an f16 value), and
    scores as the reference does on their float32 values, at each (units a program, warps)
    (unit_scores_triton.SCORE_BLOCKS)."""
    from kvrecall.kernels import unit_scores_triton

    monkeypatch.setitem(unit_scores_triton.SCORE_BLOCKS, 1, blocks)
    query = randn(11, batch, heads, dim, dtype=query_dtype)
    reps = (4 * randn(12, batch, units, dim)).to(torch.float8_e4m3fn)
    valid = random_valid(13, batch, units, triton_device)
    got = K.score_units(query, reps, valid, agg, impl="triton")
    close(got, K.score_units(query, reps.float(), valid, agg, impl="reference"), query_dtype)


def test_strided_views_match_contiguous_copies(
    triton_device: torch.device, randn: MakeTensor, close: Callable[..., None]
) -> None:
    query = randn(4, 6, 2, 16)[::2]  # every other problem: strided batch dim
    reps = randn(5, 3, 20, 32)[:, ::2, :16]  # strided unit dim, sliced head dim
    valid = random_valid(6, 3, 10, triton_device)
    got = K.score_units(query, reps, valid, impl="triton")
    close(got, K.score_units(query.contiguous(), reps.contiguous(), valid, impl="reference"))


@pytest.mark.parametrize("agg", ["max", "sum"])
def test_reference_aggregates_dot_products_over_the_group(
    device: torch.device, randn: MakeTensor, agg: str
) -> None:
    query, reps = randn(7, 2, 3, 8), randn(8, 2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool, device=device)
    valid[1, 2] = False
    scores = K.score_units(query, reps, valid, agg)
    for b in range(2):
        for u in range(5):
            dots = torch.stack([query[b, g] @ reps[b, u] for g in range(3)])
            want = dots.max() if agg == "max" else dots.sum()
            if valid[b, u]:
                torch.testing.assert_close(scores[b, u], want)
            else:
                assert scores[b, u] == float("-inf")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda d: K.score_units(
                torch.zeros(2, 3, 4, device=d), torch.zeros(2, 5, 4, device=d), torch.ones(2, 5, device=d)
            ),
            "valid: dtype",
        ),
        (
            lambda d: K.score_units(
                torch.zeros(2, 3, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            "query: expected 3 dims",
        ),
        (
            lambda d: K.score_units(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 6, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            "reps: dim 2",
        ),
        (
            lambda d: K.score_units(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(3, 5, 4, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            "reps: dim 0",
        ),
        (
            lambda d: K.score_units(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.ones(2, 6, dtype=torch.bool, device=d),
            ),
            "valid: dim 1",
        ),
        (
            lambda d: K.score_units(
                torch.zeros(2, 0, 4, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            r"query.shape\[1\]",
        ),
        (
            lambda d: K.score_units(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 4, dtype=torch.float64, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
            ),
            "reps: dtype",
        ),
        (
            lambda d: K.score_units(
                torch.zeros(2, 3, 4, device=d),
                torch.zeros(2, 5, 4, device=d),
                torch.ones(2, 5, dtype=torch.bool, device=d),
                agg="mean",
            ),
            "agg",
        ),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)


def test_float32_reps_with_a_16bit_query(
    triton_device: torch.device, randn: MakeTensor, close: Callable[..., None]
) -> None:
    query = randn(8, 3, 4, 64, dtype=torch.bfloat16)  # the working set's query
    reps = randn(9, 3, 50, 64)  # float32 k-means centroids
    valid = random_valid(10, 3, 50, triton_device)
    got = K.score_units(query, reps, valid, impl="triton")
    close(got, K.score_units(query, reps, valid, impl="reference"))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_scores_written_into_columns_of_a_wider_tensor(
    triton_device: torch.device, randn: MakeTensor, close: Callable[..., None], impl: str
) -> None:
    """out=: two parts of a table (louiskv's shared prefix and a session's own) scored into their
    columns of one tensor equal the scores of the parts, the columns around them untouched."""
    query = randn(11, 3, 4, 32)
    head, tail = randn(12, 3, 50, 32), randn(13, 3, 7, 32)
    valid = random_valid(14, 3, 57, triton_device)
    out = torch.full((3, 60), 5.0, device=triton_device)
    for reps, columns in ((head, slice(1, 51)), (tail, slice(51, 58))):
        wrote = K.score_units(query, reps, valid[:, columns.start - 1 : columns.stop - 1], "max", impl=impl,
                              out=out[:, columns])  # fmt: skip
        assert wrote.data_ptr() == out[:, columns].data_ptr()
    want = K.score_units(query, torch.cat((head, tail), dim=1), valid, "max", impl="reference")
    close(out[:, 1:58], want)
    assert bool((out[:, 0] == 5.0).all()) and bool((out[:, 58:] == 5.0).all())
    with pytest.raises(ValueError, match="out: dim 1 is 57, expected 50"):
        K.score_units(query, head, valid[:, :50], out=out[:, :57])
