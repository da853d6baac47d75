"""Engine: batched decode of many kvrecall sessions through one model, one step at a time.

    engine = Engine(weights, client, batch=8, max_capacity=2048)
    slot = engine.add(client.open_session(spec, "louiskv", {"budget": 1024}, device="cuda"), prompt_ids)
    for _ in range(64):
        tokens = engine.step()          # {slot: token generated this step}
    engine.remove(slot).close()

Sequences join and leave between steps (continuous batching); each keeps its own session.
A step is one static-shaped launch sequence over every slot (one CUDA graph on a GPU,
captured when the engine is built, while no slot is in use). After it, the host reads one
boundary flag per slot (a pinned copy, the only sync of the step), then sends the step's
AppendNotices and boundary retrievals of all slots in ONE Boundaries call
(KVRecallClient.boundaries; the daemon retrieves the sessions of a policy together). The
query that crossed the threshold becomes the slot's new reference (LouisKV).

Boundaries off the critical path (`lag` >= 1, default DEFAULT_LAG): a slot that crossed first
copies its working set to a *shadow* (a device copy, ordered before the daemon may write),
the batch reads the shadow for the next `lag` steps while the daemon retrieves into the
real working set, and then the slot switches back: the tokens written meanwhile are copied
into the real window ring and the retrieval serves from there on. (The step's notices are
answered first, in their own call, as the next step reads what they evict; the crossed
slots' retrievals follow in one call the step does not wait for.) With `switch="fixed"` (the
default) the switch happens after exactly `lag` steps (waiting for the answer if it is late),
so decoding is deterministic; with `switch="answered"` a slot switches after the first step
that finds its answer in, and after `lag` steps at the latest (waiting then): a fast daemon's
answers serve sooner, a busy one's are waited for less, and the output depends on timing.
With `switch="patient"` a slot switches after `lag` steps if its answer is in, else after the
first later step that finds it in, and after `2 * lag` steps at the latest (below the session's
spill_every; waiting then): a late answer costs the slot a staler working set for a step or
two instead of the whole batch a wait (the output depends on timing too).
With `switch="adaptive"` each crossing reads its shadow for a lag chosen when it crosses: the
engine's `lag`, or more while the daemon's recent answers came later (the 90th percentile of
the steps the last ADAPT_WINDOW retrievals needed, `adaptive_stay`), at most `2 * lag` (below
spill_every); it switches after exactly that many steps. With answers in time it is `fixed`
step for step; under load the batch waits less and a crossing's working set is a few steps
staler (the output depends on timing).

Deferred eviction (sessions opened with `deferred_eviction=True`, the default for engines the
bench builds): a slot's AppendNotice goes out without the step waiting for it; its answer is
taken before that slot's next event (its next notice, a boundary, leaving), by when the
daemon has long finished. The daemon leaves the evicted ring slots in place and the batch
masks them (ws_decode: ring slots from, retrieved slots below the evicted boundary of the last
answer taken), so what a step reads does not depend on when the daemon works. A crossed
slot's notice rides in its retrieval call, and the retrieval does not wait for the slot's last
notice's answer: it names that notice's end (StepEvent.follows), the daemon applies the two in
turn, and the slot takes both answers at its switch back.
`times` records how long each step waited on the daemon and how long each retrieval call took.
Before it reads a shadow, a slot announces every token written so far (an early
AppendNotice when one would fall due meanwhile), so none falls due while the daemon works on
the real working set; `lag` must stay below the session's spill_every. `lag=0` retrieves
before the next step.

Policies that retrieve every step (quest) retrieve after each step for the next one, with a
lag of at most 1 (a slot reading its shadow retrieves nothing, so a longer lag would skip steps; the
transformers path retrieves per layer inside the step; a captured step cannot wait for the
daemon). With a budget covering the sequence every policy is exact either way.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch

from kvrecall.client.session import StepCall
from kvrecall.engine.decoder import Decoder
from kvrecall.engine.graph import GraphStep
from kvrecall.engine.sessions import SessionBatch, evicted_mask
from kvrecall.engine.weights import DecoderWeights
from kvrecall.kernels.pinned_copy import pinned_copy
from kvrecall.kernels.ws_decode import ring_spans
from kvrecall.server.streams import HIGHEST
from kvrecall.v1 import kvrecall_pb2 as pb

# Steps a crossed slot reads its shadow. On one H200 (Llama-3-8B shape, bench e2e) a retrieval
# answers in 15-23 ms (p50; p90 about 41-43 ms at 32K x 8) against 7-11 ms steps. At lag 4, 32K x 8
# gave 1.36-1.42x full over three runs of 2026-12-01 and 1.12x in one whose answers came slower (13
# of 96 steps waited); lag 5 gave 1.40x and 1.43x in the two runs that measured it
# (bench/results/2026-12-01-h200-deferred-{final,last}-e2e.json). A longer lag keeps a crossed slot
# on its old retrieved set a step longer. Accuracy (scripts/lag_fidelity.py, SmolLM2-135M, louiskv@512,
# four 2K documents x 1,000 replayed tokens on an H200): top-1 agreement with full KV 0.9907 / 0.9890 /
# 0.9890 and mean KL 0.0059 / 0.0095 / 0.0107 at lag 0 / 4 / 5 (bench/results/2026-12-01-h200-lag-fidelity.json).
# The lag-8 figures of 2026-12-01/02 (bench/results/2026-12-0{1,2}-h200-*lag8*) are void: half their crossings
# fell on a switch-back step and retrieved for a stale query (fixed in _switch_back). With the fix, one bench
# timing both (bench/results/2026-12-02-h200-{table,many}-lag4-8-fixed-e2e.json): 32K x 8 1.47x full at lag 8
# against 1.40x at lag 4, batch 1 equal, 64 sequences 1,866 against 1,919 tokens/s. Servers may pass another
# lag (kvrecall worker --serve --lag).
DEFAULT_LAG = 4
SWITCHES = ("fixed", "answered", "patient", "adaptive")  # when a crossed slot leaves its shadow (Engine's `switch`)
# switch="adaptive": the retrievals whose answer times (in steps) set the next crossings' lag.
ADAPT_WINDOW = 32
ADAPT_QUANTILE = 0.9
# The interpreter's thread switch interval while an engine runs (seconds; CPython's default is
# 5 ms). gRPC's threads handle the answers in Python: after the step's sync the decoding thread
# may wait for the interpreter lock until one lets it go, up to the whole interval (on an H200
# at 32K x 8 with the calls in threads of their own, 0.5 ms took host time per step from 4.0 to
# 2.8 ms: bench/results/2026-11-30-h200-switch-e2e.json).
SWITCH_INTERVAL_S = 0.0005
# With the daemon embedded in the worker's process (kvrecall.server.embedded) its threads share the
# lock with the decoding thread: 0.2 ms answered 64 sequences at 11.7% boundaries with 3-5 late
# steps against 7-16 at 0.5 ms (H200, bench/results/2026-12-03-h200-emb{3,4}-*), the same at 32K x 8.
EMBEDDED_SWITCH_INTERVAL_S = 0.0002


class _Pending:
    """The Boundaries calls of one step's crossed slots (PendingBoundaries, one per client)."""

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.recorded = False
        self.timed = False  # a deferred notice call's latency went to DaemonTimes.notice_s

    def done(self) -> bool:
        return all(call.done() for call in self.calls)

    def result(self) -> tuple[float, int, list] | None:
        """Wait for every answer (raising a call's error); the first time, the seconds from
        sending to the last answer, the bytes the retrievals moved host to device and the
        BoundariesResponses, then None."""
        responses = [call.result() for call in self.calls]
        if self.recorded:
            return None
        self.recorded = True
        moved = sum(result.retrieval.bytes_moved for response in responses for result in response.results)
        return self.seconds(), moved, responses

    def seconds(self) -> float:
        """Sent to the last answer, host clock (once every answer is in)."""
        return max(call.answered for call in self.calls) - min(call.sent for call in self.calls)


