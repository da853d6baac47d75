"""Warm-up at daemon start: run the serving path once per configured (dtype, head dim), so
Triton compiles its kernels (or loads them from its on-disk cache, TRITON_CACHE_DIR) before
the first session instead of inside it.

Each shape gets a few throw-away sessions (louiskv, quest, windowkv, snapkv) on the serving
device: a streamed ingest, an append, a boundary with one and with several queries per head,
a chunk, and Boundaries calls over two sessions of a policy (retrievals, then notices); then they are closed, so the pools are back to zero when the daemon serves. On
a CPU daemon the kernels are PyTorch references with nothing to compile: nothing runs.
"""

from __future__ import annotations

import logging
import time

import torch

from kvrecall import kernels
from kvrecall.server import streams
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies import build_policy
from kvrecall.server.session import SessionRegistry
from kvrecall.server.step_batch import serve_step
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.warmup")

WORKER = "kvrecall-warmup"
PROMPT = 640
LONG_PROMPT = 4800  # more than the selection kernel's small variant of units per row (256 at 16 tokens each)
# Triton specialises an integer argument on whether it is a multiple of 16: 4,800 tokens make
# 300 clusters (not one), 8,192 make 512 (one, as every full 8K k-means segment of a long prompt
# does), so the k-means and selection kernels are compiled for both.
SEGMENT_PROMPT = 8192
# (policy, prompt tokens): every policy once, and louiskv at budgets that reach each compiled
# variant of the placement kernel (kvrecall.kernels.placement_triton.RETRIEVED_BLOCKS) and of
# the selection kernel (budget_triton: up to SMALL_UNITS units per row, and more).
POLICIES = (
    (pb.PolicyConfig(name="louiskv", louiskv=pb.LouisKVConfig(budget=128)), PROMPT),
    (pb.PolicyConfig(name="louiskv", louiskv=pb.LouisKVConfig(budget=128, ingest_select="units")), PROMPT),
    (pb.PolicyConfig(name="louiskv", louiskv=pb.LouisKVConfig(budget=1024)), SEGMENT_PROMPT),
    (pb.PolicyConfig(name="louiskv", louiskv=pb.LouisKVConfig(budget=4000)), LONG_PROMPT),
    (pb.PolicyConfig(name="quest", quest=pb.QuestConfig(budget=128)), PROMPT),
    (pb.PolicyConfig(name="windowkv", windowkv=pb.WindowKVConfig(budget=128, keep_pruned_in_host=True)), PROMPT),
    (pb.PolicyConfig(name="snapkv", snapkv=pb.SnapKVConfig(budget=128)), PROMPT),
)
# Deferred eviction (the engine's sessions) compiles the notice kernel without its ring clear,
# with and without louiskv's sums: a first notice compiling it stalled a 32K x 8 bench 1.5 s.
DEFERRED = (POLICIES[0], POLICIES[4])


def warm_up(registry: SessionRegistry, shapes: list[tuple[torch.dtype, int]]) -> float:
    """Run every policy's serving path for each (dtype, head dim); returns the seconds taken."""
    device = registry.device_pool.device
    if device.type != "cuda" or not shapes:
        return 0.0
    started = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(0)
    for dtype, head_dim in shapes:
        for (message, prompt), deferred in [*((p, False) for p in POLICIES), *((p, True) for p in DEFERRED)]:
            layout = ModelLayout(num_layers=2, num_kv_heads=8, num_query_heads=32, head_dim=head_dim, dtype=dtype,
                                 max_tokens=prompt + 256)  # fmt: skip
            _run_policy(registry, layout, message, prompt, device, generator, deferred)
    _long_rows(device, generator)
    torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _long_rows(device: torch.device, generator: torch.Generator) -> None:
    """The selection kernel's variant for rows of more units than its block holds (a prompt of
    64K tokens and more at louiskv's 16 a cluster: budget_triton's chunked kernel), on random
    scores: a prompt that long would make the policies' warm-up slow."""
    from kvrecall.kernels.budget_triton import MAX_UNITS

    scores = torch.randn(2, MAX_UNITS + 17, device=device, generator=generator)
    sizes = torch.randint(1, 32, scores.shape, device=device, generator=generator, dtype=torch.int32)
    kernels.select_under_budget(scores, sizes, 1024)


