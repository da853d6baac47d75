"""Sessions: one sequence's KV, owned by one worker, kept alive by a lease.

A Session owns its SequenceStore (host pages), its DeviceSegment (working set) and its
policy state, and returns all of them on close(). The SessionRegistry admits sessions
(RESOURCE_EXHAUSTED with what is free when a pool, a worker's share of it or a worker quota
is full), looks them up for the holder of their capability only, and closes those whose
lease ran out. A session over a shared prefix (prefixes.py) maps the prefix's pages and
starts from a copy of its policy state; closing it drops its reference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch

from kvrecall import kernels
from kvrecall.kernels.host_attention import block_tokens
from kvrecall.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from kvrecall.server.host_store import SequenceStore, tokens_per_page
from kvrecall.server.layout import ModelLayout, SegmentLayout
from kvrecall.server.policies.base import Chunk, Policy, PolicyContext, Selection
from kvrecall.server.pools import DevicePool, HostPool
from kvrecall.server.prefixes import Declared, Prefix, PrefixRegistry
from kvrecall.server.working_set import Placement, WorkingSet
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.session")


@dataclass
class SessionCounters:
    steps: int = 0
    boundaries: int = 0
    appends: int = 0
    bytes_host_to_device: int = 0
    units: int = 0


def _exclusive(method):
    """Run a session operation under the session's `busy` lock and refuse closed sessions:
    release() takes the same lock, so memory is never unmapped under a running operation
    (a cancelled RPC's worker thread may still be inside one when the daemon shuts down)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.busy:
            if self.closed:
                raise NotFound(f"session_id: no open session {self.session_id!r}")
            return method(self, *args, **kwargs)

    return run


@dataclass
class Session:
    session_id: str
    worker_id: str
    tag: str
    transport: int
    layout: ModelLayout
    policy: Policy
    store: SequenceStore
    segment: object  # DeviceSegment
    ws: WorkingSet
    lease_seconds: float
    capability: str = field(default="", repr=False)  # the secret every call on the session presents
    lease_deadline: float = 0.0
    tp_rank: int = 0  # the worker's tensor-parallel rank (shown in stats and logs)
    tp_size: int = 0  # its world size; 0 or 1: no tensor parallelism
    prompt_tokens: int = 0
    spilled_upto: int = 0  # tokens [0, spilled_upto) are in the host tier
    evicted_upto: int = 0  # tokens [n_sink, evicted_upto) have left the window
    layers_ingested: int = 0  # prompt layers [0, layers_ingested) are in (streamed ingest)
    ingested: bool = False
    closed: bool = False
    counters: SessionCounters = field(default_factory=SessionCounters)
    prefix: Prefix | None = None  # the shared prefix it reads (holding a reference)
    declared: Declared | None = None  # a declared prefix not held: this session's ingest registers it
    first_selection: torch.Tensor | None = field(default=None, repr=False)  # the ingest's, until registered
    # CUDA IPC: the worker records this interprocess event after writing the working set;
    # the daemon's stream waits on it before an operation (no host sync on either side).
    worker_event: torch.cuda.Event | None = None
    worker_event_handle: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Reentrant: a Boundaries call holds the busy locks of all its sessions around their operations.
    busy: threading.RLock = field(default_factory=threading.RLock, repr=False)
    unfinished: list[Placement | None] = field(default_factory=list, repr=False)  # placements awaiting finish()

    @property
    def plan(self):
        return self.ws.plan

    @property
    def device_bytes(self) -> int:
        """Device-pool bytes this session holds: its working set and its policy's metadata."""
        return self.segment.nbytes + self.segment.metadata_bytes

    def context(self, chunk: Chunk | None = None) -> PolicyContext:
        return PolicyContext(self.layout, self.store, self.ws, self.prompt_tokens, self.evicted_upto, chunk)

    def touch(self) -> None:
        self.lease_deadline = time.monotonic() + self.lease_seconds

    # ---- operations (run in a worker thread, under self.lock) ----------------------------
    @_exclusive
    def ingest(self, first_layer: int, kv: torch.Tensor, queries: torch.Tensor | None) -> None:
        """Prompt layers [first_layer, first_layer + n) arrive (streamed ingest: in order, each
        once): kv [n, 2, H, T, D], queries [n, Hq, n_obs, D] or None. Each layer goes to the
        host tier, its sinks and window to the working set, and to the policy at once; the
        call with the last layer completes the ingest (the policy's first selection)."""
        if self.ingested:
            raise FailedPrecondition(f"session {self.session_id}: prompt already ingested")
        T, done = kv.shape[3], self.layers_ingested
        if first_layer != done:
            problem = "was already ingested" if first_layer < done else "skips layers"
            raise InvalidArgument("first_layer", f"layer {first_layer} {problem}: layers arrive in order, the next is {done}")
        if done and T != self.prompt_tokens:
            raise InvalidArgument("num_tokens", f"{T} differs from the {self.prompt_tokens} tokens of the layers before")
        plan = self.plan
        n_sink = min(plan.n_sink, T)
        window_from = max(n_sink, T - plan.min_window)
        self.prompt_tokens, self.evicted_upto = T, window_from
        self._after_worker()
        ctx = self.context()
        for i in range(kv.shape[0]):
            layer = slice(first_layer + i, first_layer + i + 1)
            self.store.write(0, kv[i : i + 1], first_layer=layer.start)
            sinks = torch.arange(n_sink, device=self.ws.keys.device)
            self.ws.write_tokens(kv[i : i + 1], 0, 0, n_sink, sinks, layers=layer)
            self.ws.write_tokens(kv[i : i + 1], 0, window_from, T, self.ws.window_slots(window_from, T), layers=layer)
            self.policy.on_ingest_layer(ctx, layer.start, kv[i], None if queries is None else queries[i])
            self.layers_ingested += 1
        placement = None
        if self.layers_ingested == self.layout.num_layers:
            self.spilled_upto = T
            self.ingested = True
            selection = self.policy.on_ingest_done(ctx)
            if self.declared is not None and selection is not None:
                self.first_selection = selection.positions.clone()
            placement = self._place(selection, note_resident=True)
            self.counters.units = self.policy.num_units
        self.finish(placement)

    @_exclusive
    def start_from(self, prefix: Prefix) -> None:
        """Begin as if this session had ingested `prefix` itself (its store maps the prefix's
        full pages already): the partial page copied, a copy of the policy state, sinks and
        window read from the host tier and the first selection placed, in the ingest's order."""
        T, plan, store = prefix.num_tokens, self.plan, self.store
        if prefix.full_pages < len(prefix.pages):
            store.pool.copy_page(prefix.pages[prefix.full_pages], store.pages[prefix.full_pages])
        store.num_tokens = T
        self.policy = prefix.policy.derive()
        n_sink = min(plan.n_sink, T)
        window_from = max(n_sink, T - plan.min_window)
        self.prompt_tokens, self.evicted_upto, self.spilled_upto = prefix.prompt_tokens, window_from, T
        self.layers_ingested, self.ingested = self.layout.num_layers, True
        for start, end, slots in (
            (0, n_sink, torch.arange(n_sink, device=self.ws.keys.device)),
            (window_from, T, self.ws.window_slots(window_from, T)),
        ):
            kv = torch.stack([
                torch.stack((store.read(0, layer, start, end), store.read(1, layer, start, end)))
                for layer in range(self.layout.num_layers)
            ])  # fmt: skip
            self.ws.write_tokens(kv, start, start, end, slots)
        selection = None if prefix.selection is None else Selection(prefix.selection)
        placement = self._place(selection, note_resident=True)
        self.counters.units = self.policy.num_units
        self.finish(placement)

    @_exclusive
    def chunk(self, start: int, kv: torch.Tensor) -> tuple[int, int]:
        """A chunk of new tokens [start, start + n) after the ingest: kv [L, 2, H, n, D]. It goes
        to the host tier; its newest tokens fill the window ring and the tokens that leave the
        window (the ring's oldest, then the chunk's own) go to the policy as evictions.
        Returns (spilled_upto, evicted)."""
        self._require_ingested("chunk")
        n, plan = kv.shape[3], self.plan
        end = start + n
        if start != self.spilled_upto:
            raise InvalidArgument(
                "chunk.start",
                f"{start} must equal the {self.spilled_upto} tokens in the host tier "
                "(announce tokens written before the chunk with an AppendNotice first)",
            )
        if end > self.layout.max_tokens:
            raise InvalidArgument("chunk.kv.shape", f"tokens [{start}, {end}) run past max_tokens={self.layout.max_tokens}")
        self._after_worker()
        self.store.write(start, kv)
        self.spilled_upto = end
        self.counters.appends += 1
        # (After a prompt shorter than n_sink the sinks are its tokens: later ones never become sinks.)
        first = self.evicted_upto
        window_from = max(first, end - plan.min_window)
        placements = []
        ring_end = min(start, window_from)
        if ring_end > first:  # the ring's oldest tokens leave the window
            selection = self.policy.on_evict(self.context(), first, ring_end)
            self.ws.clear_window(first, ring_end)
            placements.append(self._place(selection))
            self.evicted_upto = ring_end
        if window_from > start:  # the chunk's oldest tokens never enter it
            evicted = self.policy.on_evict(self.context(Chunk(start, kv)), start, window_from)
            placements.append(self._place(evicted))
            self.evicted_upto = window_from
        ring_from = max(window_from, start)
        self.ws.write_tokens(kv, start, ring_from, end, self.ws.window_slots(ring_from, end))
        self.ws.note_resident()
        self.finish(*placements)
        return end, window_from - first

    @_exclusive
    def append(self, upto: int, kv: torch.Tensor | None, finish: bool = True) -> tuple[int, int]:
        """Tokens [spilled_upto, upto) are in the ring (kv carries them for inline sessions).
        Spill them to host, evict what leaves the window. Returns (spilled_upto, evicted).
        Without `finish` the caller finishes (see end_boundary). (A Boundaries call appends
        many sessions at once: step_batch.append_together, the same effect.)"""
        start = self.begin_append(upto, kv)
        self.ws.spill(self.store, start, upto)
        low, high = self.eviction(upto)
        selection = None
        if high > low:
            selection = self.policy.on_evict(self.context(), low, high)
            if not self.plan.deferred:  # deferred eviction: the worker masks them (layout.py)
                self.ws.clear_window(low, high)
        return self.end_append(upto, low, high, selection, finish)

    def begin_append(self, upto: int, kv: torch.Tensor | None = None) -> int:
        """An append's checks and bookkeeping before its spill: -> the first token to spill."""
        self._require_ingested("append")
        start = self.spilled_upto
        check_append_upto(self, upto, "append.upto")
        self._after_worker()
        if kv is not None:
            self.ws.write_tokens(kv, start, start, upto, self.ws.window_slots(start, upto))
        self.spilled_upto = upto
        self.counters.steps += upto - start
        self.counters.appends += 1
        return start

    def eviction(self, upto: int) -> tuple[int, int]:
        """The tokens an append up to `upto` evicts from the window: [low, high), empty when
        high == low."""
        return self.evicted_upto, max(self.evicted_upto, upto - self.plan.min_window)

    def end_append(
        self, upto: int, low: int, high: int, selection: Selection | None, finish: bool, noted: bool = False,
        placed: Placement | None = None,
    ) -> tuple[int, int]:
        """After the spill, the ring clear and the policy's on_evict for [low, high): place
        what it chose (unless the caller `placed` it, with others), note max_resident (unless
        `noted`: the batched spill did) and finish."""
        placement = None
        if high > low:
            placement = placed if placed is not None else self._place(selection)
            self.evicted_upto = high
        if not noted:
            self.ws.note_resident()
        if finish:
            self.finish(placement)
        else:
            self.unfinished.append(placement)
        return upto, high - low

    @_exclusive
    def boundary(
        self, position: int, layers: list[int], query: torch.Tensor | None = None
    ) -> tuple[Selection | None, Placement]:
        """query [L, Hq, D] (inline transport), or None: the working set's query tensor."""
        query = self.begin_boundary(position, layers, query)
        selection = self.policy.on_boundary(self.context(), query, layers or list(range(self.layout.num_layers)))
        return self.end_boundary(selection)

    @_exclusive
    def attend(self, position: int, layers: list[int], queries: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's exact attention over the host tier: queries [len(layers) or L, Hq, n, D] over
        tokens [0, position) (all appended: position == spilled_upto), block by block.
        -> (out [.., Hq, n, D] in the queries' dtype, lse [.., Hq, n] f32), on the host."""
        self._require_ingested("boundary.attend")
        check_layers(self, layers, "boundary.layers")
        if position != self.spilled_upto:
            raise InvalidArgument(
                "boundary.position",
                f"{position} must equal the {self.spilled_upto} tokens in the host tier for boundary.attend "
                "(announce the tokens written before the chunk with an AppendNotice first)",
            )
        rows = layers or list(range(self.layout.num_layers))
        self._after_worker()
        device = self.ws.keys.device
        size = block_tokens(queries.shape[1], queries.shape[2])
        outs, lses = [], []
        for row, layer in enumerate(rows):
            out, lse = kernels.attend_blocks(
                queries[row].to(device), self.store.layer_blocks(layer, position, size, device), scale
            )
            outs.append(out.to(queries.dtype))
            lses.append(lse)
        return torch.stack(outs).cpu(), torch.stack(lses).cpu()

    def begin_boundary(self, position: int, layers: list[int], query: torch.Tensor | None = None) -> torch.Tensor:
        """A boundary's checks and ordering, under `busy` (boundary(), or a Boundaries call
        that holds it): the query the policy scores, [L, Hq, D] or [L, Hq, n, D]."""
        self._require_ingested("boundary")
        check_boundary_position(self, position, "boundary.position")
        check_layers(self, layers, "boundary.layers")
        self.counters.boundaries += 1
        self._after_worker()
        if query is None:  # the worker wrote it into the working set (read in place)
            return self.ws.query
        if query.dim() == 4 and query.shape[0] != self.layout.num_layers:
            # several queries per head for `layers` only: the policies index queries by layer
            full = query.new_zeros((self.layout.num_layers, *query.shape[1:]))
            full[torch.tensor(layers)] = query
            return full
        return query

    def end_boundary(self, selection: Selection | None, finish: bool = True) -> tuple[Selection | None, Placement]:
        """Place the policy's selection. Without `finish` the caller calls finish() (after one
        stream sync for many sessions) before it reads the placement's counts."""
        placement = self._place(selection, note_resident=True)
        if not finish:
            self.unfinished.append(placement)
            return selection, placement
        self.finish(placement)
        if selection is not None:
            selection = dataclasses.replace(selection, units=placement.units)
        return selection, placement

    def _after_worker(self) -> None:
        """Order this operation's GPU work after the worker's published writes."""
        if self.worker_event is not None:
            torch.cuda.current_stream(self.ws.keys.device).wait_event(self.worker_event)

    def _place(self, selection: Selection | None, note_resident: bool = False) -> Placement:
        """Place a selection (which notes max_resident itself); without one, note it here
        if asked."""
        if selection is not None:
            return self.ws.set_retrieved(self.store, selection.positions, selection.units)
        if note_resident:
            self.ws.note_resident()
        return Placement()

    def finish(self, *placements: Placement | None, synced: bool = False) -> None:
        """Complete this session's queued GPU work before the answer lets the worker read
        (the daemon's current stream only; never a device-wide sync; `synced`: the caller
        just did, for several sessions at once), then account the operation's placements
        (their counts are on the host by then), those of operations run without `finish`
        included."""
        if self.ws.keys.is_cuda and not synced:
            torch.cuda.current_stream(self.ws.keys.device).synchronize()
        placements = (*self.unfinished, *placements)
        self.unfinished.clear()
        for placement in placements:
            if placement is not None:
                self.counters.bytes_host_to_device += placement.bytes_moved

    def _require_ingested(self, what: str) -> None:
        if not self.ingested:
            raise FailedPrecondition(f"session {self.session_id}: {what} before IngestPrompt")

    def release(self, device_pool: DevicePool) -> tuple[int, int]:
        """Return every byte; idempotent. Returns (host bytes, device bytes) freed.
        Waits for an operation still running in a worker thread."""
        with self.busy:
            if self.closed:
                return 0, 0
            self.closed = True
            host = self.store.nbytes
            device = self.device_bytes
            self.store.release()
            device_pool.free(self.segment)
            if self.worker_event_handle:
                from kvrecall.cuda_ipc import forget_event

                forget_event(self.worker_event_handle)
            return host, device


def check_append_upto(session: Session, upto: int, field_name: str) -> None:
    """An AppendNotice's end lies past the tokens already appended, at most spill_every past
    them and not past max_tokens."""
    start, spill_every = session.spilled_upto, session.plan.spill_every
    if upto <= start:
        raise InvalidArgument(field_name, f"{upto} is not past the {start} tokens already appended")
    if upto - start > spill_every:
        raise InvalidArgument(
            field_name, f"{upto - start} tokens since the last notice; send one every spill_every={spill_every}"
        )
    if upto > session.layout.max_tokens:
        raise InvalidArgument(field_name, f"{upto} is past max_tokens={session.layout.max_tokens}")


def check_boundary_position(session: Session, position: int, field_name: str) -> None:
    """A boundary's position lies in [spilled_upto, spilled_upto + spill_every]."""
    low, high = session.spilled_upto, session.spilled_upto + session.plan.spill_every
    if not low <= position <= high:
        raise InvalidArgument(
            field_name,
            f"{position} is outside [{low}, {high}] (appended tokens not yet noticed must be at most spill_every)",
        )


def check_layers(session: Session, layers: list[int], field_name: str) -> None:
    """Every layer an event names is one of the session's."""
    for layer in layers:
        if layer >= session.layout.num_layers:
            raise InvalidArgument(field_name, f"layer {layer} >= num_layers={session.layout.num_layers}")


class SessionRegistry:
    """Admission, lookup by capability, per-worker shares and quotas, and lease expiry."""

    def __init__(
        self,
        host_pool: HostPool,
        device_pool: DevicePool,
        default_lease: float,
        max_lease: float = 3600.0,
        worker_quota_bytes: int = 0,
        worker_share: float = 1.0,
        worker_copy_share: float = 0.0,
        worker_selection: bool = False,
        worker_selection_place: str = "host",
    ) -> None:
        self.host_pool = host_pool
        self.device_pool = device_pool
        self.default_lease = default_lease
        self.max_lease = max_lease
        self.worker_quota_bytes = worker_quota_bytes
        self.worker_share = worker_share
        self.worker_copy_share = worker_copy_share  # ServerConfig.worker_copy_share
        self.worker_selection = worker_selection  # ServerConfig.worker_selection
        self.worker_selection_place = worker_selection_place  # ServerConfig.worker_selection_place
        self.sessions: dict[str, Session] = {}
        self.prefixes = PrefixRegistry(host_pool, device_pool)

    def worker_usage(self, worker_id: str) -> tuple[int, int]:
        """(host bytes, device bytes) the worker's sessions hold, with the prefixes they use."""
        mine = [s for s in self.sessions.values() if s.worker_id == worker_id]
        host = sum(s.store.nbytes for s in mine) + self.prefixes.in_use_bytes(worker_id)
        return host, sum(s.device_bytes for s in mine)

    def _admit(self, worker_id: str, host_bytes: int, ws_bytes: int) -> None:
        """RESOURCE_EXHAUSTED naming the limit when the worker's share of a pool, or its quota,
        cannot take a session of host_bytes + ws_bytes (working set and policy metadata)."""
        used_host, used_device = self.worker_usage(worker_id)
        if self.worker_share < 1:
            for pool, used, need in ((self.host_pool, used_host, host_bytes), (self.device_pool, used_device, ws_bytes)):
                usage = pool.usage()
                share = int(self.worker_share * usage.capacity_bytes)
                if used + need > share:
                    raise ResourceExhausted(
                        f"{usage.tier} pool: worker {worker_id!r} share quota (worker_share={self.worker_share:g} of "
                        f"{usage.capacity_bytes} bytes = {share}): {used} bytes in use, this session needs {need} "
                        f"more; {usage.free_bytes} bytes free in the pool"
                    )
        if self.worker_quota_bytes:
            used = used_host + used_device
            if used + ws_bytes + host_bytes > self.worker_quota_bytes:
                raise ResourceExhausted(
                    f"worker {worker_id!r} quota: {used} of {self.worker_quota_bytes} bytes in use, "
                    f"this session needs {ws_bytes + host_bytes} more"
                )

    def open(
        self,
        worker_id: str,
        layout: ModelLayout,
        policy: Policy,
        transport: int,
        lease: float,
        tag: str,
        tp_rank: int = 0,
        tp_size: int = 0,
        prefix: Prefix | None = None,
        declared: Declared | None = None,
        deferred: bool = False,
    ) -> Session:
        """Admit a session: over `prefix` (held: it starts from it) or declaring `declared`
        (not held: its ingest registers it). Unreferenced prefixes are evicted first when
        a pool is short. `deferred`: deferred eviction (WorkingSetPlan.with_slack)."""
        if prefix is not None:
            self.prefixes.acquire(prefix)  # before make_room: never evicted under the session
        try:
            return self._open(worker_id, layout, policy, transport, lease, tag, tp_rank, tp_size, prefix, declared,
                              deferred)
        except BaseException:
            if prefix is not None:
                self.prefixes.release(prefix)
            raise

    def _open(
        self, worker_id, layout, policy, transport, lease, tag, tp_rank, tp_size, prefix, declared, deferred
    ) -> Session:  # fmt: skip
        plan = policy.plan().with_slack() if deferred else policy.plan()
        if transport in (pb.TRANSPORT_CUDA_IPC, pb.TRANSPORT_SHM) and plan.retrieved:  # (mapped by the worker)
            plan = plan.with_staging(self.worker_copy_share)  # (a share of 0: none)
        # A unit table the worker maps and selects over (worker_selection): a louiskv session of its
        # own (no prefix held or declared: a prefix's table is shared), mapped by the worker, staging
        # whole retrievals unless the daemon's kernels place its choices (worker_selection_place).
        mapped = (
            self.worker_selection and transport in (pb.TRANSPORT_CUDA_IPC, pb.TRANSPORT_SHM) and plan.retrieved > 0
            and (plan.staged >= plan.retrieved or self.worker_selection_place == "device")
            and prefix is None and declared is None and hasattr(policy, "mapped_table")
        )  # fmt: skip
        if mapped:
            plan = plan.with_table(policy.mapped_table())
        ws_bytes = SegmentLayout.of(layout, plan).nbytes
        if prefix is not None:
            metadata_bytes = prefix.policy.derived_metadata_bytes()
        else:
            metadata_bytes = policy.mapped_metadata_bytes() if mapped else policy.metadata_bytes()
        per_page = max(tokens_per_page(layout, self.host_pool.page_bytes), 1)
        shared = prefix.pages[: prefix.full_pages] if prefix is not None else []
        own_pages = -(-layout.max_tokens // per_page) - len(shared)
        self.prefixes.make_room(own_pages, ws_bytes + metadata_bytes)
        self._admit(worker_id, own_pages * self.host_pool.page_bytes, ws_bytes + metadata_bytes)
        session_id = "s-" + secrets.token_hex(8)
        store = SequenceStore(self.host_pool, layout, owner=worker_id, device=self.device_pool.device, shared_pages=shared)
        try:
            segment = self.device_pool.allocate(ws_bytes, metadata_bytes)
        except BaseException:
            store.release()
            raise
        ws = WorkingSet(segment, layout, plan)
        ws.note_staging(store)
        if mapped:
            policy.map_table(ws.table_fields)
        lease = min(lease or self.default_lease, self.max_lease)
        session = Session(
            session_id, worker_id, tag, transport, layout, policy, store, segment, ws, lease,
            capability=secrets.token_urlsafe(32),
        )
        session.tp_rank, session.tp_size = tp_rank, tp_size
        # Over a shorter held prefix the session still registers its declared one once its
        # chunks reach its end (a chat's next turn then starts after this one).
        longer = declared is not None and (prefix is None or prefix.num_tokens < declared.num_tokens)
        session.prefix, session.declared = prefix, declared if longer else None
        if prefix is not None:
            try:
                session.start_from(prefix)
            except BaseException:
                session.release(self.device_pool)
                raise
        if transport == pb.TRANSPORT_CUDA_IPC and segment.device.type == "cuda":
            from kvrecall.cuda_ipc import create_event

            session.worker_event, session.worker_event_handle = create_event(segment.device)
        session.touch()
        self.sessions[session_id] = session
        return session

    def get(
        self, session_id: str, worker_id: str | None, capability: str, field_name: str = "session_id"
    ) -> Session:
        """The open session `session_id` for the caller holding its capability (and, when the
        caller names a worker, owned by that worker). Anything else is the same NOT_FOUND as a
        missing session: nothing tells a caller that another tenant's session exists."""
        if not session_id:
            raise InvalidArgument(field_name, "required")
        session = self.sessions.get(session_id)
        if (
            session is None
            or session.closed
            or not secrets.compare_digest(session.capability.encode(), capability.encode())
            or (worker_id is not None and session.worker_id != worker_id)
        ):
            raise NotFound(f"{field_name}: no open session {session_id!r} for this caller and capability")
        return session

    def register_prefix(self, session: Session) -> None:
        """After `session` ingested the prefix it declared, or (over a shorter held prefix)
        appended the rest of it: share it (prefixes.register). The new prefix holds the
        shorter one it extends, if any."""
        declared, selection = session.declared, session.first_selection
        session.declared, session.first_selection = None, None
        if declared is None or session.closed:
            return
        parent = session.prefix
        if parent is not None:  # the retrieved region now: what a session over the new one places
            selection = session.ws.retrieved_positions().clone()
        prefix = self.prefixes.register(session, declared, selection, parent)
        if prefix is not None:
            session.prefix = prefix
            if parent is not None:
                self.prefixes.release(parent)  # the session's reference moved to the new prefix

    def after_append(self, session: Session) -> None:
        """After a chunk or notice of a session over a shorter held prefix: register its declared
        prefix when the tokens end exactly there; past it (the worker did not cut its chunks
        at the prefix's end), give up on it."""
        declared = session.declared
        if declared is None or not session.ingested or session.prefix is None:
            return
        if session.spilled_upto == declared.num_tokens:
            self.register_prefix(session)
        elif session.spilled_upto > declared.num_tokens:
            session.declared = None
            log.info("session %s: its tokens passed its declared prefix's end (%d) in one append: not registered",
                     session.session_id, declared.num_tokens)

    def close(self, session: Session) -> tuple[int, int]:
        self.sessions.pop(session.session_id, None)
        first = not session.closed
        freed = session.release(self.device_pool)
        if first and session.prefix is not None:
            self.prefixes.release(session.prefix)
        return freed

    def expired(self, now: float | None = None) -> list[Session]:
        now = time.monotonic() if now is None else now
        return [s for s in self.sessions.values() if s.lease_deadline < now]
