"""A tensor-parallel llama for decoding through kvrecall (Megatron-style sharding).

Rank r of a group of size N holds, per layer:

* column-parallel q/k/v (its Hq/N query heads and H/N KV heads, fused in one matrix) and
  gate/up (I/N rows of the MLP, fused), so attention and the MLP's activation need nothing
  from the other ranks;
* row-parallel o/down (the matching input columns), whose partial outputs are summed over
  the ranks with one all-reduce each (two per layer);
* replicated embedding, norms and lm_head (vocab not split: every rank has the logits).

Attention goes through the kvrecall working set exactly as `kvrecall.client.hf` does for a
transformers model (KVRecallCache.update + kvrecall_attention), restricted to the rank's KV
heads: its session's layout has num_kv_heads = H/N and num_query_heads = Hq/N. The cache's
boundary detector is swapped for an AgreedBoundaryDetector so every rank takes the same
retrieval decision (kvrecall/tp/boundary.py). Batch size 1, like KVRecallCache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvrecall.client.core import ModelSpec
from kvrecall.client.hf import kvrecall_attention
from kvrecall.tp.group import TPGroup


@dataclass(frozen=True)
class TPShape:
    """One rank's share of a llama config; sizes that do not split evenly are refused."""

    num_layers: int
    hidden: int
    head_dim: int
    num_query_heads: int  # this rank's
    num_kv_heads: int  # this rank's
    intermediate: int  # this rank's MLP rows
    vocab: int
    rms_eps: float
    q_rows: tuple[int, int]  # [start, end) rows of the full q_proj this rank holds
    kv_rows: tuple[int, int]  # of k_proj / v_proj
    mlp_rows: tuple[int, int]  # of gate_proj / up_proj (= columns of down_proj)

    @staticmethod
    def of(config: LlamaConfig, group: TPGroup) -> TPShape:
        for name in ("attention_bias", "mlp_bias"):
            if getattr(config, name, False):
                raise ValueError(f"{name}: biased projections are not supported by the tensor-parallel llama")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        q_heads = group.shard(heads, "num_attention_heads")
        kv = group.shard(kv_heads, "num_key_value_heads")
        mlp = group.shard(config.intermediate_size, "intermediate_size")
        return TPShape(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            head_dim=head_dim,
            num_query_heads=heads // group.size,
            num_kv_heads=kv_heads // group.size,
            intermediate=config.intermediate_size // group.size,
            vocab=config.vocab_size,
            rms_eps=config.rms_norm_eps,
            q_rows=(q_heads[0] * head_dim, q_heads[1] * head_dim),
            kv_rows=(kv[0] * head_dim, kv[1] * head_dim),
            mlp_rows=mlp,
        )

    def spec(self, max_tokens: int, dtype: torch.dtype) -> ModelSpec:
        """The layout this rank opens its session with (its own heads only)."""
        return ModelSpec(
            self.num_layers, self.num_kv_heads, self.num_query_heads, self.head_dim, dtype, max_tokens
        )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in float32, scale in the input dtype."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class TPAttention(nn.Module):
    """One layer's attention over this rank's heads (the module kvrecall_attention sees)."""

    def __init__(self, shape: TPShape, layer_idx: int, group: TPGroup) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.group = group
        self.shape = shape
        self.head_dim = shape.head_dim
        self.scaling = shape.head_dim**-0.5
        self.is_causal = True
        self.num_key_value_groups = shape.num_query_heads // shape.num_kv_heads
        D = shape.head_dim
        self.split = (shape.num_query_heads * D, shape.num_kv_heads * D, shape.num_kv_heads * D)
        self.qkv_proj = nn.Linear(shape.hidden, sum(self.split), bias=False)  # q, k, v rows stacked
        self.o_proj = nn.Linear(shape.num_query_heads * D, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """x [1, T, hidden] -> this rank's share of the attention output, summed over ranks."""
        T, D = x.shape[1], self.head_dim
        q, k, v = (t.view(1, T, -1, D).transpose(1, 2) for t in self.qkv_proj(x).split(self.split, dim=-1))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, self.layer_idx)
        out, _ = kvrecall_attention(self, q, k, v, None, scaling=self.scaling)  # [1, T, Hq_local, D]
        return self.group.all_reduce(self.o_proj(out.reshape(1, T, -1)))


class TPMLP(nn.Module):
    def __init__(self, shape: TPShape, group: TPGroup) -> None:
        super().__init__()
        self.group = group
        self.gate_up_proj = nn.Linear(shape.hidden, 2 * shape.intermediate, bias=False)  # gate, up rows
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.group.all_reduce(self.down_proj(F.silu(gate) * up))


