"""Cosine similarity per (problem, head) on the GPU (LouisKV, arXiv 2510.11292: query-drift boundary).

cosine_similarity_triton: a [B, H, D], b [B, H, D] -> [B, H] f32,
dot(a, b) / (max(|a|, eps) * max(|b|, eps)) with eps = reference.EPS. Matches
`reference.cosine_similarity`. One program reduces ROWS of the B * H rows, D in blocks.
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels import reference
from kvrecall.kernels._triton import next_power_of_2


@triton.jit(do_not_specialize=["n_rows"])
def _cosine_kernel(
    a_ptr, b_ptr, out_ptr,
    n_rows, H, D,
    stride_ab, stride_ah, stride_bb, stride_bh,
    EPS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    problem = (rows // H).to(tl.int64)
    head = (rows % H).to(tl.int64)
    a_rows = a_ptr + problem * stride_ab + head * stride_ah
    b_rows = b_ptr + problem * stride_bb + head * stride_bh
    dot = tl.zeros([ROWS], tl.float32)
    a_sq = tl.zeros([ROWS], tl.float32)
    b_sq = tl.zeros([ROWS], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs_d < D)[None, :]
        a = tl.load(a_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(a * b, axis=1)
        a_sq += tl.sum(a * a, axis=1)
        b_sq += tl.sum(b * b, axis=1)
    norms = tl.maximum(tl.sqrt(a_sq), EPS) * tl.maximum(tl.sqrt(b_sq), EPS)
    tl.store(out_ptr + rows, dot / norms, mask=row_mask)


def cosine_similarity_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.cosine_similarity`)."""
    batch, num_heads, dim = a.shape
    out = torch.empty(batch, num_heads, dtype=torch.float32, device=a.device)
    if out.numel() == 0:
        return out
    block_d = min(256, next_power_of_2(dim))
    rows = max(1, 2048 // block_d)
    _cosine_kernel[(triton.cdiv(out.numel(), rows),)](
        a, b, out,
        out.numel(), num_heads, dim,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        EPS=reference.EPS, ROWS=rows, BLOCK_D=block_d,
    )  # fmt: skip
    return out
