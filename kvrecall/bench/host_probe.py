"""How fast this host's CPU work runs now: a fixed gather and a fixed interpreter loop, timed.

bench e2e records it before and after its runs (meta.host_probe). On the H200 machines lent on
2026-12-03 the same A/B's runs differed 2-3x in host work (the daemon's selection 1.3 against
3.0-3.8 ms, its gather 3.8 against 6.7-12 ms) while the GPU's work did not, and those runs met
late answers the others did not: with the probe beside the figures a slow episode shows as one.
"""

from __future__ import annotations

import time

import torch

ROWS = 1 << 20  # the source: 1 Mi rows of 128 bf16 (256 MiB), as a daemon's host tier pages
GATHERED = 1 << 16  # rows gathered a round: one staging chunk (placement_staged.CHUNK_ROWS)
LOOP = 200_000  # interpreter iterations a round


def host_probe(rounds: int = 3) -> dict[str, float]:
    """{"gather_ms", "python_ms"}: the best of `rounds` of a random-row index_select of
    GATHERED rows into a preallocated buffer, and of LOOP iterations of plain Python."""
    source = torch.zeros((ROWS, 128), dtype=torch.bfloat16)
    index = torch.randint(0, ROWS, (GATHERED,), generator=torch.Generator().manual_seed(0))
    out = torch.empty((GATHERED, 128), dtype=torch.bfloat16)
    gather = loop = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        torch.index_select(source, 0, index, out=out)
        gather = min(gather, time.perf_counter() - started)
        started = time.perf_counter()
        total = 0
        for i in range(LOOP):
            total += i & 7
        loop = min(loop, time.perf_counter() - started)
    return {"gather_ms": round(gather * 1e3, 3), "python_ms": round(loop * 1e3, 3)}
