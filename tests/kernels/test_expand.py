"""expand_selection / expand_grouped: Triton vs reference, and the positions a budget selection stands for."""

from __future__ import annotations

import pytest
import torch

import kvrecall.kernels as K


def random_units(rows: int, units: int, seed: int, budget: int):
    """Candidates grouped by unit (like clustered prompt tokens), a take from the real selection."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 6, (rows, units), generator=generator)
    candidates = int(sizes.sum(dim=1).max()) if units else 0
    unit = torch.zeros(rows, candidates, dtype=torch.int64)
    rank = torch.zeros(rows, candidates, dtype=torch.int32)
    position = torch.full((rows, candidates), 10_000, dtype=torch.int64)
    for b in range(rows):
        m = 0
        for u in range(units):
            n = int(sizes[b, u])
            unit[b, m : m + n] = u
            rank[b, m : m + n] = torch.arange(n, dtype=torch.int32)
            m += n
        unit[b, m:] = 0
        rank[b, m:] = 1 << 20  # padding: never chosen
        position[b, :m] = torch.randperm(4 * max(m, 1), generator=generator)[:m]
    scores = torch.randn(rows, units, generator=generator)
    take = K.select_under_budget(scores, sizes, budget, impl="reference")
    return take, unit, rank, position


def random_grouped(rows: int, units: int, seed: int, budget: int, spare_units: int = 0):
    """random_units plus its sizes, with `spare_units` empty unit columns after the filled ones
    (a table read past its filled columns, as a captured selection reads it)."""
    take, unit, rank, position = random_units(rows, units, seed, budget)
    sizes = torch.zeros(rows, units + spare_units, dtype=torch.int32)
    for b in range(rows):
        filled = rank[b] < (1 << 20)
        sizes[b, :units] = torch.bincount(unit[b][filled], minlength=units)[:units].to(torch.int32)
    take = torch.cat([take, torch.zeros(rows, spare_units, dtype=take.dtype)], dim=1)
    return take, sizes, unit, rank, position


@pytest.mark.parametrize(
    ("rows", "units", "budget", "width"),
    [(1, 1, 1, 1), (3, 7, 9, 9), (4, 300, 200, 256), (2, 50, 40, 13), (2, 0, 5, 5), (5, 20, 0, 8),
     (2, 2000, 4500, 4200)],  # the last: over 4096 candidates, two kernel blocks with a running count
)
@pytest.mark.parametrize("index", [torch.int64, torch.int32])
def test_matches_reference(triton_device, rows, units, budget, width, index) -> None:
    take, unit, rank, position = random_units(rows, units, seed=units + width, budget=budget)
    unit, position = unit.to(index), position.to(index)  # louiskv keeps int32 tables
    got = K.expand_selection(
        *(t.to(triton_device) for t in (take, unit, rank, position)), width, impl="triton"
    )
    want = K.expand_selection(take, unit, rank, position, width, impl="reference")
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_chosen_positions_in_candidate_order(triton_device, impl) -> None:
    device = torch.device("cpu") if impl == "reference" else triton_device
    take = torch.tensor([[2, 0, 1]])
    unit = torch.tensor([[0, 0, 0, 1, 2, 2]])
    rank = torch.tensor([[0, 1, 2, 0, 0, 1]])
    position = torch.tensor([[40, 41, 42, 7, 90, 91]])
    args = [t.to(device) for t in (take, unit, rank, position)]
    assert K.expand_selection(*args, 5, impl=impl).tolist() == [[40, 41, 90, -1, -1]]
    assert K.expand_selection(*args, 2, impl=impl).tolist() == [[40, 41]]  # the first `width`


GROUPED_CASES = [
    (1, 1, 1, 1, 0), (3, 7, 9, 9, 0), (4, 300, 200, 256, 5), (2, 50, 40, 13, 0), (2, 0, 5, 5, 3), (5, 20, 0, 8, 0),
    (2, 2000, 4500, 4200, 40),  # over 1024 units and 1024 output columns: several blocks of each
    (3, 1030, 700, 512, 0),  # a second unit block holding the last 6 units
]


@pytest.mark.parametrize(("rows", "units", "budget", "width", "spare"), GROUPED_CASES)
@pytest.mark.parametrize("index", [torch.int64, torch.int32])
def test_grouped_matches_reference(triton_device, rows, units, budget, width, spare, index) -> None:
    take, sizes, unit, rank, position = random_grouped(rows, units, units + width, budget, spare)
    position = position.to(index)
    want = K.expand_selection(take, unit, rank, position, width, impl="reference")
    assert torch.equal(K.expand_grouped(take, sizes, position, width, impl="reference"), want)
    got = K.expand_grouped(*(t.to(triton_device) for t in (take, sizes, position)), width, impl="triton")
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_grouped_reads_columns_from_sizes(triton_device, impl) -> None:
    device = torch.device("cpu") if impl == "reference" else triton_device
    # units of 3, 1 and 2 candidates (columns 0-2, 3, 4-5), two padding columns; a take over a
    # unit's size counts its size, a negative one none
    sizes = torch.tensor([[3, 1, 2, 0]])
    position = torch.tensor([[40, 41, 42, 7, 90, 91, 5, 6]])
    for take, want in (([[2, 0, 1, 0]], [40, 41, 90, -1, -1]), ([[9, -1, 2, 4]], [40, 41, 42, 90, 91])):
        got = K.expand_grouped(torch.tensor(take).to(device), sizes.to(device), position.to(device), 5, impl=impl)
        assert got.tolist() == [want]


def test_arguments_are_checked(device) -> None:
    take = torch.zeros(2, 3, dtype=torch.int64, device=device)
    unit = torch.zeros(2, 4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="rank: shape"):
        K.expand_selection(take, unit, unit[:, :3], unit, 4)
    with pytest.raises(ValueError, match="take: dim 0 is 2, expected 1"):
        K.expand_selection(take, unit[:1], unit[:1], unit[:1], 4)
    with pytest.raises(ValueError, match="unit: dtype float32"):
        K.expand_selection(take, unit.float(), unit, unit, 4)
    with pytest.raises(ValueError, match="take: shape"):
        K.expand_grouped(take, take[:, :2], unit, 4)
    with pytest.raises(ValueError, match="position: dim 0 is 1, expected 2"):
        K.expand_grouped(take, take, unit[:1], 4)


def pinned_case(rows: int, units: int, budget: int, pins: int, seed: int, spare: int = 0):
    """A grouped table, scores with some units unscored (-inf), a selection under budget - pins,
    and pinned rows (ascending, -1 padded) drawn partly from the table's positions."""
    take, sizes, _, _, position = random_grouped(rows, units, seed, budget - pins, spare)
    g = torch.Generator().manual_seed(seed + 1)
    scores = torch.randn(rows, units + spare, generator=g)
    scores[torch.rand(rows, units + spare, generator=g) < 0.2] = float("-inf")
    scores[:, units:] = float("-inf")
    take = K.select_under_budget(scores, sizes, budget - pins, impl="reference")
    if rows > 1:  # a row that fits whole: few units, all scored
        scores[0] = torch.where(sizes[0] > 0, 1.0, float("-inf"))
        sizes[0, 3:] = 0
    pinned = torch.full((rows, pins), -1, dtype=torch.int64)
    for b in range(rows):
        filled = int(sizes[b].sum())
        pool = torch.cat([position[b, :filled].long(), torch.arange(50_000, 50_000 + pins)])
        pick = pool[torch.randperm(pool.numel(), generator=g)[: max(0, pins - b % 3)]]
        pinned[b, : pick.numel()] = pick.sort().values
    return take, sizes, scores, position, pinned


