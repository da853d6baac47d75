"""kvrecall's compute kernels: one Triton kernel per op beside a PyTorch reference.

Every public function checks its arguments (ValueError naming the argument) and then runs one
implementation, chosen by `impl`:

* "auto" (default): the Triton kernel when the tensors are on CUDA and Triton imports, else
  the reference (`reference.py`): the daemon's CPU path;
* "triton": the kernel, or RuntimeError where none can run (CPU tensors need
  TRITON_INTERPRET=1 set before triton is first imported);
* "reference": the PyTorch reference.

A kernel's launcher still falls back to the reference for sizes its kernel does not cover
(noted per op). Triton is imported lazily, only when a kernel is asked for. Float inputs may
be float32, float16 or bfloat16; math is float32. B is a batch of independent
(layer, kv-head) problems. Files: clustering.py (k-means), unit_scores.py, budget.py,
row_gather.py, cosine.py, windows.py, quest.py, expand.py, placement.py; reference.py holds
every op in PyTorch.
"""

from __future__ import annotations

import functools

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_int,
    check_rows,
    check_same_device,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import IMPLS, use_triton

__all__ = [
    "attention_at_positions",
    "cosine_similarity",
    "expand_selection",
    "gather_rows",
    "kmeans",
    "kmeans_assign",
    "kmeans_update",
    "masked_attention",
    "place_retrieved",
    "quest_page_bounds",
    "quest_page_scores",
    "score_units",
    "select_under_budget",
    "spill_ring",
    "window_scores",
]

