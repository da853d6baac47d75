"""transformers integration: decode any llama-architecture model through a kvrecall session.

    session = client.open_session(spec_for(model, max_tokens), policy="louiskv")
    cache = KVRecallCache(session)
    use_kvrecall_attention(model)
    model.generate(input_ids, cache=cache, max_new_tokens=64, do_sample=False)

Prefill runs ordinary causal attention over the prompt; at its last layer the cache hands
the prompt KV (and the last prompt queries the policy asked for) to the daemon once. Each
decode step writes the new token's K/V into the working set's window ring and attends over
the resident slots ([sinks | retrieved | window], masked by slot_pos). After the step the
cache announces appended tokens every `spill_every` tokens and, when the BoundaryDetector
fires, asks the daemon to retrieve for the step's queries (serving the next step).
Policies that retrieve every step (quest) retrieve per layer before that layer's attention.
Batch size 1 (one session per sequence).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvrecall.client.boundary import BoundaryDetector
from kvrecall.client.core import ModelSpec
from kvrecall.v1 import kvrecall_pb2 as pb

ATTENTION_NAME = "kvrecall"
_ACTIVE: contextvars.ContextVar[KVRecallCache | None] = contextvars.ContextVar("kvrecall_cache", default=None)


def spec_for(model: torch.nn.Module, max_tokens: int, dtype: torch.dtype | None = None) -> ModelSpec:
    """The ModelSpec of a transformers llama-style model."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelSpec(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", heads),
        num_query_heads=heads,
        head_dim=head_dim,
        dtype=dtype or next(model.parameters()).dtype,
        max_tokens=max_tokens,
    )


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
    """A transformers Cache whose KV lives in a kvrecall session (batch size 1)."""

    def __init__(
        self, session, aggregate: str = "mean", record_similarity: bool = False, signal: str | None = None
    ) -> None:
        if signal is None:  # the daemon's boundary rule decides
            signal = "pre" if getattr(session, "boundary_pre_rope", False) else "post"
        if signal not in ("pre", "post"):
            raise ValueError("signal must be 'pre' (RoPE undone) or 'post' (the attention's query)")
        self.session = session
        self.signal = signal
        spec = session.spec
        self.num_layers = spec.num_layers
        self.group = spec.num_query_heads // spec.num_kv_heads
        super().__init__(layers=[_Layer(self, i) for i in range(spec.num_layers)])
        self.detector = BoundaryDetector(session.boundary_mode, session.boundary_threshold, spec.num_layers, aggregate)
        self.per_layer_retrieval = session.boundary_mode == pb.BOUNDARY_MODE_EVERY_STEP
        self.stats = StepStats()
        self.record_similarity = record_similarity
        self._prefill_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._obs_queries: list[torch.Tensor] = []
        self.ingested = False
        self.seq_length = 0
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_at = -1
        self._attention_modules: list | None = None
        self._step_signal: list[torch.Tensor] = []

    # ---- the transformers side ----------------------------------------------------------
    def _update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if key_states.shape[0] != 1:
            raise ValueError("KVRecallCache serves batch size 1 (open one session per sequence)")
        _ACTIVE.set(self)
        if not self.ingested:
            self._prefill_kv.append((key_states[0], value_states[0]))
            return key_states, value_states
        if key_states.shape[2] != 1:
            raise ValueError("after the prompt, KVRecallCache takes one token per forward pass")
        s = self.session
        s.write_token(s.position, key_states[0, :, 0], value_states[0, :, 0], layer=layer)
        return s.keys[layer].unsqueeze(0), s.values[layer].unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    @property
    def is_compileable(self) -> bool:
        return False

    # ---- called by the attention function -----------------------------------------------
    def _prefill_attention(self, module, query, key, value, scaling: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=self.group > 1
        )
        layer = module.layer_idx
        if layer == 0:
            self._attention_modules = []
        self._attention_modules.append(module)
        n_obs = max(1, self.session.observation)
        self._obs_queries.append(query[0, :, -n_obs:].detach())
        if layer == self.num_layers - 1:
            self._ingest(query.shape[2])
        return out

    def _ingest(self, num_tokens: int) -> None:
        kv = torch.stack([torch.stack(pair) for pair in self._prefill_kv])  # [L, 2, H, T, D]
        queries = torch.stack(self._obs_queries)                              # [L, Hq, n_obs, D]
        self.session.ingest(kv, queries)
        self._reference_all(queries[:, :, -1], num_tokens - 1)
        self._prefill_kv.clear()
        self._obs_queries.clear()
        self.ingested = True
        self.seq_length = num_tokens
        self.stats.max_resident = self.session.resident_tokens()

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
    if cache.ingested and query.shape[2] == 1:
        out = cache._decode_attention(module, query, key, value, scale)
    else:
        out = cache._prefill_attention(module, query, key, value, scale)
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
