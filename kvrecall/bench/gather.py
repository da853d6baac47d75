"""Part 2: gathering rows from pinned host memory into a GPU buffer, as a share of the copy ceiling.

Rows are picked uniformly at random from the whole host pool (GiBs, far past any cache), so
every row is a separate PCIe read. ``Gatherer`` carries the tuned launch configuration and the
faster backend per row size into the decode benchmark.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrecall.bench import kernels
from kvrecall.bench.ceilings import HostPool
from kvrecall.bench.common import gbps, inner_for, log, time_fn

# Triton launch configurations tried per row size: (bytes moved per program, warps per program).
TRITON_CONFIGS: tuple[tuple[int, int], ...] = ((8192, 4), (16384, 4), (32768, 8))


@dataclass
class Gatherer:
    """A gather with a backend and launch configuration chosen per row size (bytes).

    ``backend`` is the default; ``per_row`` overrides it with (backend, rows_per_prog, num_warps)
    where part 2 measured something faster.
    """

    backend: str
    per_row: dict[int, tuple[str, int | None, int]] = field(default_factory=dict)

    def __call__(self, src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor,
                 dst_idx: torch.Tensor | None = None) -> None:
        row_bytes = src.shape[1] * src.element_size()
        backend, per_prog, warps = self.per_row.get(row_bytes, (self.backend, None, 4))
        kernels.gather_rows(src, src_idx, dst, dst_idx, backend=backend, rows_per_prog=per_prog, num_warps=warps)

    def describe(self) -> dict[str, Any]:
        return {"default_backend": self.backend,
                "per_row_bytes": {str(k): {"backend": b, "rows_per_prog": r, "num_warps": w}
                                  for k, (b, r, w) in sorted(self.per_row.items())}}


def available_backends(device: torch.device, want_cupy: bool) -> list[str]:
    """Gather backends that can run here (``torch`` is the CPU-side reference)."""
    found = []
    if kernels.triton_usable(device):
        found.append("triton")
    if want_cupy and kernels.cupy_usable(device):
        found.append("cupy")
    if device.type != "cuda":
        found.append("torch")
    return found


def _skipped_backends(device: torch.device, want_cupy: bool) -> dict[str, str]:
    """Why a kernel backend did not run here."""
    skipped = {}
    if not kernels.triton_usable(device):
        skipped["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to run it interpreted)"
    if not want_cupy:
        skipped["cupy"] = "disabled (--no-cupy)"
    elif not kernels.cupy_usable(device):
        skipped["cupy"] = "cupy not importable" if not kernels.HAVE_CUPY else "no CUDA device"
    return skipped


def check_gather(pool: HostPool, device: torch.device, backend: str, row_bytes: int, n_rows: int) -> str | None:
    """Fresh random rows, poisoned destination, exact comparison. Returns an error or None."""
    src = pool.view(torch.int32).view(-1, row_bytes // 4)
    idx = torch.randint(0, src.shape[0], (n_rows,), device=device)
    idx[::7] = -1  # skipped rows must stay untouched
    dst = torch.full((n_rows, src.shape[1]), -123456, dtype=torch.int32, device=device)
    try:
        kernels.gather_rows(src, idx, dst, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    idx_host = idx.cpu()
    valid = idx_host >= 0
    want = torch.full_like(dst.cpu(), -123456)
    want[valid] = src.index_select(0, idx_host[valid])
    if not torch.equal(dst.cpu(), want):
        return "mismatch against index_select"
    return None


def _time_gather(src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor, device: torch.device, reps: int,
                 backend: str, config: tuple[int | None, int]) -> float:
    """Median milliseconds of one gather (small gathers are timed in back-to-back batches)."""
    per_prog, warps = config

    def run() -> None:
        kernels.gather_rows(src, idx, dst, backend=backend, rows_per_prog=per_prog, num_warps=warps)

    inner = inner_for(run, device)
    return time_fn(run, device, warmup=2, reps=reps, inner=inner).median_ms


def _tune_triton(pool: HostPool, device: torch.device, row_bytes: int, n_rows: int, reps: int) -> tuple[int, int]:
    """Pick the fastest (rows per program, warps) for one row size at one row count."""
    src = pool.view(torch.int32).view(-1, row_bytes // 4)
    idx = torch.randint(0, src.shape[0], (n_rows,), device=device)
    dst = torch.empty((n_rows, src.shape[1]), dtype=torch.int32, device=device)
    best: tuple[float, tuple[int, int]] | None = None
    for prog_bytes, warps in TRITON_CONFIGS:
        config = (max(1, prog_bytes // row_bytes), warps)
        ms = _time_gather(src, idx, dst, device, reps, "triton", config)
        if best is None or ms < best[0]:
            best = (ms, config)
    assert best is not None
    return best[1]


def measure_gather(pool: HostPool, device: torch.device, row_sizes: list[int], row_counts: list[int],
                   ceiling_gbps: float, reps: int, want_cupy: bool, prefer: str = "auto"
                   ) -> tuple[dict[str, Any], Gatherer | None]:
    """Gather GB/s per backend, row size and row count; returns the report and the Gatherer for
    the decode part: per row size the faster backend (``prefer="auto"``) or the one preferred."""
    report: dict[str, Any] = {"ceiling_GBps": ceiling_gbps, "pool_bytes": pool.n_bytes, "pinned": pool.pinned,
                              "index": "uniform random rows over the whole pool", "backends": {}, "checks": {}}
    backends = available_backends(device, want_cupy)
    report["skipped_backends"] = _skipped_backends(device, want_cupy)
    working = []
    for backend in backends:
        errors = {rb: check_gather(pool, device, backend, rb, min(row_counts)) for rb in row_sizes}
        report["checks"][backend] = {str(rb): err or "ok" for rb, err in errors.items()}
        if any(errors.values()):
            log(f"  gather[{backend}] check failed: {next(e for e in errors.values() if e)}")
            continue
        working.append(backend)
    best: dict[int, tuple[float, str, int | None, int]] = {}
    for backend in working:
        points, configs = [], {}
        for row_bytes in row_sizes:
            config: tuple[int | None, int] = (None, 4)
            if backend == "triton":
                config = _tune_triton(pool, device, row_bytes, min(16384, max(row_counts)), reps)
                configs[str(row_bytes)] = {"rows_per_prog": config[0], "num_warps": config[1]}
            src = pool.view(torch.int32).view(-1, row_bytes // 4)
            for n_rows in row_counts:
                idx = torch.randint(0, src.shape[0], (n_rows,), device=device)
                dst = torch.empty((n_rows, src.shape[1]), dtype=torch.int32, device=device)
                ms = _time_gather(src, idx, dst, device, reps, backend, config)
                rate = gbps(n_rows * row_bytes, ms)
                points.append({"row_bytes": row_bytes, "rows": n_rows, "bytes": n_rows * row_bytes,
                               "median_ms": ms, "GBps": rate, "pct_of_copy_ceiling": 100 * rate / ceiling_gbps})
                if n_rows == max(row_counts) and (row_bytes not in best or rate > best[row_bytes][0]):
                    best[row_bytes] = (rate, backend, *config)
            top = max(p["GBps"] for p in points if p["row_bytes"] == row_bytes)
            log(f"  gather[{backend}] {row_bytes:>5} B rows: up to {top:.1f} GB/s "
                f"({100 * top / ceiling_gbps:.0f}% of copy)")
        report["backends"][backend] = {"points": points, "triton_configs": configs or None}
    if device.type == "cuda":
        report["staged_cpu_gather"] = _staged_baseline(pool, device, reps)
    if not working:
        return report, None
    if prefer in working:
        tuned = report["backends"][prefer]["triton_configs"] or {}
        per_row = {int(rb): (prefer, c["rows_per_prog"], c["num_warps"]) for rb, c in tuned.items()}
        gatherer = Gatherer(prefer, per_row)
    else:
        default = "triton" if "triton" in working else working[0]
        gatherer = Gatherer(default, {rb: (b, rp, w) for rb, (_, b, rp, w) in best.items()})
    report["chosen"] = gatherer.describe()
    return report, gatherer


def _staged_baseline(pool: HostPool, device: torch.device, reps: int, row_bytes: int = 2048,
                     n_rows: int = 16384) -> dict[str, Any]:
    """The slow way for contrast: index_select on the CPU into pinned staging, then one copy."""
    src = pool.view(torch.int32).view(-1, row_bytes // 4)
    idx = torch.randint(0, src.shape[0], (n_rows,))
    staging = torch.empty((n_rows, src.shape[1]), dtype=torch.int32, pin_memory=True)
    dst = torch.empty_like(staging, device=device)

    def run() -> None:
        torch.index_select(src, 0, idx, out=staging)
        dst.copy_(staging, non_blocking=True)
        torch.cuda.synchronize(device)  # the staging buffer is reused by the next call

    run()
    samples = []
    for _ in range(max(3, reps // 2)):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(samples)
    return {"row_bytes": row_bytes, "rows": n_rows, "median_ms": ms, "GBps": gbps(n_rows * row_bytes, ms)}