def _staged_retrieval(sessions, randn) -> None:
    """A background retrieval whose rows its workers copy (worker_copy_share; the staged plan's
    variant that also writes the targets where the host reads them): the warm-up's sessions are
    inline (no segment, no staging area), so each gets a stand-in staging area for the call."""
    from kvrecall.kernels.placement_staged import Staging

    for session in sessions:
        ws = session.ws
        rows, D = ws.rows * ws.plan.retrieved, ws.keys.shape[-1]
        ws.staging = Staging(ws.keys.new_empty(rows, D), ws.values.new_empty(rows, D),
                             torch.empty(rows, dtype=torch.int64, device=ws.keys.device))  # fmt: skip
        ws.query.copy_(randn(*ws.query.shape))
    try:
        events = [pb.StepEvent(position=s.spilled_upto, retrieve=True, worker_copies=True) for s in sessions]
        serve_step(sessions, events, background=True)
    finally:
        for session in sessions:
            session.ws.staging = None


def _run_policy(
    registry, layout: ModelLayout, message: pb.PolicyConfig, prompt: int, device, generator, deferred: bool = False
) -> None:  # fmt: skip
    """One policy's serving path: a session through a streamed ingest, an append, boundaries
    and a chunk; a second one beside it, then a Boundaries call retrieving for both (the
    batched retrieval, segment closing and placement kernels). `deferred`: sessions with
    deferred eviction (OpenSessionRequest.deferred_eviction)."""
    L, H, Hq, D = layout.num_layers, layout.num_kv_heads, layout.num_query_heads, layout.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=generator).to(layout.dtype)

    sessions = []
    try:
        for _ in range(2):
            policy = build_policy(message, layout)
            sessions.append(registry.open(WORKER, layout, policy, pb.TRANSPORT_INLINE, 60.0, "warm-up", deferred=deferred))
        kv = randn(L, 2, H, prompt + 80, D)
        queries = randn(L, Hq, max(1, policy.observation()), D).float()
        for session in sessions:
            for layer in range(L):  # streamed, as workers send it
                session.ingest(layer, kv[layer : layer + 1, :, :, :prompt], queries[layer : layer + 1])
        session = sessions[0]
        spill = session.plan.spill_every
        session.append(prompt + spill, kv[:, :, :, prompt : prompt + spill])
        session.boundary(prompt + spill, [], randn(L, Hq, D).float())
        for n in (8, 32):  # several queries per head: a chunk's retrieval (KVRecallCache.chunk_queries)
            session.boundary(prompt + spill, [1], randn(1, Hq, n, D).float())
        session.chunk(prompt + spill, kv[:, :, :, prompt + spill :].contiguous())
        for other in sessions:
            other.ws.query.copy_(randn(L, Hq, D))
        retrieve = [pb.StepEvent(position=other.spilled_upto, retrieve=True) for other in sessions]
        serve_step(sessions, retrieve)
        for other in sessions:
            other.ws.query.copy_(randn(L, Hq, D))
        try:  # a background retrieval: its rows by the copy engine, the staged plan's kernel (staged_plan_triton)
            serve_step(sessions, retrieve, background=True)
            _staged_retrieval(sessions, randn)
        except Exception as exc:  # noqa: BLE001 - a warm-up: the first worker's retrieval compiles it instead
            log.warning("warm-up: the background retrieval path failed (%s: %s); it compiles on first use",
                        type(exc).__name__, exc)  # fmt: skip
        # both sessions' notices in one launch (kernels.spill_evict_many; with louiskv, its sums), on
        # the stream the service serves notices on (its allocator pool and kernels loaded before a worker waits)
        notices = [pb.StepEvent(position=other.spilled_upto + spill, notice=True) for other in sessions]
        streams.on_stream(streams.notice_stream(device), serve_step, sessions, notices)
    finally:
        for session in sessions:
            registry.close(session)
