"""Plain PyTorch reference of every kvrecall kernel (float32 math, any device).

These are the ground truth the Triton kernels are tested against, and what the daemon runs on
CPU, so they are vectorised (no Python loop over tokens). They trust their arguments: the
public functions in `kvrecall.kernels` validate first.

B is a batch of independent (layer, kv-head) problems throughout. Ops and the papers they serve:

* kmeans_assign / kmeans_update / kmeans: spherical k-means over keys (LouisKV, arXiv 2510.11292)
* score_units, select_under_budget: rank retrieval units, take them under a token budget (LouisKV)
* gather_rows: copy rows of the host tier into the working set (every retrieving policy)
* expand_selection / expand_grouped: the token positions of the units a budget selection took
  (LouisKV; grouped: candidates stored unit after unit)
* place_retrieved / spill_ring: make a working set's retrieved region hold a selection (keep
  what is resident, gather the rest from the host pages) and spill the window ring to them
* cosine_similarity: the query-drift boundary test (LouisKV)
* window_scores: per-window importance of attention mass (WindowKV)
* quest_page_bounds / quest_page_scores: Quest's per-page key bounds and upper-bound scores
* masked_attention / attention_at_positions: decode attention over a working set, and the
  ground truth it must equal
* attention_with_lse: a chunk's exact attention over the host tier with its log-sum-exp
  (the ground truth of host_attention.attend_blocks)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-6
# The reference's largest temporary ([B, chunk, K] similarities) in elements: bounds memory.
_CHUNK_ELEMENTS = 1 << 24

AssignFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UpdateFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32 (rows of norm < EPS are divided by EPS)."""
    vectors = vectors.float()
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(EPS)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by cosine: x [B, N, D], centroids [B, K, D] -> assign [B, N] int64.

    assign[b, n] = argmax_k dot(x[b, n], centroids[b, k] / |centroids[b, k]|); ties go to the
    lowest k. Needs K >= 1 when N >= 1.
    """
    batch, num_points, _ = x.shape
    assign = torch.zeros(batch, num_points, dtype=torch.int64, device=x.device)
    if num_points == 0:
        return assign
    unit_t = _unit_rows(centroids).transpose(1, 2)  # [B, D, K]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * centroids.shape[1]))
    for start in range(0, num_points, chunk):
        sims = torch.bmm(x[:, start : start + chunk].float(), unit_t)
        assign[:, start : start + chunk] = sims.argmax(dim=-1)  # first maximum wins ties
    return assign


def kmeans_update(x: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means: x [B, N, D], assign [B, N] -> (centroids [B, k, D] f32, counts [B, k] int64).

    Points whose assign is outside [0, k) (e.g. -1 padding) belong to no cluster. An empty
    cluster gets a zero centroid and count 0.
    """
    batch, num_points, dim = x.shape
    member = (assign >= 0) & (assign < k)
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * k
    spill = batch * k  # one extra bin collects the non-members
    flat = torch.where(member, assign.long() + offsets, spill).reshape(-1)
    sums = torch.zeros(spill + 1, dim, dtype=torch.float32, device=x.device)
    sums.index_add_(0, flat, x.reshape(batch * num_points, dim).float())
    counts = torch.bincount(flat, minlength=spill + 1)[:spill].view(batch, k)
    centroids = sums[:spill].view(batch, k, dim) / counts.clamp_min(1).unsqueeze(-1)
    return centroids, counts


