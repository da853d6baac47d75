"""FullKV: the baseline backend, every token's K/V on the device, attended by torch SDPA's GQA
kernel (`enable_gqa=True`, no mask) over the live length, the fastest standard kernel a user
of torch has (FlashAttention / FlashInfer decode in vLLM and SGLang read the same bytes).

A captured graph has static shapes, so the step attends over exactly `live` tokens: all
slots share one length (benchmarks at a fixed context; `live` is set before the capture and
re-captured when it changes). The cache holds `max_tokens` positions per slot. When the KV of
all layers would not fit, `kv_layers` < L buffers are allocated and layer l uses buffer
l % kv_layers: each layer still reads a full-size buffer (the same bytes per step; L2 is far
smaller than one layer's KV), which a benchmark reports as `kv_layers_shared`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FullKV:
    def __init__(
        self, batch: int, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int,
        dtype: torch.dtype, device: torch.device, scale: float, kv_layers: int | None = None,
    ) -> None:  # fmt: skip
        self.kv_layers = min(num_layers, kv_layers or num_layers)
        shape = (self.kv_layers, batch, num_kv_heads, max_tokens, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.live = 0
        self.scale = scale
        self._rows = torch.arange(batch, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def fill(self, slot: int, kv: torch.Tensor) -> None:
        """A prompt's kv [L, 2, H, T, D] into slot `slot` (layer l into buffer l % kv_layers)."""
        T = kv.shape[3]
        for layer in range(self.kv_layers):
            self.keys[layer, slot, :, :T] = kv[layer, 0]
            self.values[layer, slot, :, :T] = kv[layer, 1]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        buffer = layer % self.kv_layers
        self.keys[buffer, self._rows, :, positions] = k
        self.values[buffer, self._rows, :, positions] = v
        keys = self.keys[buffer, :, :, : self.live]
        values = self.values[buffer, :, :, : self.live]
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out[:, :, 0]
