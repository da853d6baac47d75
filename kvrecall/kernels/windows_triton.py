"""Per-window attention scores on the GPU (WindowKV: windows of consecutive tokens as units).

window_scores_triton: attn [B, T] float, window_size W, mode -> [B, ceil(T / W)] f32:
"mean" = mean of the window's values, "topmean" = mean of its ceil(n / 2) largest, n being
the window's real length (the last window may be short). Matches `reference.window_scores`.

One program holds BLOCK_P whole windows as a [BLOCK_P, BLOCK_W] tile; "topmean" sorts each
row of the tile in registers. Windows longer than MAX_WINDOW fall back to the reference.
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels import reference
from kvrecall.kernels._triton import next_power_of_2

MAX_WINDOW = 4096
_TILE = 4096  # elements per program


@triton.jit(do_not_specialize=["T", "P", "W", "stride_ab"])
def _window_kernel(
    attn_ptr, out_ptr,
    T, P, W,
    stride_ab,
    TOPMEAN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    blocks = tl.cdiv(P, BLOCK_P)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    offs_p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_w = tl.arange(0, BLOCK_W)
    p_mask = offs_p < P
    tokens = offs_p[:, None].to(tl.int64) * W + offs_w[None, :]
    mask = p_mask[:, None] & (offs_w < W)[None, :] & (tokens < T)
    length = tl.maximum(tl.minimum(T - offs_p.to(tl.int64) * W, W), 1).to(tl.float32)
    if TOPMEAN:
        values = tl.load(attn_ptr + b * stride_ab + tokens, mask=mask, other=float("-inf")).to(tl.float32)
        values = tl.sort(values, dim=1, descending=True)  # padding (-inf) last
        half = tl.floor((length + 1.0) * 0.5)
        kept = tl.where(offs_w[None, :].to(tl.float32) < half[:, None], values, 0.0)
        scores = tl.sum(kept, axis=1) / half
    else:
        values = tl.load(attn_ptr + b * stride_ab + tokens, mask=mask, other=0.0).to(tl.float32)
        scores = tl.sum(values, axis=1) / length
    tl.store(out_ptr + b * P + offs_p, scores, mask=p_mask)


def window_scores_triton(attn: torch.Tensor, window_size: int, mode: str) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.window_scores`)."""
    batch, num_tokens = attn.shape
    if window_size > MAX_WINDOW:
        return reference.window_scores(attn, window_size, mode)
    num_windows = triton.cdiv(num_tokens, window_size)
    scores = torch.empty(batch, num_windows, dtype=torch.float32, device=attn.device)
    if scores.numel() == 0:
        return scores
    block_w = max(2, next_power_of_2(window_size))
    block_p = min(max(1, _TILE // block_w), next_power_of_2(num_windows))
    grid = (batch * triton.cdiv(num_windows, block_p),)
    _window_kernel[grid](
        attn, scores,
        num_tokens, num_windows, window_size,
        attn.stride(0),
        TOPMEAN=mode == "topmean", BLOCK_P=block_p, BLOCK_W=block_w,
    )  # fmt: skip
    return scores
