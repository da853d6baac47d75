"""The staged placement's plan: the one-launch kernel (staged_plan_triton) against its torch
reference on random plans of several sizes (sessions, heads, new tokens per row)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels.staged_plan import staged_plan


def random_plan(sessions: int, layers: int, heads: int, block_r: int, per_page: int, pages: int, seed: int,
                device: torch.device):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    rows = sessions * layers * heads
    scratch = torch.randint(0, 1 << 40, (rows, 2 * block_r), generator=generator)
    new = torch.randint(0, block_r + 1, (rows,), generator=generator)
    new[-1] = 0  # a full row, and an empty one where there are two
    new[0] = block_r
    for r in range(rows):  # the k-th new token's position (within the session's pages) and free slot
        scratch[r, :block_r] = torch.randint(0, per_page * pages, (block_r,), generator=generator)
        scratch[r, block_r:] = torch.randperm(block_r, generator=generator)
    counts = torch.stack((new + 3, new), dim=1).to(torch.int32)
    # Page tables of different lengths (padded with zeros), offsets far apart in the pool.
    page_numel = 2 * heads * per_page * 16
    tables = torch.zeros(sessions, pages, dtype=torch.int64)
    for s in range(sessions):
        tables[s] = torch.randperm(4 * pages, generator=generator)[:pages] * page_numel
    return scratch.to(device), counts.to(device), tables.to(device), layers * heads


@pytest.mark.parametrize(("sessions", "layers", "heads", "block_r", "per_page", "first"),
                         [(1, 1, 1, 4, 2, 0), (1, 3, 2, 16, 5, 3), (3, 2, 4, 64, 16, 16), (2, 4, 8, 256, 16, 20)])
def test_the_kernel_matches_the_reference(triton_device, sessions, layers, heads, block_r, per_page, first):  # fmt: skip
    scratch, counts, tables, rows_per_session = random_plan(sessions, layers, heads, block_r, per_page, 12,
                                                            seed=block_r + sessions, device=triton_device)  # fmt: skip
    args = (scratch, counts, block_r, tables, rows_per_session, first, heads, per_page, 16, block_r + first + 64)
    key_rows, targets, ends = staged_plan(*args, impl="triton")
    want_rows, want_targets, want_ends = staged_plan(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                                                     impl="reference")  # fmt: skip
    n = int(want_ends[-1])
    assert torch.equal(ends.cpu(), want_ends)
    assert n > 0
    assert torch.equal(key_rows[:n].cpu(), want_rows[:n])
    assert torch.equal(targets[:n].cpu(), want_targets[:n])


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_the_plan_written_where_the_host_reads_it(triton_device, impl):
    """rows_out / ends_out / targets_out (placement_staged's plan_readback "mapped"): the kernel
    writes the compacted pool rows, every row's end and the compacted targets into the buffers given (on a GPU a pinned host buffer
    the kernel reaches over PCIe), the same values as the device outputs; the rest of rows_out
    is left alone."""
    device = triton_device if impl == "triton" else torch.device("cpu")
    scratch, counts, tables, rows_per_session = random_plan(2, 3, 4, 64, 16, 12, seed=9, device=device)
    args = (scratch, counts, 64, tables, rows_per_session, 5, 4, 16, 16, 64 + 5 + 64)
    want_rows, want_targets, want_ends = staged_plan(*args, impl="reference")
    R = scratch.shape[0]
    pin = device.type == "cuda"
    rows_out = torch.full((R * 64 + 7,), -5, dtype=torch.int64, pin_memory=pin)
    ends_out = torch.full((R,), -5, dtype=torch.int64, pin_memory=pin)
    targets_out = torch.full((R * 64 + 7,), -5, dtype=torch.int64, pin_memory=pin)
    key_rows, targets, ends = staged_plan(*args, impl=impl, rows_out=rows_out, ends_out=ends_out,
                                          targets_out=targets_out)  # fmt: skip
    if pin:
        torch.cuda.synchronize()
    n = int(want_ends[-1])
    assert 0 < n < R * 64
    assert key_rows.data_ptr() == rows_out.data_ptr()
    assert torch.equal(ends_out, want_ends.cpu()) and torch.equal(ends.cpu(), want_ends.cpu())
    assert torch.equal(rows_out[:n], want_rows[:n].cpu())
    assert torch.equal(targets[:n].cpu(), want_targets[:n].cpu())
    assert torch.equal(targets_out[:n], want_targets[:n].cpu()), "the targets where the host reads them too"
    assert targets.data_ptr() != targets_out.data_ptr(), "the device's targets returned (the index copies read them)"
    if impl == "triton":  # (the reference copies its whole compacted array, the kernel only what it fills)
        assert (rows_out[n:] == -5).all() and (targets_out[n:] == -5).all()


def test_the_reference_names_the_pool_and_slot_rows():
    """One row by hand: session 1, layer 0, head 1 of H = 2, P = 4 tokens a page, D = 8."""
    block_r, H, P, D, C, first = 2, 2, 4, 8, 10, 3
    scratch = torch.zeros(4, 2 * block_r, dtype=torch.int64)
    scratch[3, :block_r] = torch.tensor([5, 2])  # positions: page 1 offset 1, page 0 offset 2
    scratch[3, block_r:] = torch.tensor([4, 0])  # free slots
    counts = torch.tensor([[0, 0], [0, 0], [0, 0], [2, 2]], dtype=torch.int32)
    tables = torch.tensor([[0, 0], [1000 * D, 3000 * D]])
    key_rows, targets, ends = staged_plan(scratch, counts, block_r, tables, 2, first, H, P, D, C, impl="reference")
    assert ends.tolist() == [0, 0, 0, 2]
    # row = page base / D + ((layer * 2 * H + head) * P + offset); local row 1 of the session
    assert key_rows[:2].tolist() == [3000 + (1 * P + 1), 1000 + (1 * P + 2)]
    assert targets[:2].tolist() == [1 * C + first + 4, 1 * C + first + 0]
