"""Transport-independent parts of a worker session, shared by the sync and asyncio SDKs.

`SessionCore` builds request messages and applies answers; it owns the working-set tensors
the worker reads (mapped shm / CUDA IPC memory, or a local mirror for the inline transport)
and never does I/O itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, TypedDict

import grpc
import torch

from kvrecall.client.errors import KVRecallClientError, UnavailableError, from_rpc_error
from kvrecall.client.selection import WorkerTable
from kvrecall.dtypes import WIRE_OF_TORCH
from kvrecall.kernels.placement_staged import Staging, apply_staged
from kvrecall.sizes import TOKEN_COUNT_FIELDS
from kvrecall.transport import MappedTensor, inline_ref, map_segment, open_ref
from kvrecall.v1 import kvrecall_pb2 as pb
from kvrecall.v1 import kvrecall_pb2_grpc as pb_grpc

TRANSPORTS = {"shm": pb.TRANSPORT_SHM, "cuda_ipc": pb.TRANSPORT_CUDA_IPC, "inline": pb.TRANSPORT_INLINE}


@dataclass(frozen=True)
class ModelSpec:
    """The model layout a session is opened with; `device` ("cuda:0", "cpu", "": unknown) is
    where the worker's model runs, which picks the transport when open_session is given none."""

    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    dtype: torch.dtype
    max_tokens: int
    device: str = ""

    def to_proto(self) -> pb.ModelLayout:
        return pb.ModelLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            num_query_heads=self.num_query_heads,
            head_dim=self.head_dim,
            dtype=WIRE_OF_TORCH[self.dtype],
            max_tokens=self.max_tokens,
        )


def policy_message(name: str, config: dict[str, Any] | None) -> pb.PolicyConfig:
    """PolicyConfig for `name` with the given typed fields (unknown fields raise ValueError)."""
    message = pb.PolicyConfig(name=name)
    if config:
        sub = getattr(message, name, None)
        if sub is None:
            raise ValueError(f"policy {name!r} takes no configuration")
        for key, value in config.items():
            if key not in sub.DESCRIPTOR.fields_by_name:
                raise ValueError(f"policy {name!r} has no setting {key!r}")
            setattr(sub, key, value)
    elif hasattr(message, name):
        getattr(message, name).SetInParent()
    return message


def fit_to_sequence(config: dict[str, Any] | None, max_tokens: int) -> dict[str, Any] | None:
    """`config` with every token count capped at `max_tokens`: for sweeps whose budgets may
    exceed a short sequence (such a budget covers it, as `max_tokens` does)."""
    if not config:
        return config
    return {k: min(v, max_tokens) if k in TOKEN_COUNT_FIELDS else v for k, v in config.items()}


