"""spill_evict_many: Triton vs reference over several sessions, and what it must leave behind."""

from __future__ import annotations

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels.notice import notice_reference
from tests.kernels.test_placement import Pages

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ring_case(rows: int, capacity: int, ring_start: int, ring: int, dim: int, upto: int, dtype, seed: int):
    """A working set whose ring holds the last `ring` tokens before `upto` (positions in
    their slots), a few retrieved slots filled below the ring, random K/V."""
    generator = torch.Generator().manual_seed(seed)
    slot_pos = torch.full((rows, capacity), -1, dtype=torch.int32)
    for position in range(max(0, upto - ring), upto):
        slot_pos[:, ring_start + position % ring] = position
    held = torch.randint(0, ring_start + 1, (rows,), generator=generator)
    for b in range(rows):
        slot_pos[b, : int(held[b])] = torch.arange(int(held[b]), dtype=torch.int32)
    keys = torch.randn(rows, capacity, dim, generator=generator).to(dtype)
    values = torch.randn(rows, capacity, dim, generator=generator).to(dtype)
    return slot_pos, keys, values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "dim", "ring", "spill", "evict", "sessions"),
    [(1, 8, 4, 1, 1, 1), (2, 16, 8, 3, 3, 3), (3, 24, 16, 16, 5, 2), (2, 64, 70, 70, 0, 4)],
)
def test_matches_reference_over_sessions(triton_device, dtype, heads, dim, ring, spill, evict, sessions) -> None:
    layers, ring_start, per_page = 2, 5, 7
    rows, capacity = layers * heads, ring_start + ring + 3
    pages = Pages(layers, heads, dim, per_page=per_page, pages=40, dtype=dtype, device=triton_device, seed=ring)
    order = torch.randperm(80, generator=torch.Generator().manual_seed(11))  # each session its own pages
    cases, spills, evictions = [], [], []
    for s in range(sessions):
        upto = ring + 9 + 4 * s
        cases.append((*ring_case(rows, capacity, ring_start, ring, dim, upto, dtype, seed=s),
                      order[20 * s : 20 * (s + 1)] * pages.page_numel))  # fmt: skip
        spills.append((upto - spill, upto))
        low = upto - ring  # the oldest ring tokens leave
        evictions.append((low, low + evict))

    def parts(device):
        return [(slot_pos.clone().to(device), keys.clone().to(device), values.clone().to(device), table.to(device),
                 torch.zeros((), dtype=torch.int64, device=device)) for slot_pos, keys, values, table in cases]  # fmt: skip

    got, want = parts(triton_device), parts(torch.device("cpu"))
    got_host, want_host = pages.copy_of(pages.host), pages.host.clone()
    got_sums = torch.full((sessions, rows, dim), 7.0, device=triton_device)
    want_sums = torch.zeros(sessions, rows, dim)
    K.spill_evict_many(got, spills, evictions, ring_start, ring, got_host, per_page, heads, sums=got_sums, impl="triton")
    notice_reference(want, spills, evictions, ring_start, ring, want_host, per_page, heads, want_sums)
    assert torch.equal(got_host.cpu(), want_host)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 1e-3)
    torch.testing.assert_close(got_sums.cpu(), want_sums, atol=atol, rtol=rtol)
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.cpu(), y)
    # what it must leave: the spilled tokens in the pages, the evicted slots empty, the counts
    pages.host = want_host
    for (_, keys, values, table), (start, end), (low, high), part in zip(cases, spills, evictions, want, strict=True):
        pages.page_base = table
        for b in range(rows):
            for position in range(start, end):
                slot = ring_start + position % ring
                assert torch.equal(pages.row(b, 0, position), keys[b, slot])
                assert torch.equal(pages.row(b, 1, position), values[b, slot])
        after = part[0]
        ring_after = after[:, ring_start : ring_start + ring]
        assert not ((ring_after >= low) & (ring_after < high)).any()
        assert int((ring_after >= 0).sum()) == rows * (ring - (high - low))  # the ring was full before
        assert int(part[4]) == int((after >= 0).sum(dim=1).max())


