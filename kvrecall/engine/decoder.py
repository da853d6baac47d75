"""The decoder's arithmetic: a Llama-style step over B sequences, and a one-sequence prefill.

Where attention reads its keys and values is the backend's business (`Backend.attend`):
kvrecall sessions' working sets (engine/sessions.py) or a plain full KV cache on the device
(engine/full.py, the baseline). The step is static-shaped (B slots, fixed buffers), so it
can be captured as one CUDA graph (engine/graph.py).

Shapes: B batch slots, E hidden, L layers, Hq query heads, H KV heads, D head dim, V vocab.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from kvrecall.engine.weights import DecoderWeights


class Backend(Protocol):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """q [B, Hq, D], the new token's k/v [B, H, D] (RoPE applied), positions int64 [B] ->
        attention output [B, Hq, D] over the sequence's cache including the new token."""
        ...


def rope(weights: DecoderWeights, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D] in the weights' dtype for int positions [N] (transformers' rotate-half form)."""
    angles = positions.float()[:, None] * weights.inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    scale = weights.rope_scaling
    return (angles.cos() * scale).to(weights.dtype), (angles.sin() * scale).to(weights.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: the variance in float32, the scale in the input dtype."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


class Decoder:
    """Runs `step()` over B slots with static buffers: `tokens` (the input token of each slot,
    replaced by its greedy next token), `positions` (advanced by one), `logits` [B, V]."""

    def __init__(self, weights: DecoderWeights, batch: int) -> None:
        self.weights = weights
        self.shape = weights.shape
        device = weights.device
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self.logits = torch.zeros(batch, self.shape.vocab, dtype=weights.dtype, device=device)
        self.scale = self.shape.head_dim**-0.5

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def _qkv(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [N, E] -> q [N, Hq, D], k [N, H, D], v [N, H, D] (q and k rotated)."""
        s, w = self.shape, self.weights.layers[layer]
        qkv = F.linear(rms_norm(x, w.ln1, s.rms_eps), w.wqkv)
        n = x.shape[0]
        q_end = s.num_query_heads * s.head_dim
        k_end = q_end + s.num_kv_heads * s.head_dim
        q = apply_rope(qkv[:, :q_end].view(n, s.num_query_heads, s.head_dim), cos[:, None], sin[:, None])
        k = apply_rope(qkv[:, q_end:k_end].view(n, s.num_kv_heads, s.head_dim), cos[:, None], sin[:, None])
        v = qkv[:, k_end:].view(n, s.num_kv_heads, s.head_dim)
        return q, k, v

    def _after_attention(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, SwiGLU MLP, residual. attn [N, Hq, D]."""
        s, w = self.shape, self.weights.layers[layer]
        x = x + F.linear(attn.reshape(x.shape[0], -1), w.wo)
        gate, up = F.linear(rms_norm(x, w.ln2, s.rms_eps), w.wgu).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.wdown)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.weights.final_norm, self.shape.rms_eps), self.weights.lm_head)

    def step(self, backend: Backend) -> None:
        """One decode token for every slot (no host sync: graph-capturable)."""
        x = self.weights.embed[self.tokens]
        cos, sin = rope(self.weights, self.positions)
        for layer in range(self.shape.num_layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            x = self._after_attention(layer, x, backend.attend(layer, q, k, v, self.positions))
        self.logits.copy_(self._head(x))
        self.tokens.copy_(self.logits.argmax(dim=-1))
        self.positions.add_(1)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, n_obs: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal forward over one prompt, tokens int64 [T] -> (kv [L, 2, H, T, D], queries of the
        last n_obs tokens [L, Hq, n_obs, D] (RoPE applied), logits of the last token [V])."""
        s = self.shape
        n = tokens.shape[0]
        positions = torch.arange(n, device=tokens.device)
        cos, sin = rope(self.weights, positions)
        x = self.weights.embed[tokens]
        kv = torch.empty(s.num_layers, 2, s.num_kv_heads, n, s.head_dim, dtype=x.dtype, device=x.device)
        queries = []
        for layer in range(s.num_layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, T, D]
            kv[layer, 0], kv[layer, 1] = k, v
            queries.append(q[:, -n_obs:])
            attn = F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, scale=self.scale, enable_gqa=s.group > 1
            )
            x = self._after_attention(layer, x, attn[0].transpose(0, 1))
        return kv, torch.stack(queries), self._head(x[-1:])[0]
