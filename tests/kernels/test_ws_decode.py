"""ws_decode: the pointer-table write and attention kernels against their references
(Triton's interpreter on CPU), at several sizes, empty slots and fully masked rows included."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels._triton import interpreter_ready
from kvrecall.kernels.ws_decode import AttendWorkspace, SlotTables, attend, write_step

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_ready()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tables_pair(capacities, L, H, G, D, dtype, seed):
    """Two SlotTables over identical copies of random working sets (0 = an empty slot)."""
    g = torch.Generator().manual_seed(seed)
    pair = (SlotTables.empty(len(capacities), DEVICE, dtype), SlotTables.empty(len(capacities), DEVICE, dtype))
    for b, C in enumerate(capacities):
        if C == 0:
            continue
        keys = torch.randn(L, H, C, D, generator=g).to(dtype)
        values = torch.randn(L, H, C, D, generator=g).to(dtype)
        slot_pos = torch.randint(-1, 4 * C, (L, H, C), generator=g, dtype=torch.int32)
        if b == 0:
            slot_pos[0] = -1  # layer 0 of slot 0: no valid slot at all
        query = torch.zeros(L, H * G, D, dtype=dtype)
        window = max(1, C // 3)
        for tables in pair:
            views = [t.clone().to(DEVICE) for t in (keys, values, slot_pos, query)]
            tables.set(b, *views, window_start=C - window, window=window)
    return pair


@pytest.mark.parametrize(
    "capacities,L,H,G,D",
    [([1], 1, 1, 1, 16), ([40, 0, 70], 2, 2, 3, 16), ([130, 5, 0, 64], 2, 4, 4, 32), ([300], 1, 2, 8, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_and_attend_match_reference(capacities, L, H, G, D, dtype):
    B = len(capacities)
    triton_tables, ref_tables = tables_pair(capacities, L, H, G, D, dtype, seed=B * D)
    g = torch.Generator().manual_seed(7)
    k, v = (torch.randn(B, H, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    q = torch.randn(B, H * G, D, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, 1000, (B,), generator=g).to(DEVICE)
    for layer in range(L):
        write_step(triton_tables, layer, k, v, q, positions, impl="triton")
        write_step(ref_tables, layer, k, v, q, positions, impl="reference")
    for got, want in zip(triton_tables.tensors, ref_tables.tensors, strict=True):
        if want is not None:
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for target in (4, 256):  # one split per sequence, and several
        workspace = AttendWorkspace(B, H, G, D, max(capacities), DEVICE, block_c=16, target_programs=target)
        for layer in range(L):
            out = attend(triton_tables, layer, q, D**-0.5, workspace, impl="triton")
            ref = attend(ref_tables, layer, q, D**-0.5, impl="reference")
            assert not out.isnan().any()
            assert (out.float() - ref.float()).abs().max().item() < tol, (target, layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deferred_eviction_mask_matches_reference(dtype):
    """Deferred eviction: ring slots read only from `evicted` on, the others only below it
    (kernels/ws_decode.py); the kernel equals the reference, and the mask is the one asked
    (a slot set without it reads every filled slot, a different answer)."""
    capacities, L, H, G, D = [48, 0, 64], 2, 2, 4, 16
    B = len(capacities)
    masked, ref = tables_pair(capacities, L, H, G, D, dtype, seed=3)
    plain, _ = tables_pair(capacities, L, H, G, D, dtype, seed=3)
    for b, C in enumerate(capacities):
        if C:
            window = max(1, C // 3)
            for tables in (masked, ref):
                tables.set(b, *tables.tensors[b], window_start=C - window, window=window, evicted=2 * C)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H * G, D, generator=g).to(dtype).to(DEVICE)
    workspace = AttendWorkspace(B, H, G, D, max(capacities), DEVICE, block_c=16, target_programs=64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for layer in range(L):
        out = attend(masked, layer, q, D**-0.5, workspace, impl="triton")
        want = attend(ref, layer, q, D**-0.5, impl="reference")
        every = attend(plain, layer, q, D**-0.5, workspace, impl="triton")
        assert (out.float() - want.float()).abs().max().item() < tol, layer
        assert (out.float() - every.float()).abs().max().item() > 10 * tol, layer
    # The reference's mask itself, on a small hand-made row: window from slot 3.
    slot_pos = torch.tensor([0, 5, 9, 7, 12, 4, -1], dtype=torch.int32)
    from kvrecall.kernels.ws_decode import readable

    assert readable(slot_pos, 3, 7, 7).tolist() == [True, True, False, True, True, False, False]
