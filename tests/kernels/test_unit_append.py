"""append_units: the kernel writes the same bits as the reference, into several tables at once."""

from __future__ import annotations

import pytest
import torch

import kvrecall.kernels as K


def tables(count: int, rows: int, units: int, tokens: int, dim: int, dtype, device, seed: int):
    """`count` unit tables (separate allocations) with random contents."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sizes, position = (torch.randint(-5, 50, shape, generator=generator, dtype=torch.int32).to(device)
                           for shape in ((rows, units), (rows, tokens)))  # fmt: skip
        reps = torch.randn(rows, units, dim, generator=generator).to(dtype=dtype, device=device)
        valid = (torch.rand(rows, units, generator=generator) > 0.5).to(device)
        out.append((reps, sizes, valid, position))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim", "lengths"), [(1, 8, [1]), (3, 24, [5, 1, 17]), (2, 16, [1300, 2])])
def test_kernel_matches_reference(triton_device, dtype, rows, dim, lengths) -> None:
    count = len(lengths)
    units, tokens = 7, max(lengths) + 40
    base = tables(count, rows, units, tokens, dim, dtype, triton_device, seed=rows)
    reps = torch.randn(count, rows, dim, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=triton_device)
    columns = dict(unit_column=[(3 * s) % units for s in range(count)], token_column=[(11 * s) % 40 for s in range(count)],
                   starts=[100 * s + 4 for s in range(count)], lengths=lengths)  # fmt: skip
    got = [tuple(t.clone() for t in table) for table in base]
    want = [tuple(t.clone() for t in table) for table in base]
    K.append_units(got, reps, **columns, impl="triton")
    K.append_units(want, reps, **columns, impl="reference")
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    s = count - 1
    u, m, n = columns["unit_column"][s], columns["token_column"][s], lengths[s]
    assert torch.equal(want[s][0][:, u], reps[s]) and (want[s][1][:, u] == n).all() and want[s][2][:, u].all()
    starts = torch.arange(columns["starts"][s], columns["starts"][s] + n, dtype=torch.int32, device=triton_device)
    assert (want[s][3][:, m : m + n] == starts).all()
    assert torch.equal(want[s][3][:, :m], base[s][3][:, :m])  # nothing around the new candidates
    assert torch.equal(want[s][3][:, m + n :], base[s][3][:, m + n :])


def test_arguments_are_checked(device) -> None:
    one = tables(2, 2, 4, 10, 8, torch.float32, device, seed=0)
    reps = torch.zeros(2, 2, 8, device=device)
    args = dict(unit_column=[0, 1], token_column=[0, 2], starts=[0, 0], lengths=[3, 3])
    with pytest.raises(ValueError, match="token_column\\[1\\]: 9 candidates from 2"):
        K.append_units(one, reps, **{**args, "lengths": [3, 9]})
    with pytest.raises(ValueError, match="unit_column\\[0\\]: 4 is outside"):
        K.append_units(one, reps, **{**args, "unit_column": [4, 0]})
    with pytest.raises(ValueError, match="tables\\[1\\].sizes"):
        K.append_units([one[0], (one[1][0], one[1][1][:, :3].contiguous(), *one[1][2:])], reps, **args)
    with pytest.raises(ValueError, match="reps: "):
        K.append_units(one, reps[:1], **args)
    with pytest.raises(ValueError, match="lengths: 1 entries"):
        K.append_units(one, reps, **{**args, "lengths": [3]})
