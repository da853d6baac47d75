"""scatter_rows: the kernel writes every staged K / V row into its target rows as its
reference (two index_copy_) does, bit for bit, for several dtypes, row widths and ranges, and
leaves every other row alone."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels.scatter_rows import scatter_rows


def case(n_rows: int, width: int, dtype: torch.dtype, total: int, first: int, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    half = first + count + 3  # (V rows start here: a gap after the K rows, as between sessions)
    rows = (torch.randn(2 * half, width, generator=generator) * 100).to(dtype)
    targets = torch.full((half,), -1, dtype=torch.int64)  # (outside the range: never read)
    targets[first : first + count] = torch.randperm(n_rows, generator=generator)[:count]
    keys, values = ((torch.randn(n_rows, width, generator=generator) * 100).to(dtype) for _ in range(2))
    return rows, targets, keys, values, half


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize(("n_rows", "width", "first", "count"),
                         [(7, 1, 0, 1), (40, 3, 2, 17), (300, 128, 5, 130), (90, 12, 0, 90), (64, 1024, 3, 9)])
def test_kernel_matches_the_reference(triton_device, dtype, n_rows, width, first, count):  # fmt: skip
    rows, targets, keys, values, half = case(n_rows, width, dtype, 0, first, count, seed=width + count)
    want_k, want_v = keys.clone(), values.clone()
    scatter_rows(rows, targets, want_k, want_v, first, count, half, impl="reference")
    assert not torch.equal(want_k, keys), "the reference moved nothing: the case tells nothing"
    got = [t.to(triton_device) for t in (rows, targets, keys, values)]
    scatter_rows(got[0], got[1], got[2], got[3], first, count, half, impl="triton")
    assert torch.equal(got[2].cpu(), want_k) and torch.equal(got[3].cpu(), want_v)


def test_nothing_to_move_and_mismatches(device):
    rows, targets, keys, values, half = case(10, 4, torch.float32, 0, 0, 3, seed=1)
    before = keys.clone()
    scatter_rows(rows, targets, keys, values, 0, 0, half)
    assert torch.equal(keys, before)
    with pytest.raises(ValueError, match="keys"):
        scatter_rows(rows, targets, keys[:, :3], values, 0, 3, half)
    with pytest.raises(ValueError, match="rows are"):
        scatter_rows(rows, targets, keys.double(), values, 0, 3, half)
