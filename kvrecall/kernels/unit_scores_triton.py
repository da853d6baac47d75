"""Unit scoring on the GPU (LouisKV, arXiv 2510.11292: score each cluster by its centroid).

score_units_triton: query [B, G, D], reps [B, U, D], valid [B, U] bool -> [B, U] f32,
scores[b, u] = max or sum over g of dot(query[b, g], reps[b, u]); invalid units -inf.

`_score_kernel` also serves Quest's page scores (quest.py): with SPLIT_SIGN it scores
relu(q) . hi + min(q, 0) . lo, which is sum_d max(q_d * kmin_d, q_d * kmax_d) for lo <= hi.
Query and reps of one 16-bit dtype multiply on tensor cores as they are (exact products,
float32 accumulation), and so do a 16-bit query and float8 e4m3 reps (the daemon's
unit_reps_dtype fp8: loaded as bytes, widened in registers to the query's dtype, which holds
every e4m3 value exactly); any other mix (e.g. float32 k-means centroids) in float32 (tf32x3).
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels._triton import FP32_DOT_PRECISION, native_dot, next_power_of_2


@triton.jit
def _operand(x, NATIVE_DOT: tl.constexpr):
    """x as a tl.dot operand: its own 16-bit dtype (exact products), else float32."""
    if not NATIVE_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot_rows(a, b, acc, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b^T for operands from `_operand`."""
    if NATIVE_DOT:
        acc = tl.dot(a, tl.trans(b), acc)
    else:
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["G", "U", "stride_vb", "stride_ob"])
def _score_kernel(
    q_ptr, hi_ptr, lo_ptr, valid_ptr, out_ptr,
    G, U, D,
    stride_qb, stride_qg, stride_hb, stride_hu, stride_lb, stride_lu, stride_vb, stride_ob,
    SPLIT_SIGN: tl.constexpr, AGG_MAX: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_U units of problem b against its (at most BLOCK_G) query heads.
    blocks = tl.cdiv(U, BLOCK_U)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    offs_u = (tl.program_id(0) % blocks) * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_g = tl.arange(0, BLOCK_G)
    u_mask = offs_u < U
    g_mask = offs_g < G
    q_rows = q_ptr + b * stride_qb + offs_g[:, None] * stride_qg
    hi_rows = hi_ptr + b * stride_hb + offs_u[:, None].to(tl.int64) * stride_hu
    lo_rows = lo_ptr + b * stride_lb + offs_u[:, None].to(tl.int64) * stride_lu
    acc = tl.zeros([BLOCK_U, BLOCK_G], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        q = _operand(q, NATIVE_DOT)
        unit_mask = u_mask[:, None] & d_mask[None, :]
        # (.to(q.dtype): float8 reps widened to the query's 16 bits; else nothing)
        hi = _operand(tl.load(hi_rows + offs_d[None, :], mask=unit_mask, other=0.0), NATIVE_DOT).to(q.dtype)
        if SPLIT_SIGN:
            lo = _operand(tl.load(lo_rows + offs_d[None, :], mask=unit_mask, other=0.0), NATIVE_DOT).to(q.dtype)
            # Triton computes 16-bit min / max in float32; casting back is exact.
            acc = _dot_rows(hi, tl.maximum(q, 0.0).to(q.dtype), acc, NATIVE_DOT, PRECISION)
            acc = _dot_rows(lo, tl.minimum(q, 0.0).to(q.dtype), acc, NATIVE_DOT, PRECISION)
        else:
            acc = _dot_rows(hi, q, acc, NATIVE_DOT, PRECISION)
    if AGG_MAX:
        scores = tl.max(tl.where(g_mask[None, :], acc, float("-inf")), axis=1)
    else:
        scores = tl.sum(acc, axis=1)  # padded heads contribute 0
    valid = tl.load(valid_ptr + b * stride_vb + offs_u, mask=u_mask, other=0) != 0
    tl.store(out_ptr + b * stride_ob + offs_u, tl.where(valid, scores, float("-inf")), mask=u_mask)


# (BLOCK_U, num_warps) by the reps' element size: units a program scores and its warps. On an H200
# (scripts/score_probe.py, 2026-12-04; copy bandwidth 4.25 TB/s read + write) a bf16 table read at
# 3.2-3.4 TB/s with (128, 8) against 3.0 with (64, 4) at 8,192 units (0.167 against 0.182 ms for 256
# rows); an fp8 one at ~2.0 with (64, 4), its best (0.137 ms: half the bytes, 0.82x the time; widened
# to f16 with the query in f16 instead of to bf16 it took 0.194 ms: not kept).
SCORE_BLOCKS = {1: (64, 4), 2: (128, 8), 4: (64, 4)}
# Query rows per launch: a [BLOCK_U, BLOCK_G] accumulator and its pipelined operand tiles
# must fit shared memory (128 rows of float32 needed 288 KiB on an H200, whose limit is 227).
MAX_BLOCK_G = 32


def launch_scores(
    query: torch.Tensor,
    hi: torch.Tensor,
    lo: torch.Tensor,
    valid: torch.Tensor,
    *,
    split_sign: bool,
    agg_max: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `_score_kernel` on checked arguments: query [B, G, D], hi/lo [B, U, D] -> [B, U] f32
    (written into `out`, a [B, U] f32 view with unit stride 1, where given). More than
    MAX_BLOCK_G query rows (a chunk's queries) run as several launches, combined."""
    batch, num_heads, dim = query.shape
    if num_heads > MAX_BLOCK_G and out is not None:
        return out.copy_(launch_scores(query, hi, lo, valid, split_sign=split_sign, agg_max=agg_max))
    if num_heads > MAX_BLOCK_G:
        parts = [
            launch_scores(query[:, g : g + MAX_BLOCK_G], hi, lo, valid, split_sign=split_sign, agg_max=agg_max)
            for g in range(0, num_heads, MAX_BLOCK_G)
        ]
        combined = parts[0]
        for part in parts[1:]:
            combined = torch.maximum(combined, part) if agg_max else combined + part
        return combined
    num_units = hi.shape[1]
    scores = torch.empty(batch, num_units, dtype=torch.float32, device=query.device) if out is None else out
    if scores.numel() == 0:
        return scores
    block_u, warps = SCORE_BLOCKS[hi.element_size()]
    native = native_dot(*(query.dtype if t.dtype == torch.float8_e4m3fn else t.dtype for t in (query, hi, lo)))
    grid = (batch * triton.cdiv(num_units, block_u),)
    _score_kernel[grid](
        query, hi, lo, valid, scores,
        num_heads, num_units, dim,
        query.stride(0), query.stride(1), hi.stride(0), hi.stride(1), lo.stride(0), lo.stride(1),
        valid.stride(0), scores.stride(0),
        SPLIT_SIGN=split_sign, AGG_MAX=agg_max,
        NATIVE_DOT=native, PRECISION=FP32_DOT_PRECISION,
        BLOCK_U=block_u, BLOCK_G=max(16, next_power_of_2(num_heads)),  # tl.dot: block dims >= 16
        BLOCK_D=min(128, max(16, next_power_of_2(dim))), num_warps=warps,
    )  # fmt: skip
    return scores


def score_units_triton(
    query: torch.Tensor, reps: torch.Tensor, valid: torch.Tensor, agg: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.score_units`)."""
    return launch_scores(query, reps, reps, valid, split_sign=False, agg_max=agg == "max", out=out)
