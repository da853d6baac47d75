"""The asyncio SDK against the real daemon: same results as the sync one."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvrecall.client import NotFoundError
from kvrecall.client.aio import AsyncKVRecallClient
from tests.conftest import SMALL, random_kv, random_query


def test_async_session_round_trip(daemon):
    kv = random_kv(SMALL, 240, seed=31)

    async def main() -> None:
        async with AsyncKVRecallClient(daemon.target, "async-worker") as client:
            before = {p.tier: p.used_bytes for p in (await client.stats()).pools}
            session = await client.open_session(SMALL, "louiskv", {"budget": 64, "n_sink": 4, "window": 32})
            async with session:
                await session.ingest(kv[:, :, :, :200].contiguous(), random_query(SMALL, 3))
                for position in range(200, 240):
                    session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
                    await session.advance()
                session.query.copy_(torch.randn_like(session.query))
                result = await session.boundary()
                assert result.tokens_placed > 0
                await session.flush()
                stats = await session.stats()
                assert stats.tokens == 240 and stats.boundaries == 1
                pos = session.slot_pos[0, 0]
                for slot, p in enumerate(pos.tolist()):
                    if p >= 0:
                        assert torch.equal(session.keys[0, 0, slot], kv[0, 0, 0, p])
            with pytest.raises(NotFoundError):
                await client.stats(session.session_id)
            after = {p.tier: p.used_bytes for p in (await client.stats()).pools}
            assert after == before

    asyncio.run(main())
