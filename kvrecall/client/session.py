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
from dataclasses import dataclass
from typing import Any, TypeVar, Unpack

import grpc
import torch
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from kvrecall.client.core import ClientBase, ModelSpec, OpenOptions, SessionCore, close_request
from kvrecall.client.errors import KVRecallClientError, NotFoundError, UnavailableError
from kvrecall.client.ingest import PromptStream
from kvrecall.client.staging import StagingBuffer
from kvrecall.transport import open_ref
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.client")

T = TypeVar("T")
_END = object()


@dataclass(frozen=True)
class StepCall:
    """One session's part of KVRecallClient.boundaries: announce the tokens up to `position`
    (`notice`), then retrieve for the query in its working set (`retrieve`)."""

    session: WorkerSession
    position: int
    notice: bool = False
    retrieve: bool = False
    follows: int = 0  # the end of the session's last notice whose answer is not taken (StepEvent.follows)
    selected: bool = False  # the caller chose the retrieval over the session's mapped table (StepEvent.worker_selected)


class PendingBoundaries:
    """A Boundaries call in flight (KVRecallClient.boundaries_future). done() polls; result()
    waits, applies the answer (notices' `noticed_upto`, stats, staged rows: on the calling
    thread's current stream) once and returns it, or raises the call's typed error. `sent` /
    `answered`: host clock (perf_counter) when it was sent and when its answer arrived (None
    before)."""

    def __init__(
        self, client: KVRecallClient, calls: list[StepCall], future: grpc.Future, started: float,
        apply_staged: bool = True,
    ) -> None:  # fmt: skip
        self.sent = time.perf_counter()
        self.answered: float | None = None
        self._client, self._calls, self._future, self._started = client, calls, future, started
        self._apply_staged = apply_staged
        self._response: pb.BoundariesResponse | None = None
        future.add_done_callback(self._stamp)

    def _stamp(self, _future: grpc.Future) -> None:
        self.answered = time.perf_counter()

    def done(self) -> bool:
        return self._future.done()

    def table_state(self, session: WorkerSession) -> pb.MappedTableState | None:
        """Wait for the answer and return what `session`'s mapped table holds after its event
        (StepResult.table), without applying the answer (result() does, once); None where the
        call failed or the session maps no table."""
        try:
            response = self._future.result()
        except grpc.RpcError:
            return None  # (result() raises it)
        for call, result in zip(self._calls, response.results, strict=True):
            if call.session is session and result.HasField("table"):
                return result.table
        return None

    def result(self) -> pb.BoundariesResponse:
        if self._response is None:
            try:
                response = self._future.result()
            except grpc.RpcError as exc:
                raise self._client.client_error(exc, self._client.stub.Boundaries, self._started) from None
            if self.answered is None:  # the done-callback may run after result() returns
                self.answered = time.perf_counter()
            for call, result in zip(self._calls, response.results, strict=True):
                if call.notice:
                    call.session.core.note_noticed(result.append.spilled_upto)
                    call.session.stats_appends += 1
                call.session.stats_boundaries += call.retrieve
                if result.HasField("table"):  # (a mapped unit table: worker_selection)
                    call.session.core.table_state = result.table
                if call.retrieve and result.retrieval.staged_rows and self._apply_staged:  # (worker_copies)
                    call.session.core.apply_staged(result.retrieval.staged_rows)
            self._response = response
        return self._response

    def staged_rows(self, session: WorkerSession) -> int:
        """Rows the answer staged for `session` (0: none, or it is not in this call), waiting for
        the answer; for a caller that copies them itself (boundaries_future's apply_staged=False)."""
        response = self.result()
        return sum(result.retrieval.staged_rows for call, result in zip(self._calls, response.results, strict=True)
                   if call.session is session and call.retrieve)  # fmt: skip


