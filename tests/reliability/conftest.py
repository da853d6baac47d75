"""Reliability tests: a real daemon process, real gRPC over a unix socket, no mocks.

One daemon (`rdaemon`) is shared by the whole directory; it runs with a 1 MiB message limit
(KVRECALL_MAX_MESSAGE_MB=1) so oversized messages can be tested with small tensors. Tests
that stop or restart a daemon, or need auth, start their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrecall.client import ModelSpec
from kvrecall.local import LocalDaemon
from kvrecall.v1 import kvrecall_pb2 as pb
from kvrecall.v1 import kvrecall_pb2_grpc as pb_grpc

WORKER_MD = "kvrecall-worker-id"
CALL_TIMEOUT = 15.0  # every raw call carries a deadline; the loaded CI box gets slack
MAX_MESSAGE_MB = 1

SPEC = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=512)


@pytest.fixture(scope="session")
def rdaemon():
    with LocalDaemon(
        host_pool_gb=0.25,
        device_pool_gb=0.125,
        extra_args=["--page-kb", "256"],
        env={"KVRECALL_MAX_MESSAGE_MB": str(MAX_MESSAGE_MB)},
        worker_share=None,  # the daemon's defaults, fair shares included
    ) as d:
        yield d


@dataclass
class Answer:
    """What a raw call returned: the response, or the status code and message."""

    response: object | None
    code: grpc.StatusCode
    details: str


class Raw:
    """The generated stub on a plain channel: for requests the SDK would never build.

    It remembers the capability of every session it opened and fills it into later requests
    naming that session (unless the request sets one, or `fill=False`), as the SDK does.
    Requests given as bytes are sent as they are (for bytes that do not parse)."""

    def __init__(self, target: str, worker: str = "rel-worker", token: str | None = None) -> None:
        self.target = target
        self.worker = worker
        self.token = token
        big = 64 << 20
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
        )
        self.stub = pb_grpc.KVRecallStub(self.channel)
        self.capabilities: dict[str, str] = {}  # session id -> capability, from OpenSession answers

    def fill(self, request) -> None:
        if request.session_id in self.capabilities and not request.capability:
            request.capability = self.capabilities[request.session_id]

    def _send(self, method: str, request, fill: bool):
        if isinstance(request, bytes):
            return self.channel.unary_unary(f"/kvrecall.v1.KVRecall/{method}")
        if fill and method != "OpenSession":
            self.fill(request)
        return getattr(self.stub, method)

    def metadata(self, worker: str | None = None, token: str | None = None) -> tuple:
        md = []
        worker = self.worker if worker is None else worker
        if worker:
            md.append((WORKER_MD, worker))
        token = self.token if token is None else token
        if token:
            md.append(("authorization", f"Bearer {token}"))
        return tuple(md)

    def call(self, method: str, request, *, worker: str | None = None, token: str | None = None,
             timeout: float = CALL_TIMEOUT, fill: bool = True) -> Answer:
        try:
            stub = self._send(method, request, fill)
            response = stub(request, timeout=timeout, metadata=self.metadata(worker, token))
        except grpc.RpcError as exc:
            return Answer(None, exc.code(), exc.details() or "")
        if method == "OpenSession" and not isinstance(response, bytes):
            self.capabilities[response.session_id] = response.capability
        return Answer(response, grpc.StatusCode.OK, "")

    def ok(self, method: str, request, **kw):
        answer = self.call(method, request, **kw)
        assert answer.code == grpc.StatusCode.OK, (method, answer.code, answer.details)
        return answer.response

    def stream(self, requests: list, *, worker: str | None = None, token: str | None = None,
               timeout: float = CALL_TIMEOUT, fill: bool = True) -> tuple[list, Answer]:
        """Send `requests` on one Decode stream; returns the answers and how the stream ended."""
        responses = []
        for request in requests if fill else ():
            if not isinstance(request, bytes):
                self.fill(request)
        decode = self.stub.Decode
        if any(isinstance(r, bytes) for r in requests):
            decode = self.channel.stream_stream("/kvrecall.v1.KVRecall/Decode")
            requests = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
        try:
            for response in decode(iter(requests), timeout=timeout, metadata=self.metadata(worker, token)):
                responses.append(response)
        except grpc.RpcError as exc:
            return responses, Answer(None, exc.code(), exc.details() or "")
        return responses, Answer(None, grpc.StatusCode.OK, "")

    def health(self, timeout: float = 5.0) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def pools(self) -> dict[str, int]:
        return {p.tier: p.used_bytes for p in self.ok("GetStats", pb.StatsRequest()).pools}

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="session")
def raw(rdaemon):
    r = Raw(rdaemon.target)
    yield r
    r.close()


def open_request(spec: ModelSpec = SPEC, policy: str = "full", config: dict | None = None,
                 transport: int = pb.TRANSPORT_SHM, worker: str = "rel-worker", lease: int = 0) -> pb.OpenSessionRequest:
    from kvrecall.client.core import policy_message

    return pb.OpenSessionRequest(
        worker_id=worker, layout=spec.to_proto(), policy=policy_message(policy, config), transport=transport,
        lease_seconds=lease,
    )


def random_kv(spec: ModelSpec, tokens: int, seed: int) -> torch.Tensor:
    """[L, 2, H, T, D] random KV."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim, generator=g).to(spec.dtype)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Poll `predicate` until it returns a truthy value; returns it, or the last value at timeout."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value
