"""The gRPC servicer: validate at the edge, run the session operation, map errors to statuses.

Heavy work (ingest, clustering, retrieval) runs in a thread under the session's lock so one
session never blocks the event loop for the others. Any error becomes one status with a
message naming the field; the daemon and the other sessions carry on, and the log gets at
most a few lines a minute per kind of rejection (ratelog.py).

Who may do what: every call on a session presents the capability OpenSession returned
(registry.get); daemon-wide GetStats lists the caller's tenant's sessions only, all of them
for an operator (`_sees_all`). Shared prefixes (prefixes.py) belong to the caller's tenant:
OpenSession finds them only among its own, GetStats lists its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch

from kvrecall import __version__
from kvrecall.phases import PhaseLog
from kvrecall.server import prefixes, streams
from kvrecall.server import validation as check
from kvrecall.server.coalesce import Coalescer
from kvrecall.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    KVRecallError,
    PermissionDenied,
    Unauthenticated,
)
from kvrecall.server.layout import SegmentLayout, staging_rows, table_shapes
from kvrecall.server.metrics import Metrics
from kvrecall.server.policies import build_policy
from kvrecall.server.policies.base import config_json
from kvrecall.server.policies.louiskv import table_state
from kvrecall.server.profiling import KernelProfiler, OpsProfiler
from kvrecall.server.ratelog import RateLimitedLog
from kvrecall.server.session import Session, SessionRegistry
from kvrecall.server.step_batch import StepTiming, check_events, serve_step
from kvrecall.server.wire import Undecodable, require_decoded
from kvrecall.transport import TensorRefError, inline_ref, open_ref
from kvrecall.v1 import kvrecall_pb2 as pb
from kvrecall.v1 import kvrecall_pb2_grpc as pb_grpc

log = logging.getLogger("kvrecall.service")
limited = RateLimitedLog(log)

WORKER_METADATA = "kvrecall-worker-id"
MAX_BOUNDARY_QUERIES = 4096  # queries per head one BoundaryEvent may carry (a chunk's last ones)


@dataclass
class AuthConfig:
    """Bearer tokens per worker identity; empty = no token auth (local unix socket)."""

    tokens: dict[str, str]  # token -> worker id
    operators: tuple[str, ...] = ()  # worker ids whose token sees every tenant's sessions

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


def open_queries(ref: pb.TensorRef, field_name: str, layout, layers: int):
    """Several queries per head for `layers` rows (0: every layer), inline
    [rows, Hq, n, D] with 1 <= n <= MAX_BOUNDARY_QUERIES: checked, then opened."""
    rows = layers or layout.num_layers
    shape = check.tensor_ref(
        ref, field_name, (layout.dtype, torch.float32), (rows, layout.num_query_heads, None, layout.head_dim),
        ("inline_data",),
    )
    check.require(1 <= shape[2] <= MAX_BOUNDARY_QUERIES, f"{field_name}.shape",
                  f"{shape[2]} queries per head: must be in [1, {MAX_BOUNDARY_QUERIES}]")
    return open_ref(ref, field_name)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _is_local_peer(peer: str) -> bool:
    return peer.startswith("unix:") or peer.startswith("ipv4:127.") or peer.startswith("ipv6:[::1]")


async def _in_thread(func, *args):
    """Run a session operation in a worker thread. If the RPC is cancelled meanwhile (client
    gone, deadline, shutdown), still wait for the thread before unwinding: the caller's lock
    and its cleanup (unmapping the tensors the thread reads) must not run under it."""
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                continue
        if not task.cancelled():
            task.exception()  # retrieved: nobody is left to report it
        raise


class KVRecallService(pb_grpc.KVRecallServicer):
    def __init__(
        self,
        registry: SessionRegistry,
        device: torch.device,
        metrics: Metrics,
        auth: AuthConfig,
        session_ops: str = "thread",
        fd_socket: str = "",
        notice_ops: str = "thread",
        notice_stream: bool = True,
        profiler: OpsProfiler | None = None,
        kernel_profiler: KernelProfiler | None = None,
        phase_log: PhaseLog | None = None,
        follow_wait_s: float = 30.0,
        coalesce_retrievals: bool = True,
    ) -> None:
        self.registry = registry
        self.device = device
        self.metrics = metrics
        self.auth = auth
        self.inline_ops = session_ops == "inline"
        # A Boundaries call of AppendNotices only (the worker's next step waits for it): on the
        # event loop with notice_ops=inline, and on its own stream (server/streams.py).
        self.inline_notices = self.inline_ops or notice_ops == "inline"
        self.notice_stream = streams.notice_stream(device) if notice_stream else None
        self.profiler = profiler  # profiling.py: Boundaries work under cProfile (off: None)
        self.kernel_profiler = kernel_profiler  # profiling.py: the GPU kernels of a window of steps (off: None)
        self.phase_log = phase_log  # kvrecall/phases.py: each Boundaries call's phases, summarised (off: None)
        self.fd_socket = fd_socket  # where shm workers receive their working set (fdpass.py)
        # Boundaries events waiting for the notice they follow (StepEvent.follows): woken after
        # every call that may have appended; at most follow_wait_s each.
        self.follow_wait_s = follow_wait_s
        self._appended = asyncio.Condition()
        self._followers = 0
        # Retrieving calls that arrive while one runs are served together by the next run
        # (coalesce.py); not with session_ops=inline, where a call runs on the loop anyway.
        self.coalescer = (
            Coalescer(self._run_retrievals, on_run=self.metrics.retrieval_run_calls.observe)
            if coalesce_retrievals and not self.inline_ops
            else None
        )
        registry.prefixes.on_evict = lambda prefix: self.metrics.prefix_evictions.inc()

    async def _session_op(self, func, *args):
        """An append or boundary: in a worker thread (other sessions' RPCs go on meanwhile), or,
        with session_ops=inline, right here on the event loop (no thread hop each way; the loop
        waits for the operation, GPU sync included)."""
        if self.inline_ops:
            return func(*args)
        return await _in_thread(func, *args)

    async def _run_retrievals(self, sessions, events, background: bool, timing: StepTiming):
        """A retrieving call's serve_step (or a coalesced run's), under cProfile when profiling."""
        work = (serve_step, sessions, events, background, True, timing)
        if self.profiler is not None:
            work = (self.profiler.run, "retrievals", *work)
        return await self._session_op(*work)

    # ---- plumbing ----------------------------------------------------------------------
    def _caller(self, context: grpc.aio.ServicerContext, claimed: str | None = None) -> str | None:
        """The calling worker's identity: from its token when auth is on, else from metadata."""
        md = _metadata(context)
        if self.auth.enabled:
            header = md.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            identity = self.auth.tokens.get(token)
            if identity is None:
                raise Unauthenticated("authorization: missing or unknown bearer token")
            for name, value in (("worker_id", claimed), (WORKER_METADATA, md.get(WORKER_METADATA))):
                if value and value != identity:
                    raise PermissionDenied(f"{name}: {value!r} does not match the token's worker {identity!r}")
            return identity
        return claimed or md.get(WORKER_METADATA) or None

    def _sees_all(self, context: grpc.aio.ServicerContext, caller: str | None) -> bool:
        """The operator role: with auth, a token whose worker is in `operators`; without, a
        local caller that names no worker (e.g. `kvrecall stats` on the unix socket)."""
        if self.auth.enabled:
            return caller in self.auth.operators
        return caller is None and _is_local_peer(context.peer())

    def segment_fd(self, session_id: str, capability: str) -> int:
        """The working-set memfd of a session, for its capability's holder (fdpass.FdServer)."""
        session = self.registry.get(session_id, None, capability)
        if session.segment.shm is None or session.segment.shm.fd < 0:
            raise InvalidArgument("session_id", f"session {session_id!r} has no shared-memory working set")
        return session.segment.shm.fd

    async def _await_followed(self, sessions: list[Session], events, context: grpc.aio.ServicerContext) -> None:
        """Hold a Boundaries call (no session lock held) until the notice each event follows
        (StepEvent.follows) has been applied: a deferred-eviction worker sends its retrieval
        without taking its last notice's answer, and two calls need not arrive in the order they
        were sent. At most follow_wait_s (or the call's deadline), then FAILED_PRECONDITION."""
        for i, (session, event) in enumerate(zip(sessions, events, strict=True)):
            field = f"events[{i}].follows"
            check.require(event.follows <= event.position, field,
                          f"{event.follows} is past the event's position {event.position}")  # fmt: skip
            if not session.ingested or event.follows <= session.spilled_upto:
                continue  # (check_events refuses an event before the ingest)
            remaining = context.time_remaining()
            limit = self.follow_wait_s if remaining is None else min(self.follow_wait_s, remaining)
            started = time.monotonic()
            deadline = started + limit
            self._followers += 1
            try:
                async with self._appended:
                    while not (session.closed or session.spilled_upto >= event.follows):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise FailedPrecondition(
                                f"{field}: no notice up to {event.follows} was applied within {limit:.1f} s "
                                f"(session {session.session_id} holds {session.spilled_upto} tokens)"
                            )
                        with contextlib.suppress(TimeoutError):  # a close by the reaper wakes nobody
                            await asyncio.wait_for(self._appended.wait(), min(left, 1.0))
                self.metrics.follow_wait.observe(time.monotonic() - started)
            finally:
                self._followers -= 1

    async def _wake_followers(self) -> None:
        """After a call that may have appended: the events waiting for a notice look again."""
        if self._followers:
            async with self._appended:
                self._appended.notify_all()

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
        if isinstance(exc, KVRecallError):
            code, message = exc.code, exc.message
        elif isinstance(exc, TensorRefError):
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        else:
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        self.metrics.errors.labels(method, code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            limited.log(logging.ERROR, (method, code), "%s failed: %s", method, message, exc_info=True)
        else:
            limited.log(logging.INFO, (method, code), "%s rejected (%s): %s", method, code.name, message)
        await context.abort(code, message)

    def _update_pool_gauges(self) -> None:
        for pool in (self.registry.host_pool, self.registry.device_pool):
            usage = pool.usage()
            self.metrics.pool_used.labels(usage.tier).set(usage.used_bytes)
            self.metrics.pool_free.labels(usage.tier).set(usage.free_bytes)
        self.metrics.pool_metadata.labels("device").set(self.registry.device_pool.metadata_bytes)
        held = self.registry.prefixes.held()
        self.metrics.prefixes.set(len(held))
        self.metrics.prefix_bytes.set(sum(p.host_bytes for p in held))
        self.metrics.prefix_refs.set(sum(p.refs for p in held))

    def _close(self, session: Session, reason: str) -> tuple[int, int]:
        freed = self.registry.close(session)
        self.metrics.sessions.labels(session.worker_id).dec()
        self.metrics.sessions_closed.labels(reason).inc()
        self._update_pool_gauges()
        log.info(
            "session %s closed (%s): worker=%s freed host=%d device=%d bytes",
            session.session_id, reason, session.worker_id, freed[0], freed[1],
        )
        return freed

    # ---- RPCs --------------------------------------------------------------------------
    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        started = time.perf_counter()
        try:
            require_decoded(request)
            self._caller(context, request.worker_id)  # authenticate before validating anything
            worker = check.worker_id(request.worker_id)
            layout = check.layout(request.layout, request.HasField("layout"))
            check.require(request.HasField("policy"), "policy", "required")
            policy = build_policy(request.policy, layout)
            transport = request.transport
            check.require(
                transport in (pb.TRANSPORT_SHM, pb.TRANSPORT_CUDA_IPC, pb.TRANSPORT_INLINE),
                "transport",
                "must be TRANSPORT_SHM, TRANSPORT_CUDA_IPC or TRANSPORT_INLINE",
            )
            if transport == pb.TRANSPORT_CUDA_IPC:
                check.require(self.device.type == "cuda", "transport", "TRANSPORT_CUDA_IPC needs a daemon on a CUDA device")
            if transport == pb.TRANSPORT_SHM:
                check.require(self.device.type == "cpu", "transport", "TRANSPORT_SHM needs a daemon on --device cpu; use TRANSPORT_CUDA_IPC")
            if transport != pb.TRANSPORT_INLINE and not _is_local_peer(context.peer()):
                raise PermissionDenied("transport: shared-memory and CUDA IPC transports are refused to remote peers; use TRANSPORT_INLINE")
            check.require(request.lease_seconds <= 86400, "lease_seconds", "must be <= 86400")
            if request.tp_size > 1:
                check.require(request.tp_rank < request.tp_size, "tp_rank", f"must be < tp_size={request.tp_size}")
            else:
                check.require(request.tp_rank == 0, "tp_rank", f"must be 0 when tp_size={request.tp_size} (no tensor parallelism)")
            check.require(len(request.tag) <= 256, "tag", "at most 256 characters")
            check.require(
                not request.deferred_eviction or transport != pb.TRANSPORT_INLINE, "deferred_eviction",
                "needs TRANSPORT_SHM or TRANSPORT_CUDA_IPC (the worker reads the working set itself)",
            )  # fmt: skip
            declared = prefix = None
            if request.HasField("prefix"):
                declared = prefixes.validate(request.prefix, layout)
                prefix = self.registry.prefixes.find(worker, declared, layout, policy)
            session = self.registry.open(
                worker, layout, policy, transport, float(request.lease_seconds), request.tag,
                request.tp_rank, request.tp_size, prefix=prefix, declared=declared,
                deferred=request.deferred_eviction,
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await self._fail(context, "OpenSession", exc)
            raise AssertionError("unreachable") from None
        plan = session.plan
        response = pb.OpenSessionResponse(
            session_id=session.session_id,
            working_set=self._working_set_info(session),
            spill_every=plan.spill_every,
            lease_seconds=int(session.lease_seconds),
            observation=policy.observation(),
            policy=policy.name,
            policy_config_json=json.dumps(config_json(policy)),
            capability=session.capability,
        )
        if declared is not None:  # the prefix it starts from (the declared one or a shorter one), else its own
            response.prefix_id = prefix.prefix_id if prefix is not None else declared.prefix_id
        if prefix is not None:
            response.prefix_tokens_held = prefix.num_tokens
            if session.transport == pb.TRANSPORT_INLINE:
                self._delta(session, torch.full_like(session.ws.slot_pos, -1), response.delta)
            self.metrics.prefix_hits.inc()
            log.info("session %s starts from prefix %s (%d tokens, %d sessions on it)",
                     session.session_id, prefix.prefix_id, prefix.num_tokens, prefix.refs)
        rule = policy.boundary_rule()
        response.boundary.mode = rule.mode
        response.boundary.threshold = rule.threshold
        response.boundary.pre_rope = rule.pre_rope
        self.metrics.sessions.labels(worker).inc()
        self.metrics.sessions_opened.labels(policy.name).inc()
        self._update_pool_gauges()
        self.metrics.rpc_latency.labels("OpenSession").observe(time.perf_counter() - started)
        log.info(
            "session %s opened: worker=%s tp=%d/%d policy=%s %s layout=%dx%dx%dx%d %s max_tokens=%d slots=%d tag=%r",
            session.session_id, worker, session.tp_rank, session.tp_size, policy.name, json.dumps(config_json(policy)),
            layout.num_layers, layout.num_kv_heads, layout.num_query_heads, layout.head_dim, layout.dtype,
            layout.max_tokens, plan.capacity, request.tag,
        )
        if (assumed := policy.fallback()) is not None:
            log.info("session %s: %s", session.session_id, assumed)
        log.info("session %s device bytes: working set %d + policy metadata %d",
                 session.session_id, session.segment.nbytes, session.segment.metadata_bytes)
        return response

    def _working_set_info(self, session: Session) -> pb.WorkingSetInfo:
        layout, plan = session.layout, session.plan
        offsets = SegmentLayout.of(layout, plan)
        info = pb.WorkingSetInfo(
            capacity=plan.capacity, n_sink=plan.n_sink, retrieved=plan.retrieved, window=plan.window,
            min_window=plan.min_window,
        )
        L, H, Hq, C, D = layout.num_layers, layout.num_kv_heads, layout.num_query_heads, plan.capacity, layout.head_dim
        from kvrecall.dtypes import WIRE_OF_TORCH

        entries = (
            (info.keys, layout.dtype, (L, H, C, D), offsets.keys_offset),
            (info.values, layout.dtype, (L, H, C, D), offsets.values_offset),
            (info.slot_pos, torch.int32, (L, H, C), offsets.slot_pos_offset),
            (info.query, layout.dtype, (L, Hq, D), offsets.query_offset),
        )
        if (S := staging_rows(layout, plan)) > 0:  # the staging area (worker_copy_share)
            entries += (
                (info.staged_keys, layout.dtype, (S, D), offsets.staged_keys_offset),
                (info.staged_values, layout.dtype, (S, D), offsets.staged_values_offset),
                (info.staged_targets, torch.int64, (S,), offsets.staged_targets_offset),
            )
            info.stages_every_row = session.ws.stages_every_row
        if plan.table is not None:  # a unit table the worker selects over (worker_selection)
            info.selection.aggregate = plan.table.aggregate
            shapes = table_shapes(layout, plan)
            entries += tuple((getattr(info.selection, name), shapes[name][1], shapes[name][0], offset)
                             for name, offset in offsets.table_offsets)  # fmt: skip
        segment = session.segment
        for ref, dtype, shape, offset in entries:
            ref.dtype = WIRE_OF_TORCH[dtype]
            ref.shape.extend(shape)
            if session.transport == pb.TRANSPORT_SHM:
                ref.shm.name = segment.shm.name
                ref.shm.offset = offset
                ref.shm.fd_socket = self.fd_socket
            elif session.transport == pb.TRANSPORT_CUDA_IPC:
                ref.cuda_ipc.handle = segment.ipc_handle
                ref.cuda_ipc.offset = offset
                ref.cuda_ipc.device = segment.device.index or 0
        if session.worker_event_handle:  # the worker records it after writing; the daemon waits on it
            info.query.cuda_ipc.event_handle = session.worker_event_handle
        return info

    def _locations(self, session: Session) -> tuple[str, ...]:
        if session.transport == pb.TRANSPORT_SHM:
            return ("shm", "inline_data")
        if session.transport == pb.TRANSPORT_CUDA_IPC:
            return ("cuda_ipc", "inline_data")
        return ("inline_data",)

    async def IngestPrompt(self, request: pb.IngestPromptRequest, context) -> pb.IngestPromptResponse:
        started = time.perf_counter()
        mapped = []
        try:
            require_decoded(request)
            session = self.registry.get(request.session_id, self._caller(context), request.capability)
            session.touch()
            layout = session.layout
            L, H, Hq, D = layout.num_layers, layout.num_kv_heads, layout.num_query_heads, layout.head_dim
            T = request.num_tokens
            check.require(1 <= T <= layout.max_tokens, "num_tokens", f"{T} must be in [1, max_tokens={layout.max_tokens}]")
            if session.declared is not None:
                check.require(T == session.declared.num_tokens, "num_tokens",
                              f"{T}: the session declared a prefix of {session.declared.num_tokens} tokens, its ingest")
            first = request.first_layer
            check.require(first < L, "first_layer", f"{first} must be < num_layers={L}")
            check.require(request.HasField("kv"), "kv", "required")
            layers = check.tensor_ref(request.kv, "kv", (layout.dtype,), (None, 2, H, T, D), self._locations(session))[0]
            check.require(
                1 <= layers <= L - first, "kv.shape", f"{layers} layers from first_layer={first}: past num_layers={L}"
            )
            queries = None
            if request.HasField("queries"):
                shape = check.tensor_ref(
                    request.queries, "queries", (layout.dtype, torch.float32), (layers, Hq, None, D), self._locations(session)
                )
                check.require(1 <= shape[2] <= T, "queries.shape", f"n_obs={shape[2]} must be in [1, num_tokens={T}]")
            async with session.lock:
                mapped.append(open_ref(request.kv, "kv"))
                if request.HasField("queries"):
                    mapped.append(open_ref(request.queries, "queries"))
                    queries = mapped[-1].tensor.float()
                snapshot = self._snapshot(session)
                await _in_thread(session.ingest, first, mapped[0].tensor, queries)
                if session.ingested and session.declared is not None:
                    self.registry.register_prefix(session)
                    if session.prefix is not None:
                        self.metrics.prefix_registered.inc()
                        self._update_pool_gauges()
                response = pb.IngestPromptResponse(
                    resident_tokens=session.ws.resident_tokens(),
                    host_tokens=session.spilled_upto,
                    units=session.policy.num_units,
                    seconds=time.perf_counter() - started,
                    layers_done=session.layers_ingested,
                )
                self._delta(session, snapshot, response.delta)
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "IngestPrompt", exc)
            raise AssertionError("unreachable") from None
        finally:
            for m in mapped:
                m.close()
        self.metrics.bytes_moved.labels("worker_to_host").inc(session.store.layout.token_bytes * T * layers // L)
        self.metrics.rpc_latency.labels("IngestPrompt").observe(time.perf_counter() - started)
        if session.ingested:
            log.info(
                "session %s ingested %d tokens (last %d of %d layers in %.3fs): %d units, %d resident",
                session.session_id, T, layers, L, response.seconds, response.units, response.resident_tokens,
            )
        return response

    def _snapshot(self, session: Session) -> torch.Tensor | None:
        return session.ws.slot_pos.clone() if session.transport == pb.TRANSPORT_INLINE else None

    def _delta(self, session: Session, snapshot: torch.Tensor | None, out: pb.WorkingSetDelta) -> None:
        """Fill `out` with the slots that changed since `snapshot` (inline transport)."""
        if snapshot is None:
            return
        now = session.ws.slot_pos
        changed = (now != snapshot).view(-1).nonzero(as_tuple=True)[0]
        if changed.numel() == 0:
            return
        positions = now.view(-1)[changed]
        filled = changed[positions >= 0]
        D = session.layout.head_dim
        out.slots = changed.to(torch.int32).cpu().numpy().tobytes()
        out.positions = positions.cpu().numpy().tobytes()
        for name, tensor in (("keys", session.ws.keys), ("values", session.ws.values)):
            rows = tensor.view(-1, D)[filled].contiguous().cpu()
            setattr(out, name, rows.view(torch.uint8).numpy().tobytes())

    async def Decode(self, request_iterator: AsyncIterator[pb.DecodeRequest], context) -> AsyncIterator[pb.DecodeResponse]:
        session: Session | None = None
        try:
            caller = self._caller(context)
            async for request in request_iterator:
                started = time.perf_counter()
                if isinstance(request, Undecodable):  # the stream ends here: one line at most
                    limited.log(logging.WARNING, "Decode.undecodable", "Decode stream of %s (session %s): %s",
                                context.peer(), session.session_id if session else "-", request.error)
                    require_decoded(request)
                if session is None or session.closed:
                    session = self.registry.get(request.session_id, caller, request.capability)
                elif request.session_id and request.session_id != session.session_id:
                    raise InvalidArgument("session_id", f"this stream is bound to {session.session_id!r}")
                session.touch()
                which = request.WhichOneof("event")
                response = pb.DecodeResponse(seq=request.seq)
                async with session.lock:
                    if session.closed:
                        raise InvalidArgument("session_id", f"session {session.session_id!r} was closed")
                    snapshot = self._snapshot(session)
                    if which == "append":
                        await self._append(session, request.append, response)
                    elif which == "boundary":
                        await self._boundary(session, request.boundary, response)
                    elif which == "chunk":
                        await self._chunk(session, request.chunk, response)
                    else:
                        raise InvalidArgument("event", "one of append, boundary or chunk is required")
                    if which in ("append", "chunk") and session.declared is not None:
                        self._after_append(session)
                    self._delta(session, snapshot, response.delta)
                if which in ("append", "chunk"):
                    await self._wake_followers()
                self.metrics.rpc_latency.labels(f"Decode.{which}").observe(time.perf_counter() - started)
                yield response
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "Decode", exc)

    async def _append(self, session: Session, notice: pb.AppendNotice, response: pb.DecodeResponse) -> None:
        kv = None
        mapped = None
        check.require(
            notice.upto <= session.layout.max_tokens, "append.upto",
            f"{notice.upto} is past max_tokens={session.layout.max_tokens}",
        )
        if session.transport == pb.TRANSPORT_INLINE:
            if not session.ingested:  # before sizing append.kv against a prompt that is not there
                raise FailedPrecondition(f"session {session.session_id}: append before IngestPrompt")
            n = notice.upto - session.spilled_upto
            check.require(notice.HasField("kv"), "append.kv", "required for TRANSPORT_INLINE sessions")
            check.require(n >= 1, "append.upto", f"{notice.upto} is not past the {session.spilled_upto} tokens already appended")
            layout = session.layout
            check.tensor_ref(
                notice.kv, "append.kv", (layout.dtype,),
                (layout.num_layers, 2, layout.num_kv_heads, n, layout.head_dim), ("inline_data",),
            )
            mapped = open_ref(notice.kv, "append.kv")
            kv = mapped.tensor
        try:
            spilled, evicted = await self._session_op(session.append, notice.upto, kv)
        finally:
            if mapped is not None:
                mapped.close()
        response.append.spilled_upto = spilled
        response.append.evicted = evicted
        self.metrics.appends.inc()

    async def _chunk(self, session: Session, chunk: pb.ChunkAppend, response: pb.DecodeResponse) -> None:
        if not session.ingested:  # before sizing chunk.kv against a prompt that is not there
            raise FailedPrecondition(f"session {session.session_id}: chunk before IngestPrompt")
        layout = session.layout
        check.require(chunk.HasField("kv"), "chunk.kv", "required")
        n = check.tensor_ref(
            chunk.kv, "chunk.kv", (layout.dtype,), (layout.num_layers, 2, layout.num_kv_heads, None, layout.head_dim),
            self._locations(session),
        )[3]
        check.require(n >= 1, "chunk.kv.shape", "the chunk holds no tokens")
        check.require(
            chunk.start + n <= layout.max_tokens, "chunk.kv.shape",
            f"tokens [{chunk.start}, {chunk.start + n}) run past max_tokens={layout.max_tokens}",
        )
        mapped = open_ref(chunk.kv, "chunk.kv")
        try:
            spilled, evicted = await self._session_op(session.chunk, chunk.start, mapped.tensor)
        finally:
            mapped.close()
        response.append.spilled_upto = spilled
        response.append.evicted = evicted
        self.metrics.appends.inc()
        self.metrics.bytes_moved.labels("worker_to_host").inc(layout.token_bytes * n)

    async def _boundary(self, session: Session, event: pb.BoundaryEvent, response: pb.DecodeResponse) -> None:
        layout = session.layout
        started = time.perf_counter()
        if self.kernel_profiler is not None:  # a retrieval on the Decode stream opens the window too
            self.kernel_profiler.begin()
        mapped = None
        check.require(
            event.position <= layout.max_tokens, "boundary.position",
            f"{event.position} is past max_tokens={layout.max_tokens}",
        )
        if event.HasField("attend"):
            await self._attend(session, event, response.attention)
            if not event.HasField("queries"):
                return
            started = time.perf_counter()
        if event.HasField("queries"):
            mapped = open_queries(event.queries, "boundary.queries", layout, len(event.layers))
            query = mapped.tensor.float()
        elif event.HasField("query"):
            check.tensor_ref(
                event.query, "boundary.query", (layout.dtype, torch.float32),
                (layout.num_layers, layout.num_query_heads, layout.head_dim), ("inline_data",),
            )
            mapped = open_ref(event.query, "boundary.query")
            query = mapped.tensor.float()
        else:
            check.require(
                session.transport != pb.TRANSPORT_INLINE, "boundary.query", "required for TRANSPORT_INLINE sessions"
            )
            query = None  # the session reads the working set's, after the worker's writes
        try:
            selection, placement = await self._session_op(
                session.boundary, event.position, list(event.layers), query
            )
        finally:
            if mapped is not None:
                mapped.close()
        r = response.retrieval
        r.units_selected = selection.units if selection is not None else 0
        r.tokens_placed = placement.placed
        r.tokens_gathered = placement.gathered
        r.bytes_moved = placement.bytes_moved
        r.seconds = time.perf_counter() - started
        self.metrics.boundaries.labels(session.policy.name).inc()
        self.metrics.bytes_moved.labels("host_to_device").inc(placement.bytes_moved)

    async def _attend(self, session: Session, event: pb.BoundaryEvent, answer: pb.HostAttention) -> None:
        """A chunk's exact attention over the host tier (BoundaryEvent.attend)."""
        layout = session.layout
        started = time.perf_counter()
        rows = len(event.layers) or layout.num_layers
        check.require(event.attend_scale >= 0 and math.isfinite(event.attend_scale), "boundary.attend_scale",
                      f"{event.attend_scale} must be a finite scale >= 0 (0: 1/sqrt(head_dim))")
        scale = event.attend_scale or layout.head_dim**-0.5
        mapped = open_queries(event.attend, "boundary.attend", layout, len(event.layers))
        try:
            out, lse = await self._session_op(session.attend, event.position, list(event.layers), mapped.tensor, scale)
        finally:
            mapped.close()
        answer.out.CopyFrom(inline_ref(out))
        answer.lse.CopyFrom(inline_ref(lse))
        answer.tokens = event.position
        answer.seconds = time.perf_counter() - started
        self.metrics.bytes_moved.labels("host_to_attention").inc(layout.token_bytes // layout.num_layers * event.position * rows)

    async def Boundaries(self, request: pb.BoundariesRequest, context) -> pb.BoundariesResponse:
        """One step's notices and retrievals of many sessions (server/step_batch.py): every
        event is checked first, under all their locks; one bad event refuses the whole call."""
        started = time.perf_counter()
        try:
            require_decoded(request)
            caller = self._caller(context)
            sessions = self._step_sessions(request.events, caller)
            await self._await_followed(sessions, request.events, context)
            async with contextlib.AsyncExitStack() as held:
                for session in sorted(sessions, key=lambda s: s.session_id):
                    await held.enter_async_context(session.lock)
                for i, session in enumerate(sessions):
                    if session.closed:
                        raise InvalidArgument(f"events[{i}].session_id", f"session {session.session_id!r} was closed")
                    session.touch()
                events = list(request.events)
                check_events(sessions, events, request.background)
                timing = StepTiming()
                reports_phases = True
                retrieves = any(event.retrieve for event in events)
                if retrieves and self.kernel_profiler is not None:
                    self.kernel_profiler.begin()
                if retrieves and self.coalescer is not None:
                    served = await self.coalescer.serve(sessions, events, request.background)
                    outcomes, groups, timing, reports_phases = (
                        served.outcomes, served.groups, served.timing, served.reports_phases,
                    )  # fmt: skip
                elif retrieves:
                    outcomes, groups = await self._run_retrievals(sessions, events, request.background, timing)
                else:
                    work = (serve_step, sessions, events, False, True, timing)
                    if self.profiler is not None:
                        work = (self.profiler.run, "notices", *work)
                    if self.inline_notices:
                        outcomes, groups = streams.on_stream(self.notice_stream, *work)
                    else:
                        outcomes, groups = await _in_thread(streams.on_stream, self.notice_stream, *work)
                for session in sessions:  # a notice may reach (or pass) a declared prefix's end
                    if session.declared is not None:
                        self._after_append(session)
            await self._wake_followers()
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "Boundaries", exc)
            raise AssertionError("unreachable") from None
        ended = time.perf_counter()
        seconds = ended - started
        response = pb.BoundariesResponse(
            seconds=seconds, groups=groups, queued_seconds=timing.started - started,
            serve_seconds=timing.syncing - timing.started, sync_seconds=timing.ended - timing.syncing,
        )  # fmt: skip
        moved = 0
        for session, outcome in zip(sessions, outcomes, strict=True):
            result = response.results.add()
            if outcome.append is not None:
                result.append.spilled_upto, result.append.evicted = outcome.append
                self.metrics.appends.inc()
            if (state := table_state(session.policy)) is not None:  # (worker_selection)
                t = result.table
                t.units, t.candidates, t.open_start = state
                t.evicted = session.evicted_upto
            if outcome.placement is not None:
                placement = outcome.placement
                r = result.retrieval
                r.units_selected, r.tokens_placed = placement.units, placement.placed
                r.tokens_gathered, r.bytes_moved, r.seconds = placement.gathered, placement.bytes_moved, seconds
                r.staged_rows = outcome.staged_rows
                if outcome.staged_rows:
                    self.metrics.worker_copied_rows.inc(outcome.staged_rows)
                if outcome.on_host:
                    self.metrics.host_selections.labels(outcome.on_host).inc()
                moved += placement.bytes_moved
                self.metrics.boundaries.labels(session.policy.name).inc()
        self.metrics.bytes_moved.labels("host_to_device").inc(moved)
        self.metrics.rpc_latency.labels("Boundaries").observe(seconds)
        kind = "retrievals" if retrieves else "notices"
        phases = timing.phases if reports_phases else None  # a coalesced run's phases count once
        for phase, phase_seconds in (phases or {}).items():
            self.metrics.boundaries_phase.labels(kind, phase).observe(phase_seconds)
        if self.phase_log is not None and phases is not None:
            self.phase_log.add(kind, phases)
        return response

    def _after_append(self, session: Session) -> None:
        """A session over a shorter held prefix that appended up to its declared one's end
        registers it (SessionRegistry.after_append)."""
        held = session.prefix
        self.registry.after_append(session)
        if session.prefix is not held:
            self.metrics.prefix_registered.inc()
            self._update_pool_gauges()

    def _step_sessions(self, events, caller: str | None) -> list[Session]:
        """The session of every event, for the caller holding its capability: one event per
        session, shm / cuda_ipc sessions only (the query and tokens are in the working set)."""
        check.require(len(events) >= 1, "events", "at least one event is required")
        sessions: list[Session] = []
        seen: dict[str, int] = {}
        for i, event in enumerate(events):
            field = f"events[{i}].session_id"
            if event.session_id in seen:
                raise InvalidArgument(field, f"session {event.session_id!r} is also events[{seen[event.session_id]}]")
            session = self.registry.get(event.session_id, caller, event.capability, field)
            check.require(session.transport != pb.TRANSPORT_INLINE, field,
                          "TRANSPORT_INLINE sessions send their boundaries on Decode (the query travels inline)")
            seen[event.session_id] = i
            sessions.append(session)
        return sessions

    async def KeepAlive(self, request: pb.KeepAliveRequest, context) -> pb.KeepAliveResponse:
        try:
            require_decoded(request)
            session = self.registry.get(request.session_id, self._caller(context), request.capability)
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "KeepAlive", exc)
            raise AssertionError("unreachable") from None
        session.touch()
        return pb.KeepAliveResponse(lease_seconds_left=int(session.lease_seconds))

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        try:
            require_decoded(request)
            session = self.registry.get(request.session_id, self._caller(context), request.capability)
            async with session.lock:
                if session.closed:
                    raise InvalidArgument("session_id", f"session {request.session_id!r} is already closed")
                host, device = self._close(session, "closed")
            await self._wake_followers()
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "CloseSession", exc)
            raise AssertionError("unreachable") from None
        return pb.CloseSessionResponse(host_bytes_freed=host, device_bytes_freed=device)

    async def GetStats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        try:
            require_decoded(request)
            caller = self._caller(context)
            if request.session_id:
                sessions = [self.registry.get(request.session_id, caller, request.capability)]
            else:
                sees_all = self._sees_all(context, caller)
                sessions = [
                    s for s in self.registry.sessions.values()
                    if not s.closed and (sees_all or s.worker_id == caller)
                ]
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "GetStats", exc)
            raise AssertionError("unreachable") from None
        response = pb.StatsResponse(version=__version__, device=str(self.device))
        for pool in (self.registry.host_pool, self.registry.device_pool):
            u = pool.usage()
            response.pools.add(
                tier=u.tier, kind=u.kind, capacity_bytes=u.capacity_bytes, used_bytes=u.used_bytes, free_bytes=u.free_bytes
            )
        workers: dict[str, pb.WorkerStats] = {}
        for s in sessions:
            c = s.counters
            response.sessions.add(
                session_id=s.session_id, worker_id=s.worker_id, policy=s.policy.name, prompt_tokens=s.prompt_tokens,
                tokens=s.spilled_upto, steps=c.steps, boundaries=c.boundaries, appends=c.appends,
                bytes_host_to_device=c.bytes_host_to_device, resident_tokens=s.ws.resident_tokens(),
                max_resident_tokens=s.ws.max_resident, host_tokens=s.spilled_upto, units=s.policy.num_units,
                host_bytes=s.store.nbytes, device_bytes=s.device_bytes, tag=s.tag,
                tp_rank=s.tp_rank, tp_size=s.tp_size, metadata_bytes=s.segment.metadata_bytes,
                prefix_id=s.prefix.prefix_id if s.prefix else "", prefix_tokens=s.prefix.num_tokens if s.prefix else 0,
            )
            w = workers.setdefault(s.worker_id, pb.WorkerStats(worker_id=s.worker_id))
            w.sessions += 1
            w.host_bytes += s.store.nbytes
            w.device_bytes += s.device_bytes
        response.workers.extend(workers.values())
        now = time.monotonic()
        if not request.session_id:
            response.prefixes.extend(
                p.stats(now) for p in self.registry.prefixes.held() if sees_all or p.tenant == caller
            )
        response.prefix_evictions = self.registry.prefixes.evictions
        return response

    # ---- leases ------------------------------------------------------------------------
    async def reap_expired(self) -> int:
        """Close every session whose lease ran out; returns how many."""
        count = 0
        for session in self.registry.expired():
            async with session.lock:
                if session.closed or session.lease_deadline >= time.monotonic():
                    continue
                log.warning(
                    "session %s lease expired (worker %s silent for %.0fs): releasing its memory",
                    session.session_id, session.worker_id, session.lease_seconds,
                )
                self._close(session, "lease_expired")
                count += 1
        return count
