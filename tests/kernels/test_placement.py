"""place_retrieved / spill_ring: Triton vs reference, and what a placement must leave behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvrecall.kernels as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Pages:
    """A host pool of `pages` pages [L, 2, H, P, D] at shuffled offsets (as a SequenceStore has)."""

    def __init__(
        self, layers: int, heads: int, dim: int, per_page: int, pages: int, dtype, device, seed: int
    ):
        generator = torch.Generator().manual_seed(seed)
        self.layers, self.heads, self.dim, self.per_page = layers, heads, dim, per_page
        self.page_numel = layers * 2 * heads * per_page * dim
        self.pinned = device.type == "cuda"  # on a GPU the kernels read (and write) it in place (UVA)
        self.host = self.copy_of(
            torch.randn((2 * pages + 1) * self.page_numel, generator=generator).to(dtype)
        )
        order = torch.randperm(2 * pages, generator=generator)[:pages]
        self.page_base = (order * self.page_numel).to(device)
        self.positions = pages * per_page

    def copy_of(self, host: torch.Tensor) -> torch.Tensor:
        return host.clone().pin_memory() if self.pinned else host.clone()

    def row(self, b: int, kv: int, position: int) -> torch.Tensor:
        layer, head = divmod(b, self.heads)
        page, in_page = divmod(position, self.per_page)
        start = (
            int(self.page_base[page])
            + (((layer * 2 + kv) * self.heads + head) * self.per_page + in_page) * self.dim
        )
        return self.host[start : start + self.dim]


def random_case(pages: Pages, capacity: int, first: int, retrieved: int, seed: int):
    """Current slots (some empty) and a selection keeping a random part of them, -1 padded
    anywhere, with a few positions past the pages (ignored)."""
    generator = torch.Generator().manual_seed(seed)
    rows = pages.layers * pages.heads
    slot_pos = torch.full((rows, capacity), -1, dtype=torch.int32)
    selection = torch.full((rows, retrieved), -1, dtype=torch.int64)

    def pick(n: int, low: int, high: int) -> torch.Tensor:
        return torch.randperm(high - low, generator=generator)[:n] + low

    for b in range(rows):
        pool = pick(2 * retrieved + 4, 0, pages.positions + 3)  # distinct; a few past the pages
        held = int(torch.randint(0, retrieved + 1, (1,), generator=generator))
        current = pick(held, 0, pages.positions)
        slot_pos[b, first + pick(held, 0, retrieved)] = current.int()
        kept = current[pick(int(torch.randint(0, held + 1, (1,), generator=generator)), 0, held)]
        fresh = pool[~torch.isin(pool, current)]
        fresh = fresh[: int(torch.randint(0, retrieved - len(kept) + 1, (1,), generator=generator))]
        chosen = torch.cat((kept, fresh))
        selection[b, pick(len(chosen), 0, retrieved)] = chosen
    return slot_pos, selection


def run(impl: str, pages: Pages, slot_pos, keys, values, selection, first: int, device):
    slot_pos, keys, values = (t.clone().to(device) for t in (slot_pos, keys, values))
    counts = K.place_retrieved(
        slot_pos,
        keys,
        values,
        selection.to(device),
        first,
        pages.host,
        pages.page_base.to(device),
        pages.per_page,
        pages.heads,
        impl=impl,
    )
    return slot_pos.cpu(), keys.cpu(), values.cpu(), counts.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("layers", "heads", "dim", "retrieved", "first", "window"),
    [(1, 1, 8, 1, 0, 0), (2, 3, 16, 7, 2, 4), (1, 2, 24, 33, 1, 5), (2, 2, 64, 64, 4, 8)],
)
def test_matches_reference(triton_device, dtype, layers, heads, dim, retrieved, first, window) -> None:
    pages = Pages(layers, heads, dim, per_page=5, pages=30, dtype=dtype, device=triton_device, seed=retrieved)
    capacity = first + retrieved + window
    slot_pos, selection = random_case(pages, capacity, first, retrieved, seed=dim)
    rows = layers * heads
    keys = torch.randn(rows, capacity, dim).to(dtype)
    values = torch.randn(rows, capacity, dim).to(dtype)
    got = run("triton", pages, slot_pos, keys, values, selection, first, triton_device)
    want = run("reference", pages, slot_pos, keys, values, selection, first, torch.device("cpu"))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def reads_by(monkeypatch, reads: str) -> None:
    """Force the placement's reads: "copy" (staged: the host gathers, the plan written to the
    host by its kernel), "copy-plan" (staged, the plan copied to the host after the kernel:
    plan_readback "copy"), or "kernel" (the
    placement kernel reads the pool itself)."""
    from kvrecall.kernels import placement_staged, placement_triton

    # On a CPU (Triton's interpreter) the pool is not pinned, so force the choice either way.
    monkeypatch.setattr(placement_triton, "staged", lambda host, keys, selection: reads != "kernel")
    monkeypatch.setattr(placement_staged, "_plan_readback", "copy" if reads == "copy-plan" else "mapped")


@pytest.mark.parametrize("reads", ["copy", "copy-plan", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "dim", "retrieved", "first"), [(1, 8, 1, 0), (3, 16, 7, 2), (2, 64, 64, 4)])
def test_copy_engine_reads_match_the_reference(triton_device, monkeypatch, reads, dtype, heads, dim, retrieved, first):
    """The placement whose kernel only plans and whose rows come by the host gather and one
    copy (placement_staged.py; on a GPU the default), its plan written to the host by the kernel
    or copied there, leaves what the reference leaves, as does the kernel reading the pool
    itself; one session alone and three in one launch."""
    reads_by(monkeypatch, reads)
    pages = Pages(2, heads, dim, per_page=5, pages=30, dtype=dtype, device=triton_device, seed=retrieved)
    capacity = first + retrieved + 6
    slot_pos, selection = random_case(pages, capacity, first, retrieved, seed=dim)
    keys, values = (torch.randn(2 * heads, capacity, dim).to(dtype) for _ in range(2))
    got = run("triton", pages, slot_pos, keys, values, selection, first, triton_device)
    want = run("reference", pages, slot_pos, keys, values, selection, first, torch.device("cpu"))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    parts, wants = [], []
    for seed in range(3):
        slot_pos, selection = random_case(pages, capacity, first, retrieved, seed=seed)
        keys, values = (torch.randn(2 * heads, capacity, dim).to(dtype) for _ in range(2))
        wants.append(run("reference", pages, slot_pos, keys, values, selection, first, torch.device("cpu")))
        resident = torch.zeros((), dtype=torch.int64, device=triton_device)
        parts.append((*(t.clone().to(triton_device) for t in (slot_pos, keys, values)),
                      pages.page_base.to(triton_device), resident, selection))  # fmt: skip
    selection = torch.cat([part[5] for part in parts]).to(triton_device)
    counts = K.place_retrieved_many([part[:5] for part in parts], selection, first, pages.host, pages.per_page,
                                    pages.heads, impl="triton")  # fmt: skip
    for part, want, count in zip(parts, wants, counts.view(3, 2 * heads, 2), strict=True):
        for a, b in zip((*part[:3], count), want, strict=True):
            assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_sessions_in_one_launch_match_each_alone(triton_device, impl, dtype) -> None:
    """place_retrieved_many over 3 sessions (their own working sets, page tables and resident
    counters; one host pool) leaves exactly what place_retrieved leaves session by session."""
    device = torch.device("cpu") if impl == "reference" else triton_device
    pages = Pages(2, 2, 16, per_page=4, pages=20, dtype=dtype, device=device, seed=3)
    first, retrieved, capacity, rows = 2, 9, 16, 4
    generator = torch.Generator().manual_seed(7)
    sessions = []
    for seed in range(3):
        slot_pos, selection = random_case(pages, capacity, first, retrieved, seed=seed)
        table = (torch.randperm(40, generator=generator)[:20] * pages.page_numel).to(device)
        kv = [torch.randn(rows, capacity, 16, generator=generator).to(dtype) for _ in range(2)]
        sessions.append((slot_pos, *kv, table, selection))

    def working(session):
        slot_pos, keys, values, table, _ = session
        resident = torch.zeros((), dtype=torch.int64, device=device)
        return slot_pos.clone().to(device), keys.clone().to(device), values.clone().to(device), table, resident

    together = [working(session) for session in sessions]
    selection = torch.cat([session[-1] for session in sessions]).to(device)
    counts = K.place_retrieved_many(together, selection, first, pages.host, pages.per_page, pages.heads, impl=impl)
    for part, session, got in zip(together, sessions, counts.view(3, rows, 2), strict=True):
        alone = working(session)
        want = K.place_retrieved(*alone[:3], session[-1].to(device), first, pages.host, alone[3], pages.per_page,
                                 pages.heads, resident_max=alone[4], impl=impl)  # fmt: skip
        assert torch.equal(got, want)
        for a, b in zip(part, alone, strict=True):
            assert torch.equal(a, b)
        assert int(part[4]) > 0


def mostly_shared_case(rows: int, capacity: int, first: int, retrieved: int, positions: int, generator):
    """Rows whose selection keeps all but b + 1 of their retrieved tokens (row b), in another
    order, plus two entries just past the session's `positions` (ignored), and one current
    slot at `positions` (a stale token: never kept; further past, the reference's row keys
    would collide)."""
    slot_pos = torch.full((rows, capacity), -1, dtype=torch.int32)
    selection = torch.full((rows, retrieved), -1, dtype=torch.int64)
    for b in range(rows):
        order = torch.randperm(positions, generator=generator)
        held = order[: retrieved - 4]
        slots = first + torch.randperm(retrieved, generator=generator)
        slot_pos[b, slots[: len(held)]] = held.int()
        slot_pos[b, slots[len(held)]] = positions
        fresh = order[len(held) : len(held) + b + 1]
        chosen = torch.cat((held[b + 1 :], fresh, positions + 1 + torch.arange(2)))
        selection[b, torch.randperm(retrieved, generator=generator)[: len(chosen)]] = chosen
    return slot_pos, selection


@pytest.mark.parametrize("reads", ["copy", "copy-plan", "kernel"])
def test_many_sessions_of_unlike_lengths_match_the_reference(triton_device, monkeypatch, reads) -> None:
    """One launch over sessions of 35, 65 and 100 positions (7, 13, 20 pages of 5 tokens: no
    multiple of 16 or 32, so the membership marks end mid-word and the launch sizes them for the
    longest) whose rows keep most of their tokens: selections naming positions past their own
    session's pages but inside the longest one's are ignored, current slots past them are freed,
    and every session ends as the reference leaves it alone."""
    reads_by(monkeypatch, reads)
    pages = Pages(2, 2, 8, per_page=5, pages=20, dtype=torch.float32, device=triton_device, seed=11)
    first, retrieved, capacity, rows = 1, 24, 30, 4
    generator = torch.Generator().manual_seed(0)
    parts, wants, selections = [], [], []
    for length in (7, 13, 20):
        slot_pos, selection = mostly_shared_case(rows, capacity, first, retrieved, length * 5, generator)
        keys, values = (torch.randn(rows, capacity, 8, generator=generator) for _ in range(2))
        table = pages.page_base[:length]
        want = [t.clone() for t in (slot_pos, keys, values)]
        resident = torch.zeros((), dtype=torch.int64)
        counts = K.place_retrieved(*want, selection, first, pages.host, table.cpu(), 5, 2, resident_max=resident,
                                   impl="reference")  # fmt: skip
        wants.append((*want, table, resident, counts))
        resident = torch.zeros((), dtype=torch.int64, device=triton_device)
        parts.append((*(t.to(triton_device) for t in (slot_pos, keys, values)), table, resident))
        selections.append(selection)
    counts = K.place_retrieved_many(parts, torch.cat(selections).to(triton_device), first, pages.host, 5, 2,
                                    impl="triton")  # fmt: skip
    for part, want, got in zip(parts, wants, counts.view(3, rows, 2), strict=True):
        for a, b in zip((*part, got), want, strict=True):
            assert torch.equal(a.cpu(), b.cpu())
    assert counts[:, 1].tolist() == [b + 1 for _ in range(3) for b in range(rows)]  # only the fresh tokens moved


def test_many_sessions_of_unlike_shapes_are_refused(device) -> None:
    pages = Pages(1, 2, 8, per_page=4, pages=4, dtype=torch.float32, device=device, seed=0)

    def session(capacity: int) -> tuple[torch.Tensor, ...]:
        return (torch.full((2, capacity), -1, dtype=torch.int32, device=device),
                torch.zeros(2, capacity, 8, device=device), torch.zeros(2, capacity, 8, device=device),
                pages.page_base, torch.zeros((), dtype=torch.int64, device=device))  # fmt: skip

    part, other = session(6), session(7)
    selection = torch.full((4, 3), -1, device=device)
    with pytest.raises(ValueError, match=r"parts\[1\].slot_pos"):
        K.place_retrieved_many([part, other], selection, 1, pages.host, 4, 2)
    with pytest.raises(ValueError, match="selection: .*S \\* B"):
        K.place_retrieved_many([part], selection, 1, pages.host, 4, 2)
    with pytest.raises(ValueError, match=r"parts\[0\]: resident_max"):
        K.place_retrieved_many([part[:4] + (None,)], selection[:2], 1, pages.host, 4, 2)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_placement_keeps_residents_and_gathers_the_rest(triton_device, impl) -> None:
    device = torch.device("cpu") if impl == "reference" else triton_device
    pages = Pages(2, 2, 8, per_page=4, pages=20, dtype=torch.float32, device=device, seed=1)
    first, retrieved, capacity = 3, 12, 20
    slot_pos, selection = random_case(pages, capacity, first, retrieved, seed=5)
    keys, values = torch.randn(4, capacity, 8), torch.randn(4, capacity, 8)
    new_pos, new_keys, new_values, counts = run(impl, pages, slot_pos, keys, values, selection, first, device)
    valid = (selection >= 0) & (selection < pages.positions)
    assert counts[:, 0].tolist() == valid.sum(dim=1).tolist()
    outside = torch.ones(capacity, dtype=torch.bool)
    outside[first : first + retrieved] = False
    assert torch.equal(new_pos[:, outside], slot_pos[:, outside])  # sinks and window untouched
    for b in range(4):
        region = new_pos[b, first : first + retrieved]
        assert sorted(region[region >= 0].tolist()) == sorted(selection[b][valid[b]].tolist())
        gathered = 0
        for slot in range(first, first + retrieved):
            position = int(new_pos[b, slot])
            if position >= 0 and position == int(slot_pos[b, slot]):
                assert torch.equal(new_keys[b, slot], keys[b, slot])  # kept in place, not copied
            elif position >= 0:
                gathered += 1
                assert torch.equal(new_keys[b, slot], pages.row(b, 0, position))
                assert torch.equal(new_values[b, slot], pages.row(b, 1, position))
        assert counts[b, 1] == gathered


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_resident_max_counts_whole_rows(triton_device, impl) -> None:
    device = torch.device("cpu") if impl == "reference" else triton_device
    pages = Pages(1, 2, 4, per_page=4, pages=8, dtype=torch.float32, device=device, seed=6)
    # row 0: sink 0 + window 6, 7 filled; row 1: nothing outside the region [1, 5)
    slot_pos = torch.tensor([[0, 9, -1, -1, -1, -1, 30, 31], [-1] * 8], dtype=torch.int32, device=device)
    keys = torch.zeros(2, 8, 4, device=device)
    selection = torch.tensor([[9, 1, -1, -1], [2, 3, 4, 5]], device=device)
    resident = torch.tensor(5, device=device)  # a larger earlier maximum stays
    place = dict(host=pages.host, page_base=pages.page_base.to(device), tokens_per_page=4, num_kv_heads=2)
    K.place_retrieved(slot_pos, keys, keys.clone(), selection, 1, resident_max=resident, impl=impl, **place)
    assert int(resident) == 5
    selection = torch.tensor([[9, 1, 2, 3], [2, 3, 4, 5]], device=device)
    K.place_retrieved(slot_pos, keys, keys.clone(), selection, 1, resident_max=resident, impl=impl, **place)
    assert int(resident) == 7  # row 0: 1 sink + 4 retrieved + 2 window


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_same_selection_moves_nothing(triton_device, impl) -> None:
    device = torch.device("cpu") if impl == "reference" else triton_device
    pages = Pages(1, 2, 8, per_page=4, pages=8, dtype=torch.float32, device=device, seed=2)
    slot_pos = torch.tensor([[7, -1, 3, 20, -1], [-1, -1, -1, -1, -1]], dtype=torch.int32)
    keys, values = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    selection = torch.tensor([[20, 3, 7, -1, -1], [-1, -1, -1, -1, -1]])  # another order: still resident
    new_pos, new_keys, _, counts = run(impl, pages, slot_pos, keys, values, selection, 0, device)
    assert torch.equal(new_pos, slot_pos) and torch.equal(new_keys, keys)
    assert counts.tolist() == [[3, 0], [0, 0]]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_kth_new_token_takes_the_kth_free_slot(triton_device, impl) -> None:
    device = torch.device("cpu") if impl == "reference" else triton_device
    pages = Pages(1, 1, 4, per_page=4, pages=8, dtype=torch.float32, device=device, seed=3)
    slot_pos = torch.tensor([[9, 1, -1, 5, 2, 30]], dtype=torch.int32)  # slot 0: a sink
    selection = torch.tensor([[-1, 11, 5, 4, -1]])  # keeps 5; 11 and 4 are new
    new_pos, *_, counts = run(
        impl, pages, slot_pos, torch.zeros(1, 6, 4), torch.zeros(1, 6, 4), selection, 1, device
    )
    assert new_pos.tolist() == [[9, 11, 4, 5, -1, -1]]
    assert counts.tolist() == [[3, 2]]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_a_current_slot_past_the_pages_is_freed_and_leaves_other_rows_alone(triton_device, impl) -> None:
    """Row 0 holds position 40 of 32 (2 words of marks a row: its mark would fall on row 1's
    position 8, which row 1 selects); it is freed, and row 1's 8 is still new."""
    device = torch.device("cpu") if impl == "reference" else triton_device
    pages = Pages(1, 2, 4, per_page=4, pages=8, dtype=torch.float32, device=device, seed=7)
    slot_pos = torch.tensor([[40, 3, -1], [-1, -1, -1]], dtype=torch.int32)
    selection = torch.tensor([[3, -1, -1], [8, 2, -1]])
    new_pos, *_, counts = run(impl, pages, slot_pos, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), selection, 0, device)
    assert new_pos.tolist() == [[-1, 3, -1], [8, 2, -1]]
    assert counts.tolist() == [[1, 0], [2, 2]]


