"""louiskv's pinned selection helpers against set arithmetic on random rows of several sizes."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels.reference import drop_members
from kvrecall.server.policies.snapkv import ascending


def random_rows(rows: int, width: int, high: int, seed: int) -> torch.Tensor:
    """Rows of distinct positions in [0, high), -1 padded at random places."""
    g = torch.Generator().manual_seed(seed)
    out = torch.stack([torch.randperm(high, generator=g)[:width] for _ in range(rows)])
    holes = torch.rand(rows, width, generator=g) < 0.3
    return torch.where(holes, -1, out)


@pytest.mark.parametrize(
    "rows,pinned,width,high", [(1, 1, 1, 4), (3, 4, 8, 20), (16, 32, 96, 300), (64, 128, 384, 4096)]
)
def testdrop_members_keeps_exactly_the_positions_not_pinned(rows, pinned, width, high):
    for seed in range(3):
        pin = ascending(random_rows(rows, pinned, high, seed))
        positions = random_rows(rows, width, high, seed + 100)
        out = drop_members(positions, pin)
        assert out.shape == positions.shape
        for b in range(rows):
            held = set(pin[b][pin[b] >= 0].tolist())
            expected = [p if p >= 0 and p not in held else -1 for p in positions[b].tolist()]
            assert out[b].tolist() == expected


def test_ascending_sorts_and_pads_last():
    rows = torch.tensor([[5, -1, 2, 9, -1], [-1, -1, -1, -1, -1], [3, 1, 2, 0, 4]])
    assert ascending(rows).tolist() == [[2, 5, 9, -1, -1], [-1] * 5, [0, 1, 2, 3, 4]]
