"""Engine: batched decode of many kvrecall sessions through one model, one step at a time.

    engine = Engine(weights, client, batch=8, max_capacity=2048)
    slot = engine.add(client.open_session(spec, "louiskv", {"budget": 1024}, device="cuda"), prompt_ids)
    for _ in range(64):
        tokens = engine.step()          # {slot: token generated this step}
    engine.remove(slot).close()

Sequences join and leave between steps (continuous batching); each keeps its own session.
A step is one static-shaped launch sequence over every slot (one CUDA graph on a GPU,
captured when the engine is built, while no slot is in use). After it, the host reads one
boundary flag per slot (a pinned copy, the only sync of the step), then, for the slots that
need it, sends the window's AppendNotice and the boundary's retrieval, all slots' calls
concurrently (each session has its own Decode stream). The retrieval serves the next step,
as in LouisKV: the query that crossed the threshold becomes the slot's new reference.

Policies that retrieve every step (quest) retrieve after each step for the next one (the
transformers path retrieves per layer inside the step; a captured step cannot wait for the
daemon). With a budget covering the sequence every policy is exact either way.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvrecall.engine.decoder import Decoder
from kvrecall.engine.graph import GraphStep
from kvrecall.engine.sessions import SessionBatch
from kvrecall.engine.weights import DecoderWeights


@dataclass
class Sequence:
    """One slot's sequence: its session and what it did."""

    session: object  # kvrecall.client.WorkerSession
    slot: int
    tokens: list[int] = field(default_factory=list)
    boundaries: int = 0
    appends: int = 0
    steps: int = 0


class Engine:
    """Batched greedy decode over up to `batch` sessions (see the module docstring).

    `force_boundary(step, slot) -> bool | None` overrides the device's boundary decision
    (benchmarks with random weights set a measured rate this way; None keeps the flag)."""

    def __init__(
        self, weights: DecoderWeights, batch: int, max_capacity: int, *, use_graph: bool = True,
        impl: str = "auto", force_boundary: Callable[[int, int], bool | None] | None = None,
    ) -> None:  # fmt: skip
        s = weights.shape
        self.device = weights.device
        self.decoder = Decoder(weights, batch)
        self.backend = SessionBatch(
            batch, s.num_layers, s.num_query_heads, s.num_kv_heads, s.head_dim, max_capacity, self.device,
            weights.dtype, self.decoder.scale, impl,
        )  # fmt: skip
        self.sequences: list[Sequence | None] = [None] * batch
        self.force_boundary = force_boundary
        self.steps = 0
        self._calls = ThreadPoolExecutor(max_workers=batch, thread_name_prefix="kvrecall-engine")
        # Captured while no slot is in use: the warm-up steps write nothing anywhere.
        self.graph = GraphStep(lambda: self.decoder.step(self.backend), self.device, use_graph)
        self.decoder.tokens.zero_()
        self.decoder.positions.zero_()
        pin = self.device.type == "cuda"
        self._tokens_host = torch.zeros(batch, dtype=torch.int64, pin_memory=pin)
        self._flags_host = torch.zeros(batch, dtype=torch.bool, pin_memory=pin)

    @property
    def batch(self) -> int:
        return self.decoder.batch

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
        the `first_token` to feed. Returns the slot."""
        slot = next((b for b, seq in enumerate(self.sequences) if seq is None), None)
        if slot is None:
            raise RuntimeError(f"all {self.batch} slots are in use")
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
        session.ingest(kv, queries)
        self.backend.set_slot(slot, session.core)
        if queries is not None:
            self.backend.set_reference(slot, queries[:, :, -1])
        self.decoder.tokens[slot] = first_token
        self.decoder.positions[slot] = kv.shape[3]
        self.sequences[slot] = Sequence(session, slot, [first_token])
        return slot

    def remove(self, slot: int) -> Sequence:
        """Free the slot (the caller closes the session)."""
        seq = self.sequences[slot]
        if seq is None:
            raise KeyError(f"slot {slot} is empty")
        self.backend.clear_slot(slot)
        self.sequences[slot] = None
        return seq

    # ---- decoding --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One token for every active slot; returns {slot: its new token}."""
        self.graph()
        self._tokens_host.copy_(self.decoder.tokens, non_blocking=True)
        self._flags_host.copy_(self.backend.flags, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        tokens, flags = self._tokens_host.tolist(), self._flags_host.tolist()
        calls = []
        for seq in self.active:
            b = seq.slot
            core = seq.session.core
            core.position += 1
            seq.steps += 1
            seq.tokens.append(tokens[b])
            forced = self.force_boundary(self.steps, b) if self.force_boundary is not None else None
            crossed = flags[b] if forced is None else forced
            append = core.needs_append()
            if crossed:
                self.backend.set_reference(b)
                seq.boundaries += 1
            seq.appends += int(append)
            if append or crossed:
                calls.append(self._calls.submit(_serve, seq.session, append, crossed))
        for call in calls:
            call.result()
        self.steps += 1
        return {seq.slot: tokens[seq.slot] for seq in self.active}

    def close(self) -> None:
        self._calls.shutdown(wait=True)


def _serve(session, append: bool, boundary: bool) -> None:
    """The daemon calls one slot needs after a step: the window's notice, then the retrieval."""
    if append:
        session.append()
    if boundary:
        session.boundary()