@pytest.mark.parametrize(
    ("rows", "units", "budget", "pins", "spare"),
    [(1, 5, 8, 2, 0), (4, 300, 256, 64, 7), (3, 2000, 1024, 256, 0), (2, 40, 16, 16, 0), (3, 30, 64, 0, 2)],
)
def test_pinned_matches_reference(triton_device, rows, units, budget, pins, spare) -> None:
    take, sizes, scores, position, pinned = pinned_case(rows, units, budget, pins, units + pins, spare)
    want, want_take = K.expand_pinned(take, sizes, scores, position, pinned, budget, impl="reference")
    got, got_take = K.expand_pinned(
        *(t.to(triton_device) for t in (take, sizes, scores, position, pinned)), budget, impl="triton"
    )
    assert torch.equal(got.cpu(), want) and torch.equal(got_take.cpu(), want_take)
    for b in range(rows):  # each token once; a row that does not fit keeps every pinned token first
        row = [p for p in want[b].tolist() if p >= 0]
        assert len(row) == len(set(row))
        fits = int(torch.where(scores[b] > float("-inf"), sizes[b], 0).sum()) <= budget
        if not fits:
            assert want[b, :pins].tolist() == pinned[b].tolist()
    if rows > 1:  # row 0 fits: its every unit whole, no pinned part
        assert torch.equal(want[0], K.expand_grouped(want_take[:1], sizes[:1], position[:1], budget)[0])


