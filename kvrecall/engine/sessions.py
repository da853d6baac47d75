"""SessionBatch: the attention backend over B kvrecall sessions' working sets.

Each slot of the batch is one sequence with its own session (its own working set, host tier
and boundaries); one attention launch per layer covers every slot through pointer tables
(kernels/ws_decode.py). Inside the step, everything stays on the device: the new K/V and the
query go into each working set, and the boundary signal (LouisKV's query drift: cosine of
each layer's query against the query of the last retrieval, mean over query heads, then over
layers) becomes one flag per slot. The host reads the flags after the step
(engine/engine.py) and asks the daemon to retrieve for the slots that crossed; the retrieval
serves the next step.
"""

from __future__ import annotations

import torch

from kvrecall import kernels
from kvrecall.client.boundary import next_threshold
from kvrecall.kernels.ws_decode import AttendWorkspace, SlotTables, attend, write_step
from kvrecall.v1 import kvrecall_pb2 as pb


def evicted_mask(core) -> int | None:
    """The evicted boundary slot tables mask with (ws_decode), for a deferred-eviction session."""
    return core.evicted_upto if core.deferred else None


# Thresholds that make the flag constant: similarity is in [-1, 1].
NEVER = -2.0
ALWAYS = 2.0


class SessionBatch:
    """Pointer tables, boundary references and flags for up to `batch` sessions."""

    def __init__(
        self, batch: int, num_layers: int, num_query_heads: int, num_kv_heads: int, head_dim: int,
        max_capacity: int, device: torch.device, dtype: torch.dtype, scale: float, impl: str = "auto",
    ) -> None:  # fmt: skip
        self.num_layers = num_layers
        self.max_capacity = max_capacity
        self.scale = scale
        self.impl = impl
        self.tables = SlotTables.empty(batch, device, dtype)
        self.workspace = AttendWorkspace(
            batch, num_kv_heads, num_query_heads // num_kv_heads, head_dim, max_capacity, device
        )
        shape = (batch, num_layers, num_query_heads, head_dim)
        self.reference = torch.zeros(shape, dtype=torch.float32, device=device)  # last retrieval's query
        self.latest = torch.zeros(shape, dtype=torch.float32, device=device)  # this step's query
        self.similarity = torch.zeros(batch, num_layers, dtype=torch.float32, device=device)
        self.threshold = torch.full((batch,), NEVER, dtype=torch.float32, device=device)
        self.target_rate = torch.zeros(batch, dtype=torch.float32, device=device)  # > 0: the threshold adapts
        self.min_gap = torch.zeros(batch, dtype=torch.int32, device=device)  # steps after a retrieval with no flag
        self.since = torch.zeros(batch, dtype=torch.int32, device=device)  # decode steps since the last retrieval
        self.flags = torch.zeros(batch, dtype=torch.bool, device=device)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        write_step(self.tables, layer, k, v, q, positions, impl=self.impl)
        signal = q.float()
        self.latest[:, layer] = signal
        cosine = kernels.cosine_similarity(signal, self.reference[:, layer], impl=self.impl)  # [B, Hq]
        self.similarity[:, layer] = cosine.mean(dim=-1)
        out = attend(self.tables, layer, q, self.scale, self.workspace, impl=self.impl)
        if layer == self.num_layers - 1:
            self.since.add_(1)
            torch.lt(self.similarity.mean(dim=1), self.threshold, out=self.flags)
            self.flags.logical_and_(self.since > self.min_gap)
            self.since.masked_fill_(self.flags, 0)
            self.threshold.copy_(next_threshold(self.threshold, self.flags.float(), self.target_rate))
        return out

    # ---- slots (host side, between steps) ---------------------------------------------------
    def set_slot(self, b: int, core) -> None:
        """Slot b reads the working set of session `core` (a client SessionCore)."""
        window_start = core.n_sink + core.retrieved
        self.tables.set(b, core.keys, core.values, core.slot_pos, core.query, window_start, core.window,
                        evicted_mask(core))  # fmt: skip
        mode = core.boundary_mode
        threshold = {pb.BOUNDARY_MODE_THRESHOLD: core.boundary_threshold, pb.BOUNDARY_MODE_EVERY_STEP: ALWAYS}
        self.threshold[b] = threshold.get(mode, NEVER)
        self.target_rate[b] = core.boundary_target_rate if mode == pb.BOUNDARY_MODE_THRESHOLD else 0.0
        self.min_gap[b] = core.boundary_min_gap
        self.since[b] = 0
        self.reference[b].zero_()
        self.flags[b] = False

    def clear_slot(self, b: int) -> None:
        self.tables.clear(b)
        self.threshold[b] = NEVER
        self.target_rate[b] = 0.0
        self.min_gap[b] = 0
        self.flags[b] = False

    def set_reference(self, b: int, queries: torch.Tensor | None = None) -> None:
        """The query of slot b's last retrieval: queries [L, Hq, D], or this step's."""
        self.reference[b].copy_(self.latest[b] if queries is None else queries.float())
        self.since[b : b + 1].zero_()  # a kernel: `since[b] = 0` would wait for the stream
