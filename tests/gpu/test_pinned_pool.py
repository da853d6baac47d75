"""The host tier's pinned memory: exactly the size asked for, readable by the GPU, released."""

from __future__ import annotations

import pytest
import torch

from kvrecall.server.pinned import PinnedBuffer
from kvrecall.server.pools import HostPool

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.mark.parametrize("nbytes", [4096, 3 * MiB + 4096, 70 * MiB])
def test_a_pinned_buffer_is_exactly_its_size_and_page_locked(nbytes):
    buffer = PinnedBuffer(nbytes)
    try:
        assert buffer.tensor.numel() == nbytes  # not rounded up to a power of two
        assert buffer.tensor.is_pinned()
        assert int(buffer.tensor[: nbytes // 2].sum()) == 0  # touched: zeros
        data = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        buffer.tensor.copy_(data, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(buffer.tensor.cuda(), data)
    finally:
        buffer.release()
    assert not buffer.registered
    buffer.release()  # idempotent


def test_the_host_pool_pins_its_pages_and_stores_tokens_over_uva():
    pool = HostPool(40 * MiB + 512 * 1024, page_bytes=512 * 1024, pinned=True)
    try:
        assert pool.kind == "pinned" and pool.buffer.is_pinned()
        assert pool.buffer.numel() == pool.capacity_bytes == 81 * 512 * 1024
        pages = pool.allocate(3, "t")
        flat = pool.view(torch.bfloat16)
        rows = torch.randn(3, 512 * 1024 // 2, device="cuda").bfloat16()
        offsets = torch.tensor(pages, device="cuda") * (512 * 1024 // 2)
        for i in range(3):
            flat[int(offsets[i]) : int(offsets[i]) + rows.shape[1]].copy_(rows[i])
        torch.cuda.synchronize()
        assert torch.equal(flat[int(offsets[1]) : int(offsets[1]) + rows.shape[1]].cuda(), rows[1])
    finally:
        pool.close()