def assign_centroids(centroids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The centroids an assignment step compares points of `dtype` with.

    float32 points: the float32 centroids as they are. 16-bit points: the unit centroids
    rounded to that dtype, so a kernel multiplies 16-bit by 16-bit in one tensor-core pass
    (exact products, float32 sums). Rounding moves a cosine by at most ~2^-8 relative: only
    near-ties can change cluster (LouisKV's units are approximate by construction).
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return centroids
    return _unit_rows(centroids).to(dtype)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    seed: int = 0,
    assign_fn: AssignFn = kmeans_assign,
    update_fn: UpdateFn = kmeans_update,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical k-means: x [B, N, D] -> (centroids [B, K, D] f32, assign [B, N], counts [B, K]).

    K = min(k, N). Init: the K evenly spaced points x[:, (i * N // K + seed) % N] (deterministic;
    `seed` only rotates the grid). Then `iters` Lloyd iterations of assign + update; a cluster
    left empty by an update keeps its previous centroid (no re-seeding), so no centroid is
    ever the zero vector. Finally every point is assigned to its nearest returned centroid and
    counts are that assignment's cluster sizes (a count may be 0); the centroids are the means
    of the previous assignment (equal to the final members' means once converged).
    For 16-bit x, "nearest" is measured against the unit centroids rounded to x's dtype (see
    `assign_centroids`). `assign_fn` / `update_fn` choose the implementation of the two steps.
    """
    batch, num_points, dim = x.shape
    k = min(k, num_points)
    if k == 0:
        return (
            x.new_zeros(batch, 0, dim, dtype=torch.float32),
            torch.zeros(batch, num_points, dtype=torch.int64, device=x.device),
            torch.zeros(batch, 0, dtype=torch.int64, device=x.device),
        )
    init = ((torch.arange(k, device=x.device) * num_points) // k + seed) % num_points
    centroids = x[:, init].float()
    for _ in range(iters):
        means, counts = update_fn(x, assign_fn(x, assign_centroids(centroids, x.dtype)), k)
        centroids = torch.where(counts.unsqueeze(-1) > 0, means, centroids)
    assign = assign_fn(x, assign_centroids(centroids, x.dtype))
    counts = torch.zeros(batch, k, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign))
    return centroids, assign, counts


def score_units(
    query: torch.Tensor, reps: torch.Tensor, valid: torch.Tensor, agg: str = "max"
) -> torch.Tensor:
    """Unit scores: query [B, G, D], reps [B, U, D], valid [B, U] -> [B, U] f32.

    scores[b, u] = agg_g dot(query[b, g], reps[b, u]) with agg "max" or "sum" over the G query
    heads of the group; invalid units score -inf.
    """
    per_head = torch.bmm(reps.float(), query.float().transpose(1, 2))  # [B, U, G]
    scores = per_head.amax(dim=-1) if agg == "max" else per_head.sum(dim=-1)
    return scores.masked_fill(~valid.bool(), float("-inf"))


def select_under_budget(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy selection: scores [B, U], sizes [B, U] -> tokens taken per unit [B, U] int64.

    Units are visited by descending score (ties: lower index first); each takes
    min(size, budget left), so the last one taken may be partial. Units scoring -inf or NaN
    take nothing; negative sizes count as 0.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    takeable = torch.where(scores > float("-inf"), sizes.long().clamp_min(0), 0)
    ordered = takeable.gather(1, order)
    before = ordered.cumsum(dim=1) - ordered
    taken = torch.minimum(ordered, (budget - before).clamp_min(0))
    return torch.zeros_like(takeable).scatter_(1, order, taken)


def gather_rows(
    src: torch.Tensor, src_start: torch.Tensor, dst: torch.Tensor, dst_start: torch.Tensor, row_len: int
) -> None:
    """dst[dst_start[i] : dst_start[i] + row_len] = src[src_start[i] : ... + row_len], in place.

    src, dst: 1-D, same dtype, may live on different devices; starts [N] in elements.
    Overlapping destination rows leave an unspecified one of the writers.
    """
    if src_start.numel() == 0 or row_len == 0:
        return
    rows = src.unfold(0, row_len, 1)[src_start.to(src.device).long()]  # [N, row_len], one copy
    columns = torch.arange(row_len, device=dst.device)
    dst_index = (dst_start.to(dst.device).long().unsqueeze(1) + columns).reshape(-1)
    dst.index_copy_(0, dst_index, rows.reshape(-1).to(dst.device))


def expand_selection(
    take: torch.Tensor, unit: torch.Tensor, rank: torch.Tensor, position: torch.Tensor, width: int
) -> torch.Tensor:
    """Positions of the chosen candidates: take [B, U], unit / rank / position [B, M] -> [B, width].

    Candidate m of row b is chosen when rank[b, m] < take[b, unit[b, m]]; the first `width`
    chosen positions in candidate order, -1 padded (prefix sums and one scatter)."""
    return _expand_chosen(rank < take.gather(1, unit.long()), position, width)


def expand_grouped(take: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor, width: int) -> torch.Tensor:
    """expand_selection for candidates grouped by unit: take, sizes [B, U], position [B, M] ->
    [B, width]. Unit u's candidates are the sizes[u] columns after those of units < u, in rank
    order, so its first take[u] (clamped to [0, sizes]) are the chosen ones: the work grows with
    the units and the chosen tokens, not with M (one host sync for their number)."""
    rows, units = sizes.shape
    out = torch.full((rows, width), -1, dtype=torch.int64, device=sizes.device)
    if units == 0 or width == 0:
        return out
    sizes = sizes.long().clamp_min(0)
    take = torch.minimum(take.long().clamp_min(0), sizes).flatten()
    first_in = (sizes.cumsum(dim=1) - sizes).flatten()  # each unit's first candidate column
    first_out = take.view(rows, units).cumsum(dim=1).flatten() - take  # and its first output column
    unit = torch.repeat_interleave(torch.arange(rows * units, device=sizes.device), take)  # per chosen token
    offset = torch.arange(unit.numel(), device=sizes.device) - (take.cumsum(dim=0) - take)[unit]
    row, column_out, column_in = unit // units, first_out[unit] + offset, first_in[unit] + offset
    keep = (column_out < width) & (column_in < position.shape[1])
    out[row[keep], column_out[keep]] = position[row[keep], column_in[keep]].long()
    return out


def expand_pinned(
    take: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, position: torch.Tensor, pinned: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """expand_grouped with pinned tokens (see kernels.expand_pinned) -> (positions, take used)."""
    whole = torch.where(scores > float("-inf"), sizes.long().clamp_min(0), 0).to(take.dtype)
    fits = whole.sum(dim=1, keepdim=True) <= width  # [B, 1]
    take = torch.where(fits, whole, take)
    new = expand_grouped(take, sizes, position, width)
    mixed = torch.cat([pinned, drop_members(new[:, : width - pinned.shape[1]], pinned)], dim=1)
    return torch.where(fits, new, mixed), take


def drop_members(positions: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    """positions [B, n] with every entry that row b of `pinned` [B, P] (ascending, -1 padded)
    holds set to -1, so a row of the two together names each token once."""
    big = torch.iinfo(pinned.dtype).max
    keys = torch.where(pinned < 0, big, pinned)  # still ascending: the padding is last
    return torch.where(in_sorted_rows(keys, positions) & (positions >= 0), -1, positions)


def in_sorted_rows(keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per row, whether each entry of x [B, m] equals an entry of keys [B, k] (each row
    ascending): a binary search per entry."""
    if keys.shape[1] == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    at = torch.searchsorted(keys, x.contiguous()).clamp_(max=keys.shape[1] - 1)
    return torch.gather(keys, 1, at) == x


def _expand_chosen(chosen: torch.Tensor, position: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` positions of the chosen candidates in candidate order, -1 padded."""
    column = chosen.cumsum(dim=1)  # 1-based output column; column 0 collects the rest
    column = torch.where(chosen & (column <= width), column, 0)
    out = torch.full((chosen.shape[0], width + 1), -1, dtype=torch.int64, device=chosen.device)
    out.scatter_(1, column, position.long())
    return out[:, 1:]


def host_rows(
    page_base: torch.Tensor, rows: torch.Tensor, kv: int, positions: torch.Tensor, tokens_per_page: int,
    num_kv_heads: int, row_len: int,
) -> torch.Tensor:
    """Element offsets in the flat host pool of (row = layer * H + head, kv, position) for
    pages laid out [L, 2, H, P, D]; page_base [pages] holds each page's offset."""
    layer, head = rows // num_kv_heads, rows % num_kv_heads
    page = torch.div(positions, tokens_per_page, rounding_mode="floor")
    in_page = positions - page * tokens_per_page
    return page_base[page] + (((layer * 2 + kv) * num_kv_heads + head) * tokens_per_page + in_page) * row_len


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
) -> torch.Tensor:
    """Make slots [first_slot, first_slot + R) of every row hold `selection`, in place.

    slot_pos [B, C] int32, keys / values [B, C, D], selection [B, R] (-1 or >= the host's
    positions = none). Per row: tokens already resident keep their slots; the k-th new entry
    of the selection goes to the k-th slot (ascending) that is not kept and its K/V rows are
    copied from the host pages; the other slots become -1. Returns [B, 2] int32: (valid
    entries of the selection, rows gathered). Valid entries of one row are expected distinct.
    resident_max (an int64 scalar), if given, is raised to the most filled slots of any row.
    """
    rows = slot_pos.shape[0]
    counts = torch.zeros(rows, 2, dtype=torch.int32, device=slot_pos.device)
    if rows and selection.shape[1]:
        _place(slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads, counts)
    note_resident(slot_pos, resident_max)
    return counts


def note_resident(slot_pos: torch.Tensor, resident_max: torch.Tensor | None) -> None:
    """resident_max (an int64 scalar; None: nothing) raised to the most filled slots of any row
    of slot_pos [B, C]."""
    if resident_max is not None and slot_pos.shape[0]:
        torch.maximum(resident_max, (slot_pos >= 0).sum(dim=1).amax(), out=resident_max)


def append_units(
    tables: list[tuple[torch.Tensor, ...]], reps: torch.Tensor, unit_column: list[int], token_column: list[int],
    starts: list[int], lengths: list[int],
) -> None:
    """kernels.append_units, table by table: a unit per row (reps, size, valid) and its
    candidates' positions."""
    for s, (table_reps, sizes, valid, position) in enumerate(tables):
        u, m, n = unit_column[s], token_column[s], lengths[s]
        table_reps[:, u] = reps[s]
        sizes[:, u] = n
        valid[:, u] = n > 0
        position[:, m : m + n] = torch.arange(starts[s], starts[s] + n, dtype=torch.int32, device=position.device)


def _place(
    slot_pos: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selection: torch.Tensor,
    first_slot: int,
    host: torch.Tensor,
    page_base: torch.Tensor,
    tokens_per_page: int,
    num_kv_heads: int,
    counts: torch.Tensor,
) -> None:
    """place_retrieved's work on a non-empty region; fills counts [B, 2]."""
    region_counts, rows, positions, targets = plan_placement(slot_pos, selection, first_slot, page_base,
                                                             tokens_per_page)  # fmt: skip
    counts.copy_(region_counts)
    if rows.numel():
        dim = keys.shape[2]
        copy_host_rows(host, page_base, rows, positions, tokens_per_page, num_kv_heads, keys.view(-1),
                       values.view(-1), targets * dim, dim)  # fmt: skip


def plan_placement(
    slot_pos: torch.Tensor, selection: torch.Tensor, first_slot: int, page_base: torch.Tensor, tokens_per_page: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """place_retrieved's plan of a non-empty region (plan_region), written into slot_pos ->
    (counts [B, 2], the new tokens' rows, their positions, their targets: flat rows of the
    keys / values [B, C, D]). What remains is copying their K / V rows (copy_host_rows)."""
    region = slot_pos[:, first_slot : first_slot + selection.shape[1]]
    final, filled, counts = plan_region(region.long(), selection.to(slot_pos.device).long(),
                                        page_base.numel() * tokens_per_page)  # fmt: skip
    region.copy_(final)
    rows, column = filled.nonzero(as_tuple=True)
    return counts, rows, final[rows, column], rows * slot_pos.shape[1] + first_slot + column


def copy_host_rows(
    host: torch.Tensor, page_base: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, tokens_per_page: int,
    num_kv_heads: int, keys: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, dim: int,
) -> None:  # fmt: skip
    """The K and V rows of (row = layer * H + head, position) from the host pages into the flat
    keys / values at element offsets dst."""
    page_base, rows, positions = page_base.to(host.device), rows.to(host.device), positions.to(host.device)
    for kv, target in ((0, keys), (1, values)):
        gather_rows(host, host_rows(page_base, rows, kv, positions, tokens_per_page, num_kv_heads, dim), target, dst, dim)


def _members(x: torch.Tensor, x_ok: torch.Tensor, of: torch.Tensor, of_ok: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, whether each valid entry of x [B, m] is among the valid entries of `of` [B, k]
    (positions in [0, n)). Where n is within MAP_SPAN x k, a [B, n + 1] membership map (the host's
    placement plan at 32K and budget 1024: server/host_selection.py); else a sort of each row of
    `of` and a binary search. (torch.isin sorted all B (m + k) keys together: ~30 ms at 256 x 1024.)"""
    if n <= MAP_SPAN * max(1, of.shape[1]):
        seen = torch.zeros(of.shape[0], n + 1, dtype=torch.bool, device=of.device)
        seen.scatter_(1, torch.where(of_ok, of, n), True)
        seen[:, n] = False
        return seen.gather(1, torch.where(x_ok, x, n))
    keys = torch.where(of_ok, of, n).sort(dim=1).values  # (the invalid last, as n: no valid x equals it)
    return x_ok & in_sorted_rows(keys, torch.where(x_ok, x, n))


# _members' choice: a membership map while positions span at most this many times the entries (else a sort).
# At budget 1024 and 256 rows the map plans a region in 8.7 ms against the sort's 24.4 ms at 131K positions,
# 11.8 against 24.9 at 262K (this 2-core CPU, idle, 2026-12-04: scripts/plan_region_probe.py,
# bench/results/2026-12-04-cpu-plan-region-probe.json); above 256x its bool table (67 MB a call at 262K) grows.
MAP_SPAN = 256


def plan_region(
    current: torch.Tensor, selection: torch.Tensor, num_positions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """place_retrieved's plan for one region: current [B, R] int64 (its slots' positions, -1
    empty), selection [B, R] int64 (-1 or >= num_positions = none) -> (the region afterwards
    [B, R] int64, filled [B, R] bool: the slots given a new token, counts [B, 2] int32: valid
    entries of the selection, new tokens). Residents keep their slots; the k-th new entry goes
    to the k-th slot that is not kept."""
    rows, retrieved, device = current.shape[0], current.shape[1], current.device
    cur_ok = (current >= 0) & (current < num_positions)
    sel_ok = (selection >= 0) & (selection < num_positions)
    keep = cur_ok & _members(current, cur_ok, selection, sel_ok, num_positions)
    new = sel_ok & ~_members(selection, sel_ok, current, cur_ok, num_positions)
    free = ~keep
    free_rank = free.cumsum(dim=1) - 1
    new_rank = new.cumsum(dim=1) - 1
    n_new = new.sum(dim=1, keepdim=True)
    filled = free & (free_rank < n_new)
    pos_of_rank = torch.full((rows, retrieved + 1), -1, dtype=torch.int64, device=device)
    pos_of_rank.scatter_(1, torch.where(new, new_rank, retrieved), torch.where(new, selection, -1))
    incoming = pos_of_rank.gather(1, torch.where(filled, free_rank, retrieved))
    final = torch.where(keep, current, torch.where(filled, incoming, -1))
    counts = torch.stack((sel_ok.sum(dim=1), n_new.squeeze(1)), dim=1).to(torch.int32)
    return final, filled, counts


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
) -> None:
    """Copy tokens [start, end) of every row from ring slots ring_start + position % ring_size
    of keys / values [B, C, D] into the host pages (layout of `place_retrieved`)."""
    rows, capacity, dim = keys.shape
    if rows == 0 or end <= start:
        return
    device = host.device
    positions = torch.arange(start, end, device=device)
    row_index = torch.arange(rows, device=device).repeat_interleave(end - start)
    positions = positions.repeat(rows)
    slots = ((row_index * capacity + ring_start + positions % ring_size) * dim).to(keys.device)
    page_base = page_base.to(device)
    for kv, source in ((0, keys), (1, values)):
        dst = host_rows(page_base, row_index, kv, positions, tokens_per_page, num_kv_heads, dim)
        gather_rows(source.reshape(-1), slots, host, dst, dim)


def store_tokens(
    kv: torch.Tensor, start: int, first_layer: int, host: torch.Tensor, page_base: torch.Tensor, tokens_per_page: int
) -> None:
    """Copy kv [l, 2, H, n, D] (layers [first_layer, first_layer + l)) into the host pages as
    tokens [start, start + n) (layout of `place_retrieved`)."""
    layers, _, heads, n, dim = kv.shape
    if layers == 0 or n == 0:
        return
    device = host.device
    rows = torch.arange(layers * heads, device=device).repeat_interleave(n)
    positions = torch.arange(start, start + n, device=device).repeat(layers * heads)
    source = kv.permute(1, 0, 2, 3, 4).reshape(2, -1)  # [2, l * H * n * D]: rows in (layer, head, token) order
    offsets = torch.arange(layers * heads * n, device=kv.device) * dim
    page_base = page_base.to(device)
    for index in range(2):
        dst = host_rows(page_base, rows + first_layer * heads, index, positions, tokens_per_page, heads, dim)
        gather_rows(source[index], offsets, host, dst, dim)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b [B, H, D] -> [B, H] f32: dot(a, b) / (max(|a|, EPS) * max(|b|, EPS))."""
    a = a.float()
    b = b.float()
    norms = a.norm(dim=-1).clamp_min(EPS) * b.norm(dim=-1).clamp_min(EPS)
    return (a * b).sum(dim=-1) / norms


def window_lengths(num_tokens: int, window_size: int, device: torch.device) -> torch.Tensor:
    """Real length of each of the ceil(T / W) windows [P] int64 (the last may be short)."""
    starts = torch.arange(0, num_tokens, window_size, device=device)
    return (num_tokens - starts).clamp_max(window_size)


def window_scores(attn: torch.Tensor, window_size: int, mode: str = "mean") -> torch.Tensor:
    """Per-window scores: attn [B, T] -> [B, ceil(T / W)] f32 for W = window_size.

    "mean": mean of the window's values; "topmean": mean of its ceil(n / 2) largest values,
    n being the window's real length.
    """
    batch, num_tokens = attn.shape
    num_windows = -(-num_tokens // window_size)
    if num_windows == 0:
        return attn.new_zeros(batch, 0, dtype=torch.float32)
    lengths = window_lengths(num_tokens, window_size, attn.device)
    pad_value = 0.0 if mode == "mean" else float("-inf")
    padded = attn.new_full((batch, num_windows * window_size), pad_value, dtype=torch.float32)
    padded[:, :num_tokens] = attn
    windows = padded.view(batch, num_windows, window_size)
    if mode == "mean":
        return windows.sum(dim=-1) / lengths
    halves = (lengths + 1) // 2
    top = windows.topk((window_size + 1) // 2, dim=-1).values  # sorted, padding (-inf) last
    keep = torch.arange(top.shape[-1], device=attn.device) < halves.unsqueeze(1)
    return torch.where(keep, top, 0.0).sum(dim=-1) / halves


def quest_page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page bounds: keys [B, T, D] -> (kmin, kmax) [B, ceil(T / page_size), D], keys' dtype.

    Elementwise min / max of the keys of each page of page_size consecutive tokens (the last
    page may be short).
    """
    batch, num_tokens, dim = keys.shape
    full = num_tokens // page_size
    pages = keys[:, : full * page_size].reshape(batch, full, page_size, dim)
    kmin, kmax = pages.amin(dim=2), pages.amax(dim=2)
    if full * page_size < num_tokens:
        tail = keys[:, full * page_size :]
        kmin = torch.cat([kmin, tail.amin(dim=1, keepdim=True)], dim=1)
        kmax = torch.cat([kmax, tail.amax(dim=1, keepdim=True)], dim=1)
    return kmin, kmax


def quest_page_scores(
    query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Quest upper bounds: query [B, G, D], kmin/kmax [B, P, D], valid [B, P] -> [B, P] f32.

    score = max_g sum_d max(q_d * kmin_d, q_d * kmax_d); invalid pages -inf. Since kmin <= kmax,
    the sum is relu(q) . kmax + min(q, 0) . kmin: two batched products, no [B, G, P, D] temporary.
    """
    q = query.float()
    per_head = torch.bmm(kmax.float(), q.clamp_min(0).transpose(1, 2))
    per_head += torch.bmm(kmin.float(), q.clamp_max(0).transpose(1, 2))  # [B, P, G]
    return per_head.amax(dim=-1).masked_fill(~valid.bool(), float("-inf"))


def masked_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """GQA decode attention over valid slots: query [Hq, D], keys/values [Hkv, C, D], valid [Hkv, C].

    Query head h reads kv head h // (Hq / Hkv). Returns [Hq, D] f32; a head with no valid slot
    outputs zeros.
    """
    num_kv_heads, _, dim = keys.shape
    group = query.shape[0] // num_kv_heads
    q = query.float().view(num_kv_heads, group, dim)
    logits = torch.bmm(q, keys.float().transpose(1, 2)) * scale  # [Hkv, G, C]
    valid = valid.bool().unsqueeze(1)
    probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    probs = torch.where(valid.any(dim=-1, keepdim=True), probs, 0.0)  # all -inf rows are NaN
    return torch.bmm(probs, values.float()).view(num_kv_heads * group, dim)


def attention_at_positions(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Full attention restricted to `positions`: the ground truth for a working set.

    query [Hq, D]; keys/values [Hkv, T, D] hold every token; positions [Hkv, R] int (-1 = none,
    duplicates allowed). Attention over a working set whose slots hold the tokens at slot_pos
    must equal this with positions = slot_pos, whatever the slot order.
    """
    num_kv_heads, num_tokens, _ = keys.shape
    chosen = positions >= 0
    mask = torch.zeros(num_kv_heads, num_tokens + 1, dtype=torch.bool, device=keys.device)
    mask.scatter_(1, torch.where(chosen, positions.long(), num_tokens), True)  # column T: padding
    return masked_attention(query, keys, values, mask[:, :num_tokens], scale)


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query over every token in one softmax: query [Hq, n, D], keys/values [Hkv, T, D]
    (T >= 1). -> (out [Hq, n, D] f32, lse [Hq, n] f32 = logsumexp of the scaled scores): the
    ground truth of host_attention.attend_blocks."""
    num_kv_heads = keys.shape[0]
    Hq, n, dim = query.shape
    q = query.float().reshape(num_kv_heads, Hq // num_kv_heads * n, dim)
    logits = torch.bmm(q, keys.float().transpose(1, 2)) * scale  # [Hkv, G * n, T]
    out = torch.bmm(torch.softmax(logits, dim=-1), values.float())
    return out.reshape(Hq, n, dim), torch.logsumexp(logits, dim=-1).reshape(Hq, n)
