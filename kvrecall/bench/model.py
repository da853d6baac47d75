"""A random-weight Llama-shaped decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP), bf16.

Only the layer arithmetic lives here; where attention reads its keys and values from is the
policy's business (``policies.py``). Decode attention is SDPA's GQA kernel (`enable_gqa`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-style decoder."""

    n_layers: int = 32
    hidden: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    mlp: int = 14336
    vocab: int = 128256
    itemsize: int = 2

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0 and self.n_heads * self.head_dim == self.hidden

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def weight_bytes(self) -> int:
        """Parameters read by one decode step (the embedding table contributes one row per token)."""
        qkv = self.hidden * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        per_layer = qkv + self.hidden * self.hidden + 3 * self.hidden * self.mlp + 2 * self.hidden
        return (self.n_layers * per_layer + self.vocab * self.hidden + self.hidden) * self.itemsize

    def kv_bytes(self, batch: int, tokens: int, layers: int | None = None) -> int:
        """Bytes of K and V for ``tokens`` positions of ``batch`` sequences over ``layers`` layers."""
        layers = self.n_layers if layers is None else layers
        return layers * 2 * batch * self.n_kv_heads * tokens * self.head_dim * self.itemsize


LLAMA3_8B = ModelShape()
TINY = ModelShape(n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, mlp=512, vocab=1000)


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(n_heads + 2 n_kv_heads) * head_dim, hidden]
    wo: torch.Tensor  # [hidden, hidden]
    ln2: torch.Tensor  # [hidden]
    wgu: torch.Tensor  # [2 mlp, hidden] (gate rows, then up rows)
    wdown: torch.Tensor  # [hidden, mlp]


def _randn(*shape: int, device: torch.device, scale: float) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=torch.bfloat16) * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form); cos / sin broadcast against x's last dims."""
    return x * cos + rotate_half(x) * sin


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), head_dim] in bf16 (Llama-3 base frequency)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)


class RandomLlama:
    """Random bf16 weights of a real shape (scaled by 1/sqrt(fan_in) so activations stay finite)."""

    def __init__(self, shape: ModelShape, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.shape = shape
        self.device = device
        s = shape
        qkv_out = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
        self.embed = _randn(s.vocab, s.hidden, device=device, scale=1.0)
        self.layers = [
            LayerWeights(
                ln1=1 + _randn(s.hidden, device=device, scale=0.1),
                wqkv=_randn(qkv_out, s.hidden, device=device, scale=s.hidden ** -0.5),
                wo=_randn(s.hidden, s.hidden, device=device, scale=s.hidden ** -0.5),
                ln2=1 + _randn(s.hidden, device=device, scale=0.1),
                wgu=_randn(2 * s.mlp, s.hidden, device=device, scale=s.hidden ** -0.5),
                wdown=_randn(s.hidden, s.mlp, device=device, scale=s.mlp ** -0.5),
            )
            for _ in range(s.n_layers)
        ]
        self.final_norm = 1 + _randn(s.hidden, device=device, scale=0.1)
        self.lm_head = _randn(s.vocab, s.hidden, device=device, scale=s.hidden ** -0.5)

    def attn_in(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode: x [B, hidden] -> q [B, Hkv, G, D], k [B, Hkv, D], v [B, Hkv, D] (q, k after RoPE)."""
        s, w = self.shape, self.layers[layer]
        batch = x.shape[0]
        qkv = F.linear(F.rms_norm(x, (s.hidden,), w.ln1, 1e-5), w.wqkv)
        n_qk = s.n_heads + s.n_kv_heads
        qk = apply_rope(qkv[:, : n_qk * s.head_dim].view(batch, n_qk, s.head_dim), cos, sin)
        q = qk[:, : s.n_heads].view(batch, s.n_kv_heads, s.group, s.head_dim)
        k = qk[:, s.n_heads:]
        v = qkv[:, n_qk * s.head_dim:].view(batch, s.n_kv_heads, s.head_dim)
        return q, k, v

    def attn_out(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, SwiGLU MLP, residual. attn: [B, Hkv, G, D]."""
        s, w = self.shape, self.layers[layer]
        x = x + F.linear(attn.reshape(x.shape[0], s.hidden), w.wo)
        gate, up = F.linear(F.rms_norm(x, (s.hidden,), w.ln2, 1e-5), w.wgu).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.wdown)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and greedy pick: x [B, hidden] -> token ids [B]."""
        logits = F.linear(F.rms_norm(x, (self.shape.hidden,), self.final_norm, 1e-5), self.lm_head)
        return logits.argmax(dim=-1)

    def prefill_layer(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill one layer: x [T, hidden] -> (x, k [1, Hkv, T, D], v [1, Hkv, T, D]); causal SDPA."""
        s, w = self.shape, self.layers[layer]
        tokens = x.shape[0]
        qkv = F.linear(F.rms_norm(x, (s.hidden,), w.ln1, 1e-5), w.wqkv)
        n_qk = s.n_heads + s.n_kv_heads
        qk = apply_rope(qkv[:, : n_qk * s.head_dim].view(tokens, n_qk, s.head_dim), cos[:, None], sin[:, None])
        q = qk[:, : s.n_heads].transpose(0, 1)[None]
        k = qk[:, s.n_heads:].transpose(0, 1)[None]
        v = qkv[:, n_qk * s.head_dim:].view(tokens, s.n_kv_heads, s.head_dim).transpose(0, 1)[None]
        attn = causal_attention(q, k, v)
        x = x + F.linear(attn[0].transpose(0, 1).reshape(tokens, s.hidden), w.wo)
        gate, up = F.linear(F.rms_norm(x, (s.hidden,), w.ln2, 1e-5), w.wgu).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.wdown), k, v


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Hkv, G, D] over k, v [B, Hkv, T, D] -> [B, Hkv, G, D]; no mask (one decode token).

    SDPA's GQA kernel (the query heads as heads, `enable_gqa`), the fastest standard kernel:
    folding the group into the query length instead measured 7.6x / 10.9x slower at 32K / 128K,
    batch 1, on an H200 (same output)."""
    batch, kv_heads, group, dim = q.shape
    out = F.scaled_dot_product_attention(
        q.reshape(batch, kv_heads * group, 1, dim), k, v, scale=1.0 / math.sqrt(dim), enable_gqa=group > 1
    )
    return out.view(batch, kv_heads, group, dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Prefill attention with GQA; on a GPU only fused backends are allowed (the math backend
    would materialise a T x T score matrix per head). Falls back to expanded KV heads if the
    fused kernels refuse ``enable_gqa``."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except RuntimeError:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