@dataclass
class SessionCore:
    """What a worker holds for one open session."""

    session_id: str
    spec: ModelSpec
    transport: int
    info: pb.OpenSessionResponse
    keys: torch.Tensor = field(repr=False)      # [L, H, C, D]
    values: torch.Tensor = field(repr=False)    # [L, H, C, D]
    slot_pos: torch.Tensor = field(repr=False)  # [L, H, C] int32
    query: torch.Tensor = field(repr=False)     # [L, Hq, D]
    _mapped: list[MappedTensor] = field(default_factory=list, repr=False)
    # CUDA IPC: the daemon's interprocess event publish() records (None: a stream sync instead).
    publish_event: torch.cuda.Event | None = field(default=None, repr=False)
    # The daemon's staging area for retrievals this worker copies itself (WorkingSetInfo.staged_*;
    # None: the session has none): StepEvent.worker_copies, apply_staged.
    staging: Staging | None = field(default=None, repr=False)
    # The session's unit table, mapped for the worker to choose its retrievals (WorkingSetInfo.selection;
    # None: the daemon chooses): StepEvent.worker_selected.
    table: WorkerTable | None = field(default=None, repr=False)
    # What that table held after this session's last event (StepResult.table; None before one).
    table_state: pb.MappedTableState | None = field(default=None, repr=False)
    prefix_tokens: int = 0   # tokens of the prefix declared at open (0: none declared)
    position: int = 0        # tokens in the sequence (prompt + generated) so far
    noticed_upto: int = 0    # tokens announced to the daemon with AppendNotices (answers taken)
    # Tokens below it have left the window ring (the daemon's rule, mirrored: `note_noticed`);
    # with deferred eviction the worker masks the ring slots below it itself.
    evicted_upto: int = 0
    seq: int = 0
    closed: bool = False

    @staticmethod
    def from_open(
        response: pb.OpenSessionResponse, spec: ModelSpec, transport: int, prefix_tokens: int = 0
    ) -> SessionCore:
        ws = response.working_set
        refs = [ws.keys, ws.values, ws.slot_pos, ws.query]
        names = ["keys", "values", "slot_pos", "query"]
        if transport == pb.TRANSPORT_INLINE:
            from kvrecall.dtypes import TORCH_OF_WIRE

            tensors = [torch.zeros(tuple(r.shape), dtype=TORCH_OF_WIRE[r.dtype]) for r in refs]
            tensors[2].fill_(-1)
            mapped: list[MappedTensor] = []
        elif transport == pb.TRANSPORT_SHM:
            segment = receive_working_set(response)
            tensors = map_segment(segment, refs, names)
            mapped = [MappedTensor(segment.tensor, [segment.release])]
        else:
            mapped = [open_ref(r, name) for r, name in zip(refs, names, strict=True)]
            tensors = [m.tensor for m in mapped]
        staging = None
        if ws.HasField("staged_targets") and transport in (pb.TRANSPORT_CUDA_IPC, pb.TRANSPORT_SHM):
            staged_refs = [ws.staged_keys, ws.staged_values, ws.staged_targets]
            staged_names = ["staged_keys", "staged_values", "staged_targets"]
            if transport == pb.TRANSPORT_SHM:  # (the segment mapped above)
                staging = Staging(*map_segment(segment, staged_refs, staged_names))
            else:
                staged = [open_ref(r, name) for r, name in zip(staged_refs, staged_names, strict=True)]
                mapped += staged
                staging = Staging(*(m.tensor for m in staged))
        table = None
        if ws.HasField("selection") and transport in (pb.TRANSPORT_CUDA_IPC, pb.TRANSPORT_SHM):
            table, table_mapped = WorkerTable.mapped(ws.selection, transport, segment if transport == pb.TRANSPORT_SHM
                                                     else None)  # fmt: skip
            mapped += table_mapped
        core = SessionCore(
            response.session_id, spec, transport, response, *tensors, _mapped=mapped, staging=staging,
            table=table, prefix_tokens=prefix_tokens,
        )  # fmt: skip
        if response.prefix_tokens_held:  # the daemon holds the prompt's prefix: start after it
            core.apply_delta(response.delta)
            core.start_at(response.prefix_tokens_held)
        if transport == pb.TRANSPORT_CUDA_IPC and ws.query.cuda_ipc.event_handle:
            from kvrecall.cuda_ipc import open_event

            core.publish_event = open_event(ws.query.cuda_ipc.event_handle, ws.query.cuda_ipc.device, "query")
        return core

    @property
    def capability(self) -> str:
        """The secret every call on this session presents (OpenSessionResponse.capability)."""
        return self.info.capability

    @property
    def prefix_held(self) -> int:
        """Prompt tokens the daemon already held at open (a shared prefix; 0: none): the
        session starts after them, its working set filled as if it had ingested them."""
        return self.info.prefix_tokens_held

    # ---- the plan the daemon chose --------------------------------------------------
    @property
    def n_sink(self) -> int:
        return self.info.working_set.n_sink

    @property
    def retrieved(self) -> int:
        return self.info.working_set.retrieved

    @property
    def window(self) -> int:
        return self.info.working_set.window

    @property
    def capacity(self) -> int:
        return self.info.working_set.capacity

    @property
    def spill_every(self) -> int:
        return self.info.spill_every

    @property
    def min_window(self) -> int:
        """Recent tokens the ring keeps after a notice (a daemon that does not say: window -
        spill_every)."""
        return self.info.working_set.min_window or self.window - self.spill_every

    @property
    def deferred(self) -> bool:
        """Deferred eviction (OpenSessionRequest.deferred_eviction, granted): the ring has
        spill_every slots beyond min_window + spill_every, and notices leave evicted ring slots
        in place for the worker to mask."""
        return self.window - self.spill_every - self.min_window > 0

    def start_at(self, tokens: int) -> None:
        """The session holds `tokens` tokens, all noticed (after its ingest or a held prefix)."""
        self.position = self.noticed_upto = tokens
        self.evicted_upto = max(min(self.n_sink, tokens), tokens - self.min_window)

    def note_noticed(self, upto: int) -> None:
        """An answer said tokens [0, upto) are in the host tier: what left the ring follows."""
        self.noticed_upto = max(self.noticed_upto, upto)
        self.evicted_upto = max(self.evicted_upto, upto - self.min_window)

    @property
    def boundary_mode(self) -> int:
        return self.info.boundary.mode

    @property
    def boundary_threshold(self) -> float:
        return self.info.boundary.threshold

    @property
    def boundary_target_rate(self) -> float:
        # the policy's target retrieval rate (louiskv `target_rate`; 0: the fixed threshold)
        return float(self.policy_config.get("target_rate") or 0.0)

    @property
    def boundary_min_gap(self) -> int:
        # decode steps after a retrieval in which the rule does not fire (louiskv `min_gap`)
        return int(self.policy_config.get("min_gap") or 0)

    @property
    def exact_chunks(self) -> bool:
        # a chunk attends exactly over the host tier (BoundaryEvent.attend), not the working set
        return bool(self.policy_config.get("exact_chunks", False))

    @property
    def boundary_pre_rope(self) -> bool:
        return self.info.boundary.pre_rope

    @property
    def observation(self) -> int:
        return self.info.observation

    @property
    def policy_config(self) -> dict[str, Any]:
        return json.loads(self.info.policy_config_json or "{}")

    def window_slot(self, position: int) -> int:
        return self.n_sink + self.retrieved + position % self.window

    # ---- working-set writes (worker side, between daemon calls) ---------------------
    def write_token(self, position: int, keys: torch.Tensor, values: torch.Tensor, layer: int | None = None) -> None:
        """Write one token's K/V into its ring slot: [L, H, D] for all layers, or [H, D] for `layer`."""
        slot = self.window_slot(position)
        where = slice(None) if layer is None else layer
        self.keys[where, :, slot] = keys
        self.values[where, :, slot] = values
        self.slot_pos[where, :, slot] = position

    def needs_append(self) -> bool:
        """True when spill_every tokens were written since the last AppendNotice."""
        return self.position - self.noticed_upto >= self.spill_every

    def valid_mask(self, layer: int) -> torch.Tensor:
        """[H, C] bool: the slots attention must read for `layer`."""
        return self.slot_pos[layer] >= 0

    def resident_tokens(self) -> int:
        return int((self.slot_pos >= 0).sum(dim=-1).max())

    # ---- request builders / answer appliers ------------------------------------------
    def keepalive_request(self) -> pb.KeepAliveRequest:
        return pb.KeepAliveRequest(session_id=self.session_id, capability=self.capability)

    def close_request(self) -> pb.CloseSessionRequest:
        return close_request(self.info)

    def stats_request(self) -> pb.StatsRequest:
        return pb.StatsRequest(session_id=self.session_id, capability=self.capability)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def ingest_request(
        self, num_tokens: int, kv_ref: pb.TensorRef | None = None, queries: torch.Tensor | None = None,
        first_layer: int = 0,
    ) -> pb.IngestPromptRequest:  # fmt: skip
        """IngestPrompt of a `num_tokens`-token prompt: layers [first_layer, ...) of its KV staged
        as `kv_ref`, their observation queries inline (in `kv_ref`'s dtype is the caller's job)."""
        request = pb.IngestPromptRequest(
            session_id=self.session_id, capability=self.capability, num_tokens=num_tokens, first_layer=first_layer
        )
        if kv_ref is not None:
            request.kv.CopyFrom(kv_ref)
        if queries is not None:
            request.queries.CopyFrom(inline_ref(queries))
        return request

    def apply_ingest(self, response: pb.IngestPromptResponse, num_tokens: int) -> None:
        self.apply_delta(response.delta)
        self.start_at(num_tokens)

    def append_request(self, upto: int | None = None) -> pb.DecodeRequest:
        """An AppendNotice for the tokens written up to `upto` (default: all of them)."""
        upto = self.position if upto is None else upto
        request = pb.DecodeRequest(seq=self.next_seq(), session_id=self.session_id, capability=self.capability)
        request.append.upto = upto
        if self.transport == pb.TRANSPORT_INLINE:
            start = self.noticed_upto
            positions = torch.arange(start, upto)
            slots = self.n_sink + self.retrieved + positions % self.window
            kv = torch.stack((self.keys[:, :, slots], self.values[:, :, slots]), dim=1)
            request.append.kv.CopyFrom(inline_ref(kv))
        return request

    def boundary_request(
        self, layers: list[int] | None = None, position: int | None = None, queries: torch.Tensor | None = None,
        attend: torch.Tensor | None = None, attend_scale: float = 0.0,
    ) -> pb.DecodeRequest:
        """A BoundaryEvent at `position` (default: the tokens written so far), for the query in
        the working set or for `queries` (several per head, inline). With `attend` (a chunk's
        queries, inline) the answer carries their exact attention over the host tier, and the
        event retrieves for `queries` only."""
        request = pb.DecodeRequest(seq=self.next_seq(), session_id=self.session_id, capability=self.capability)
        request.boundary.position = self.position if position is None else position
        request.boundary.layers.extend(layers or [])
        if attend is not None:
            request.boundary.attend.CopyFrom(inline_ref(attend))
            request.boundary.attend_scale = attend_scale
        if queries is not None:
            request.boundary.queries.CopyFrom(inline_ref(queries.to(self.spec.dtype)))
        elif self.transport == pb.TRANSPORT_INLINE and attend is None:
            request.boundary.query.CopyFrom(inline_ref(self.query))
        return request

    def chunk_request(self, kv) -> pb.DecodeRequest:
        """ChunkAppend of the tokens in staging buffer `kv` (a StagingBuffer), from `position`."""
        request = pb.DecodeRequest(seq=self.next_seq(), session_id=self.session_id, capability=self.capability)
        request.chunk.start = self.position
        request.chunk.kv.CopyFrom(kv.ref())
        return request

    def apply_delta(self, delta: pb.WorkingSetDelta) -> None:
        """Inline transport: bring the mirror up to date with the daemon's changes."""
        if not delta.slots:
            return
        slots = torch.frombuffer(bytearray(delta.slots), dtype=torch.int32).to(torch.int64)
        positions = torch.frombuffer(bytearray(delta.positions), dtype=torch.int32)
        self.slot_pos.view(-1)[slots] = positions
        filled = slots[positions >= 0]
        D = self.spec.head_dim
        for raw, target in ((delta.keys, self.keys), (delta.values, self.values)):
            if filled.numel():
                rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(target.dtype).view(-1, D)
                target.view(-1, D)[filled] = rows

    def apply_answer(self, request: pb.DecodeRequest, response: pb.DecodeResponse) -> None:
        if response.seq != request.seq:
            raise RuntimeError(f"answer seq {response.seq} for request {request.seq}: stream out of order")
        if request.WhichOneof("event") in ("append", "chunk"):
            self.note_noticed(response.append.spilled_upto)
        self.apply_delta(response.delta)

    @property
    def stages_every_row(self) -> bool:
        """The daemon stages every new row of this session's worker-copies retrievals
        (WorkingSetInfo.stages_every_row): such a retrieval writes no key or value row in place."""
        return self.staging is not None and self.info.working_set.stages_every_row

    def apply_staged(self, rows: int) -> None:
        """Copy a retrieval's `rows` staged rows (RetrievalResult.staged_rows) into their slots, on
        the current stream (StepEvent.worker_copies): before the retrieved region is read again
        and before this session's next event (whose publish() orders the daemon after it)."""
        if rows <= 0:
            return
        if self.staging is None:
            raise RuntimeError(f"session {self.session_id}: {rows} staged rows but no staging area was mapped")
        apply_staged(self.keys, self.values, self.staging, rows)

    def publish(self) -> None:
        """Make this worker's writes to a GPU working set visible before the daemon reads it:
        record the session's interprocess event on the current stream (the daemon's stream
        waits on it; nothing waits on the host), else sync the current stream (never the device)."""
        if self.publish_event is not None:
            self.publish_event.record(torch.cuda.current_stream(self.keys.device))
        elif self.keys.is_cuda:
            torch.cuda.current_stream(self.keys.device).synchronize()

    def unmap(self) -> None:
        for m in self._mapped:
            m.close()
        self._mapped.clear()


