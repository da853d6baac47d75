"""The asyncio SDK: the same sessions as kvrecall.client.session, on grpc.aio.

    async with AsyncKVRecallClient("unix:///tmp/kvrecall.sock", "worker-0") as client:
        session = await client.open_session(spec, "louiskv", {"budget": 512})
        await session.ingest(kv, queries)
        ...  # session.write_token(...); await session.advance()
        await session.close()
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Unpack

import grpc
import torch

from kvrecall.client.core import ClientBase, ModelSpec, OpenOptions, SessionCore, close_request
from kvrecall.client.errors import KVRecallClientError, UnavailableError
from kvrecall.client.staging import staged
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.client.aio")


class AsyncKVRecallClient(ClientBase):
    """The asyncio twin of KVRecallClient (arguments: see ClientBase)."""

    def _make_channel(self, creds, options):
        if creds:
            return grpc.aio.secure_channel(self.target, creds, options)
        return grpc.aio.insecure_channel(self.target, options)

    async def call(self, method, request, *, timeout: float | None = None):
        """One unary call with a deadline (the channel retries RETRIED_METHODS on UNAVAILABLE)."""
        started = time.monotonic()
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self.client_error(exc, method, started) from None

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel is connected (see KVRecallClient.wait_ready)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise self.unavailable(UnavailableError("no connection"), f"waited {timeout:.1f}s") from None

    async def stats(self, session_id: str = "", capability: str = "") -> pb.StatsResponse:
        """Daemon-wide (the caller's tenant's sessions), or one session given its capability."""
        return await self.call(self.stub.GetStats, pb.StatsRequest(session_id=session_id, capability=capability))

    async def open_session(
        self, spec: ModelSpec, policy: str, config: dict[str, Any] | None = None, **options: Unpack[OpenOptions]
    ) -> AsyncWorkerSession:
        """Open a session (options: see ClientBase.open_request)."""
        request, kind = self.open_request(spec, policy, config, **options)
        response = await self.call(self.stub.OpenSession, request)
        try:
            core = SessionCore.from_open(response, spec, kind, len(request.prefix.token_ids))
        except Exception:
            await self.call(self.stub.CloseSession, close_request(response))
            raise
        return AsyncWorkerSession(self, core)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncKVRecallClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncWorkerSession:
    def __init__(self, client: AsyncKVRecallClient, core: SessionCore) -> None:
        self.client = client
        self.core = core
        self._stream: Any = None
        lease = max(1, core.info.lease_seconds)
        self._keepalive = asyncio.create_task(self._keep_alive(lease / 3.0))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    async def ingest(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> pb.IngestPromptResponse:
        core = self.core
        with staged(kv, core.transport) as ref:
            request = core.ingest_request(kv.shape[3], ref, None if queries is None else queries.to(kv.dtype))
            response = await self.client.call(self.client.stub.IngestPrompt, request, timeout=max(self.client.timeout, 300))
        core.apply_ingest(response, kv.shape[3])
        return response

    async def _stream_call(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        if self._stream is None:
            self._stream = self.client.stub.Decode(metadata=self.client._metadata)
        self.core.publish()
        try:
            await self._stream.write(request)
            response = await asyncio.wait_for(self._stream.read(), self.client.timeout)
        except grpc.aio.AioRpcError as exc:
            self._stream = None
            raise self.client.stream_error(exc) from None
        if response is grpc.aio.EOF:
            self._stream = None
            raise KVRecallClientError("decode stream ended unexpectedly")
        self.core.apply_answer(request, response)
        return response

    async def append(self) -> pb.AppendAck:
        return (await self._stream_call(self.core.append_request())).append

    async def boundary(self, layers: list[int] | None = None) -> pb.RetrievalResult:
        return (await self._stream_call(self.core.boundary_request(layers))).retrieval

    async def advance(self) -> pb.AppendAck | None:
        self.core.position += 1
        if self.core.needs_append():
            return await self.append()
        return None

    async def flush(self) -> None:
        if self.core.position > self.core.noticed_upto:
            await self.append()

    async def stats(self) -> pb.SessionStats:
        return (await self.client.stats(self.core.session_id, self.core.capability)).sessions[0]

    async def close(self) -> pb.CloseSessionResponse | None:
        if self.core.closed:
            return None
        self.core.closed = True
        self._keepalive.cancel()
        if self._stream is not None:
            await self._stream.done_writing()
            self._stream = None
        try:
            return await self.client.call(
                self.client.stub.CloseSession, self.core.close_request()
            )
        finally:
            self.core.unmap()

    async def __aenter__(self) -> AsyncWorkerSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _keep_alive(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.client.call(
                    self.client.stub.KeepAlive, self.core.keepalive_request(), timeout=5.0
                )
            except KVRecallClientError as exc:
                log.warning("keep-alive for session %s failed: %s", self.core.session_id, exc)