@pytest.mark.parametrize(("rows", "units", "budget", "width", "spare"), GROUPED_CASES)
@pytest.mark.parametrize(("cut", "tail_dtype"), [(0.0, torch.int32), (0.4, torch.int32), (0.7, torch.int64),
                                                 (1.0, torch.int32)])  # fmt: skip
def test_grouped_with_a_tail_is_one_table(triton_device, rows, units, budget, width, spare, cut, tail_dtype) -> None:
    """position's candidate columns split in two (a shared prefix's and a session's own, louiskv's
    choose_units_split), at any column: the positions the whole table gives, on both paths."""
    take, sizes, _, _, position = random_grouped(rows, units, units + width, budget, spare)
    split = int(cut * position.shape[1])
    head, tail = position[:, :split].to(torch.int32), position[:, split:].to(tail_dtype)
    want = K.expand_grouped(take, sizes, position, width, impl="reference")
    assert torch.equal(K.expand_grouped(take, sizes, head, width, impl="reference", tail=tail), want)
    got = K.expand_grouped(*(t.to(triton_device) for t in (take, sizes, head)), width, impl="triton",
                           tail=tail.to(triton_device))  # fmt: skip
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize(
    ("rows", "units", "budget", "pins", "spare"), [(1, 5, 8, 2, 0), (4, 300, 256, 64, 7), (3, 2000, 1024, 256, 0)]
)
@pytest.mark.parametrize("cut", [0.25, 0.9])
def test_pinned_with_a_tail_is_one_table(triton_device, rows, units, budget, pins, spare, cut) -> None:
    take, sizes, scores, position, pinned = pinned_case(rows, units, budget, pins, units + pins, spare)
    split = int(cut * position.shape[1])
    head, tail = position[:, :split], position[:, split:]
    want, want_take = K.expand_pinned(take, sizes, scores, position, pinned, budget, impl="reference")
    got, got_take = K.expand_pinned(take, sizes, scores, head, pinned, budget, impl="reference", tail=tail)
    assert torch.equal(got, want) and torch.equal(got_take, want_take)
    got, got_take = K.expand_pinned(
        *(t.to(triton_device) for t in (take, sizes, scores, head, pinned)), budget, impl="triton",
        tail=tail.to(triton_device),
    )  # fmt: skip
    assert torch.equal(got.cpu(), want) and torch.equal(got_take.cpu(), want_take)


def test_a_tail_is_checked(device) -> None:
    take = torch.zeros(2, 3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="tail: dim 0 is 1, expected 2"):
        K.expand_grouped(take, take, take, 4, tail=take[:1])
    with pytest.raises(ValueError, match="tail: dtype float32"):
        K.expand_grouped(take, take, take, 4, tail=take.float())