def close_request(response: pb.OpenSessionResponse) -> pb.CloseSessionRequest:
    """CloseSession for the session `response` opened."""
    return pb.CloseSessionRequest(session_id=response.session_id, capability=response.capability)


def receive_working_set(response: pb.OpenSessionResponse):
    """Map a CPU daemon's working-set segment: a sealed memfd received over its fd socket."""
    from kvrecall.fdpass import receive_fd
    from kvrecall.shm import ShmSegment

    shm = response.working_set.keys.shm
    fd = receive_fd(shm.fd_socket, response.session_id, response.capability)
    return ShmSegment.map_fd(fd, shm.name, 0)


# Calls gRPC retries on UNAVAILABLE (the daemon not up yet, or restarting): nothing is created
# on the daemon before it answers them, so a retry cannot open a session twice.
RETRIED_METHODS = ("OpenSession", "GetStats")
MAX_CONNECT_RETRIES = 4  # gRPC makes at most 5 attempts of a call


def retry_service_config(connect_retries: int) -> str:
    """The channel's service config: RETRIED_METHODS retry UNAVAILABLE up to `connect_retries`
    times, gRPC waiting a random time up to 0.1 s, 0.2 s, 0.4 s, ... (at most 2 s) between attempts."""
    service = pb.DESCRIPTOR.services_by_name["KVRecall"].full_name
    policy = {
        "maxAttempts": connect_retries + 1,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": service, "method": method} for method in RETRIED_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


class OpenOptions(TypedDict, total=False):
    """The keyword arguments of open_session (see ClientBase.open_request)."""

    transport: str | None
    device: torch.device | str | None
    lease_seconds: int
    tag: str
    tp_rank: int
    tp_size: int
    prefix: pb.PrefixDeclaration | None
    deferred_eviction: bool


class ClientBase:
    """What the sync and asyncio clients share: identity, deadlines, the channel's settings
    (retries included: `connect_retries` in [0, 4], see RETRIED_METHODS), the mapping of gRPC
    errors and the OpenSession request. Subclasses make the channel."""

    def __init__(
        self,
        target: str,
        worker_id: str,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float = 30.0,
        connect_retries: int = MAX_CONNECT_RETRIES,
        max_message_mb: int = 512,
    ) -> None:
        if not 0 <= connect_retries <= MAX_CONNECT_RETRIES:
            raise ValueError(f"connect_retries: must be in [0, {MAX_CONNECT_RETRIES}] (gRPC makes at most 5 attempts)")
        self.target = target
        self.worker_id = worker_id
        self.timeout = timeout
        self.connect_retries = connect_retries
        self._metadata = metadata(worker_id, token)
        options = channel_options(max_message_mb, connect_retries)
        self.channel = self._make_channel(credentials(tls_ca, tls_cert, tls_key), options)
        self.stub = pb_grpc.KVRecallStub(self.channel)
        self._retried = {getattr(self.stub, method) for method in RETRIED_METHODS}

    def _make_channel(self, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError

    def client_error(self, exc: grpc.RpcError, method: Any, started: float) -> KVRecallClientError:
        """The typed error of a failed unary call of stub `method` begun at `started` (monotonic)."""
        error = from_rpc_error(exc)
        if isinstance(error, UnavailableError):
            attempts = self.connect_retries + 1 if method in self._retried else 1
            error = self.unavailable(error, f"{attempts} attempt(s) over {time.monotonic() - started:.1f}s")
        return error

    def stream_error(self, exc: grpc.RpcError) -> KVRecallClientError:
        """The typed error of a broken Decode stream."""
        error = from_rpc_error(exc)
        return self.unavailable(error, "decode stream broken") if isinstance(error, UnavailableError) else error

    def unavailable(self, error: KVRecallClientError, what: str) -> UnavailableError:
        """An UnavailableError that says what is down and what it means for open sessions."""
        return UnavailableError(
            f"kvrecall daemon at {self.target} is unavailable (not running or restarting; {what}): "
            f"{error.details}. Sessions do not survive a daemon restart: open new ones once it is back."
        )

    def open_request(
        self,
        spec: ModelSpec,
        policy: str,
        config: dict[str, Any] | None,
        *,
        transport: str | None = None,
        device: torch.device | str | None = None,
        lease_seconds: int = 0,
        tag: str = "",
        tp_rank: int = 0,
        tp_size: int = 0,
        prefix: pb.PrefixDeclaration | None = None,
        deferred_eviction: bool = False,
    ) -> tuple[pb.OpenSessionRequest, int]:
        """The OpenSession request and the transport it asks for (see choose_transport; the
        device defaults to the spec's). `prefix` (kvrecall.prefix.declare): the prompt starts
        with this shareable prefix (SessionCore.prefix_held says whether the daemon held it).
        `deferred_eviction`: for kvrecall.engine.Engine, which decodes on without waiting for
        AppendNotices' answers (OpenSessionRequest.deferred_eviction)."""
        device = device if device is not None else (spec.device or None)
        kind = choose_transport(self.target, torch.device(device) if device is not None else None, transport)
        request = pb.OpenSessionRequest(
            worker_id=self.worker_id,
            layout=spec.to_proto(),
            policy=policy_message(policy, config),
            transport=kind,
            lease_seconds=lease_seconds,
            tag=tag,
            tp_rank=tp_rank,
            tp_size=tp_size,
            deferred_eviction=deferred_eviction,
        )
        if prefix is not None:
            request.prefix.CopyFrom(prefix)
        return request, kind


def metadata(worker_id: str, token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata; an empty worker_id names none (the operator's view on a local
    daemon without auth: GetStats lists every tenant's sessions)."""
    md = [("kvrecall-worker-id", worker_id)] if worker_id else []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    return tuple(md)


def channel_options(max_message_mb: int, connect_retries: int) -> list[tuple[str, Any]]:
    n = max_message_mb << 20
    options = [
        ("grpc.max_send_message_length", n),
        ("grpc.max_receive_message_length", n),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.service_config_disable_resolution", 1),  # ours, not one a DNS record names
    ]
    if connect_retries:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(connect_retries))]
    return options


def normalise_target(target: str) -> str:
    """Accept unix:///path, unix:path, HOST:PORT."""
    return target


def credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> grpc.ChannelCredentials | None:
    if not (tls_ca or tls_cert):
        return None

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def choose_transport(target: str, device: torch.device | None, transport: str | None) -> int:
    """`transport` by name; else inline for a remote target, CUDA IPC for a local one when the
    worker's tensors are on a GPU, shared memory otherwise."""
    if transport:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {sorted(TRANSPORTS)}")
        return TRANSPORTS[transport]
    local = target.startswith("unix:") or target.startswith("localhost:") or target.startswith("127.")
    if not local:
        return pb.TRANSPORT_INLINE
    if device is not None and device.type == "cuda":
        return pb.TRANSPORT_CUDA_IPC
    return pb.TRANSPORT_SHM
