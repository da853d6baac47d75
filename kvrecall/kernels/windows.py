"""Per-window attention scores (WindowKV: windows of consecutive tokens as units).

Kernel: `windows_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton

WINDOW_MODES = ("mean", "topmean")


def window_scores(
    attn: torch.Tensor, window_size: int, mode: str = "mean", impl: str = "auto"
) -> torch.Tensor:
    """Per-window scores: attn [B, T] float -> [B, ceil(T / window_size)] f32 (WindowKV).

    "mean": the window's mean; "topmean": mean of its ceil(n / 2) largest values, n its real
    length (the last window may be short). Kernel: window_size <= windows_triton.MAX_WINDOW.
    """
    check_tensor("attn", attn, rank=2, dtypes=FLOAT_DTYPES)
    check_int("window_size", window_size, 1)
    check_choice("mode", mode, WINDOW_MODES)
    if use_triton(impl, attn.device):
        from kvrecall.kernels.windows_triton import window_scores_triton

        return window_scores_triton(attn, window_size, mode)
    return reference.window_scores(attn, window_size, mode)
