"""Units -> token positions (LouisKV: the chosen units fill the budget): any candidate order, or grouped by unit.

Kernel: `expand_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_int,
    check_same_device,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton


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
    int (int32 or int64 each). A candidate is chosen when rank < take[unit]; the first `width` chosen positions
    in candidate order. No sort, no host sync.
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
        from kvrecall.kernels.expand_triton import expand_selection_triton

        return expand_selection_triton(take, unit, rank, position, width)
    return reference.expand_selection(take, unit, rank, position, width)


def expand_grouped(
    take: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor, width: int, impl: str = "auto",
    tail: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """expand_selection where the candidates are grouped by unit, in unit order: unit u's
    sizes[u] candidates follow those of units < u, in rank order (louiskv's unit table) ->
    [B, width] int64, -1 padded: the same positions, from take, sizes [B, U] (int) and
    position [B, M] (int32 or int64) alone. take is clamped to [0, sizes]. On a GPU it reads
    the units and the chosen positions, not every candidate; no host sync there.

    `tail` [B, M2]: candidate columns M.. are tail's (a table kept in two parts, a shared
    prefix's and a session's own: the same result as position and tail concatenated, no copy).
    """
    check_tensor("take", take, rank=2, dtypes=INDEX_DTYPES)
    check_tensor("sizes", sizes, rank=2, dtypes=INDEX_DTYPES)
    check_tensor("position", position, rank=2, dtypes=INDEX_DTYPES)
    if take.shape != sizes.shape:
        raise ValueError(f"take: shape {tuple(take.shape)} differs from sizes' {tuple(sizes.shape)}")
    check_size("position", position, 0, sizes.shape[0], "B of sizes")
    check_int("width", width, 0)
    _check_tail(tail, sizes)
    device = check_same_device(take=take, sizes=sizes, position=position, **_tail(tail))
    if use_triton(impl, device):
        from kvrecall.kernels.expand_triton import expand_grouped_triton

        return expand_grouped_triton(take, sizes, position, width, tail=tail)[0]
    return reference.expand_grouped(take, sizes, _joined(position, tail), width)


def _check_tail(tail: torch.Tensor | None, sizes: torch.Tensor) -> None:
    if tail is not None:
        check_tensor("tail", tail, rank=2, dtypes=INDEX_DTYPES)
        check_size("tail", tail, 0, sizes.shape[0], "B of sizes")


def _tail(tail: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if tail is None else {"tail": tail}


def _joined(position: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """The reference's one candidate table: position then tail (a copy)."""
    if tail is None:
        return position
    dtype = torch.promote_types(position.dtype, tail.dtype)
    return torch.cat((position.to(dtype), tail.to(dtype)), dim=1)


def expand_pinned(
    take: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, position: torch.Tensor, pinned: torch.Tensor,
    width: int, impl: str = "auto", tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """expand_grouped with pinned tokens (louiskv keeps them in every retrieval) -> (positions
    [B, width] int64, the take used [B, U]).

    pinned [B, P] int64, ascending, -1 padded (P <= width); take came from a selection under
    width - P; scores [B, U] float (-inf: not a unit). A row whose scored units all fit the
    width (sum of their sizes <= width) takes them all, pinned tokens among them; every other
    row holds its pinned tokens in its first P columns, then the expansion of `take` less the
    tokens pinned already (-1 where one was). One launch on a GPU (no host sync). `tail`: as
    for expand_grouped.
    """
    check_tensor("pinned", pinned, rank=2, dtypes=(torch.int64,))
    check_tensor("scores", scores, rank=2, dtypes=FLOAT_DTYPES)
    if scores.shape != sizes.shape:
        raise ValueError(f"scores: shape {tuple(scores.shape)} differs from sizes' {tuple(sizes.shape)}")
    check_size("pinned", pinned, 0, sizes.shape[0], "B of sizes")
    if pinned.shape[1] > width:
        raise ValueError(f"pinned: {pinned.shape[1]} tokens exceed width {width}")
    check_tensor("take", take, rank=2, dtypes=INDEX_DTYPES)
    check_tensor("sizes", sizes, rank=2, dtypes=INDEX_DTYPES)
    check_tensor("position", position, rank=2, dtypes=INDEX_DTYPES)
    if take.shape != sizes.shape:
        raise ValueError(f"take: shape {tuple(take.shape)} differs from sizes' {tuple(sizes.shape)}")
    check_size("position", position, 0, sizes.shape[0], "B of sizes")
    _check_tail(tail, sizes)
    device = check_same_device(take=take, sizes=sizes, scores=scores, position=position, pinned=pinned, **_tail(tail))
    if use_triton(impl, device):
        from kvrecall.kernels.expand_triton import expand_grouped_triton

        return expand_grouped_triton(take, sizes, position, width, scores, pinned, tail=tail)
    return reference.expand_pinned(take, sizes, scores, _joined(position, tail), pinned, width)
