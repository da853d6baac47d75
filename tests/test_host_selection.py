"""Host selection's choice (server/host_selection.choose_on_host) against louiskv's choose_units
(the CPU references the daemon runs): the same positions per row as sets and the same count of
units, at several sizes, with and without pinned tokens, with rows whose units all fit the budget,
invalid units and the last unit taken in part. And the placement plan's row-wise membership
(reference._members, by a map or by a sort) against sets."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels import reference
from kvrecall.server.host_selection import choose_on_host
from kvrecall.server.policies.louiskv import choose_units


def table(rows: int, units: int, seed: int, invalid: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 25, (rows, units), generator=g, dtype=torch.int32)
    sizes[torch.rand(rows, units, generator=g) < invalid] = 0  # unfilled units: invalid, no candidates
    total = int(sizes.sum(dim=1).max())
    position = torch.stack([torch.randperm(total, generator=g) for _ in range(rows)]).to(torch.int32)
    reps = torch.randn(rows, units, 16, generator=g)
    q = torch.randn(rows, 4, 16, generator=g)
    return q, reps, sizes > 0, sizes, position, g


def as_sets(positions: torch.Tensor) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in positions]


@pytest.mark.parametrize("aggregate", ["max", "sum"])
@pytest.mark.parametrize("rows,units,budget,pinned", [(8, 40, 64, 0), (8, 40, 64, 16), (16, 300, 256, 64),
                                                      (4, 6, 200, 16), (32, 1000, 1024, 256)])  # fmt: skip
def test_choose_on_host_picks_what_choose_units_picks(rows, units, budget, pinned, aggregate):
    q, reps, valid, sizes, position, g = table(rows, units, seed=rows * units + budget + pinned)
    pins = None
    if pinned:  # ascending distinct candidates of each row, some -1 padding
        pins = torch.stack([torch.sort(row[torch.randperm(row.numel(), generator=g)[:pinned]].long()).values
                            for row in position])  # fmt: skip
        pins[0, -3:] = -1
        pins[0] = torch.sort(torch.where(pins[0] < 0, torch.iinfo(torch.int64).max, pins[0])).values
        pins[0] = torch.where(pins[0] == torch.iinfo(torch.int64).max, -1, pins[0])
    expected, take = choose_units(q, reps, valid, sizes, position, pins, budget, aggregate)
    got, chosen = choose_on_host(q, reps, valid, sizes, position, pins, budget, aggregate)
    assert got.shape == expected.shape == (rows, budget)
    assert as_sets(got) == as_sets(expected)
    assert int(chosen) == int((take > 0).sum())
    fits = (torch.where(valid, sizes, 0).sum(dim=1) <= budget).any().item()
    if (rows, units, budget) == (4, 6, 200):
        assert fits, "the case of rows whose units all fit is not exercised"


@pytest.mark.parametrize("rows,width,span", [(7, 50, 300), (7, 50, 100_000), (3, 1, 5), (4, 0, 10), (4, 0, 1000),
                                             (5, 20, 21)])  # fmt: skip
def test_members_is_row_wise_set_membership(rows, width, span):
    g = torch.Generator().manual_seed(rows * width + span)
    x = torch.randint(-1, span + 3, (rows, width), generator=g)
    of = torch.randint(-1, span + 3, (rows, width), generator=g)
    x_ok, of_ok = (x >= 0) & (x < span), (of >= 0) & (of < span)
    want = torch.tensor([[bool(x_ok[b, r]) and int(x[b, r]) in set(of[b][of_ok[b]].tolist()) for r in range(width)]
                         for b in range(rows)], dtype=torch.bool).view(rows, width)  # fmt: skip
    assert torch.equal(reference._members(x, x_ok, of, of_ok, span), want)


def test_an_fp8_table_chooses_as_its_values_do_on_host_and_device():
    """A unit table stored in float8 e4m3 (the daemon's unit_reps_dtype fp8; louiskv.to_reps):
    choose_units over it and host selection over its float32 mirror (HostTable's) choose alike,
    as over the rounded values in float32; out-of-range values are clamped to +-448, never NaN
    (a CPU cast to e4m3 gives NaN past 480); and the rounding changes some choice (the case
    tells something)."""
    from kvrecall.server.policies.louiskv import FP8, to_reps

    q, reps, valid, sizes, position, _ = table(16, 300, seed=3)
    reps[0, :5] *= 1000  # past e4m3's range
    stored = to_reps(reps, FP8)
    assert stored.dtype == FP8 and not stored.float().isnan().any()
    assert stored[0, :5].float().abs().max() == 448
    full, _ = choose_units(q, reps, valid, sizes, position, None, 256, "max")
    got, take = choose_units(q, stored, valid, sizes, position, None, 256, "max")
    want, _ = choose_units(q, stored.float(), valid, sizes, position, None, 256, "max")
    host, host_chosen = choose_on_host(q, stored.float(), valid, sizes, position, None, 256, "max")
    assert as_sets(got) == as_sets(want) == as_sets(host)
    assert int(host_chosen) == int((take > 0).sum())
    assert as_sets(got[1:]) != as_sets(full[1:]), "fp8 changed no choice: the case tells nothing"
