"""Opening a rank's session and decoding a TPLlama through it.

Every rank opens its own session on the daemon of its own GPU, with its own heads' layout
and its rank in the request; the ranks then check they were given the same plan (slots,
spill cadence, boundary rule), since one decision per step only makes sense if every rank
appends and retrieves on the same steps. Greedy tokens are taken from rank 0 so the ranks
cannot drift apart on a tie.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrecall.client.hf import KVRecallCache
from kvrecall.tp.boundary import AgreedBoundaryDetector
from kvrecall.tp.model import TPLlama

PLAN_FIELDS = (
    "capacity",
    "n_sink",
    "retrieved",
    "window",
    "spill_every",
    "boundary_mode",
    "boundary_threshold",
)


def _plan(session) -> list[float]:
    return [float(getattr(session, name)) for name in PLAN_FIELDS]


class RankOpenError(RuntimeError):
    """Another rank could not open its session (this rank closed its own)."""


def open_tp_session(
    client,
    model: TPLlama,
    policy: str,
    config: dict[str, Any] | None,
    max_tokens: int,
    *,
    tag: str = "",
    record_similarity: bool = False,
):
    """(session, cache) for this rank: its heads' layout, its rank, an agreeing detector.

    Collective: every rank of the group must call it. If any rank's daemon refuses (a full
    pool, say) or the plans differ, every rank closes what it opened and raises, so no rank
    is left waiting for a peer that will never decode."""
    group = model.group
    weight = model.lm_head.weight
    spec = model.shape.spec(max_tokens, weight.dtype)
    session, error = None, None
    try:
        session = client.open_session(
            spec, policy, config, device=weight.device, tag=tag, tp_rank=group.rank, tp_size=group.size
        )
        row = [1.0, *_plan(session)]
    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
        error, row = exc, [0.0] * (1 + len(PLAN_FIELDS))
    rows = group.gather(torch.tensor(row, dtype=torch.float64, device=weight.device)).cpu()
    failed = [rank for rank in range(group.size) if rows[rank, 0] == 0]
    differing = [name for i, name in enumerate(PLAN_FIELDS, 1) if len(set(rows[:, i].tolist())) > 1]
    if error is not None:
        raise error
    if failed or differing:
        session.close()
        if failed:
            raise RankOpenError(f"ranks {failed} could not open their sessions (see their logs)")
        raise RankOpenError(
            f"tensor-parallel ranks were given different plans ({differing}): {rows.tolist()}"
        )
    try:
        cache = KVRecallCache(session, record_similarity=record_similarity)
        cache.detector = AgreedBoundaryDetector.replacing(cache.detector, group)
    except BaseException:
        session.close()
        raise
    return session, cache


@dataclass
class TPDecodeResult:
    tokens: list[int]
    logits: list[torch.Tensor] = field(repr=False)  # per step, [vocab] float32 on the CPU
    boundary_steps: list[int]  # decode steps after which a retrieval was made (0 = first)
    append_steps: list[int]
    step_seconds: list[float]  # wall time of each decode forward (prefill excluded)
    prefill_seconds: float
    similarities: list[float] = field(default_factory=list)


def _agreed_token(model: TPLlama, logits: torch.Tensor) -> int:
    choice = logits.argmax().reshape(1)
    return int(model.group.gather(choice)[0, 0])  # rank 0's choice


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def tp_decode(
    model: TPLlama, cache: KVRecallCache, input_ids: torch.Tensor, steps: int, forced: list[int] | None = None
) -> TPDecodeResult:
    """Prefill input_ids [1, T] through the session, then `steps` greedy (or `forced`) tokens.
    Logits[i] is the distribution the i-th generated token was read from."""
    device = input_ids.device
    started = time.perf_counter()
    logits = [model(input_ids, 0, cache)]
    sync(device)
    prefill = time.perf_counter() - started
    position = input_ids.shape[1]
    tokens: list[int] = []
    boundary_steps: list[int] = []
    append_steps: list[int] = []
    step_seconds: list[float] = []
    for step in range(steps):
        token = forced[step] if forced is not None else _agreed_token(model, logits[-1])
        tokens.append(token)
        if step == steps - 1:
            break
        boundaries, appends = cache.stats.boundaries, cache.stats.appends
        started = time.perf_counter()
        logits.append(model(torch.tensor([[token]], device=device), position, cache))
        sync(device)
        step_seconds.append(time.perf_counter() - started)
        if cache.stats.boundaries > boundaries:
            boundary_steps.append(step)
        if cache.stats.appends > appends:
            append_steps.append(step)
        position += 1
    cache.session.flush()
    return TPDecodeResult(
        tokens=tokens,
        logits=[x.float().cpu() for x in logits[: len(tokens)]],
        boundary_steps=boundary_steps,
        append_steps=append_steps,
        step_seconds=step_seconds,
        prefill_seconds=prefill,
        similarities=list(cache.stats.similarities),
    )