@dataclass
class Sequence:
    """One slot's sequence: its session and what it did."""

    session: object  # kvrecall.client.WorkerSession
    slot: int
    tokens: list[int] = field(default_factory=list)
    boundaries: int = 0
    appends: int = 0
    steps: int = 0
    pending: _Pending | None = None  # the boundary's daemon calls while the slot reads its shadow
    pending_from: int = 0  # first position written into the shadow
    shadow: tuple[torch.Tensor, ...] | None = None
    light: bool = False  # the shadow's keys and values are the real ones (Engine._to_shadow)
    notice: _Pending | None = None  # deferred eviction: its last AppendNotice, answer not taken yet
    sent_upto: int = 0  # tokens announced in notices sent (noticed_upto once their answers are taken)
    stay: int = 0  # switch="adaptive": the steps this crossing reads its shadow (chosen as it crossed)
    seen_at: int | None = None  # switch="adaptive": the first step of the shadow that found the answer in


@dataclass
class _Flight:
    """A launched step not yet processed: its host buffers' parity, the sequences it decodes
    and the event its host copies complete at (None on a CPU)."""

    parity: int
    sequences: list[Sequence]
    done: torch.cuda.Event | None


def riding_eviction(core, state) -> tuple[int, list[torch.Tensor]]:
    """What a notice up to the session's position, riding in its retrieval's event, evicts (the
    daemon's rule: up to position - min_window) after the table's `state`: (the evicted end, the
    keys of those tokens in the ring, [L, H, n, D] slices in position order)."""
    end = max(state.evicted, core.position - core.min_window)
    spans = ring_spans(core.n_sink + core.retrieved, core.window, state.evicted, end)
    return end, [core.keys[:, :, lo:hi] for lo, hi in spans]


def adaptive_stay(needed: deque[int] | list[int], lag: int, longest: int) -> int:
    """switch="adaptive": the steps a new crossing reads its shadow. `needed`: for each recent
    retrieval, the steps after its crossing by which its answer was in (seen in, or waited for);
    their ADAPT_QUANTILE, at least `lag` and at most `longest`."""
    if not needed:
        return lag
    ordered = sorted(needed)
    quantile = ordered[max(0, math.ceil(ADAPT_QUANTILE * len(ordered)) - 1)]
    return max(lag, min(longest, quantile))


# Samples each DaemonTimes series keeps (the latest): a serving engine steps for ever and never
# clears them; a benchmark clears them and reads far fewer.
TIMES_KEPT = 65536


def _series() -> deque[float]:
    return deque(maxlen=TIMES_KEPT)


