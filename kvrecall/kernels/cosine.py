"""Per-head cosine similarity: the LouisKV boundary signal (client/boundary.py, tp/boundary.py,
the batched engine's engine/sessions.py).

Kernel: `cosine_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """a, b [B, H, D] -> [B, H] f32: dot(a, b) / (max(|a|, 1e-6) * max(|b|, 1e-6)) (LouisKV boundary)."""
    check_tensor("a", a, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("b", b, rank=3, dtypes=FLOAT_DTYPES)
    if b.shape != a.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} differs from a's {tuple(a.shape)}")
    if use_triton(impl, check_same_device(a=a, b=b)):
        from kvrecall.kernels.cosine_triton import cosine_similarity_triton

        return cosine_similarity_triton(a, b)
    return reference.cosine_similarity(a, b)
