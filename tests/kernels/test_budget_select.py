"""select_under_budget: Triton vs reference, and the greedy rule's properties."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels._checks import FLOAT_DTYPES


def random_problem(
    seed: int, batch: int, units: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores with many exact ties (small integers) and some -inf units; sizes in [0, 12]."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(-4, 5, (batch, units), generator=generator).float()
    scores[torch.rand(batch, units, generator=generator) < 0.2] = float("-inf")
    sizes = torch.randint(0, 13, (batch, units), generator=generator)
    return scores.to(device=device, dtype=dtype), sizes.to(device)


def greedy_by_hand(scores: list[float], sizes: list[int], budget: int) -> list[int]:
    """The rule, one unit at a time."""
    order = sorted(range(len(scores)), key=lambda u: (-scores[u], u))
    take = [0] * len(scores)
    for unit in order:
        if scores[unit] == float("-inf") or budget == 0:
            continue
        take[unit] = min(max(sizes[unit], 0), budget)
        budget -= take[unit]
    return take


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("batch", "units"), [(1, 1), (3, 7), (2, 100), (2, 0), (0, 5)])
@pytest.mark.parametrize("budget", [0, 1, 37, 10_000])
def test_matches_reference(
    triton_device: torch.device, dtype: torch.dtype, batch: int, units: int, budget: int
) -> None:
    scores, sizes = random_problem(units + budget, batch, units, triton_device, dtype)
    got = K.select_under_budget(scores, sizes, budget, impl="triton")
    want = K.select_under_budget(scores, sizes, budget, impl="reference")
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


def test_matches_reference_on_a_long_row(triton_device: torch.device) -> None:
    scores, sizes = random_problem(9, 2, 600, triton_device)  # 1024-wide sort: slow in the interpreter
    got = K.select_under_budget(scores, sizes, 1500, impl="triton")
    assert torch.equal(got, K.select_under_budget(scores, sizes, 1500, impl="reference"))


def test_nan_scores_and_negative_sizes_take_nothing(triton_device: torch.device) -> None:
    scores = torch.tensor([[float("nan"), 1.0, 2.0, float("-inf"), 0.5]], device=triton_device)
    sizes = torch.tensor([[5, -3, 4, 9, 6]], device=triton_device)
    for impl in ("triton", "reference"):
        assert K.select_under_budget(scores, sizes, 7, impl=impl).tolist() == [[0, 0, 4, 0, 3]]


def test_signed_zeros_tie_and_a_wide_row_matches_the_reference(triton_device: torch.device) -> None:
    scores = torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0]], device=triton_device)
    sizes = torch.tensor([[3, 3, 1, 3, 3]], device=triton_device)
    for impl in ("triton", "reference"):
        assert K.select_under_budget(scores, sizes, 5, impl=impl).tolist() == [[3, 1, 1, 0, 0]]
    # Past SMALL_UNITS (the 4096-wide variant): distinct float scores spanning signs and magnitudes.
    generator = torch.Generator().manual_seed(5)
    scores = (torch.randn(2, 3000, generator=generator) * 1e3).to(triton_device)
    sizes = torch.randint(0, 40, (2, 3000), generator=generator).to(triton_device)
    for budget in (1, 1024, 30_000, 100_000):
        got = K.select_under_budget(scores, sizes, budget, impl="triton")
        assert torch.equal(got, K.select_under_budget(scores, sizes, budget, impl="reference"))


@pytest.mark.parametrize(("chunk", "units", "ways"), [(8, 20, 2), (8, 43, 2), (64, 195, 2), (8, 43, 16), (64, 195, 4)])
def test_rows_longer_than_a_block_take_the_chunked_kernel(
    triton_device: torch.device, monkeypatch: pytest.MonkeyPatch, chunk: int, units: int, ways: int
) -> None:
    """Past MAX_UNITS the row is searched chunk by chunk (_select_chunked_kernel), `ways` thresholds
    a pass (SEARCH_WAYS): ties spread over several chunks (and a last chunk cut short) take what
    the reference gives them."""
    from kvrecall.kernels import budget_triton as budget_module

    monkeypatch.setattr(budget_module, "MAX_UNITS", chunk)
    monkeypatch.setattr(budget_module, "SEARCH_WAYS", ways)
    scores, sizes = random_problem(units, 3, units, triton_device)
    for budget in (1, 3 * units, 10**6):
        got = K.select_under_budget(scores, sizes, budget, impl="triton")
        assert torch.equal(got, K.select_under_budget(scores, sizes, budget, impl="reference")), budget


@pytest.mark.parametrize("seed", range(6))
def test_reference_follows_the_greedy_rule(device: torch.device, seed: int) -> None:
    scores, sizes = random_problem(seed, 2, 25, device)
    budget = 7 * seed
    take = K.select_under_budget(scores, sizes, budget)
    for b in range(2):
        assert take[b].tolist() == greedy_by_hand(scores[b].tolist(), sizes[b].tolist(), budget)


@pytest.mark.parametrize("seed", range(6))
def test_never_exceeds_the_budget_and_fills_it_when_it_can(device: torch.device, seed: int) -> None:
    scores, sizes = random_problem(100 + seed, 3, 40, device)
    budget = 25 * seed
    take = K.select_under_budget(scores, sizes, budget)
    available = torch.where(scores > float("-inf"), sizes, 0).sum(dim=1)
    assert (take.sum(dim=1) == available.clamp_max(budget)).all()
    assert ((take >= 0) & (take <= sizes)).all()
    assert (take[scores == float("-inf")] == 0).all()
    partial = (take > 0) & (take < sizes)
    assert (partial.sum(dim=1) <= 1).all()  # only the last unit taken may be cut
    # No skipped unit outranks a taken one.
    for b in range(3):
        taken = scores[b][take[b] > 0]
        skipped = scores[b][(take[b] == 0) & (sizes[b] > 0) & (scores[b] > float("-inf"))]
        if len(taken) and len(skipped):
            assert taken.min() >= skipped.max()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda d: K.select_under_budget(
                torch.zeros(2, 3, device=d), torch.zeros(2, 4, dtype=torch.long, device=d), 5
            ),
            "sizes: shape",
        ),
        (
            lambda d: K.select_under_budget(torch.zeros(2, 3, device=d), torch.zeros(2, 3, device=d), 5),
            "sizes: dtype",
        ),
        (
            lambda d: K.select_under_budget(
                torch.zeros(6, device=d), torch.zeros(6, dtype=torch.long, device=d), 5
            ),
            "scores: expected 2 dims",
        ),
        (
            lambda d: K.select_under_budget(
                torch.zeros(2, 3, device=d), torch.zeros(2, 3, dtype=torch.long, device=d), -1
            ),
            "budget",
        ),
        (
            lambda d: K.select_under_budget(
                torch.zeros(2, 3, device=d), torch.zeros(2, 3, dtype=torch.long, device=d), 2.5
            ),
            "budget: expected an int",
        ),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)
