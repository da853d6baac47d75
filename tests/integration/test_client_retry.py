"""The SDK's retries are gRPC's service-config retryPolicy: OpenSession and GetStats are tried
again on UNAVAILABLE, other calls are not, and a daemon that stays down gives the operator's
message. A small real gRPC server of the KVRecall service stands in for a daemon that answers
UNAVAILABLE a given number of times (the way a restarting one does)."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

from kvrecall.client import KVRecallClient
from kvrecall.client.aio import AsyncKVRecallClient
from kvrecall.client.errors import UnavailableError
from kvrecall.v1 import kvrecall_pb2 as pb
from kvrecall.v1 import kvrecall_pb2_grpc as pb_grpc


class FlakyDaemon(pb_grpc.KVRecallServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method, then a real answer."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def GetStats(self, request, context):
        self._attempt("GetStats", context)
        return pb.StatsResponse()

    def KeepAlive(self, request, context):
        self._attempt("KeepAlive", context)
        return pb.KeepAliveResponse()


@pytest.fixture
def flaky(tmp_path):
    def start(failures: int) -> tuple[str, FlakyDaemon]:
        servicer = FlakyDaemon(failures)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_KVRecallServicer_to_server(servicer, server)
        target = f"unix://{tmp_path}/flaky-{failures}.sock"
        server.add_insecure_port(target)
        server.start()
        servers.append(server)
        return target, servicer

    servers: list[grpc.Server] = []
    yield start
    for server in servers:
        server.stop(None)


def test_get_stats_is_retried_until_it_succeeds(flaky):
    target, daemon = flaky(failures=3)
    with KVRecallClient(target, "w", connect_retries=3) as client:
        client.stats()
    assert daemon.calls["GetStats"] == 4


def test_a_daemon_that_stays_down_gets_the_operators_message(flaky):
    target, daemon = flaky(failures=10)
    with KVRecallClient(target, "w", connect_retries=2) as client, pytest.raises(UnavailableError) as info:
        client.stats()
    assert daemon.calls["GetStats"] == 3
    message = str(info.value)
    assert f"kvrecall daemon at {target} is unavailable" in message and "3 attempt(s)" in message
    assert "Sessions do not survive a daemon restart" in message


def test_other_calls_are_not_retried(flaky):
    target, daemon = flaky(failures=1)
    with KVRecallClient(target, "w", connect_retries=4) as client, pytest.raises(UnavailableError, match="1 attempt"):
        client.call(client.stub.KeepAlive, pb.KeepAliveRequest(session_id="s"))
    assert daemon.calls["KeepAlive"] == 1


def test_no_retries_when_asked_and_at_most_four(flaky):
    target, daemon = flaky(failures=1)
    with KVRecallClient(target, "w", connect_retries=0) as client, pytest.raises(UnavailableError):
        client.stats()
    assert daemon.calls["GetStats"] == 1
    with pytest.raises(ValueError, match="connect_retries"):
        KVRecallClient(target, "w", connect_retries=5)


def test_the_asyncio_client_retries_the_same_way(flaky):
    target, daemon = flaky(failures=2)

    async def stats() -> None:
        async with AsyncKVRecallClient(target, "w", connect_retries=2) as client:
            await client.wait_ready(timeout=10)
            await client.stats()

    asyncio.run(stats())
    assert daemon.calls["GetStats"] == 3