class KVRecallClient(ClientBase):
    """A connection to one daemon, for one worker identity (arguments: see ClientBase)."""

    def _make_channel(self, creds, options):
        self._poller: grpc.Future | None = None  # see _hold_poller
        channel = grpc.secure_channel(self.target, creds, options) if creds else grpc.insecure_channel(self.target, options)
        self._health = HealthStub(channel)
        return channel

    def call(self, method: Callable[..., T], request: Any, *, timeout: float | None = None) -> T:
        """One unary call with a deadline (the channel retries RETRIED_METHODS on UNAVAILABLE)."""
        started = time.monotonic()
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self.client_error(exc, method, started) from None

    def wait_ready(self, timeout: float) -> None:
        """Wait until the channel is connected: after a daemon restart it reconnects by itself,
        within its reconnect backoff (at most 2 s); UnavailableError after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise self.unavailable(UnavailableError("no connection"), f"waited {timeout:.1f}s") from None

    def health(self, timeout: float = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = self.call(stub.Check, health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def stats(self, session_id: str = "", capability: str = "") -> pb.StatsResponse:
        """Daemon-wide (the caller's tenant's sessions), or one session given its capability."""
        return self.call(self.stub.GetStats, pb.StatsRequest(session_id=session_id, capability=capability))

    def boundaries(self, calls: list[StepCall], timeout: float | None = None) -> pb.BoundariesResponse:
        """One decode step's AppendNotices and retrievals of many sessions in ONE call (the
        Boundaries RPC; shm / CUDA IPC sessions, at most one call each): each session's writes
        are published first, then the daemon notices, retrieves (policies that batch: all
        their sessions together) and answers once. On success every notice's session has
        `noticed_upto` advanced. A bad call refuses them all (the error names events[i])."""
        return self.boundaries_future(calls, timeout).result()

    def boundaries_future(
        self, calls: list[StepCall], timeout: float | None = None, background: bool = False,
        worker_copies: bool = False, apply_staged: bool = True,
    ) -> PendingBoundaries:  # fmt: skip
        """`boundaries` without waiting: the call is sent (writes published) and its answer is
        applied when the caller takes it (PendingBoundaries.result). No thread of this
        process's interpreter waits for it (gRPC's own threads do), so a decoding thread does
        not share the interpreter lock with a thread per call in flight. `background`: the
        caller decodes on without the answer for a while (BoundariesRequest.background);
        `worker_copies` (with background): sessions with a staging area take their retrievals'
        new rows from it, copied by result() (StepEvent.worker_copies): take the answer before
        the retrieved region is read again; `apply_staged` False: the caller copies each session's
        (PendingBoundaries.staged_rows, WorkerSession.core.apply_staged) when it is ready to."""
        request = pb.BoundariesRequest(background=background)
        for call in calls:
            core = call.session.core
            core.publish()
            request.events.add(
                session_id=core.session_id, capability=core.capability, position=call.position,
                notice=call.notice, retrieve=call.retrieve, follows=call.follows,
                worker_copies=worker_copies and call.retrieve and core.staging is not None,
                worker_selected=call.selected,
            )  # fmt: skip
        self._hold_poller()
        started = time.monotonic()
        future = self.stub.Boundaries.future(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return PendingBoundaries(self, calls, future, started, apply_staged)

    def _hold_poller(self) -> None:
        """Keep one call in flight for the client's life (a health Watch stream nobody reads), so
        gRPC's poller thread stays up between futures. With no call in flight it exits after each
        answer, and every future() started a new thread from the decoding thread: 1.5 ms of its
        time per call on a loaded 2-core CPU. If the daemon ends the stream, the next call opens
        another; channel.close() cancels it."""
        if self._poller is None or self._poller.done():
            self._poller = self._health.Watch(HealthCheckRequest(), metadata=self._metadata)

    def open_session(
        self, spec: ModelSpec, policy: str, config: dict[str, Any] | None = None, **options: Unpack[OpenOptions]
    ) -> WorkerSession:
        """Open a session (options: see ClientBase.open_request)."""
        request, kind = self.open_request(spec, policy, config, **options)
        response = self.call(self.stub.OpenSession, request)
        try:
            core = SessionCore.from_open(response, spec, kind, len(request.prefix.token_ids))
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
        last prompt tokens (OpenSessionResponse.observation says how many the policy wants).
        It travels layer by layer (a PromptStream): one layer of staging at a time."""
        stream = PromptStream(self, kv.shape[3])
        try:
            for layer in range(kv.shape[0]):
                stream.send(layer, kv[layer, 0], kv[layer, 1], None if queries is None else queries[layer])
        except BaseException:
            stream.close()
            raise
        return stream.finish()

    def prompt_stream(self, num_tokens: int) -> PromptStream:
        """A streamed ingest of a `num_tokens`-token prompt (send() each layer, then finish())."""
        return PromptStream(self, num_tokens)

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
            raise self.client.stream_error(exc) from None
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

    def boundary(
        self, layers: list[int] | None = None, position: int | None = None, queries: torch.Tensor | None = None
    ) -> pb.RetrievalResult:
        """Ask for retrieval for the query in `self.query` (write it first), or for `queries`
        [len(layers) or L, Hq, n, D] (several per head: a chunk's last queries, sent inline)."""
        self.stats_boundaries += 1
        return self._stream_call(self.core.boundary_request(layers, position, queries)).retrieval

    def attend(
        self, layer: int, queries: torch.Tensor, scale: float, retrieve: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's exact attention over every token before it (the host tier; flush() first):
        queries [Hq, n, D] of `layer` -> (out [Hq, n, D], lse [Hq, n] f32) on the queries'
        device, to merge with the chunk's attention over itself (kernels.merge_attention).
        With `retrieve` [Hq, m, D] the same call retrieves for those queries (as boundary())."""
        self.stats_boundaries += int(retrieve is not None)
        request = self.core.boundary_request(
            [layer], queries=None if retrieve is None else retrieve[None],
            attend=queries.detach().float()[None], attend_scale=scale,
        )
        answer = self._stream_call(request).attention
        out = open_ref(answer.out, "attention.out").tensor[0]
        lse = open_ref(answer.lse, "attention.lse").tensor[0]
        return out.to(queries.device), lse.to(queries.device)

    def chunk(self, kv: StagingBuffer) -> pb.AppendAck:
        """Hand over a chunk of n new tokens after the ingest, kv.tensor [L, 2, H, n, D],
        at `position` (announce tokens written before it with flush() first)."""
        self.stats_appends += 1
        ack = self._stream_call(self.core.chunk_request(kv)).append
        self.core.position = ack.spilled_upto
        return ack

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