AGGREGATIONS = ("max", "sum")
WINDOW_MODES = ("mean", "topmean")


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Nearest centroid by cosine: x [B, N, D], centroids [B, K, D] -> assign [B, N] int64.

    Ties go to the lowest index; K >= 1 unless N == 0 (LouisKV clustering step).
    """
    check_tensor("x", x, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("centroids", centroids, rank=3, dtypes=FLOAT_DTYPES)
    check_size("centroids", centroids, 0, x.shape[0], "B of x")
    check_size("centroids", centroids, 2, x.shape[2], "D of x")
    if x.shape[1] > 0 and centroids.shape[1] == 0:
        raise ValueError("centroids: K is 0 but x has points to assign")
    if use_triton(impl, check_same_device(x=x, centroids=centroids)):
        from kvrecall.kernels.clustering import kmeans_assign_triton

        return kmeans_assign_triton(x, centroids)
    return reference.kmeans_assign(x, centroids)


def kmeans_update(
    x: torch.Tensor, assign: torch.Tensor, k: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means: x [B, N, D], assign [B, N] int -> (centroids [B, k, D] f32, counts [B, k] int64).

    Points assigned outside [0, k) (e.g. -1 padding) join no cluster; an empty cluster gets a
    zero centroid and count 0.
    """
    check_tensor("x", x, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("assign", assign, rank=2, dtypes=INDEX_DTYPES)
    check_size("assign", assign, 0, x.shape[0], "B of x")
    check_size("assign", assign, 1, x.shape[1], "N of x")
    check_int("k", k, 1)
    check_int("x.shape[2]", x.shape[2], 1)
    if use_triton(impl, check_same_device(x=x, assign=assign)):
        from kvrecall.kernels.clustering import kmeans_update_triton

        return kmeans_update_triton(x, assign, k)
    return reference.kmeans_update(x, assign, k)


def kmeans(
    x: torch.Tensor, k: int, iters: int, seed: int = 0, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical k-means: x [B, N, D] -> (centroids [B, K, D] f32, assign [B, N] int64, counts [B, K] int64).

    K = min(k, N). Deterministic: evenly spaced initial points (`seed` rotates them), `iters`
    Lloyd iterations, empty clusters keep their previous centroid (not re-seeded); the
    returned assign is nearest-centroid for the returned centroids and counts are its sizes.
    See `reference.kmeans` (LouisKV, arXiv 2510.11292).
    """
    check_tensor("x", x, rank=3, dtypes=FLOAT_DTYPES)
    check_int("k", k, 1)
    check_int("iters", iters, 0)
    check_int("seed", seed, 0)
    use_triton(impl, x.device)  # validates impl before any work
    return reference.kmeans(
        x,
        k,
        iters,
        seed,
        assign_fn=functools.partial(kmeans_assign, impl=impl),
        update_fn=functools.partial(kmeans_update, impl=impl),
    )


def score_units(
    query: torch.Tensor, reps: torch.Tensor, valid: torch.Tensor, agg: str = "max", impl: str = "auto"
) -> torch.Tensor:
    """Unit scores: query [B, G, D], reps [B, U, D], valid [B, U] bool -> [B, U] f32.

    max or sum over the G grouped query heads of dot(query, rep); invalid units -inf (LouisKV).
    """
    check_tensor("query", query, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("reps", reps, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("valid", valid, rank=2, dtypes=(torch.bool,))
    check_size("reps", reps, 0, query.shape[0], "B of query")
    check_size("reps", reps, 2, query.shape[2], "D of query")
    check_size("valid", valid, 0, reps.shape[0], "B of reps")
    check_size("valid", valid, 1, reps.shape[1], "U of reps")
    check_int("query.shape[1]", query.shape[1], 1)
    check_choice("agg", agg, AGGREGATIONS)
    if use_triton(impl, check_same_device(query=query, reps=reps, valid=valid)):
        from kvrecall.kernels.unit_scores import score_units_triton

        return score_units_triton(query, reps, valid, agg)
    return reference.score_units(query, reps, valid, agg)


def select_under_budget(
    scores: torch.Tensor, sizes: torch.Tensor, budget: int, impl: str = "auto"
) -> torch.Tensor:
    """Greedy take under a token budget: scores [B, U] float, sizes [B, U] int -> take [B, U] int64.

    Descending score (ties: lower index first), each unit takes min(size, budget left);
    -inf / NaN scores take nothing. Kernel: U <= budget.MAX_UNITS, else the reference.
    """
    check_tensor("scores", scores, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("sizes", sizes, rank=2, dtypes=INDEX_DTYPES)
    if sizes.shape != scores.shape:
        raise ValueError(f"sizes: shape {tuple(sizes.shape)} differs from scores' {tuple(scores.shape)}")
    check_int("budget", budget, 0)
    if use_triton(impl, check_same_device(scores=scores, sizes=sizes)):
        from kvrecall.kernels.budget import select_under_budget_triton

        return select_under_budget_triton(scores, sizes, budget)
    return reference.select_under_budget(scores, sizes, budget)


def gather_rows(
    src: torch.Tensor,
    src_start: torch.Tensor,
    dst: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
    impl: str = "auto",
) -> None:
    """In place: dst[dst_start[i] : dst_start[i] + row_len] = src[src_start[i] : src_start[i] + row_len].

    src, dst: 1-D, contiguous, same dtype; src may be pinned host memory while dst is on CUDA
    (the kernel reads it directly). Starts [N] int, in elements. Bounds are checked (a sync
    when the starts live on the GPU). Overlapping destination rows: one writer wins.
    """
    check_tensor("src", src, rank=1)
    check_tensor("dst", dst, rank=1)
    check_tensor("src_start", src_start, rank=1, dtypes=INDEX_DTYPES)
    check_tensor("dst_start", dst_start, rank=1, dtypes=INDEX_DTYPES)
    if dst.dtype != src.dtype:
        raise ValueError(f"dst: dtype {dst.dtype} differs from src's {src.dtype}")
    check_size("dst_start", dst_start, 0, src_start.shape[0], "N of src_start")
    check_int("row_len", row_len, 0)
    if src.device.type == dst.device.type == "cuda" and src.device != dst.device:
        raise ValueError(f"dst: on {dst.device}, src on {src.device}: one GPU only")
    # The kernel moves 16 bytes per access where every start allows it: checked with the bounds.
    vector = max(1, 16 // src.element_size())
    starts_aligned = check_rows(src_start, dst_start, row_len, src.numel(), dst.numel(), vector)
    device = dst.device if dst.device.type == "cuda" else src.device
    if use_triton(impl, device):
        from kvrecall.kernels.row_gather import gather_rows_triton

        gather_rows_triton(src, src_start, dst, dst_start, row_len, starts_aligned)
        return
    reference.gather_rows(src, src_start, dst, dst_start, row_len)



def expand_selection(
    take: torch.Tensor,
    unit: torch.Tensor,
    rank: torch.Tensor,
    position: torch.Tensor,
    width: int,
    impl: str = "auto",
) -> torch.Tensor:
    """Token positions of the units a selection took -> [B, width] int64, -1 padded (LouisKV).

    take [B, U] int (tokens per unit, from select_under_budget); per candidate token unit
    [B, M] int (in [0, U)), rank [B, M] int (its index inside the unit), position [B, M]
    int (int32 or int64 each). A candidate is chosen when rank < take[unit]; the first `width`
    chosen positions in candidate order. No sort, no host sync.
    """
    check_tensor("take", take, rank=2, dtypes=INDEX_DTYPES)
    check_tensor("unit", unit, rank=2, dtypes=INDEX_DTYPES)
    check_tensor("rank", rank, rank=2, dtypes=INDEX_DTYPES)
    check_tensor("position", position, rank=2, dtypes=INDEX_DTYPES)
    for name, tensor in (("unit", unit), ("rank", rank), ("position", position)):
        if tensor.shape != unit.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from unit's {tuple(unit.shape)}")
    check_size("take", take, 0, unit.shape[0], "B of unit")
    check_int("width", width, 0)
    if take.shape[1] == 0 and unit.shape[1] > 0:
        raise ValueError("take: no units but unit has candidates")
    device = check_same_device(take=take, unit=unit, rank=rank, position=position)
    if use_triton(impl, device):
        from kvrecall.kernels.expand import expand_selection_triton

        return expand_selection_triton(take, unit, rank, position, width)
    return reference.expand_selection(take, unit, rank, position, width)


def _check_host_pages(
    keys: torch.Tensor, values: torch.Tensor, host: torch.Tensor, page_base: torch.Tensor, tokens_per_page: int,
    num_kv_heads: int,
) -> None:
    check_tensor("keys", keys, rank=3)
    if values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError(f"values: {tuple(values.shape)} {values.dtype}, expected keys' {tuple(keys.shape)} {keys.dtype}")
    for name, tensor in (("keys", keys), ("values", values)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    check_tensor("host", host, rank=1)
    if host.dtype != keys.dtype:
        raise ValueError(f"host: dtype {host.dtype} differs from keys' {keys.dtype}")
    check_tensor("page_base", page_base, rank=1, dtypes=(torch.int64,))
    if page_base.device != keys.device:
        raise ValueError(f"page_base: on {page_base.device}, expected {keys.device} (like keys)")
    check_int("tokens_per_page", tokens_per_page, 1)
    check_int("num_kv_heads", num_kv_heads, 1)
    if keys.shape[0] % num_kv_heads:
        raise ValueError(f"keys: {keys.shape[0]} rows is not a multiple of num_kv_heads={num_kv_heads}")
    if keys.device.type == host.device.type == "cuda" and keys.device != host.device:
        raise ValueError(f"host: on {host.device}, keys on {keys.device}: one GPU only")


def place_retrieved(
    slot_pos: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selection: torch.Tensor,
    first_slot: int,
    host: torch.Tensor,
    page_base: torch.Tensor,
    tokens_per_page: int,
    num_kv_heads: int,
    resident_max: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Make slots [first_slot, first_slot + R) of each row hold `selection`, in place -> [B, 2] int32.

    slot_pos [B, C] int32, keys / values [B, C, D] contiguous (row b = layer b // H, head
    b % H), selection [B, R] int (-1 = none; distinct per row). Tokens already resident keep
    their slots, the k-th new one goes to the k-th freed slot and its K/V rows are copied from
    `host` (the flat pool: pinned memory read by the GPU directly), pages [L, 2, H, P, D] at
    offsets page_base [pages] int64 (on keys' device). Positions past the pages count as none.
    Returns per row (selected, gathered) on slot_pos' device, with no host sync.
    resident_max (int64 scalar on that device), if given, is raised to the most filled slots
    (all C) of any row afterwards. Kernel: R <= placement.MAX_RETRIEVED, else the reference.
    """
    check_tensor("slot_pos", slot_pos, rank=2, dtypes=(torch.int32,))
    _check_host_pages(keys, values, host, page_base, tokens_per_page, num_kv_heads)
    check_tensor("selection", selection, rank=2, dtypes=INDEX_DTYPES)
    check_size("keys", keys, 0, slot_pos.shape[0], "B of slot_pos")
    check_size("keys", keys, 1, slot_pos.shape[1], "C of slot_pos")
    check_size("selection", selection, 0, slot_pos.shape[0], "B of slot_pos")
    check_int("first_slot", first_slot, 0)
    if first_slot + selection.shape[1] > slot_pos.shape[1]:
        raise ValueError(
            f"selection: {selection.shape[1]} slots from first_slot={first_slot} pass capacity {slot_pos.shape[1]}"
        )
    if not slot_pos.is_contiguous():
        raise ValueError("slot_pos: must be contiguous")
    device = check_same_device(slot_pos=slot_pos, keys=keys, values=values, selection=selection)
    if resident_max is not None:
        check_tensor("resident_max", resident_max, rank=0, dtypes=(torch.int64,))
        check_same_device(slot_pos=slot_pos, resident_max=resident_max)
    if use_triton(impl, device):
        from kvrecall.kernels.placement import place_retrieved_triton

        return place_retrieved_triton(
            slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads,
            resident_max,
        )  # fmt: skip
    return reference.place_retrieved(
        slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads, resident_max
    )


def spill_ring(
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    end: int,
    ring_start: int,
    ring_size: int,
    host: torch.Tensor,
    page_base: torch.Tensor,
    tokens_per_page: int,
    num_kv_heads: int,
    impl: str = "auto",
) -> None:
    """Copy tokens [start, end) of every row from the ring (slot ring_start + position %
    ring_size of keys / values [B, C, D]) into the host pages (layout of `place_retrieved`).
    The GPU writes pinned host memory directly: no D2H sync. end - start <= ring_size."""
    _check_host_pages(keys, values, host, page_base, tokens_per_page, num_kv_heads)
    check_int("start", start, 0)
    check_int("end", end, start)
    check_int("ring_size", ring_size, max(1, end - start))
    check_int("ring_start", ring_start, 0)
    if ring_start + ring_size > keys.shape[1]:
        raise ValueError(f"ring_size: slots [{ring_start}, {ring_start + ring_size}) pass capacity {keys.shape[1]}")
    if end > page_base.numel() * tokens_per_page:
        raise ValueError(f"end: {end} is past the {page_base.numel() * tokens_per_page} positions of the pages")
    device = keys.device if keys.device.type == "cuda" else host.device
    if use_triton(impl, device):
        from kvrecall.kernels.placement import spill_ring_triton

        spill_ring_triton(keys, values, start, end, ring_start, ring_size, host, page_base, tokens_per_page, num_kv_heads)
        return
    reference.spill_ring(keys, values, start, end, ring_start, ring_size, host, page_base, tokens_per_page, num_kv_heads)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """a, b [B, H, D] -> [B, H] f32: dot(a, b) / (max(|a|, 1e-6) * max(|b|, 1e-6)) (LouisKV boundary)."""
    check_tensor("a", a, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("b", b, rank=3, dtypes=FLOAT_DTYPES)
    if b.shape != a.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} differs from a's {tuple(a.shape)}")
    if use_triton(impl, check_same_device(a=a, b=b)):
        from kvrecall.kernels.cosine import cosine_similarity_triton

        return cosine_similarity_triton(a, b)
    return reference.cosine_similarity(a, b)


def window_scores(
    attn: torch.Tensor, window_size: int, mode: str = "mean", impl: str = "auto"
) -> torch.Tensor:
    """Per-window scores: attn [B, T] float -> [B, ceil(T / window_size)] f32 (WindowKV).

    "mean": the window's mean; "topmean": mean of its ceil(n / 2) largest values, n its real
    length (the last window may be short). Kernel: window_size <= windows.MAX_WINDOW.
    """
    check_tensor("attn", attn, rank=2, dtypes=FLOAT_DTYPES)
    check_int("window_size", window_size, 1)
    check_choice("mode", mode, WINDOW_MODES)
    if use_triton(impl, attn.device):
        from kvrecall.kernels.windows import window_scores_triton

        return window_scores_triton(attn, window_size, mode)
    return reference.window_scores(attn, window_size, mode)


def quest_page_bounds(
    keys: torch.Tensor, page_size: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page bounds: keys [B, T, D] -> (kmin, kmax) [B, ceil(T / page_size), D] in keys' dtype."""
    check_tensor("keys", keys, rank=3, dtypes=FLOAT_DTYPES)
    check_int("page_size", page_size, 1)
    if use_triton(impl, keys.device):
        from kvrecall.kernels.quest import quest_page_bounds_triton

        return quest_page_bounds_triton(keys, page_size)
    return reference.quest_page_bounds(keys, page_size)


def quest_page_scores(
    query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, valid: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """Quest upper bounds: query [B, G, D], kmin/kmax [B, P, D], valid [B, P] bool -> [B, P] f32.

    max over g of sum_d max(q_d * kmin_d, q_d * kmax_d); invalid pages -inf. Needs kmin <= kmax.
    """
    check_tensor("query", query, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("kmin", kmin, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("kmax", kmax, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("valid", valid, rank=2, dtypes=(torch.bool,))
    check_size("kmin", kmin, 0, query.shape[0], "B of query")
    check_size("kmin", kmin, 2, query.shape[2], "D of query")
    if kmax.shape != kmin.shape:
        raise ValueError(f"kmax: shape {tuple(kmax.shape)} differs from kmin's {tuple(kmin.shape)}")
    if valid.shape != kmin.shape[:2]:
        raise ValueError(
            f"valid: shape {tuple(valid.shape)}, expected {tuple(kmin.shape[:2])} (B, P of kmin)"
        )
    check_int("query.shape[1]", query.shape[1], 1)
    if use_triton(impl, check_same_device(query=query, kmin=kmin, kmax=kmax, valid=valid)):
        from kvrecall.kernels.quest import quest_page_scores_triton

        return quest_page_scores_triton(query, kmin, kmax, valid)
    return reference.quest_page_scores(query, kmin, kmax, valid)


def _check_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    check_tensor("query", query, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("keys", keys, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("values", values, rank=3, dtypes=FLOAT_DTYPES)
    if values.shape != keys.shape:
        raise ValueError(f"values: shape {tuple(values.shape)} differs from keys' {tuple(keys.shape)}")
    check_size("query", query, 1, keys.shape[2], "D of keys")
    if keys.shape[0] == 0 or query.shape[0] % keys.shape[0]:
        raise ValueError(f"query: {query.shape[0]} heads is not a multiple of the {keys.shape[0]} kv heads")


def _reference_only(impl: str, op: str) -> None:
    check_choice("impl", impl, IMPLS)
    if impl == "triton":
        raise ValueError(f"impl: {op} has no Triton kernel; use 'auto' or 'reference'")


def masked_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """GQA decode attention over valid slots -> [Hq, D] f32 (reference only).

    query [Hq, D], keys/values [Hkv, C, D], valid [Hkv, C] bool; query head h reads kv head
    h // (Hq / Hkv); a head with no valid slot outputs zeros.
    """
    _check_attention(query, keys, values)
    check_tensor("valid", valid, rank=2, dtypes=(torch.bool,))
    if valid.shape != keys.shape[:2]:
        raise ValueError(
            f"valid: shape {tuple(valid.shape)}, expected {tuple(keys.shape[:2])} (Hkv, C of keys)"
        )
    check_same_device(query=query, keys=keys, values=values, valid=valid)
    _reference_only(impl, "masked_attention")
    return reference.masked_attention(query, keys, values, valid, scale)


def attention_at_positions(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Full attention restricted to `positions` -> [Hq, D] f32: the ground truth for a working set.

    keys/values [Hkv, T, D] hold every token, positions [Hkv, R] int (-1 = none). Attention
    over a working set (masked_attention with valid = slot_pos >= 0) must equal this with
    positions = slot_pos, whatever the slot order (reference only).
    """
    _check_attention(query, keys, values)
    check_tensor("positions", positions, rank=2, dtypes=INDEX_DTYPES)
    check_size("positions", positions, 0, keys.shape[0], "Hkv of keys")
    if positions.numel() and int(positions.max()) >= keys.shape[1]:
        raise ValueError(f"positions: max {int(positions.max())} is past the {keys.shape[1]} tokens of keys")
    check_same_device(query=query, keys=keys, values=values, positions=positions)
    _reference_only(impl, "attention_at_positions")
    return reference.attention_at_positions(query, keys, values, positions, scale)