class TPDecoderLayer(nn.Module):
    def __init__(self, shape: TPShape, layer_idx: int, group: TPGroup) -> None:
        super().__init__()
        self.eps = shape.rms_eps
        self.self_attn = TPAttention(shape, layer_idx, group)
        self.mlp = TPMLP(shape, group)
        self.input_layernorm = nn.Parameter(torch.ones(shape.hidden))
        self.post_attention_layernorm = nn.Parameter(torch.ones(shape.hidden))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        x = x + self.self_attn(_rms_norm(x, self.input_layernorm, self.eps), cos, sin, cache)
        return x + self.mlp(_rms_norm(x, self.post_attention_layernorm, self.eps))


class TPLlama(nn.Module):
    """The rank's shard of a LlamaForCausalLM; `forward` returns the last position's logits."""

    def __init__(self, config: LlamaConfig, group: TPGroup) -> None:
        super().__init__()
        self.config = config
        self.group = group
        self.shape = TPShape.of(config, group)
        s = self.shape
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(TPDecoderLayer(s, i, group) for i in range(s.num_layers))
        self.norm = nn.Parameter(torch.ones(s.hidden))
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        # Not a submodule: its inv_freq stays float32 when the weights move to bf16.
        rotary = LlamaRotaryEmbedding(config)
        object.__setattr__(self, "rotary_emb", rotary)
        for layer in self.layers:
            # Lets KVRecallCache(signal="pre") undo RoPE for the boundary signal, as for HF models.
            object.__setattr__(layer.self_attn, "_kvrecall_rotary", rotary)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position: int, cache) -> torch.Tensor:
        """input_ids [1, T] at positions [position, position + T) -> logits [vocab] of the last."""
        x = self.embed_tokens(input_ids)
        if self.rotary_emb.inv_freq.device != x.device:
            self.rotary_emb.to(x.device)
        positions = torch.arange(position, position + input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary_emb(x, positions)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        x = _rms_norm(x[:, -1], self.norm, self.shape.rms_eps)
        return self.lm_head(x)[0]

    # ---- weights -----------------------------------------------------------------------
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's shard of a LlamaForCausalLM state dict (full, unsharded tensors)."""
        s = self.shape
        q, kv, mlp = slice(*s.q_rows), slice(*s.kv_rows), slice(*s.mlp_rows)
        mine: dict[str, torch.Tensor] = {
            "embed_tokens.weight": state["model.embed_tokens.weight"],
            "norm": state["model.norm.weight"],
            # tied embeddings: the checkpoint may omit lm_head
            "lm_head.weight": state.get("lm_head.weight", state["model.embed_tokens.weight"]),
        }
        for i in range(s.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            mine[dst + "input_layernorm"] = state[src + "input_layernorm.weight"]
            mine[dst + "post_attention_layernorm"] = state[src + "post_attention_layernorm.weight"]
            attn, ff = src + "self_attn.", src + "mlp."
            mine[dst + "self_attn.qkv_proj.weight"] = torch.cat(
                (
                    state[attn + "q_proj.weight"][q],
                    state[attn + "k_proj.weight"][kv],
                    state[attn + "v_proj.weight"][kv],
                )
            )
            mine[dst + "self_attn.o_proj.weight"] = state[attn + "o_proj.weight"][:, q]
            mine[dst + "mlp.gate_up_proj.weight"] = torch.cat(
                (state[ff + "gate_proj.weight"][mlp], state[ff + "up_proj.weight"][mlp])
            )
            mine[dst + "mlp.down_proj.weight"] = state[ff + "down_proj.weight"][:, mlp]
        own = self.state_dict()
        missing = sorted(set(own) - set(mine))
        if missing:
            raise KeyError(f"state dict: nothing for {missing[:4]}")
        with torch.no_grad():
            for name, tensor in mine.items():
                own[name].copy_(tensor)

    @staticmethod
    def from_hf(model: nn.Module, group: TPGroup, device: torch.device | str = "cpu") -> TPLlama:
        """This rank's shard of a transformers LlamaForCausalLM (its dtype)."""
        dtype = next(model.parameters()).dtype
        tp = TPLlama(model.config, group).to(dtype)
        tp.load_full_state_dict(model.state_dict())
        return tp.to(device)

    @staticmethod
    def random(
        config: LlamaConfig, group: TPGroup, device: torch.device | str, dtype: torch.dtype, seed: int = 0
    ) -> TPLlama:
        """A random-weight shard built on `device` in `dtype` (for timing real shapes; std 0.02
        like HF's init, norms at 1). Each rank draws its own shard: TP=N is not the TP=1 model split."""
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                tp = TPLlama(config, group)
        finally:
            torch.set_default_dtype(default)
        generator = torch.Generator(device=device).manual_seed(seed + group.rank)
        with torch.no_grad():
            for name, p in tp.named_parameters():
                if "layernorm" in name or name == "norm":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=generator)
        return tp
