"""transformers integration: decode any llama-architecture model through a kvrecall session.

    session = client.open_session(spec_for(model, max_tokens), policy="louiskv")
    cache = KVRecallCache(session)
    use_kvrecall_attention(model)
    model.generate(input_ids, cache=cache, max_new_tokens=64, do_sample=False)

The first forward pass is the prompt (the ingest): ordinary causal attention, and each
layer's K/V (with the last prompt queries the policy asked for) streams to the daemon right
after that layer's attention used it (client/ingest.py), so the worker never holds the whole
prompt's KV. `prefill(model, cache, ids)` with `chunk_tokens` feeds a fresh long prompt
layer by layer instead (llama-family models): each layer's projections and MLP run chunk by
chunk, its attention in one causal call over the whole prompt, and the layer's K/V goes to the
daemon while the next layer computes; the worker holds the prompt's hidden states, one layer's
queries and K/V and one chunk's activations. A later forward pass of n > 1 tokens is a chunk (a question
after a cached document, a chat turn): per layer, policies that retrieve first retrieve for
the chunk's last queries; with the session's `exact_chunks` (louiskv and quest by default) the
same call returns the chunk's exact attention over every earlier token (the daemon reads the
host tier) and the chunk merges it with its causal attention over itself, else it attends over
the resident slots and causally over itself; after the last layer the chunk's K/V goes to the
daemon (ChunkAppend), which puts it in the host tier and the window ring. A pass of one token
is a decode step: its K/V goes into the window ring and it attends over the resident slots ([sinks | retrieved | window], masked
by slot_pos); after the step the cache announces appended tokens every `spill_every` tokens
and, when the BoundaryDetector fires, asks the daemon to retrieve for the step's queries
(serving the next step). Policies that retrieve every step (quest) retrieve per layer before
that layer's attention. Batch size 1 (one session per sequence).

Shared documents: open the session with `prefix=declare(document_ids, model_fingerprint(model))`
(kvrecall.prefix) and `prefill` the whole prompt. When the daemon holds the document for
this tenant, model and policy, the session starts after it (its working set already filled)
and only the rest is prefilled, as chunks; otherwise the document is the first pass (the
ingest), which registers it for the next sessions. When the daemon holds only a shorter prefix
of the declared one (a chat's earlier turns), a pass ends at the declared end and the daemon
registers the longer prefix there, for the next turn.
"""

from __future__ import annotations

import contextvars
import hashlib
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvrecall.client.boundary import BoundaryDetector
from kvrecall.client.chunk_attention import causal_attention
from kvrecall.client.core import ModelSpec
from kvrecall.client.ingest import PromptStream
from kvrecall.client.staging import StagingBuffer
from kvrecall.kernels.host_attention import causal_attention_lse, merge_attention
from kvrecall.v1 import kvrecall_pb2 as pb

ATTENTION_NAME = "kvrecall"
# Models whose forward pass is embed -> decoder layers (with rotary embeddings) -> norm ->
# lm_head, so prefill() may run it layer by layer (LAYER_MAJOR_MODELS: config.model_type).
LAYER_MAJOR_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
_ACTIVE: contextvars.ContextVar[KVRecallCache | None] = contextvars.ContextVar("kvrecall_cache", default=None)


def spec_for(model: torch.nn.Module, max_tokens: int, dtype: torch.dtype | None = None) -> ModelSpec:
    """The ModelSpec of a transformers llama-style model."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weight = next(model.parameters())
    return ModelSpec(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", heads),
        num_query_heads=heads,
        head_dim=head_dim,
        dtype=dtype or weight.dtype,
        max_tokens=max_tokens,
        device=str(weight.device),
    )


def model_fingerprint(model: torch.nn.Module, sample: int = 64) -> str:
    """A digest of `model`'s configuration and weights (the first `sample` elements of every
    parameter) for PrefixDeclaration.fingerprint: two models share prefix KV only when equal."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().reshape(-1)[:sample].float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class StepStats:
    steps: int = 0
    boundaries: int = 0
    appends: int = 0
    max_resident: int = 0
    similarities: list[float] = field(default_factory=list)