@dataclass
class DaemonTimes:
    """Host-clock seconds the engine spent on the daemon (the caller clears them at will; each
    series keeps its latest TIMES_KEPT samples). A step waits for its notices (and, with lag 0,
    its retrievals) and for retrievals still unanswered when their slots switch back
    (`late_s`); `answer_s` is each retrieving Boundaries call's latency, sent to answered,
    whether or not a step waited for it."""

    wait_s: deque[float] = field(default_factory=_series)  # per step: all its waiting on the daemon
    late_s: deque[float] = field(default_factory=_series)  # per step: of that, waiting for late retrievals
    answer_s: deque[float] = field(default_factory=_series)  # per retrieving call
    notice_s: deque[float] = field(default_factory=_series)  # per deferred notice call: sent to answered
    # Where a step's host time goes: launch to the step's sync (the captured step and any work
    # queued on the stream before it), the step's own GPU time (CUDA events around the graph;
    # 0 on a CPU), and the host work after the sync that is not waiting on the daemon.
    sync_s: deque[float] = field(default_factory=_series)
    graph_gpu_s: deque[float] = field(default_factory=_series)
    host_s: deque[float] = field(default_factory=_series)
    # Of host_s: the shadow copies (to and back) and sending the retrievals, per step.
    shadow_s: deque[float] = field(default_factory=_series)
    send_s: deque[float] = field(default_factory=_series)
    moved_bytes: deque[float] = field(default_factory=_series)  # per retrieving call, host to device
    # Per background retrieving call: rows its answer left staged for this worker to copy (a
    # daemon with worker_copy_share; 0 where the daemon copied them).
    staged_rows: deque[float] = field(default_factory=_series)
    daemon_s: deque[float] = field(default_factory=_series)  # per waited-for call: the daemon's own handling time
    # Per waited-for call: sent to answered on this host, and the daemon's parts of daemon_s
    # (BoundariesResponse: before its work began, the work up to its sync, the sync).
    call_s: deque[float] = field(default_factory=_series)
    queued_s: deque[float] = field(default_factory=_series)
    serve_s: deque[float] = field(default_factory=_series)
    gpu_sync_s: deque[float] = field(default_factory=_series)
    # The same parts of each retrieving call (waited for or not), as its answer reported them.
    retrieval_queued_s: deque[float] = field(default_factory=_series)
    retrieval_serve_s: deque[float] = field(default_factory=_series)
    retrieval_sync_s: deque[float] = field(default_factory=_series)
    shadow_steps: deque[float] = field(default_factory=_series)  # per boundary: steps its slot read the shadow

    def clear(self) -> None:
        for series in fields(self):
            getattr(self, series.name).clear()


