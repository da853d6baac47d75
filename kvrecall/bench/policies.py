"""Where each policy's decode attention reads its KV from, and what it moves to get it there.

Every policy implements ``attend(layer, q, k, v) -> out`` for one decode token
(q [B, Hkv, G, D], k / v [B, Hkv, D], out [B, Hkv, G, D]) and ``after_step()``; ``DecodeStep``
runs the whole model around it. All of them are graph-capturable: no host synchronisation,
static shapes, indices computed on the GPU.

* ``FullKV``: every position on the GPU.
* ``ResidentSet`` (``bound``): a fixed [sinks | retrieved | window] set, no retrieval at all.
* ``QuestHost`` (``perstep-host``): Quest page retrieval every step and layer, full KV in host.
* ``LouisKV``: the resident set plus boundary detection each step, and a batched retrieval of
  all layers (score cluster centroids, plan residency, gather only the missing rows) at a
  semantic boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvrecall.bench import kernels
from kvrecall.bench.ceilings import HostPool
from kvrecall.bench.model import ModelShape, RandomLlama, decode_attention, rope_tables

Gather = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


@dataclass(frozen=True)
class ResidentLayout:
    """The GPU working set per (layer, sequence, KV head): [sinks | retrieved | window] tokens.

    ``unit`` is both Quest's page size and the LouisKV cluster size used here; ``slots`` is how
    many units fill the retrieved budget.
    """

    n_sink: int = 16
    budget: int = 1024
    window: int = 64
    unit: int = 16

    def __post_init__(self) -> None:
        for name in ("n_sink", "budget", "window"):
            assert getattr(self, name) % self.unit == 0, f"{name} must be a multiple of unit"

    @property
    def tokens(self) -> int:
        return self.n_sink + self.budget + self.window

    @property
    def slots(self) -> int:
        return self.budget // self.unit


class FullKV:
    """All KV on the GPU: [kv_layers, B, Hkv, T, D] keys and values.

    When the whole cache exceeds ``mem_limit`` bytes, fewer layers' buffers are allocated and
    layer ``l`` uses buffer ``l % kv_layers``: every layer still reads a full T-token cache
    (buffers far larger than L2), so the bytes read per step are those of the real cache.
    """

    name = "full"

    def __init__(self, shape: ModelShape, batch: int, tokens: int, device: torch.device, mem_limit: int):
        per_layer = shape.kv_bytes(batch, tokens, layers=1)
        self.kv_layers = max(1, min(shape.n_layers, mem_limit // per_layer))
        dims = (self.kv_layers, batch, shape.n_kv_heads, tokens, shape.head_dim)
        self.keys = torch.randn(dims, device=device, dtype=torch.bfloat16)
        self.values = torch.randn(dims, device=device, dtype=torch.bfloat16)
        self.position = tokens - 1
        self.gpu_kv_bytes = shape.kv_bytes(batch, tokens)
        self.allocated_bytes = 2 * self.keys.numel() * self.keys.element_size()
        self.emulated = self.kv_layers < shape.n_layers

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.keys[layer % self.kv_layers], self.values[layer % self.kv_layers]
        keys[:, :, self.position] = k
        values[:, :, self.position] = v
        return decode_attention(q, keys, values)

    def after_step(self) -> None:
        pass


class ResidentSet:
    """The bound: attention over a fixed resident set, kv [L, 2, B, Hkv, R, D], no retrieval.

    The new token is written into its window-ring slot each step, as the worker does.
    """

    name = "bound"

    def __init__(self, shape: ModelShape, layout: ResidentLayout, batch: int, tokens: int, device: torch.device):
        self.shape, self.layout, self.batch = shape, layout, batch
        dims = (shape.n_layers, 2, batch, shape.n_kv_heads, layout.tokens, shape.head_dim)
        self.kv = torch.randn(dims, device=device, dtype=torch.bfloat16)
        self.window_slot = layout.n_sink + layout.budget + (tokens - 1) % layout.window

    @property
    def gpu_kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = self.kv[layer]
        kv[0, :, :, self.window_slot] = k
        kv[1, :, :, self.window_slot] = v
        return decode_attention(q, kv[0], kv[1])

    def after_step(self) -> None:
        pass

    def _resident_rows(self, rows_per_unit: int) -> torch.Tensor:
        """Row index (rows of ``rows_per_unit`` tokens) of slot j's first token, per (l, kv, b, h):
        int64 [L, 2, B * Hkv, slots]."""
        s, lay = self.shape, self.layout
        heads = torch.arange(s.n_layers * 2 * self.batch * s.n_kv_heads, device=self.kv.device)
        heads = heads.view(s.n_layers, 2, self.batch * s.n_kv_heads, 1)
        slot_tokens = lay.n_sink + lay.unit * torch.arange(lay.slots, device=self.kv.device)
        return (heads * lay.tokens + slot_tokens) // rows_per_unit


class HostKV:
    """The batch's full KV cache in the pinned host pool: [2, Lh, Bh, Hkv, T, D] bf16.

    Allocating 32 layers x B sequences of host KV would take minutes to pin (and 128 GiB at
    128K x 8); so layer ``l`` of sequence ``b`` reads host slot (``l % Lh``, ``b % Bh``) with Lh, Bh
    as large as the pool allows. Rows are still gathered at random from GiBs of host memory, so
    the bytes moved and the access pattern are those of a real cache. ``logical_bytes`` is what
    a real one would hold.
    """

    def __init__(self, pool: HostPool, shape: ModelShape, batch: int, tokens: int):
        flat = pool.view(torch.bfloat16)
        per_layer_seq = 2 * shape.n_kv_heads * tokens * shape.head_dim
        capacity = flat.numel() // per_layer_seq
        if capacity < 1:
            raise MemoryError(f"host pool of {pool.n_bytes} B holds less than one layer of one sequence")
        self.batch_slots = min(batch, capacity)
        self.layer_slots = min(shape.n_layers, capacity // self.batch_slots)
        self.shape, self.batch, self.tokens = shape, batch, tokens
        dims = (2, self.layer_slots, self.batch_slots, shape.n_kv_heads, tokens, shape.head_dim)
        self.data = flat[: self.layer_slots * self.batch_slots * per_layer_seq].view(dims)
        self.logical_bytes = shape.kv_bytes(batch, tokens)
        self.shared = self.layer_slots < shape.n_layers or self.batch_slots < batch

    def rows(self, tokens_per_row: int) -> torch.Tensor:
        """The host KV as a 2-D tensor of rows of ``tokens_per_row`` tokens."""
        return self.data.view(-1, tokens_per_row * self.shape.head_dim)

    def head_rows(self, device: torch.device, tokens_per_row: int) -> torch.Tensor:
        """Row index of token 0 of each (kv, layer, sequence, KV head): int64 [2, L, B * Hkv]."""
        s = self.shape
        kv = torch.arange(2, device=device).view(2, 1, 1, 1)
        layer = (torch.arange(s.n_layers, device=device) % self.layer_slots).view(1, -1, 1, 1)
        seq = (torch.arange(self.batch, device=device) % self.batch_slots).view(1, 1, -1, 1)
        head = torch.arange(s.n_kv_heads, device=device).view(1, 1, 1, -1)
        index = ((kv * self.layer_slots + layer) * self.batch_slots + seq) * s.n_kv_heads + head
        return (index * self.tokens // tokens_per_row).reshape(2, s.n_layers, self.batch * s.n_kv_heads)


class QuestHost(ResidentSet):
    """Quest (Tang et al., ICML 2024), per-step page retrieval from pinned host memory.

    The GPU keeps per page of ``unit`` tokens the elementwise max and min of its keys,
    bounds [L, B * Hkv, P, 2D] ([max | min]). Each step and layer the page score is Quest's upper
    bound of q.k summed over the G query heads of a KV head: sum_g (q_g+ . kmax + q_g- . kmin),
    which is one matrix-vector product with (sum_g q_g)+ and (sum_g q_g)-; the top pages under the
    budget are fetched from the host into the retrieved region, then attention runs over the same
    [sinks | retrieved | window] set as ``bound``.

    ``cached=False`` fetches every selected page every step (variant a). ``cached=True`` keeps
    the region as a page cache and fetches only pages not resident (variant b). With random
    weights the same graph replays the same selection, so each step first evicts
    ``(1 - overlap) * slots`` pages: exactly that many are fetched per step and head, the
    step-to-step overlap of selections that a real model shows.
    """

    def __init__(self, shape: ModelShape, layout: ResidentLayout, batch: int, tokens: int, device: torch.device,
                 host: HostKV, gather: Gather, cached: bool, overlap: float, plan_backend: str):
        super().__init__(shape, layout, batch, tokens, device)
        self.name = "perstep-host-b" if cached else "perstep-host-a"
        n_heads, pages = batch * shape.n_kv_heads, tokens // layout.unit
        self.bounds = torch.randn((shape.n_layers, n_heads, pages, 2 * shape.head_dim), device=device,
                                  dtype=torch.bfloat16)
        self.host_pages = host.rows(layout.unit)
        self.host_base = host.head_rows(device, layout.unit).unsqueeze(-1)  # [2, L, N, 1]
        # rows of kv[layer] that receive slot j's page: the same for every layer, so layer 0's
        self.dst_rows = self._resident_rows(layout.unit)[0].reshape(-1)
        self.gather, self.plan_backend, self.cached = gather, plan_backend, cached
        self.n_evict = round((1.0 - overlap) * layout.slots)
        self.slot_table = torch.full((shape.n_layers, n_heads, layout.slots), -1, dtype=torch.int64, device=device)
        self.fetch = torch.empty((n_heads, layout.slots), dtype=torch.int64, device=device)

    @property
    def gpu_kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.bounds.numel() * self.bounds.element_size()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, lay = self.shape, self.layout
        q_sum = q.sum(dim=2).reshape(self.batch * s.n_kv_heads, s.head_dim)
        q_split = torch.cat((q_sum.clamp(min=0), q_sum.clamp(max=0)), dim=-1)
        scores = torch.bmm(self.bounds[layer], q_split.unsqueeze(-1)).squeeze(-1)
        pages = scores.topk(lay.slots, dim=-1, sorted=False).indices
        base = self.host_base[:, layer]
        if self.cached:
            fetch = kernels.plan_fetch(pages, self.slot_table[layer], self.n_evict, self.fetch,
                                       backend=self.plan_backend)
            src = torch.where(fetch >= 0, base + fetch, -1)
        else:
            src = base + pages
        dst = self.kv[layer].view(-1, lay.unit * s.head_dim)
        self.gather(self.host_pages, src.reshape(-1), dst, self.dst_rows)
        return super().attend(layer, q, k, v)


class LouisKV(ResidentSet):
    """LouisKV (arXiv 2510.11292) in process: the bound step plus boundary detection, and a
    retrieval of all layers at a semantic boundary.

    Each step every layer writes its query into ``queries`` [L, B, Hkv, G, D] and the step ends
    with the boundary test (cosine similarity to the query of the last retrieval, per layer and
    sequence, under ``threshold``). The boundary work is batched over all layers: score the
    T / unit cluster centroids [L * B * Hkv, U, D] of every head with the summed group query, take
    the top ``slots`` clusters (``unit`` tokens each, so ``budget`` tokens), plan residency against
    the slots' current clusters, and gather only the missing clusters' rows (one row per token,
    head_dim * 2 bytes) from the pinned host. Clusters are emulated as fixed strided token sets
    {u, u + U, u + 2U, ...}: scattered single-token rows, the access pattern of real k-means
    clusters. ``boundary_miss`` is the share of the selected clusters fetched at a boundary
    (1.0: the whole budget, the worst case).

    ``retrieve()`` does it after a step, on the step's stream. ``start_overlapped_retrieval()``
    issues it on a side stream at the start of the next step, one gather per layer, and layer l's
    attention waits only for layer l's rows, so the transfer overlaps the dense layers.
    Index tensors are layer-major so that each layer's slice is contiguous.
    """

    name = "louiskv"

    def __init__(self, shape: ModelShape, layout: ResidentLayout, batch: int, tokens: int, device: torch.device,
                 host: HostKV, gather: Gather, boundary_miss: float, plan_backend: str, threshold: float = 0.9):
        super().__init__(shape, layout, batch, tokens, device)
        n_heads, units = shape.n_layers * batch * shape.n_kv_heads, tokens // layout.unit
        self.centroids = torch.randn((n_heads, units, shape.head_dim), device=device, dtype=torch.bfloat16)
        qdims = (shape.n_layers, batch, shape.n_kv_heads, shape.group, shape.head_dim)
        self.queries = torch.zeros(qdims, device=device, dtype=torch.bfloat16)
        self.reference_queries = torch.randn(qdims, device=device, dtype=torch.bfloat16)
        self.drifted = torch.zeros((shape.n_layers, batch), device=device, dtype=torch.bool)
        self.threshold = threshold
        self.slot_table = torch.full((n_heads, layout.slots), -1, dtype=torch.int64, device=device)
        self.fetch = torch.empty((n_heads, layout.slots), dtype=torch.int64, device=device)
        self.n_evict = round(boundary_miss * layout.slots)
        self.host_tokens = host.rows(1)
        # [L, 2, B * Hkv, 1, 1]: host row of token 0 of each (layer, kv, head)
        self.host_base = host.head_rows(device, 1).transpose(0, 1)[..., None, None].contiguous()
        self.member_offsets = torch.arange(layout.unit, device=device) * units  # token k of unit u: u + k U
        # [L, 2, B * Hkv, slots, unit]: resident row of token k of slot j
        self.dst_rows = self._resident_rows(1)[..., None] + torch.arange(layout.unit, device=device)
        self.gather, self.plan_backend = gather, plan_backend
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.layer_ready = ([torch.cuda.Event() for _ in range(shape.n_layers)]
                            if device.type == "cuda" else [])
        self.pending = False

    @staticmethod
    def gpu_bytes_per_sequence(shape: ModelShape, layout: ResidentLayout, tokens: int) -> int:
        """GPU bytes one sequence holds: working set, centroids, queries and slot tables."""
        heads = shape.n_layers * shape.n_kv_heads
        working = shape.kv_bytes(1, layout.tokens)
        centroids = heads * (tokens // layout.unit) * shape.head_dim * shape.itemsize
        queries = 2 * shape.n_layers * shape.n_heads * shape.head_dim * shape.itemsize
        tables = 2 * heads * layout.slots * 8
        return working + centroids + queries + tables

    @property
    def gpu_kv_bytes(self) -> int:
        tensors = (self.kv, self.centroids, self.queries, self.reference_queries, self.slot_table, self.fetch)
        return sum(t.numel() * t.element_size() for t in tensors)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.pending:
            torch.cuda.current_stream().wait_event(self.layer_ready[layer])
        self.queries[layer].copy_(q)
        return super().attend(layer, q, k, v)

    def after_step(self) -> None:
        self.pending = False
        similarity = F.cosine_similarity(self.queries.float(), self.reference_queries.float(), dim=-1)
        torch.lt(similarity.mean(dim=(2, 3)), self.threshold, out=self.drifted)

    def _plan_sources(self, q_sum: torch.Tensor) -> torch.Tensor:
        """Score, select and plan for all layers: host rows to fetch, [L, 2, B * Hkv, slots, unit]
        (-1 where the slot keeps its cluster)."""
        s, lay = self.shape, self.layout
        scores = torch.bmm(self.centroids, q_sum).squeeze(-1)
        units = scores.topk(lay.slots, dim=-1, sorted=False).indices
        fetch = kernels.plan_fetch(units, self.slot_table, self.n_evict, self.fetch, backend=self.plan_backend)
        fetch = fetch.view(s.n_layers, 1, -1, lay.slots, 1)
        return torch.where(fetch >= 0, self.host_base + fetch + self.member_offsets, -1)

    def _query_sums(self) -> torch.Tensor:
        """The group-summed queries of the step that hit the boundary, [L * B * Hkv, D, 1]; they
        become the reference of the boundary test."""
        self.reference_queries.copy_(self.queries)
        return self.queries.sum(dim=3).reshape(-1, self.shape.head_dim, 1)

    def retrieve(self) -> None:
        """The boundary work for every layer, after the step, on the step's stream."""
        src = self._plan_sources(self._query_sums())
        self.gather(self.host_tokens, src.reshape(-1), self.kv.view(-1, self.shape.head_dim), self.dst_rows.reshape(-1))

    def start_overlapped_retrieval(self) -> None:
        """The boundary work on a side stream, one gather per layer; call before the next step."""
        assert self.side_stream is not None, "overlapped retrieval needs a CUDA device"
        q_sum = self._query_sums()  # taken before this step's layers overwrite the queries
        q_sum.record_stream(self.side_stream)  # freed on this stream, still read on the side stream
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            src = self._plan_sources(q_sum)
            kv_rows = self.kv.view(-1, self.shape.head_dim)
            for layer in range(self.shape.n_layers):
                self.gather(self.host_tokens, src[layer].reshape(-1), kv_rows, self.dst_rows[layer].reshape(-1))
                self.layer_ready[layer].record(self.side_stream)
        self.pending = True


class DecodeStep:
    """One decode step of the whole model for a batch, attention delegated to ``policy``.

    Inputs (token ids, RoPE tables of the new position) are static tensors, so the step can be
    captured once and replayed. ``extra`` runs after the step (LouisKV's boundary retrieval).
    """

    def __init__(self, model: RandomLlama, policy: FullKV | ResidentSet, batch: int, position: int,
                 extra: Callable[[], None] | None = None):
        device = model.device
        self.model, self.policy, self.extra = model, policy, extra
        self.tokens = torch.randint(0, model.shape.vocab, (batch,), device=device)
        cos, sin = rope_tables(torch.tensor([position], device=device), model.shape.head_dim)
        self.cos, self.sin = cos[0], sin[0]
        self.next_tokens = torch.empty_like(self.tokens)

    def __call__(self) -> None:
        model, policy = self.model, self.policy
        x = F.embedding(self.tokens, model.embed)
        for layer in range(model.shape.n_layers):
            q, k, v = model.attn_in(layer, x, self.cos, self.sin)
            x = model.attn_out(layer, x, policy.attend(layer, q, k, v))
        self.next_tokens.copy_(model.head(x))
        policy.after_step()
        if self.extra is not None:
            self.extra()
