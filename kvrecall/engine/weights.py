"""The weights of a Llama-architecture decoder, as the engine reads them.

From a transformers Llama-style model (`from_hf`: SmolLM2, Llama 2/3, Mistral, Qwen2 without
biases...) or random at a given shape (`random`: benchmarks at a real model's shape). RoPE
comes from the model's own inverse frequencies and attention scaling, so scaled variants
(Llama 3's) match transformers exactly.

Shapes: hidden size E, L layers, Hq query heads, H KV heads, head dim D, MLP width F, vocab V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    hidden: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    rms_eps: float = 1e-5
    rope_theta: float = 500000.0

    @property
    def group(self) -> int:
        return self.num_query_heads // self.num_kv_heads


# The shape the issue benchmarks use (Llama-3-8B).
LLAMA3_8B = DecoderShape(32, 4096, 32, 8, 128, 14336, 128256)


@dataclass
class LayerWeights:
    ln1: torch.Tensor   # [E]
    wqkv: torch.Tensor  # [(Hq + 2H) * D, E]: q rows, then k, then v
    wo: torch.Tensor    # [E, Hq * D]
    ln2: torch.Tensor   # [E]
    wgu: torch.Tensor   # [2F, E]: gate rows, then up rows
    wdown: torch.Tensor  # [E, F]


@dataclass
class DecoderWeights:
    shape: DecoderShape
    embed: torch.Tensor        # [V, E]
    layers: list[LayerWeights]
    final_norm: torch.Tensor   # [E]
    lm_head: torch.Tensor      # [V, E]
    inv_freq: torch.Tensor     # [D / 2] float32
    rope_scaling: float = 1.0  # transformers' attention_scaling (cos and sin are multiplied by it)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm, self.lm_head]
        for layer in self.layers:
            tensors += [layer.ln1, layer.wqkv, layer.wo, layer.ln2, layer.wgu, layer.wdown]
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
        return sum(unique.values())

    @staticmethod
    def from_hf(model: torch.nn.Module) -> DecoderWeights:
        """Views of a transformers Llama-style model's weights (q/k/v and gate/up concatenated)."""
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = DecoderShape(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            num_query_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", heads),
            head_dim=head_dim,
            mlp=config.intermediate_size,
            vocab=config.vocab_size,
            rms_eps=config.rms_norm_eps,
        )
        inner = model.model
        layers = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            if getattr(attn.q_proj, "bias", None) is not None:
                raise ValueError("the engine serves models without attention biases (Llama-style)")
            layers.append(
                LayerWeights(
                    ln1=block.input_layernorm.weight.detach(),
                    wqkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                    wo=attn.o_proj.weight.detach(),
                    ln2=block.post_attention_layernorm.weight.detach(),
                    wgu=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                    wdown=mlp.down_proj.weight.detach(),
                )
            )
        rotary = inner.rotary_emb
        return DecoderWeights(
            shape=shape,
            embed=inner.embed_tokens.weight.detach(),
            layers=layers,
            final_norm=inner.norm.weight.detach(),
            lm_head=model.lm_head.weight.detach(),
            inv_freq=rotary.inv_freq.detach().float(),
            rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        )

    @staticmethod
    def random(shape: DecoderShape, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> DecoderWeights:
        """Random weights scaled by 1/sqrt(fan_in), so activations stay finite at any depth."""
        generator = torch.Generator(device=device).manual_seed(seed)
        s = shape

        def randn(*dims: int, scale: float) -> torch.Tensor:
            return (torch.randn(*dims, device=device, dtype=dtype, generator=generator) * scale).to(dtype)

        qkv_rows = (s.num_query_heads + 2 * s.num_kv_heads) * s.head_dim
        layers = [
            LayerWeights(
                ln1=1 + randn(s.hidden, scale=0.1),
                wqkv=randn(qkv_rows, s.hidden, scale=s.hidden**-0.5),
                wo=randn(s.hidden, s.num_query_heads * s.head_dim, scale=(s.num_query_heads * s.head_dim) ** -0.5),
                ln2=1 + randn(s.hidden, scale=0.1),
                wgu=randn(2 * s.mlp, s.hidden, scale=s.hidden**-0.5),
                wdown=randn(s.hidden, s.mlp, scale=s.mlp**-0.5),
            )
            for _ in range(s.num_layers)
        ]
        steps = torch.arange(0, s.head_dim, 2, dtype=torch.float32, device=device) / s.head_dim
        return DecoderWeights(
            shape=s,
            embed=randn(s.vocab, s.hidden, scale=1.0),
            layers=layers,
            final_norm=1 + randn(s.hidden, scale=0.1),
            lm_head=randn(s.vocab, s.hidden, scale=s.hidden**-0.5),
            inv_freq=1.0 / s.rope_theta**steps,
        )