def test_empty_rows_and_region(device) -> None:
    pages = Pages(1, 1, 4, per_page=4, pages=2, dtype=torch.float32, device=device, seed=4)
    slot_pos = torch.full((1, 3), -1, dtype=torch.int32, device=device)
    keys = torch.zeros(1, 3, 4, device=device)
    counts = K.place_retrieved(
        slot_pos,
        keys,
        keys.clone(),
        torch.empty(1, 0, dtype=torch.int64, device=device),
        1,
        pages.host,
        pages.page_base,
        4,
        1,
    )
    assert counts.tolist() == [[0, 0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("start", "end"), [(0, 1), (3, 11), (13, 21), (5, 5)])
def test_spill_matches_reference_and_lands_in_pages(triton_device, dtype, start, end) -> None:
    pages = Pages(2, 3, 16, per_page=3, pages=10, dtype=dtype, device=triton_device, seed=end)
    rows, ring_start, ring = 6, 4, 8
    keys = torch.randn(rows, ring_start + ring + 2, 16).to(dtype)
    values = torch.randn(rows, ring_start + ring + 2, 16).to(dtype)
    got, want = pages.copy_of(pages.host), pages.host.clone()
    K.spill_ring(
        keys.to(triton_device),
        values.to(triton_device),
        start,
        end,
        ring_start,
        ring,
        got,
        pages.page_base,
        3,
        3,
        impl="triton",
    )
    K.spill_ring(
        keys, values, start, end, ring_start, ring, want, pages.page_base.cpu(), 3, 3, impl="reference"
    )
    assert torch.equal(got, want)
    pages.host = want
    for b in range(rows):
        for position in range(start, end):
            slot = ring_start + position % ring
            assert torch.equal(pages.row(b, 0, position), keys[b, slot])
            assert torch.equal(pages.row(b, 1, position), values[b, slot])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layers", "first_layer", "start", "n"), [(1, 0, 0, 1), (1, 1, 2, 13), (2, 0, 5, 25), (1, 2, 0, 30)])
def test_store_tokens_matches_reference_and_lands_in_pages(triton_device, dtype, layers, first_layer, start, n) -> None:
    pages = Pages(3, 2, 16, per_page=3, pages=11, dtype=dtype, device=triton_device, seed=n)
    kv = torch.randn(layers, 2, 2, n + 4, 16).to(dtype)[:, :, :, 2 : 2 + n]  # strided in tokens, as a slice is
    got, want = pages.copy_of(pages.host), pages.host.clone()
    K.store_tokens(kv.to(triton_device), start, first_layer, got, pages.page_base, 3, impl="triton")
    K.store_tokens(kv, start, first_layer, want, pages.page_base.cpu(), 3, impl="reference")
    assert torch.equal(got.cpu(), want)
    before = pages.host.clone()
    pages.host = want
    written = set()
    for layer in range(layers):
        for head in range(2):
            b = (first_layer + layer) * 2 + head
            for i in range(n):
                for index in range(2):
                    assert torch.equal(pages.row(b, index, start + i), kv[layer, index, head, i])
                    offset = pages.row(b, index, start + i).data_ptr() - want.data_ptr()
                    written.add(offset // want.element_size())
    untouched = torch.ones(want.numel(), dtype=torch.bool)
    for offset in written:
        untouched[offset : offset + 16] = False
    assert torch.equal(want[untouched], before.cpu()[untouched])  # nothing else moved


def test_arguments_are_checked(device) -> None:
    pages = Pages(1, 2, 4, per_page=4, pages=2, dtype=torch.float32, device=device, seed=5)
    slot_pos = torch.full((2, 6), -1, dtype=torch.int32, device=device)
    keys = torch.zeros(2, 6, 4, device=device)
    selection = torch.full((2, 4), -1, dtype=torch.int64, device=device)

    def place(**change):
        args = dict(
            slot_pos=slot_pos,
            keys=keys,
            values=keys.clone(),
            selection=selection,
            first_slot=1,
            host=pages.host,
            page_base=pages.page_base,
            tokens_per_page=4,
            num_kv_heads=2,
        )
        args.update(change)
        return K.place_retrieved(**args)

    with pytest.raises(ValueError, match="selection: 4 slots from first_slot=3"):
        place(first_slot=3)
    with pytest.raises(ValueError, match="slot_pos: dtype int64"):
        place(slot_pos=slot_pos.long())
    with pytest.raises(ValueError, match="host: dtype"):
        place(host=pages.host.half())
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        place(num_kv_heads=3)
    with pytest.raises(ValueError, match="end: 9 is past the 8 positions"):
        K.spill_ring(keys, keys.clone(), 4, 9, 0, 6, pages.host, pages.page_base, 4, 2)
    kv = torch.zeros(1, 2, 2, 5, 4, device=device)
    with pytest.raises(ValueError, match="kv: tokens up to 9 pass the 8 positions"):
        K.store_tokens(kv, 4, 0, pages.host, pages.page_base, 4)
    with pytest.raises(ValueError, match="kv: shape"):
        K.store_tokens(torch.zeros(1, 3, 2, 5, 4, device=device), 0, 0, pages.host, pages.page_base, 4)
    with pytest.raises(ValueError, match="host: dtype"):
        K.store_tokens(kv, 0, 0, pages.host.half(), pages.page_base, 4)


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvrecall.kernels import expand_triton as expand, notice_triton as notice, placement_triton as placement
from kvrecall.kernels import budget_triton as budget, unit_append_triton as unit_append

INDEX = {name: "i32" for name in ("R", "C", "first_slot", "sel_stride", "num_positions", "mark_words",
         "tokens_per_page", "num_kv_heads", "rows_per_session", "rows", "U", "start", "n", "ring_start", "ring_size",
         "M", "P", "width", "steps", "pin_steps", "stride_s", "stride_t", "stride_u", "stride_r", "stride_p", "first_row", "stride_l", "stride_kv",
         "stride_h", "split", "stride_q", "budget", "stride_sb", "stride_zb")}
KERNELS = [
    (placement._place_kernel, "*i32 *i16 *i16 *i64 *i16 *i64 *i64 *i32 *i32 *i64 *i32",
     dict(D=128, BLOCK_R=1024, ROWS=32, BLOCK_D=128, TRACK_RESIDENT=True, MANY=False, COPY=False)),
    (placement._place_kernel, "*i32 *i16 *i16 *i64 *i16 *i64 *i64 *i32 *i32 *i32 *i32",
     dict(D=64, BLOCK_R=16, ROWS=64, BLOCK_D=64, TRACK_RESIDENT=False, MANY=False, COPY=True)),
    (placement._place_kernel, "*i32 *i16 *i16 *i64 *i16 *i64 *i64 *i32 *i32 *i64 *i64",
     dict(D=128, BLOCK_R=1024, ROWS=32, BLOCK_D=128, TRACK_RESIDENT=True, MANY=True, COPY=False)),
    (placement._spill_kernel, "*i16 *i16 *i16 *i64", dict(D=128, ROWS=32, BLOCK_D=128)),
    (placement._store_kernel, "*i16 *i16 *i64", dict(D=128, ROWS=32, BLOCK_D=128)),
    (expand._expand_kernel, "*i64 *i64 *i32 *i64 *i64", dict(BLOCK=1024)),
    (expand._expand_grouped_kernel, "*i64 *i32 *i32 *i32 *i64 *i64 *i64 *i64 *i32",
     dict(BLOCK_U=1024, BLOCK_W=1024, PINNED=False, TAIL=False)),
    (expand._expand_grouped_kernel, "*i64 *i32 *i32 *i32 *i64 *fp32 *i64 *i64 *i32",
     dict(BLOCK_U=1024, BLOCK_W=1024, PINNED=True, TAIL=False)),
    (expand._expand_grouped_kernel, "*i64 *i32 *i32 *i32 *i64 *fp32 *i64 *i64 *i32",  # a shared prefix's table
     dict(BLOCK_U=1024, BLOCK_W=1024, PINNED=True, TAIL=True)),
    (unit_append._append_kernel, "*i16 *i32 *i8 *i32 *i16 *i64", dict(D=128, BLOCK_D=128, BLOCK_M=64)),
    (notice._notice_kernel, "*i32 *bf16 *bf16 *bf16 *i64 *i64 *fp32 *i64",
     dict(D=128, ROWS=32, BLOCK_D=128, BLOCK_W=64, BLOCK_C=1024, SUMS=True, CLEAR=True)),
    (notice._notice_kernel, "*i32 *bf16 *bf16 *bf16 *i64 *i64 *fp32 *i64",  # deferred eviction
     dict(D=128, ROWS=32, BLOCK_D=128, BLOCK_W=64, BLOCK_C=1024, SUMS=False, CLEAR=False)),
    (budget._select_kernel, "*fp32 *i32 *i64", dict(BLOCK_U=4096)),
    (budget._select_chunked_kernel, "*fp32 *i32 *i64", dict(CHUNK=4096, LOG_WAYS=1)),  # rows past 4,096 units
    (budget._select_chunked_kernel, "*fp32 *i32 *i64", dict(CHUNK=256, LOG_WAYS=4)),
]
for kernel, pointers, constexprs in KERNELS:
    names = kernel.arg_names
    signature = dict(zip(names, pointers.split()))
    signature.update({name: INDEX[name] for name in names if name not in signature and name not in constexprs})
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    print("compiled", names[0])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run compiles them natively")
def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    """The interpreter runs what the compiler may refuse: build every kernel here for sm_90."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("compiled") == 15


def staged_diagnostics(monkeypatch):
    """placement_staged, its placements staged and its diagnostics off (restored after the test)."""
    from kvrecall.kernels import placement_staged, placement_triton

    monkeypatch.setattr(placement_triton, "staged", lambda host, keys, selection: True)
    for name in ("_skip_index_copies", "_skip_uploads", "_skip_plan_sync", "_plan_readback", "_skip_transfers",
                 "_index_scratch"):  # fmt: skip
        monkeypatch.setattr(placement_staged, name, False)
    monkeypatch.setattr(placement_staged, "_index_share", 1.0)
    monkeypatch.setattr(placement_staged, "_index_defer", False)
    monkeypatch.setattr(placement_staged, "_DEFERRED", [])
    return placement_staged


def placed_both_ways(device):
    """One staged placement by the kernels on `device` and by the reference -> (keys, values as
    before, the kernels' (slot_pos, keys, values), the reference's, the (row, slot) pairs the
    reference wrote); the slot positions checked equal."""
    pages = Pages(2, 2, 16, per_page=5, pages=30, dtype=torch.float32, device=device, seed=5)
    capacity = 2 + 9 + 6
    slot_pos, selection = random_case(pages, capacity, 2, 9, seed=16)
    keys, values = (torch.randn(4, capacity, 16) for _ in range(2))
    got = run("triton", pages, slot_pos, keys, values, selection, 2, device)
    want = run("reference", pages, slot_pos, keys, values, selection, 2, torch.device("cpu"))
    assert torch.equal(got[0], want[0]), "slot positions as placed"
    moved = (want[1] != keys).any(dim=-1)
    assert moved.any(), "the reference moved no row: the test tells nothing"
    return keys, values, got, want, moved


@pytest.mark.parametrize("dry", ["index-copies", "uploads", "plan-sync", "transfers", "index-scratch"])
def test_dry_index_copies_leave_the_rows_and_move_the_positions(triton_device, monkeypatch, dry):
    """The daemon's dry_index_copies, dry_uploads, dry_plan_sync, dry_transfers and
    dry_index_scratch diagnostics: a staged placement writes its slot positions as the reference
    does but never its rows (with dry_transfers, zeros where the rows would go; with
    dry_index_scratch the rows into a stand-in of the working set; else the working set's K/V keep
    every byte); with dry_uploads and dry_transfers the rows are not even gathered, with
    dry_plan_sync the plan is not even read back."""
    placement_staged = staged_diagnostics(monkeypatch)
    placement_staged.configure(dry == "index-copies", dry == "uploads", dry == "plan-sync",
                               dry_transfers=dry == "transfers", dry_index_scratch=dry == "index-scratch")  # fmt: skip
    gathered, plans = [], []
    upload = placement_staged.gather_upload
    monkeypatch.setattr(placement_staged, "gather_upload",
                        lambda *args: gathered.append(args) or (dry == "index-scratch" and upload(*args)))  # fmt: skip
    take = placement_staged._PLANS.take
    monkeypatch.setattr(placement_staged._PLANS, "take", lambda *args: plans.append(args) or take(*args))
    keys, values, got, want, moved = placed_both_ways(triton_device)
    if dry == "transfers":
        for got_kv, kv in ((got[1], keys), (got[2], values)):
            assert torch.equal(got_kv[moved], torch.zeros_like(got_kv[moved])), "zeros where the rows go"
            assert torch.equal(got_kv[~moved], kv[~moved]), "the other rows untouched"
    else:
        assert torch.equal(got[1], keys) and torch.equal(got[2], values), "rows written"
    if dry == "index-scratch":  # the rows went to the stand-in, where the reference put them in the working set
        ((scratch_keys, scratch_values),) = placement_staged._SCRATCH.values()  # (the rows' bits, as integers)
        for scratch, kv in ((scratch_keys, want[1]), (scratch_values, want[2])):
            assert torch.equal(scratch.cpu().view(kv.dtype)[moved], kv[moved])
    assert len(gathered) == (dry in ("index-copies", "index-scratch")), "rows gathered" if gathered else "no rows gathered"
    assert len(plans) == (dry != "plan-sync"), "the plan read back" if plans else "the plan not read back"


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_dry_index_share_copies_that_share_of_the_rows(triton_device, monkeypatch, share):
    """The daemon's dry_index_share diagnostic: a staged placement index-copies only that share of
    its rows into their slots (at least one: at 0 the launches alone), each where the reference
    puts it; the other rows never arrive; the slot positions are placed as always."""
    placement_staged = staged_diagnostics(monkeypatch)
    placement_staged.configure(False, dry_index_share=share)
    keys, values, got, want, moved = placed_both_ways(triton_device)
    written = (got[1] != keys).any(dim=-1)
    assert int(written.sum()) == max(1, round(share * int(moved.sum())))
    assert not (written & ~moved).any(), "a row written where the reference writes none"
    for got_kv, want_kv, kv in ((got[1], want[1], keys), (got[2], want[2], values)):
        assert torch.equal(got_kv[written], want_kv[written]) and torch.equal(got_kv[~written], kv[~written])
    with pytest.raises(ValueError, match="dry_index_share"):
        placement_staged.configure(False, dry_index_share=1.5)


def test_dry_index_defer_copies_the_rows_at_the_next_placement(triton_device, monkeypatch):
    """The daemon's dry_index_defer diagnostic: a staged placement leaves its rows out of the
    working set and its index copies pending; the next staged placement launches them first,
    and then every row is where the reference puts it."""
    placement_staged = staged_diagnostics(monkeypatch)
    placement_staged.configure(False, dry_index_defer=True)
    keys, values, got, want, moved = placed_both_ways(triton_device)
    assert torch.equal(got[1], keys) and torch.equal(got[2], values), "no row written by the call itself"
    ((_, copies),) = placement_staged._DEFERRED
    placement_staged._flush_deferred(torch.device(triton_device))
    assert placement_staged._DEFERRED == []
    for (into, _, _), want_kv in zip(copies, want[1:3], strict=True):
        assert torch.equal(into.cpu().view(want_kv.dtype).view(want_kv.shape), want_kv), "rows as the reference"
    placement_staged.configure(True, dry_index_defer=True)
    assert not placement_staged._index_defer, "nothing to defer when the index copies are dry"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_worker_copies_stage_the_rows_that_fit_and_apply_to_the_reference(triton_device, monkeypatch, dtype):
    """Worker copies (placement_staged.worker_copies): of three sessions placed in one launch, the
    first has a staging area its new rows fit in, the second one too small for them, the third
    none. The first's K / V rows are untouched by the placement and its staging area holds them
    with their targets, so apply_staged (the worker's half) leaves what the reference leaves; the
    second and third are placed by the daemon's own copies; every slot position as placed."""
    from kvrecall.kernels import placement_staged, placement_triton
    from kvrecall.kernels.placement_staged import Staging, apply_staged, worker_copies

    monkeypatch.setattr(placement_triton, "staged", lambda host, keys, selection: True)
    heads, dim, first, retrieved = 2, 16, 2, 9
    pages = Pages(2, heads, dim, per_page=5, pages=30, dtype=dtype, device=triton_device, seed=21)
    capacity = first + retrieved + 6
    parts, wants, befores = [], [], []
    for seed in range(3):
        slot_pos, selection = random_case(pages, capacity, first, retrieved, seed=40 + seed)
        keys, values = (torch.randn(2 * heads, capacity, dim).to(dtype) for _ in range(2))
        wants.append(run("reference", pages, slot_pos, keys, values, selection, first, torch.device("cpu")))
        befores.append((keys, values))
        resident = torch.zeros((), dtype=torch.int64, device=triton_device)
        parts.append((*(t.clone().to(triton_device) for t in (slot_pos, keys, values)),
                      pages.page_base.to(triton_device), resident, selection))  # fmt: skip
    new_rows = [int(want[3][:, 1].sum()) for want in wants]
    assert min(new_rows[:2]) > 1, "the case moves too few rows to tell anything"

    def staging(rows: int) -> Staging:
        return Staging(torch.zeros(rows, dim, dtype=dtype, device=triton_device),
                       torch.zeros(rows, dim, dtype=dtype, device=triton_device),
                       torch.full((rows,), -1, dtype=torch.int64, device=triton_device))  # fmt: skip

    fits, short = staging(new_rows[0] + 3), staging(new_rows[1] - 1)
    selection = torch.cat([part[5] for part in parts]).to(triton_device)
    with worker_copies({parts[0][1].data_ptr(): fits, parts[1][1].data_ptr(): short}):
        K.place_retrieved_many([part[:5] for part in parts], selection, first, pages.host, pages.per_page,
                               pages.heads, impl="triton")  # fmt: skip
    assert (fits.rows, short.rows) == (new_rows[0], 0)
    assert getattr(placement_staged._scope, "stagings", None) is None, "the scope outlived its block"
    staged_part, want = parts[0], wants[0]
    assert torch.equal(staged_part[0].cpu(), want[0]), "slot positions placed by the daemon"
    assert torch.equal(staged_part[1].cpu(), befores[0][0]) and torch.equal(staged_part[2].cpu(), befores[0][1])
    apply_staged(staged_part[1], staged_part[2], fits, fits.rows)
    for s, (part, want) in enumerate(zip(parts, wants, strict=True)):
        for name, got, expected in zip(("slot_pos", "keys", "values"), part[:3], want[:3], strict=True):
            assert torch.equal(got.cpu(), expected), f"session {s}: {name}"
    with pytest.raises(ValueError, match="rows"):
        apply_staged(staged_part[1], staged_part[2], fits, fits.capacity + 1)


def test_segment_layout_places_the_staging_area_after_the_working_set() -> None:
    """A plan with_staging(share) adds K / V rows and int64 targets for ceil(share x retrieved)
    slots per (layer, KV head), aligned and after the four working-set tensors; share 0 adds
    nothing and keeps the segment's size."""
    from kvrecall.server.layout import ModelLayout, SegmentLayout, WorkingSetPlan, staging_rows

    layout = ModelLayout(num_layers=3, num_kv_heads=2, num_query_heads=4, head_dim=24, dtype=torch.bfloat16,
                         max_tokens=4096)  # fmt: skip
    plan = WorkingSetPlan(n_sink=4, retrieved=100, window=32, spill_every=16)
    plain, staged = SegmentLayout.of(layout, plan), SegmentLayout.of(layout, plan.with_staging(0.25))
    assert plan.with_staging(0.0) == plan and SegmentLayout.of(layout, plan.with_staging(0.0)) == plain
    assert plan.with_staging(0.25).staged == 25 and plan.with_staging(0.251).staged == 26
    rows = staging_rows(layout, plan.with_staging(0.25))
    assert rows == 3 * 2 * 25
    ends = [
        (staged.staged_keys_offset, rows * 24 * 2), (staged.staged_values_offset, rows * 24 * 2),
        (staged.staged_targets_offset, rows * 8),
    ]  # fmt: skip
    assert staged.staged_keys_offset >= plain.nbytes - 256
    cursor = staged.query_offset
    for offset, size in ends:
        assert offset % 256 == 0 and offset > cursor
        cursor = offset + size
    assert staged.nbytes >= cursor and staged.keys_offset == plain.keys_offset


@pytest.mark.parametrize(("impl", "reads"), [("reference", "kernel"), ("triton", "kernel"), ("triton", "copy")])
def test_on_counts_sees_the_counts_once_before_the_staged_gather(triton_device, monkeypatch, impl, reads):
    """place_retrieved / place_retrieved_many hand their counts to on_counts exactly once, the
    counts they return; a staged placement (reads "copy") before its host gather (after the
    plan's sync), so the totals the daemon computes from them join the placement's launches."""
    from kvrecall.kernels import placement_staged, placement_triton

    monkeypatch.setattr(placement_triton, "staged", lambda host, keys, selection: reads == "copy")
    device = torch.device("cpu") if impl == "reference" else triton_device
    events: list[str] = []
    gather = torch.index_select

    def watched(*args, **kwargs):
        events.append("gather")
        return gather(*args, **kwargs)

    monkeypatch.setattr(placement_staged.torch, "index_select", watched)
    pages = Pages(2, 2, 16, per_page=5, pages=30, dtype=torch.float32, device=device, seed=8)
    capacity = 2 + 9 + 6
    parts, selections = [], []
    for seed in range(2):
        slot_pos, selection = random_case(pages, capacity, 2, 9, seed=60 + seed)
        keys, values = (torch.randn(4, capacity, 16) for _ in range(2))
        resident = torch.zeros((), dtype=torch.int64, device=device)
        parts.append((slot_pos.to(device), keys.to(device), values.to(device), pages.page_base.to(device), resident))
        selections.append(selection.to(device))
    seen: list[torch.Tensor] = []

    def on_counts(counts):
        events.append("counts")
        seen.append(counts.clone())

    alone = K.place_retrieved(*parts[0][:3], selections[0], 2, pages.host, parts[0][3], pages.per_page, pages.heads,
                              resident_max=parts[0][4], impl=impl, on_counts=on_counts)  # fmt: skip
    assert len(seen) == 1 and torch.equal(seen[0], alone)
    together = K.place_retrieved_many(parts, torch.cat(selections), 2, pages.host, pages.per_page, pages.heads,
                                      impl=impl, on_counts=on_counts)  # fmt: skip
    assert len(seen) == 2 and torch.equal(seen[1], together)
    if reads == "copy":  # each call: its counts, then its gather
        second = events.index("counts", 1)
        assert events[0] == "counts" and events[1] == "gather" and events[second + 1] == "gather", events
    assert int(alone[:, 1].sum()) > 0, "nothing gathered: the test tells nothing"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_staged_reference_applied_equals_the_reference_and_falls_back_when_short(seed) -> None:
    """place_staged_reference (worker copies on a CPU daemon): slot positions as the reference
    places them, keys and values untouched, the new rows staged; applied by apply_staged they
    give the reference's working set. A staging area one row short writes them in place."""
    from kvrecall.kernels import reference
    from kvrecall.kernels.placement_staged import Staging, apply_staged, place_staged_reference

    pages = Pages(2, 2, 16, per_page=5, pages=30, dtype=torch.float32, device=torch.device("cpu"), seed=30 + seed)
    capacity = 2 + 9 + 6
    slot_pos, selection = random_case(pages, capacity, 2, 9, seed=70 + seed)
    keys, values = (torch.randn(4, capacity, 16) for _ in range(2))
    want = [t.clone() for t in (slot_pos, keys, values)]
    want_counts = reference.place_retrieved(*want, selection, 2, pages.host, pages.page_base, pages.per_page, 2)
    new = int(want_counts[:, 1].sum())
    assert new > 0, "nothing new: the test tells nothing"
    for rows, fits in ((4 * 9, True), (new - 1, False)):
        got = [t.clone() for t in (slot_pos, keys, values)]
        staging = Staging(torch.zeros(rows, 16), torch.zeros(rows, 16), torch.zeros(rows, dtype=torch.int64))
        counts = place_staged_reference(*got, selection, 2, pages.host, pages.page_base, pages.per_page, 2, None,
                                        staging)  # fmt: skip
        assert torch.equal(counts, want_counts) and torch.equal(got[0], want[0])
        assert staging.rows == (new if fits else 0)
        if fits:
            assert torch.equal(got[1], keys) and torch.equal(got[2], values), "rows written in place"
            apply_staged(got[1], got[2], staging, staging.rows)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
