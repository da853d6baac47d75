"""The synchronous SDK: `KVRecallClient` opens `WorkerSession`s.

Every call has a deadline; gRPC failures surface as typed exceptions (client/errors.py).
A session keeps its lease alive from a background thread until it is closed.

    client = KVRecallClient("unix:///tmp/kvrecall.sock", worker_id="worker-0")
    session = client.open_session(spec, policy="louiskv", config={"budget": 512})
    session.ingest(prompt_kv, queries)          # [L, 2, H, T, D], [L, Hq, n_obs, D]
    ...  # per token: session.write_token(...); session.advance()
    session.close()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import torch

from kvrecall.client.core import ClientBase, ModelSpec, SessionCore, close_request
from kvrecall.client.errors import KVRecallClientError, NotFoundError, UnavailableError, from_rpc_error
from kvrecall.client.staging import staged
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.client")

T = TypeVar("T")
_END = object()


class KVRecallClient(ClientBase):
    """A connection to one daemon, for one worker identity (arguments: see ClientBase)."""

    def _make_channel(self, creds, options):
        return grpc.secure_channel(self.target, creds, options) if creds else grpc.insecure_channel(self.target, options)

    def call(self, method: Callable[..., T], request: Any, *, retry: bool = False, timeout: float | None = None) -> T:
        """One unary call with a deadline; retries UNAVAILABLE with backoff when `retry`."""
        started = time.monotonic()
        for attempt, delay in enumerate(self.retry_delays(retry)):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if isinstance(error, UnavailableError) and delay is not None:
                    log.warning("daemon %s unavailable (%s); retrying in %.1fs", self.target, error.details, delay)
                    time.sleep(delay)
                    continue
                if isinstance(error, UnavailableError):
                    elapsed = time.monotonic() - started
                    error = self.unavailable(error, f"{attempt + 1} attempt(s) over {elapsed:.1f}s")
                raise error from None
        raise AssertionError("unreachable")

    def unavailable(self, error: KVRecallClientError, what: str) -> UnavailableError:
        """An UnavailableError that says what is down and what it means for open sessions."""
        return UnavailableError(
            f"kvrecall daemon at {self.target} is unavailable (not running or restarting; {what}): "
            f"{error.details}. Sessions do not survive a daemon restart: open new ones once it is back."
        )

    def health(self, timeout: float = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = self.call(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def stats(self, session_id: str = "", capability: str = "") -> pb.StatsResponse:
        """Daemon-wide (the caller's tenant's sessions), or one session given its capability."""
        return self.call(self.stub.GetStats, pb.StatsRequest(session_id=session_id, capability=capability), retry=True)

    def open_session(
        self,
        spec: ModelSpec,
        policy: str,
        config: dict[str, Any] | None = None,
        *,
        transport: str | None = None,
        device: torch.device | str | None = None,
        lease_seconds: int = 0,
        tag: str = "",
        tp_rank: int = 0,
        tp_size: int = 0,
    ) -> WorkerSession:
        """Open a session; `transport` defaults to shm (local CPU), cuda_ipc (local GPU) or inline."""
        request, kind = self.open_request(
            spec, policy, config, transport, device, lease_seconds, tag, tp_rank, tp_size
        )
        response = self.call(self.stub.OpenSession, request, retry=True)
        try:
            core = SessionCore.from_open(response, spec, kind)
        except Exception:
            self.call(self.stub.CloseSession, close_request(response))
            raise
        return WorkerSession(self, core)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KVRecallClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerSession:
    """One sequence's session as its worker sees it (attributes of SessionCore are exposed)."""

    def __init__(self, client: KVRecallClient, core: SessionCore) -> None:
        self.client = client
        self.core = core
        self._requests: queue.Queue = queue.Queue()
        self._responses: Iterator[pb.DecodeResponse] | None = None
        self._stop = threading.Event()
        self.stats_boundaries = 0
        self.stats_appends = 0
        lease = max(1, core.info.lease_seconds)
        self._keepalive = threading.Thread(target=self._keep_alive, args=(lease / 3.0,), daemon=True)
        self._keepalive.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    # ---- unary -----------------------------------------------------------------------
    def ingest(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> pb.IngestPromptResponse:
        """Hand the prompt KV over once: kv [L, 2, H, T, D]; queries [L, Hq, n_obs, D] of the
        last prompt tokens (OpenSessionResponse.observation says how many the policy wants)."""
        core = self.core
        request = core.ingest_request(kv.shape[3])
        with staged(kv, core.transport) as ref:
            request.kv.CopyFrom(ref)
            if queries is not None:
                request.queries.CopyFrom(inline_ref(queries.to(kv.dtype)))
            response = self.client.call(self.client.stub.IngestPrompt, request, timeout=max(self.client.timeout, 300))
        core.apply_delta(response.delta)
        core.position = core.noticed_upto = kv.shape[3]
        return response

    def stats(self) -> pb.SessionStats:
        return self.client.stats(self.core.session_id, self.core.capability).sessions[0]

    def close(self) -> pb.CloseSessionResponse | None:
        """Close the session and unmap its memory (idempotent)."""
        if self.core.closed:
            return None
        self.core.closed = True
        self._stop.set()
        self._end_stream()
        try:
            return self.client.call(
                self.client.stub.CloseSession, self.core.close_request()
            )
        except NotFoundError:
            # Already gone (lease expired, or the daemon restarted): nothing left to free.
            log.info("session %s was already gone on the daemon", self.core.session_id)
            return None
        finally:
            self.core.unmap()

    def __enter__(self) -> WorkerSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except KVRecallClientError as error:
            if exc_type is None:
                raise
            # do not mask the error that ended the block (e.g. the daemon went away)
            log.warning("closing session %s failed: %s", self.core.session_id, error)

    # ---- decode stream ---------------------------------------------------------------
    def _stream_call(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        if self._responses is None:
            self._requests = queue.Queue()

            def requests() -> Iterator[pb.DecodeRequest]:
                while True:
                    item = self._requests.get()
                    if item is _END:
                        return
                    yield item

            self._responses = self.client.stub.Decode(requests(), metadata=self.client._metadata)
        self.core.publish()
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as exc:
            self._responses = None  # the stream is over; the next call opens a new one
            error = from_rpc_error(exc)
            if isinstance(error, UnavailableError):
                error = self.client.unavailable(error, "decode stream broken")
            raise error from None
        except StopIteration:
            self._responses = None
            raise KVRecallClientError("decode stream ended unexpectedly") from None
        self.core.apply_answer(request, response)
        return response

    def _end_stream(self) -> None:
        if self._responses is not None:
            self._requests.put(_END)
            self._responses = None

    def append(self, upto: int | None = None) -> pb.AppendAck:
        """Tell the daemon about the tokens written since the last notice (blocks for the ack)."""
        self.stats_appends += 1
        return self._stream_call(self.core.append_request(upto)).append

    def boundary(self, layers: list[int] | None = None, position: int | None = None) -> pb.RetrievalResult:
        """Ask for retrieval for the query in `self.query` (write it first)."""
        self.stats_boundaries += 1
        return self._stream_call(self.core.boundary_request(layers, position)).retrieval

    def advance(self) -> pb.AppendAck | None:
        """Count one token written at `position`; send an AppendNotice when one is due."""
        self.core.position += 1
        if self.core.needs_append():
            return self.append()
        return None

    def flush(self) -> None:
        """Announce any tokens written since the last notice."""
        if self.core.position > self.core.noticed_upto:
            self.append()

    def _keep_alive(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.client.call(
                    self.client.stub.KeepAlive, self.core.keepalive_request(), timeout=5.0
                )
            except NotFoundError:
                # The daemon no longer has it (restarted, or the lease ran out): stop pinging.
                log.warning("session %s is gone on the daemon; keep-alive stopped", self.core.session_id)
                return
            except KVRecallClientError as exc:
                log.warning("keep-alive for session %s failed: %s", self.core.session_id, exc)
            except ValueError:  # the client's channel was closed under an open session
                return