class Engine:
    """Batched greedy decode over up to `batch` sessions (see the module docstring).

    `force_boundary(step, slot) -> bool | None` overrides the device's boundary decision
    (benchmarks with random weights set a measured rate this way; None keeps the flag).
    `switch_interval`: sets the process's sys.setswitchinterval (None leaves it).
    `follow_notices` False: a crossing slot takes its last notice's answer before it sends its
    retrieval (the behaviour before StepEvent.follows; for comparison).
    `host_copies` (on a GPU): "copy" (default) moves the slot tables to the device and each
    step's tokens and flags to the host by the copy engine; "kernel" by kernels inside the step
    (kernels/pinned_copy.py), which do not queue behind the daemon's transfers. On an H200 at 64
    sequences the copy engine held each step 9.6 ms behind the daemon's 542 MiB a call, kernels
    0.1 ms, but that gap may have been GPU time the daemon's kernels used: with it gone the daemon
    answered in 103 against 55 ms (p50), 30 of 96 steps waited, and the step was no faster (1,856
    against 1,937 tokens/s; bench/results/2026-12-01-h200-hostcopies-*). That kernel run was the
    first bench on a freshly started machine, as was the session's one other slow run, so one
    A/B does not settle it; at 32K x 8 both gave 1.41-1.42x.
    `overlap` (see step(); needs deferred-eviction sessions, lag >= 1 and host_copies="copy"):
    each step is launched before the host work of the one before. Off by default here; on in
    the serve path (BatchedEngine, `kvrecall worker --serve --overlap`) and in `bench e2e`: at
    the real model's retrieval traffic it wins at every batch measured on an H200 (32K x 8 1.59x
    full against 1.40x, 64 sequences 3,393 against 2,896 tokens/s), though the daemon, left only
    time slices of a GPU that never idles, answers later (docs/ARCHITECTURE.md, "Overlap").
    `keep_logits` (with overlap, where the
    decoder's buffer already holds the next step's): `logits` holds a copy of the returned
    step's, made each step. `switch`: "fixed" (after exactly `lag` steps), "answered" (as soon
    as the answer is in, at most `lag` steps), "patient" (after `lag` steps once the answer is
    in, at most `2 * lag`) or "adaptive" (after exactly the steps the recent answers needed,
    `lag` to `2 * lag`; see the module docstring)."""

    def __init__(
        self, weights: DecoderWeights, batch: int, max_capacity: int, *, use_graph: bool = True,
        impl: str = "auto", force_boundary: Callable[[int, int], bool | None] | None = None, lag: int = DEFAULT_LAG,
        switch_interval: float | None = SWITCH_INTERVAL_S, follow_notices: bool = True, host_copies: str = "copy",
        overlap: bool = False, keep_logits: bool = False, switch: str = "fixed",
    ) -> None:  # fmt: skip
        if switch not in SWITCHES:
            raise ValueError(f"switch: expected one of {', '.join(SWITCHES)}, got {switch!r}")
        self.switch = switch
        if host_copies not in ("kernel", "copy"):
            raise ValueError(f"host_copies: expected 'kernel' or 'copy', got {host_copies!r}")
        if overlap and host_copies == "kernel":
            raise ValueError("overlap: needs host_copies='copy' (the captured step reads the host tables itself)")
        self.overlap = overlap
        self._check_lag(lag, [])
        self.lag = lag
        if switch_interval is not None:
            sys.setswitchinterval(switch_interval)
        s = weights.shape
        self.device = weights.device
        pin = self.device.type == "cuda"
        self._kernel_copies = pin and host_copies == "kernel"
        self.decoder = Decoder(weights, batch)
        self.backend = SessionBatch(
            batch, s.num_layers, s.num_query_heads, s.num_kv_heads, s.head_dim, max_capacity, self.device,
            weights.dtype, self.decoder.scale, impl,
        )  # fmt: skip
        self.backend.tables.step_uploads = self._kernel_copies  # uploaded in _step_launches
        self.backend.tables.staged = pin and not self._kernel_copies  # uploaded before each launch
        # Host buffers per launch parity: two with overlap (one step's are read while the next
        # step's copies may land), else one.
        n = 2 if overlap else 1
        self._tokens_host = [torch.zeros(batch, dtype=torch.int64, pin_memory=pin) for _ in range(n)]
        self._flags_host = [torch.zeros(batch, dtype=torch.bool, pin_memory=pin) for _ in range(n)]
        self.keep_logits = keep_logits
        self._logits: list[torch.Tensor] = []
        self._parity = 0
        self._flight: _Flight | None = None  # overlap: the step launched ahead, not processed yet
        self._last: _Flight | None = None  # the step step() returned last
        self.sequences: list[Sequence | None] = [None] * batch
        self.force_boundary = force_boundary
        # Called after a step's retrievals are sent, with the crossed slots' retrieval queries (their
        # sessions' working-set queries): bench e2e --worker-selection's emulation
        # (kvrecall/bench/worker_selection.py); None: nothing.
        self.on_crossings: Callable[[list[torch.Tensor]], None] | None = None
        # Where sessions map their unit tables (a daemon's worker_selection): the stream their
        # crossings' choices run on, beside the step (made at the first).
        self._choice_stream: torch.cuda.Stream | None = None
        self.worker_choices = 0  # retrievals chosen here (over mapped tables), since the engine started
        self._warmed_choices: set[tuple] = set()  # the shapes whose choice kernels ran once (_warm_choice)
        self.follow_notices = follow_notices
        self.steps = 0
        # Free shadow working sets, reused; at most `batch` kept (sessions' capacities vary).
        self._shadows: list[tuple[torch.Tensor, ...]] = []
        # The retrievals in flight: one Boundaries call per step of the last `lag` steps.
        self.times = DaemonTimes()
        # switch="adaptive": the steps each recent retrieval needed (adaptive_stay), and the time
        # a step takes (a moving average of step() to step()), which turns a wait into steps.
        self._needed: deque[int] = deque(maxlen=ADAPT_WINDOW)
        self._step_s = 0.0
        self._started = 0.0
        # Captured while no slot is in use: the warm-up steps write nothing anywhere.
        self.graph = GraphStep(self._step_launches, self.device, use_graph)
        self.decoder.tokens.zero_()
        self.decoder.positions.zero_()
        self._events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)] \
            if pin else []  # fmt: skip
        if keep_logits and overlap:  # (without overlap the decoder's buffer is the returned step's)
            self._logits = [torch.empty_like(self.decoder.logits) for _ in range(n)]
        self._shadow_s = 0.0  # this step's host seconds in shadow copies (times.shadow_s)

    @property
    def batch(self) -> int:
        return self.decoder.batch

    def _step_launches(self) -> None:
        """What the graph holds: the step; with kernel copies, first the slot tables written since
        the last step uploaded, and after it the tokens and flags written to the pinned host
        buffers the host reads after the sync."""
        if self._kernel_copies:
            self.backend.tables.upload(self.backend.impl)
        self.decoder.step(self.backend)
        if self._kernel_copies:
            pinned_copy(self.decoder.tokens, self._tokens_host[0])
            pinned_copy(self.backend.flags, self._flags_host[0])

    @property
    def active(self) -> list[Sequence]:
        return [seq for seq in self.sequences if seq is not None]

    # ---- joining and leaving -------------------------------------------------------------------
    def add(
        self, session, prompt: torch.Tensor | None = None, *, kv: torch.Tensor | None = None,
        queries: torch.Tensor | None = None, first_token: int = 0,
    ) -> int:  # fmt: skip
        """Put a freshly opened session into a free slot. Either `prompt` (int64 [T] token ids:
        prefilled here, its KV ingested, the first generated token is its greedy next token) or
        a prompt's `kv` [L, 2, H, T, D] (+ optional observation `queries` [L, Hq, n, D]) with
        the `first_token` to feed. A session whose daemon held its whole prompt at open (a
        shared document: `prefix_held` == T) is not ingested again: its working set is the
        prefix's; the kv and queries give the prompt's length and the boundary reference.
        Returns the slot."""
        slot = next((b for b, seq in enumerate(self.sequences) if seq is None), None)
        if slot is None:
            raise RuntimeError(f"all {self.batch} slots are in use")
        self._check_lag(self.lag, [session])
        if session.capacity > self.backend.max_capacity:
            raise ValueError(
                f"session {session.session_id}: working set of {session.capacity} slots exceeds the "
                f"engine's max_capacity={self.backend.max_capacity}"
            )
        if prompt is not None:
            kv, queries, logits = self.decoder.prefill(prompt.to(self.device), n_obs=max(1, session.observation))
            first_token = int(logits.argmax())
        if kv is None:
            raise ValueError("give the prompt's token ids or its kv")
        held = getattr(session, "prefix_held", 0)
        if held and held != kv.shape[3]:
            raise ValueError(
                f"session {session.session_id}: the daemon holds {held} of its {kv.shape[3]} prompt tokens; the engine "
                "takes a session whose daemon holds the whole prompt (a shared document) or none of it"
            )
        if not held:
            session.ingest(kv, queries)
        self.backend.set_slot(slot, session.core)
        if queries is not None:
            self.backend.set_reference(slot, queries[:, :, -1])
        self.decoder.tokens[slot] = first_token
        self.decoder.positions[slot] = kv.shape[3]
        self.sequences[slot] = Sequence(session, slot, [first_token], sent_upto=session.core.noticed_upto)
        if session.core.table is not None:
            self._warm_choice(session.core)
        return slot

    def _warm_choice(self, core) -> None:
        """The first session of its shapes that maps a unit table: the kernels of its choice
        compiled now (Triton compiles at first use) rather than at its first crossing, by two
        choices over its own table, with and without an open segment, whose results no one reads
        (a crossing writes its own)."""
        table = core.table
        key = (table.reps.dtype, table.reps.shape[2], tuple(core.query.shape), tuple(table.chosen.shape),
               None if table.pinned is None else table.pinned.shape[1], table.aggregate)  # fmt: skip
        if key in self._warmed_choices:
            return
        self._warmed_choices.add(key)
        units, tokens = min(64, table.sizes.shape[1] - 1), max(0, min(1024, table.position.shape[1] - 16))
        with self._choice_scope():
            for evicted in (0, 16):
                table.choose(core.query, pb.MappedTableState(units=units, candidates=tokens, evicted=evicted))

    def _check_lag(self, lag: int, sessions: list) -> None:
        """ValueError unless 0 <= lag < every session's spill_every (see the module docstring),
        and with overlap lag >= 1 and every session deferred."""
        if lag < 0:
            raise ValueError("lag must be >= 0")
        if self.overlap and lag < 1:
            raise ValueError("lag must be >= 1 with overlap (the next step is launched before a retrieval is sent)")
        for session in sessions:
            if self.overlap and not session.core.deferred:
                raise ValueError(f"session {session.session_id}: overlap needs sessions opened with deferred_eviction=True")
            if lag >= session.spill_every:
                raise ValueError(f"lag={lag} must be below the session's spill_every={session.spill_every}")

    def _lag(self, seq: Sequence) -> int:
        """The slot's lag: the engine's, at most 1 for a policy that retrieves after every step
        (a slot reading its shadow retrieves nothing, so a longer lag would skip steps)."""
        return min(self.lag, 1) if seq.session.boundary_mode == pb.BOUNDARY_MODE_EVERY_STEP else self.lag

    def _longest_stay(self, seq: Sequence, lag: int) -> int:
        """Steps a crossed slot may read its shadow: `lag`, or with switch="patient" up to 2 * lag
        for a slot whose answer is late, with switch="adaptive" what the recent answers needed, up
        to 2 * lag (below spill_every: the early notice before the shadow makes room in the ring
        for that many steps; policies retrieving every step keep `lag`)."""
        if self.switch not in ("patient", "adaptive") or seq.session.boundary_mode == pb.BOUNDARY_MODE_EVERY_STEP:
            return lag
        longest = max(lag, min(2 * lag, seq.session.core.spill_every - 1))
        return longest if self.switch == "patient" else adaptive_stay(self._needed, lag, longest)

    def _keeps_shadow(self, seq: Sequence, lag: int) -> bool:
        """Whether a crossed slot reads its shadow for another step (the module docstring's switches)."""
        stay = seq.session.core.position - seq.pending_from
        if self.switch == "adaptive":
            if seq.seen_at is None and seq.pending.done():
                seq.seen_at = stay
            return stay < seq.stay
        if stay < lag:
            return not (self.switch == "answered" and seq.pending.done())
        return stay < self._longest_stay(seq, lag) and not seq.pending.done()

    def set_lag(self, lag: int) -> None:
        """Change `lag` between steps: slots reading a shadow switch back first (waiting for
        their answers), so every boundary from here on follows the new lag."""
        self._check_lag(lag, [seq.session for seq in self.active])
        for seq in self.active:
            if seq.pending is not None:
                self._switch_back(seq)
        self.lag = lag

    def remove(self, slot: int) -> Sequence:
        """Free the slot (the caller closes the session)."""
        seq = self.sequences[slot]
        if seq is None:
            raise KeyError(f"slot {slot} is empty")
        self._quiesce()
        if seq.pending is not None:
            self._switch_back(seq)
        self._take_notice(seq)
        self.backend.clear_slot(slot)
        self.sequences[slot] = None
        return seq

    # ---- decoding --------------------------------------------------------------------------------
    @property
    def logits(self) -> torch.Tensor:
        """[B, V] logits of the step step() returned last (with overlap: needs keep_logits, as the
        decoder's buffer already holds the next step's)."""
        if not self.overlap:
            return self.decoder.logits
        if not self.keep_logits:
            raise RuntimeError("Engine(overlap=True) keeps the returned step's logits only with keep_logits=True")
        if self._last is None:
            raise RuntimeError("no step returned yet")
        return self._logits[self._last.parity]

    def _launch(self) -> _Flight:
        """Queue one step (its tables' upload, the graph, the copies the host reads after it)."""
        parity = self._parity
        if self.overlap:
            self._parity ^= 1
        cuda = self.device.type == "cuda"
        self.backend.tables.flush(parity)
        if cuda:
            self._events[parity][0].record()
        self.graph()
        done = None
        if cuda:
            self._events[parity][1].record()
        if self._logits:
            self._logits[parity].copy_(self.decoder.logits, non_blocking=True)
        if not self._kernel_copies:
            self._tokens_host[parity].copy_(self.decoder.tokens, non_blocking=True)
            self._flags_host[parity].copy_(self.backend.flags, non_blocking=True)
        if cuda:
            done = torch.cuda.Event()
            done.record()
        return _Flight(parity, self.active, done)

    @property
    def _ahead(self) -> int:
        """Steps launched past the one step() processes: 1 with overlap, else 0."""
        return 1 if self.overlap else 0

    def _quiesce(self) -> None:
        """Overlap: wait until the step launched ahead has run (before a slot's session may be
        closed under it); it is still processed by the next step()."""
        if self._flight is not None and self._flight.done is not None:
            self._flight.done.synchronize()

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One token for every active slot; returns {slot: its new token}.

        With overlap the next step is launched before this one's host work (the boundary
        flags, notices, retrievals, shadow switches), which then runs while the GPU decodes:
        what the host decides after step t takes effect at step t + 2 (a crossed slot reads
        its shadow from t + 2, a retrieval's query is step t + 1's), and the slot of a
        sequence added between calls joins at the step launched next."""
        started = time.perf_counter()
        if self.switch == "adaptive":  # (the only reader of the step time: _steps_needed)
            if self._started:
                gap = started - self._started
                self._step_s = gap if not self._step_s else 0.9 * self._step_s + 0.1 * gap
            self._started = started
        if self.overlap:
            flight = self._flight if self._flight is not None else self._launch()
            self._flight = self._launch()
        else:
            flight = self._launch()
        if flight.done is not None:
            flight.done.synchronize()
        self._last = flight
        synced = time.perf_counter()
        tokens, flags = self._tokens_host[flight.parity].tolist(), self._flags_host[flight.parity].tolist()
        ahead = self._ahead
        notices: list[StepCall] = []  # waited for now
        deferred: list[Sequence] = []  # deferred eviction: notices sent, answers taken later
        crossings: list[tuple[Sequence, bool, int]] = []  # (slot, its notice rides along, follows)
        late = taken = 0.0
        self._shadow_s = 0.0
        for seq in flight.sequences:
            b = seq.slot
            if self.sequences[b] is not seq:
                continue  # left after the launch
            core = seq.session.core
            core.position += 1
            seq.steps += 1
            seq.tokens.append(tokens[b])
            lag = self._lag(seq)
            if seq.pending is not None:
                if self._keeps_shadow(seq, lag):
                    continue  # no notice falls due while it reads its shadow (see below)
                waited = self._switch_back(seq)
                late += waited
                if self.switch == "adaptive" and seq.session.boundary_mode != pb.BOUNDARY_MODE_EVERY_STEP:
                    self._needed.append(self._steps_needed(seq, waited))  # (a lag-1 policy's answers set no stay)
            if ahead and seq.notice is not None and core.position + ahead - seq.sent_upto >= core.spill_every:
                # The step launched ahead writes one more ring slot: the answer a notice would be
                # taken for at the next step is taken before the launch after it (the ring's slack).
                taken += self._take_notice(seq)
            forced = self.force_boundary(self.steps, b) if self.force_boundary is not None else None
            crossed = flags[b] if forced is None else forced
            # A slot about to read its shadow for `lag` steps announces its tokens first, so its
            # ring (copied into the shadow) has room for them without evicting anything.
            stay = self._longest_stay(seq, lag) if crossed else lag
            early = crossed and lag > 0 and core.position + stay > seq.sent_upto + core.spill_every
            notice = core.position - seq.sent_upto >= core.spill_every or early
            # A crossing slot's retrieval follows its last notice without taking that answer (the
            # daemon applies them in turn: StepEvent.follows); the slot takes it at its switch back.
            follows = seq.sent_upto if crossed and lag > 0 and seq.notice is not None and self.follow_notices else 0
            if (notice or crossed) and seq.notice is not None and not follows:
                taken += self._take_notice(seq)  # its last notice's answer, before any new event
            if notice:
                seq.appends += 1
                seq.sent_upto = core.position
            if crossed:
                self.backend.set_reference(b)
                seq.boundaries += 1
            if crossed and lag > 0:
                seq.stay, seq.seen_at = stay, None
                crossings.append((seq, notice and core.deferred, follows))
                if notice and not core.deferred:
                    notices.append(StepCall(seq.session, core.position, notice=True))
            elif notice and core.deferred and not crossed:
                deferred.append(seq)
            elif notice or crossed:
                notices.append(StepCall(seq.session, core.position, notice, crossed))
        waited = late + taken
        if notices:  # the notices (and with lag 0 the retrievals): the next step reads their effect
            waited += self._daemon(notices)
            for call in notices:
                if call.session.core.deferred:
                    self.backend.tables.set_evicted(self._slot_of(call.session), call.session.core.evicted_upto)
        send = 0.0
        if deferred or crossings:
            for seq, _, _ in crossings:
                self._to_shadow(seq)
            sending = time.perf_counter()
            if deferred:
                pending = self._send([StepCall(seq.session, seq.sent_upto, notice=True) for seq in deferred],
                                     background=False)  # fmt: skip
                for seq in deferred:
                    seq.notice = pending
            if crossings:
                states = {seq.slot: self._table_state(seq) for seq, _, _ in crossings}
                choosing = [(seq.session.core, states[seq.slot], riding_eviction(seq.session.core, states[seq.slot])
                             if rides else None) for seq, rides, _ in crossings if states[seq.slot] is not None]  # fmt: skip
                calls = [StepCall(seq.session, seq.session.core.position, notice=rides, retrieve=True, follows=follows,
                                  selected=states[seq.slot] is not None)
                         for seq, rides, follows in crossings]  # fmt: skip
                if choosing:
                    with self._choices(choosing):
                        pending = self._send(calls)
                else:
                    pending = self._send(calls)
                for seq, _, _ in crossings:
                    seq.pending = pending
                if self.on_crossings is not None:
                    self.on_crossings([seq.session.core.query for seq, _, _ in crossings])
            send = time.perf_counter() - sending
        self.times.wait_s.append(waited)
        self.times.late_s.append(late)
        self.times.sync_s.append(synced - started)
        events = self._events[flight.parity] if self._events else None
        self.times.graph_gpu_s.append(events[0].elapsed_time(events[1]) / 1e3 if events else 0.0)
        self.times.host_s.append(time.perf_counter() - synced - waited)
        self.times.shadow_s.append(self._shadow_s)
        self.times.send_s.append(send)
        self.steps += 1
        return {seq.slot: tokens[seq.slot] for seq in flight.sequences if self.sequences[seq.slot] is seq}

    def _table_state(self, seq: Sequence):
        """What the slot's mapped unit table holds now (pb.MappedTableState), if it chooses its
        retrieval here: after its last event, or after the notice its retrieval follows, whose
        answer it waits for but does not take (the table is settled; the batch masks what that
        notice evicted at the switch back, as when the daemon chooses). None: the daemon chooses
        (no table mapped, or no answer has said what it holds yet)."""
        core = seq.session.core
        if core.table is None:
            return None
        if seq.notice is not None:
            return next((state for call in seq.notice.calls if (state := call.table_state(seq.session)) is not None),
                        None)  # fmt: skip
        return core.table_state

    @contextlib.contextmanager
    def _choices(self, choosing: list) -> Iterator[None]:
        """Sessions that map their unit tables choose their retrievals (WorkerTable.choose, for
        each one's (core, table state, riding eviction)) on a stream of their own at the highest
        priority, after what the current stream has queued (the step launched ahead writes the
        query the daemon would read: the same one); the Boundaries call sent inside publishes the
        choices (its event is recorded on that stream)."""
        self.worker_choices += len(choosing)
        scope = self._choice_scope()
        if self._choice_stream is not None:
            self._choice_stream.wait_stream(torch.cuda.current_stream(self.device))
        with scope:
            for core, state, evicting in choosing:
                core.table.choose(core.query, state, evicting)
            yield

    def _choice_scope(self) -> contextlib.AbstractContextManager:
        """The choice stream's scope (made at first use) on a GPU; nothing on a CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._choice_stream is None:
            self._choice_stream = torch.cuda.Stream(self.device, priority=HIGHEST)
        return torch.cuda.stream(self._choice_stream)

    def _steps_needed(self, seq: Sequence, waited: float) -> int:
        """switch="adaptive", at a switch back: the steps after the crossing by which its answer
        was in: the first shadow step that saw it, else the stay and the wait in steps (one at least)."""
        if seq.seen_at is not None:
            return seq.seen_at
        stay = seq.session.core.position - seq.pending_from
        return stay + max(1, math.ceil(waited / self._step_s) if self._step_s > 0 else 1)

    @staticmethod
    def _by_client(calls: list[StepCall]) -> list[list[StepCall]]:
        """`calls` grouped by daemon client (one group in practice)."""
        groups: dict[int, list[StepCall]] = {}
        for call in calls:
            groups.setdefault(id(call.session.client), []).append(call)
        return list(groups.values())

    def _daemon(self, calls: list[StepCall]) -> float:
        """One Boundaries call per daemon client for `calls`, waited for; its host-clock latency
        goes to `times` when it retrieves. Returns the seconds it took."""
        started = time.perf_counter()
        for group in self._by_client(calls):
            sent = time.perf_counter()
            response = group[0].session.client.boundaries(group)
            self.times.call_s.append(time.perf_counter() - sent)
            self.times.daemon_s.append(response.seconds)
            self.times.queued_s.append(response.queued_seconds)
            self.times.serve_s.append(response.serve_seconds)
            self.times.gpu_sync_s.append(response.sync_seconds)
        seconds = time.perf_counter() - started
        if any(call.retrieve for call in calls):
            self.times.answer_s.append(seconds)
        return seconds

    def _send(self, calls: list[StepCall], background: bool = True) -> _Pending:
        """The Boundaries calls for `calls` sent, not waited for (no thread of ours waits). A
        background call's retrievals may leave their rows staged for us (a daemon with
        worker_copy_share): each slot copies its own at its switch back (_switch_back), not when
        another slot of the call takes the answer (a slot still on a light shadow reads its keys
        and values in place)."""
        return _Pending([group[0].session.client.boundaries_future(group, background=background,
                                                                   worker_copies=background, apply_staged=False)
                         for group in self._by_client(calls)])  # fmt: skip

    def _slot_of(self, session) -> int:
        return next(seq.slot for seq in self.active if seq.session is session)

    def _take_notice(self, seq: Sequence) -> float:
        """Deferred eviction: take the answer of the slot's last notice (waiting if it is not in:
        returns the seconds waited) and mask the batch with its evicted boundary."""
        if seq.notice is None:
            return 0.0
        started = time.perf_counter()
        late = not seq.notice.done()
        for call in seq.notice.calls:
            call.result()  # applies every notice of the call (noticed_upto, evicted_upto), once
        waited = time.perf_counter() - started if late else 0.0
        if not seq.notice.timed:
            seq.notice.timed = True
            self.times.notice_s.append(seq.notice.seconds())
        seq.notice = None
        if seq.pending is None:  # (a slot reading its shadow takes it at its switch back)
            self.backend.tables.set_evicted(seq.slot, seq.session.core.evicted_upto)
        return waited

    # ---- shadows (boundaries off the critical path) -----------------------------------------
    def _to_shadow(self, seq: Sequence) -> None:
        """Copy the slot's working set to a shadow and point the batch at it. The copy is queued
        before the boundary's call publishes the worker's writes, so the daemon (which waits on
        that) writes the real working set only after the copy has read it. A session whose
        retrievals stage every row for us (worker copies: the daemon writes only slot positions)
        gets a light shadow: its slot positions and query copied, its keys and values read and
        written in place (the daemon's notice writes only retrieved slots free in the copy, which
        the batch masks), where the ring keeps enough tokens for the stay."""
        started = time.perf_counter()
        core = seq.session.core
        real = (core.keys, core.values, core.slot_pos, core.query)
        # (The steps on a light shadow write the real ring: they must not reach the ring slots of
        # tokens an unanswered notice still spills, which lie within 2 * spill_every of position.)
        light = core.stages_every_row and seq.stay + self._ahead + 1 < core.min_window
        copied = real[2:] if light else real
        shadow = next((sh for sh in self._shadows
                       if len(sh) == len(copied) and all(a.shape == r.shape for a, r in zip(sh, copied, strict=True))),
                      None)  # fmt: skip
        if shadow is None:
            with torch.inference_mode(False):  # ordinary tensors: written outside step() too
                shadow = tuple(torch.empty_like(t) for t in copied)
        else:
            self._shadows = [sh for sh in self._shadows if sh is not shadow]  # tensors have no ==
        torch._foreach_copy_(list(shadow), list(copied))  # one call (a launch per dtype)
        if light:
            shadow = (*real[:2], *shadow)
        seq.shadow, seq.pending_from, seq.light = shadow, core.position, light
        self.backend.tables.set(seq.slot, *shadow, core.n_sink + core.retrieved, core.window, evicted_mask(core))
        self._shadow_s += time.perf_counter() - started

    def _switch_back(self, seq: Sequence) -> float:
        """Wait for the boundary's answer, copy the tokens written meanwhile into the real window
        ring and point the batch at the real working set again. Returns the seconds waited for
        an answer not in yet (0 when it was)."""
        started = time.perf_counter()
        late = not seq.pending.done()
        self._take_notice(seq)  # the notice its retrieval followed (answered before the retrieval)
        answer = seq.pending.result()
        if answer is not None:  # the first slot of the call to switch back records its latency
            self.times.answer_s.append(answer[0])
            self.times.moved_bytes.append(answer[1])
            self.times.staged_rows.append(sum(r.retrieval.staged_rows for response in answer[2] for r in response.results))
            for series, field_name in ((self.times.retrieval_queued_s, "queued_seconds"),
                                       (self.times.retrieval_serve_s, "serve_seconds"),
                                       (self.times.retrieval_sync_s, "sync_seconds")):  # fmt: skip
                series.append(max(getattr(response, field_name) for response in answer[2]))
        answered = time.perf_counter()
        waited = answered - started if late else 0.0
        core = seq.session.core
        core.apply_staged(sum(call.staged_rows(seq.session) for call in seq.pending.calls))  # (worker copies)
        # The ring slots written meanwhile: one span of slots, or two where the ring wraps
        # (slices, so no index tensors and no wait for the stream; one foreach call).
        targets, sources = [], []
        # (With overlap the step launched ahead writes one more, queued before these copies.)
        end = core.position + self._ahead
        for lo, hi in ring_spans(core.n_sink + core.retrieved, core.window, seq.pending_from, end):
            for real, copy in zip((core.keys, core.values, core.slot_pos), seq.shadow, strict=False):
                if copy is not real:  # (a light shadow's keys and values are the real ones)
                    targets.append(real[:, :, lo:hi])
                    sources.append(copy[:, :, lo:hi])
        # The latest step's query too: a slot that crosses again in this step retrieves for the query
        # in its working set, which the steps reading the shadow wrote into the shadow's.
        targets.append(core.query)
        sources.append(seq.shadow[3])
        torch._foreach_copy_(targets, sources)
        self.backend.tables.set(seq.slot, core.keys, core.values, core.slot_pos, core.query,
                                core.n_sink + core.retrieved, core.window, evicted_mask(core))  # fmt: skip
        self._shadows = [seq.shadow[2:] if seq.light else seq.shadow, *self._shadows][: self.batch]
        self.times.shadow_steps.append(core.position - seq.pending_from)
        seq.pending, seq.shadow = None, None
        self._shadow_s += time.perf_counter() - answered
        return waited

    def close(self) -> None:
        self._quiesce()
        self._flight = None
        for seq in self.active:
            if seq.pending is not None:
                seq.pending.result()
            if seq.notice is not None:
                for call in seq.notice.calls:
                    call.result()