def test_without_sums_and_with_no_eviction(triton_device) -> None:
    """No sums asked, nothing evicted: only the spill and the counter."""
    pages = Pages(1, 2, 16, per_page=4, pages=8, dtype=torch.float32, device=triton_device, seed=1)
    slot_pos, keys, values = ring_case(2, 12, 2, 8, 16, 20, torch.float32, seed=0)
    part = (slot_pos.to(triton_device), keys.to(triton_device), values.to(triton_device),
            pages.page_base.to(triton_device), torch.full((), 3, dtype=torch.int64, device=triton_device))  # fmt: skip
    before = part[0].clone()
    K.spill_evict_many([part], [(16, 20)], [(0, 0)], 2, 8, pages.host, 4, 2)
    assert torch.equal(part[0], before)
    assert int(part[4]) == int((before >= 0).sum(dim=1).max())
    for position in range(16, 20):
        assert torch.equal(pages.row(1, 0, position).cpu(), keys[1, 2 + position % 8])


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_deferred_eviction_leaves_the_ring_slots(triton_device, impl) -> None:
    """clear=False (deferred eviction): the spill and the sums as with clear=True, the evicted
    ring slots keep their positions (the worker masks them), and the resident count leaves
    them out all the same (and the slots left in place by an earlier eviction)."""
    pages = Pages(1, 2, 16, per_page=4, pages=8, dtype=torch.float32, device=triton_device, seed=2)
    slot_pos, keys, values = ring_case(2, 14, 2, 8, 16, 20, torch.float32, seed=1)

    device = triton_device

    def run(clear: bool):
        part = (slot_pos.clone().to(device), keys.to(device), values.to(device), pages.page_base.to(device),
                torch.zeros((), dtype=torch.int64, device=device))  # fmt: skip
        host = pages.copy_of(pages.host)
        sums = torch.zeros(1, 2, 16, device=device)
        K.spill_evict_many([part], [(16, 20)], [(12, 15)], 2, 8, host, 4, 2, sums=sums, impl=impl, clear=clear)
        return part, host.cpu(), sums.cpu()

    (cleared, host_c, sums_c), (kept, host_k, sums_k) = run(True), run(False)
    assert torch.equal(host_c, host_k) and torch.equal(sums_c, sums_k)
    assert sums_k.abs().sum() > 0
    assert torch.equal(kept[0].cpu(), slot_pos)  # nothing emptied
    assert int(kept[4]) == int(cleared[4]) == int((cleared[0] >= 0).sum(dim=1).max())
    # A second notice: the slots evicted first still hold positions below its eviction.
    again = torch.zeros((), dtype=torch.int64, device=device)
    part = (kept[0], kept[1], kept[2], kept[3], again)
    K.spill_evict_many([part], [(20, 20)], [(15, 17)], 2, 8, pages.copy_of(pages.host), 4, 2, impl=impl, clear=False)
    ring = slot_pos[:, 2:10]
    assert int(again) == int(((slot_pos >= 0).sum(dim=1) - ((ring >= 0) & (ring < 17)).sum(dim=1)).max())


def test_arguments_are_checked(device) -> None:
    pages = Pages(1, 2, 8, per_page=4, pages=4, dtype=torch.float32, device=device, seed=0)
    slot_pos, keys, values = ring_case(2, 10, 2, 6, 8, 10, torch.float32, seed=0)
    part = (slot_pos.to(device), keys.to(device), values.to(device), pages.page_base.to(device),
            torch.zeros((), dtype=torch.int64, device=device))  # fmt: skip
    with pytest.raises(ValueError, match="parts: at least one"):
        K.spill_evict_many([], [], [], 2, 6, pages.host, 4, 2)
    with pytest.raises(ValueError, match="do not fit the ring of 6"):
        K.spill_evict_many([part], [(0, 7)], [(0, 0)], 2, 6, pages.host, 4, 2)
    with pytest.raises(ValueError, match="past the 16 positions"):
        K.spill_evict_many([part], [(14, 17)], [(0, 0)], 2, 6, pages.host, 4, 2)
    with pytest.raises(ValueError, match="pass capacity 10"):
        K.spill_evict_many([part], [(0, 1)], [(0, 0)], 5, 6, pages.host, 4, 2)
    with pytest.raises(ValueError, match="sums: "):
        K.spill_evict_many([part], [(0, 1)], [(0, 0)], 2, 6, pages.host, 4, 2, sums=torch.zeros(2, 2, 8, device=device))
    other = (part[0][:1].clone(), part[1][:1].clone(), part[2][:1].clone(), part[3], part[4])
    with pytest.raises(ValueError, match=r"parts\[1\].slot_pos"):
        K.spill_evict_many([part, other], [(0, 1)] * 2, [(0, 0)] * 2, 2, 6, pages.host, 4, 2)