class _Layer(DynamicLayer):
    """Per-layer facade transformers expects; the owning cache does the work."""

    is_sliding = False

    def __init__(self, owner: KVRecallCache, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._update(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.seq_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return -1


class KVRecallCache(Cache):
    """A transformers Cache whose KV lives in a kvrecall session (batch size 1).

    chunk_tokens: the chunk size `prefill()` feeds a prompt in (None: the whole prompt in one
    pass); layer_major: a fresh prompt in chunks goes layer by layer (exact, see
    prefill_layer_major) where the model allows, else chunk by chunk over the working set;
    chunk_queries: how many of a chunk's last queries per head pick its retrieval."""

    def __init__(
        self, session, aggregate: str = "mean", record_similarity: bool = False, signal: str | None = None,
        chunk_tokens: int | None = None, chunk_queries: int = 32, layer_major: bool = True,
    ) -> None:
        if signal is None:  # the daemon's boundary rule decides
            signal = "pre" if getattr(session, "boundary_pre_rope", False) else "post"
        if signal not in ("pre", "post"):
            raise ValueError("signal must be 'pre' (RoPE undone) or 'post' (the attention's query)")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.session = session
        self.signal = signal
        self.chunk_tokens = chunk_tokens
        self.chunk_queries = max(1, chunk_queries)
        self.layer_major = layer_major
        spec = session.spec
        self.num_layers = spec.num_layers
        self.group = spec.num_query_heads // spec.num_kv_heads
        super().__init__(layers=[_Layer(self, i) for i in range(spec.num_layers)])
        self.detector = BoundaryDetector(
            session.boundary_mode, session.boundary_threshold, spec.num_layers, aggregate,
            session.boundary_target_rate, session.boundary_min_gap,
        )
        self.per_layer_retrieval = session.boundary_mode == pb.BOUNDARY_MODE_EVERY_STEP
        self.exact_chunks = session.exact_chunks  # a chunk attends over the host tier (the daemon answers)
        self.retrieves = session.boundary_mode in (pb.BOUNDARY_MODE_EVERY_STEP, pb.BOUNDARY_MODE_THRESHOLD)
        self.stats = StepStats()
        self.record_similarity = record_similarity
        self._prompt: PromptStream | None = None
        self._chunk: StagingBuffer | None = None  # [L, 2, H, n, D]: the chunk in this forward pass
        self._last_queries: list[torch.Tensor] = []  # per layer, the pass's last query [Hq, D]
        self.ingested = bool(session.prefix_held)  # a held prefix: the daemon ingested it
        self.seq_length = session.prefix_held
        self.fed = False  # no forward pass yet: prefill() skips or ingests a declared prefix
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_at = -1
        self._attention_modules: list | None = None
        self._step_signal: list[torch.Tensor] = []

    # ---- the transformers side ----------------------------------------------------------
    def _update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if key_states.shape[0] != 1:
            raise ValueError("KVRecallCache serves batch size 1 (open one session per sequence)")
        _ACTIVE.set(self)
        if not self.ingested or key_states.shape[2] > 1:  # the prompt or a chunk: the attention sends it on
            return key_states, value_states
        s = self.session
        s.write_token(s.position, key_states[0, :, 0], value_states[0, :, 0], layer=layer)
        return s.keys[layer].unsqueeze(0), s.values[layer].unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    @property
    def is_compileable(self) -> bool:
        return False

    # ---- called by the attention function -----------------------------------------------
    def _note_layer(self, module, query: torch.Tensor) -> int:
        """Record the layer's module and last query [Hq, D] for this pass; its index."""
        layer = module.layer_idx
        if layer == 0:
            self._attention_modules, self._last_queries = [], []
        self._attention_modules.append(module)
        self._last_queries.append(query[0, :, -1].detach())
        return layer

    def _prefill_attention(self, module, query, key, value, scaling: float) -> torch.Tensor:
        out = causal_attention(query, key, value, scaling, self.group)
        self._send_prompt_layer(module, query, key[0], value[0], key.shape[2])
        return out

    def _send_prompt_layer(self, module, query, keys: torch.Tensor, values: torch.Tensor, total: int) -> None:
        """This pass's layer of the prompt, keys / values [H, total, D], to the daemon with the
        layer's last queries (the first layer opens the stream); the last layer completes the
        ingest."""
        layer = self._note_layer(module, query)
        if layer == 0:
            self._prompt = self.session.prompt_stream(total)
        n_obs = max(1, self.session.observation)
        self._prompt.send(layer, keys, values, query[0, :, -n_obs:].detach())
        if layer == self.num_layers - 1:
            self._end_prompt(total)

    def _abort_prompt(self) -> None:
        prompt, self._prompt = self._prompt, None
        if prompt is not None:
            prompt.close()

    def _end_prompt(self, num_tokens: int) -> None:
        prompt, self._prompt = self._prompt, None
        prompt.finish()
        self._after_prompt(num_tokens)

    def _after_prompt(self, num_tokens: int) -> None:
        """The prompt is ingested: decode from here (references: this pass's last queries)."""
        self.ingested = True
        self.seq_length = num_tokens
        self._reference_all(torch.stack(self._last_queries), num_tokens - 1)
        self.stats.max_resident = self.session.resident_tokens()

    def _chunk_attention(self, module, query, key, value, scaling: float) -> torch.Tensor:
        """n > 1 new tokens after the ingest: retrieve for their last queries (retrieving
        policies), attend over the resident slots and causally over the chunk."""
        s = self.session
        layer = self._note_layer(module, query)
        if layer == 0:
            s.flush()  # tokens decoded before the chunk reach the host tier first
            shape = (self.num_layers, 2, *key.shape[1:])
            self._chunk = StagingBuffer(shape, s.spec.dtype, s.transport, key.device)
        chunk = self._chunk.tensor[layer]
        chunk[0].copy_(key[0])
        chunk[1].copy_(value[0])
        last = query[0, :, -self.chunk_queries :].detach() if self.retrieves else None
        if self.exact_chunks:  # exact: over the host tier (every earlier token), merged with itself
            host_out, host_lse = s.attend(layer, query[0], scaling, retrieve=last)
            own_out, own_lse = causal_attention_lse(query[0], key[0], value[0], scaling)
            out = merge_attention(host_out, host_lse, own_out, own_lse).to(query.dtype)[None]
        else:  # over the resident slots (what the retrieval for its last queries placed)
            if last is not None:
                s.boundary([layer], queries=last[None])
            out = chunk_attention(
                query, s.keys[layer], s.values[layer], s.slot_pos[layer], chunk[0], chunk[1], scaling, self.group
            )
        if layer == self.num_layers - 1:
            self._end_chunk(query.shape[2])
        return out

    def _end_chunk(self, num_tokens: int) -> None:
        chunk, self._chunk = self._chunk, None
        try:
            self.session.chunk(chunk)
        finally:
            chunk.release()
        self.seq_length += num_tokens
        self.stats.appends += 1
        if self.retrieves:
            self.stats.boundaries += 1
        self._reference_all(torch.stack(self._last_queries), self.seq_length - 1)
        self.stats.max_resident = max(self.stats.max_resident, self.session.resident_tokens())

    def _decode_attention(self, module, query, key, value, scaling: float) -> torch.Tensor:
        layer = module.layer_idx
        s = self.session
        q = query[0, :, 0]  # [Hq, D]
        s.query[layer] = q.to(s.query.dtype)
        signal_q = self._signal_query(module, q, self.seq_length)
        self.detector.observe(layer, signal_q)
        if layer == 0:
            self._step_signal = []
        self._step_signal.append(signal_q)
        if self.per_layer_retrieval:
            s.boundary([layer])
            self.detector.set_reference(layer, signal_q)
        valid = s.slot_pos[layer] >= 0  # [H, C]
        mask = valid.repeat_interleave(self.group, dim=0)[None, :, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=self.group > 1)
        if layer == self.num_layers - 1:
            self._end_step()
        return out

    def _signal_query(self, module, q: torch.Tensor, position: int) -> torch.Tensor:
        """The boundary signal's view of query q [Hq, D] at `position`: the attention's
        (post-RoPE) query, or with the rotary embedding undone ("pre": position-free)."""
        rotary = getattr(module, "_kvrecall_rotary", None)
        if self.signal == "post" or rotary is None:
            return q
        if self._rope_at != position:
            ids = torch.tensor([[position]], device=q.device)
            cos, sin = rotary(q.unsqueeze(0), ids)
            self._rope = (cos[0, 0].to(q.dtype), sin[0, 0].to(q.dtype))
            self._rope_at = position
        return undo_rope(q, *self._rope)

    def _reference_all(self, queries: torch.Tensor, position: int) -> None:
        """Reset every layer's reference to queries [L, Hq, D] (post-RoPE) at `position`."""
        modules = self._attention_modules or [None] * self.num_layers
        self.detector.note_retrieval()
        for layer in range(self.num_layers):
            self.detector.set_reference(layer, self._signal_query(modules[layer], queries[layer], position))

    def _end_step(self) -> None:
        s = self.session
        self.stats.steps += 1
        self.seq_length += 1
        self.stats.max_resident = max(self.stats.max_resident, s.resident_tokens())
        if s.advance() is not None:
            self.stats.appends += 1
        if self.record_similarity:
            self.stats.similarities.append(self.detector.score())
        if not self.per_layer_retrieval and self.detector.is_boundary():
            s.boundary()
            self.stats.boundaries += 1
            for layer, q in enumerate(self._step_signal):
                self.detector.set_reference(layer, q)
        elif self.per_layer_retrieval:
            self.stats.boundaries += 1


# Bool mask elements one SDPA call of chunk_attention may build (query rows are blocked to fit).
MAX_MASK_ELEMENTS = 1 << 26


def chunk_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_pos: torch.Tensor,
    chunk_keys: torch.Tensor, chunk_values: torch.Tensor, scale: float, group: int,
) -> torch.Tensor:
    """Attention of n new tokens: query [1, Hq, n, D]; the resident slots keys / values
    [H, C, D] with slot_pos [H, C] (-1: empty); the chunk's own chunk_keys / values [H, n, D].
    Token i attends over every resident slot and over chunk tokens [0, i]. -> [1, Hq, n, D].
    Query rows go in blocks so that no mask exceeds MAX_MASK_ELEMENTS."""
    Hq, n = query.shape[1], query.shape[2]
    C = keys.shape[1]
    k = torch.cat((keys, chunk_keys.to(keys.dtype)), dim=1)[None]
    v = torch.cat((values, chunk_values.to(values.dtype)), dim=1)[None]
    valid = (slot_pos >= 0).repeat_interleave(group, dim=0)[:, None, :]  # [Hq, 1, C]
    block = max(1, min(n, MAX_MASK_ELEMENTS // (Hq * (C + n))))
    rows = torch.arange(n, device=query.device)
    out = []
    for first in range(0, n, block):
        last = min(n, first + block)
        causal = rows[None, :last] <= rows[first:last, None]  # [b, last]
        mask = torch.cat((valid.expand(Hq, last - first, C), causal.expand(Hq, -1, -1)), dim=-1)[None]
        out.append(F.scaled_dot_product_attention(
            query[:, :, first:last], k[:, :, : C + last], v[:, :, : C + last], attn_mask=mask, scale=scale,
            enable_gqa=group > 1,
        ))  # fmt: skip
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def layer_major_supported(model) -> bool:
    """Whether prefill_layer_major can run `model` (a llama-family decoder, see LAYER_MAJOR_MODELS)."""
    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    layers = getattr(inner, "layers", None) or [None]
    return (
        getattr(config, "model_type", None) in LAYER_MAJOR_MODELS
        and hasattr(model, "lm_head")
        and all(hasattr(inner, name) for name in ("embed_tokens", "norm", "rotary_emb"))
        and all(hasattr(layers[0], name) for name in LAYER_PARTS)
        and all(hasattr(layers[0].self_attn, name) for name in ATTENTION_PARTS)
    )


def chunk_bounds(total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) chunks of `size` tokens over `total`."""
    return [(start, min(total, start + size)) for start in range(0, total, size)]


@torch.no_grad()
def prefill_layer_major(model, cache: KVRecallCache, input_ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """A fresh prompt [1, T] through a llama-family `model`, layer by layer. Each layer runs in
    three phases: the projections chunk by chunk (`chunk_tokens` rows; the prompt's rotated
    queries and the layer's K/V go into one buffer each), one causal attention over the whole
    prompt (the very SDPA call of a one-pass prefill: cuDNN's fused kernel on Hopper), then
    o_proj and the MLP chunk by chunk. The layer's K/V streams to the daemon (the ingest)
    while the next layer computes. The worker holds the prompt's hidden states, its queries
    and attention output for one layer, one layer's K/V (plus its staging copy) and one
    chunk's activations; the FLOPs and the logits are a one-pass prefill's.
    Returns the last position's logits [V] f32."""
    if cache.ingested or cache._prompt is not None:
        raise ValueError("prefill_layer_major takes a fresh cache (the whole prompt is its ingest)")
    inner, spec = model.model, cache.session.spec
    T = input_ids.shape[1]
    Hq, H, D = spec.num_query_heads, spec.num_kv_heads, spec.head_dim
    bounds = chunk_bounds(T, chunk_tokens)
    hidden = inner.embed_tokens(input_ids)  # [1, T, hidden]: each chunk's rows are rewritten per layer
    positions = torch.arange(T, device=input_ids.device)[None]
    rotary = [inner.rotary_emb(hidden, positions[:, a:b]) for a, b in bounds]
    query = hidden.new_empty(1, Hq, T, D)
    keys, values = hidden.new_empty(H, T, D), hidden.new_empty(H, T, D)
    try:
        for layer in inner.layers[: model.config.num_hidden_layers]:
            attn = layer.self_attn
            rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            for (a, b), (cos, sin) in zip(bounds, rotary, strict=True):
                x = layer.input_layernorm(hidden[:, a:b])
                shape = (1, b - a, -1, D)
                q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
                if getattr(attn, "q_norm", None) is not None:  # qwen3
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                query[:, :, a:b] = q
                keys[:, a:b] = k[0]
                values[:, a:b] = attn.v_proj(x).view(shape)[0].transpose(0, 1)
            out = causal_attention(query, keys[None], values[None], attn.scaling, Hq // H)  # [1, Hq, T, D]
            cache._send_prompt_layer(attn, query, keys, values, T)  # send() copies both
            for a, b in bounds:
                h = hidden[:, a:b] + attn.o_proj(out[:, :, a:b].transpose(1, 2).reshape(1, b - a, Hq * D))
                hidden[:, a:b] = h + layer.mlp(layer.post_attention_layernorm(h))
            del out
    except BaseException:
        cache._abort_prompt()
        raise
    return model.lm_head(inner.norm(hidden[:, -1:]))[0, -1].float()


@torch.no_grad()
def prefill(model, cache: KVRecallCache, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Feed `input_ids` [1, T] through `model` with `cache` (the next tokens of its sequence):
    in chunks of `chunk_tokens` (default: the cache's; None: one pass). A fresh cache's prompt
    in chunks goes layer by layer (prefill_layer_major) when the model allows; otherwise the
    first pass of a fresh cache is its ingest and the others are chunks over the working set.
    Returns the last position's logits [V] f32.

    A fresh cache whose session declared a prefix takes the whole prompt, which must go on at
    least 2 tokens past the prefix (a chunk: it sets the boundary references): the tokens the
    daemon held are skipped, and a prefix it did not hold is the first pass (the ingest)."""
    size = chunk_tokens or cache.chunk_tokens or input_ids.shape[1]
    session, total = cache.session, input_ids.shape[1]
    if not cache.ingested and not session.prefix_tokens and size < total and cache.layer_major \
            and layer_major_supported(model):  # fmt: skip
        cache.fed = True
        return prefill_layer_major(model, cache, input_ids, size)
    cuts, skip = [], 0
    if session.prefix_tokens and not cache.fed:
        if total < session.prefix_tokens + 2:
            raise ValueError(f"the prompt ({total} tokens) must go on at least 2 tokens past its prefix "
                             f"({session.prefix_tokens} tokens)")
        skip = session.prefix_held
        if skip < session.prefix_tokens:  # not held (the ingest), or a shorter one held: a pass ends
            cuts.append(session.prefix_tokens)  # at its end, and the daemon registers it there
    begin = max([skip, *cuts])
    cuts += list(range(begin + size, total, size)) + [total]
    start = cache.seq_length - skip  # the position of input_ids[:, 0]
    logits = None
    for first, last in zip([skip, *cuts[:-1]], cuts, strict=True):
        ids = input_ids[:, first:last]
        positions = torch.arange(start + first, start + last, device=ids.device)
        out = model(
            input_ids=ids, cache=cache, use_cache=True, position_ids=positions[None],
            cache_position=positions, logits_to_keep=1,
        )
        cache.fed = True
        logits = out.logits[0, -1].float()
    return logits


def undo_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of transformers' apply_rotary_pos_emb for q [..., D] rotated by cos/sin [D]."""
    half = q.shape[-1] // 2
    unrotated = torch.cat((q[..., half:], -q[..., :half]), dim=-1)  # rotate_half inverted
    return q * cos + unrotated * sin


def kvrecall_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, q, D], key/value [1, H, kv, D].

    A KVRecallCache marks itself active in each layer's cache update; a forward pass without
    one (an ordinary cache, or none) gets plain SDPA attention, so the model stays usable."""
    cache = _ACTIVE.get()
    if cache is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _ACTIVE.set(None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not cache.ingested:
        out = cache._prefill_attention(module, query, key, value, scale)
    elif query.shape[2] == 1:
        out = cache._decode_attention(module, query, key, value, scale)
    else:
        out = cache._chunk_attention(module, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def use_kvrecall_attention(model: torch.nn.Module) -> None:
    """Route the model's attention through kvrecall (registers the function once)."""
    AttentionInterface.register(ATTENTION_NAME, kvrecall_attention)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:
        for layer in getattr(model.model, "layers", []):
            # Lets KVRecallCache(signal="pre") undo RoPE for the boundary signal.
            object.__setattr__(layer.self_attn, "_kvrecall_rotary", rotary)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.config._attn_implementation = ATTENTION_NAME
