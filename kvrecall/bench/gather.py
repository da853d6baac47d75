"""Part 2: gathering rows from pinned host memory into a GPU buffer, as a share of the copy ceiling.

Rows are picked uniformly at random from the whole host pool (GiBs, far past any cache), so
every row is a separate PCIe read. ``Gatherer`` carries the tuned launch configuration and the
faster backend per row size into the decode benchmark.

Two measurements:

* ``triton`` / ``cupy``: the benchmark's own kernels (``kvrecall.bench.kernels``), one random
  index set per point reused by every timed call (address translations stay warm);
* ``kv-<variant>``: the project's kernel (``kvrecall.kernels.row_gather_triton``: triton, triton+sort,
  cupy, cupy+sort), every call in a timed batch reading a *fresh* index set (cold
  translations, as a retrieval that fetches new rows), batches replayed as CUDA graphs so host
  launch overhead stays out. ``kvrecall_fastest`` names the variant to make the default.

``diagnostics`` (GPU only) separates the causes of the small-row gap: the same index set
reused vs fresh ones, rows confined to a smaller region of the pool (translation reach), rows
sorted by address, and a second pool backed by 2 MB transparent huge pages registered with
cudaHostRegister (fewer, larger pages to translate).
"""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrecall.bench import kernels
from kvrecall.bench.ceilings import HostPool
from kvrecall.bench.common import GiB, gbps, inner_for, log, time_fn

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

    def __call__(
        self, src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor | None = None
    ) -> None:
        row_bytes = src.shape[1] * src.element_size()
        backend, per_prog, warps = self.per_row.get(row_bytes, (self.backend, None, 4))
        kernels.gather_rows(
            src, src_idx, dst, dst_idx, backend=backend, rows_per_prog=per_prog, num_warps=warps
        )

    def describe(self) -> dict[str, Any]:
        return {
            "default_backend": self.backend,
            "per_row_bytes": {
                str(k): {"backend": b, "rows_per_prog": r, "num_warps": w}
                for k, (b, r, w) in sorted(self.per_row.items())
            },
        }


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


def check_gather(
    pool: HostPool, device: torch.device, backend: str, row_bytes: int, n_rows: int
) -> str | None:
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


def _time_gather(
    src: torch.Tensor,
    idx: torch.Tensor,
    dst: torch.Tensor,
    device: torch.device,
    reps: int,
    backend: str,
    config: tuple[int | None, int],
) -> float:
    """Median milliseconds of one gather (small gathers are timed in back-to-back batches)."""
    per_prog, warps = config

    def run() -> None:
        kernels.gather_rows(src, idx, dst, backend=backend, rows_per_prog=per_prog, num_warps=warps)

    inner = inner_for(run, device)
    return time_fn(run, device, warmup=2, reps=reps, inner=inner).median_ms


def _tune_triton(
    pool: HostPool, device: torch.device, row_bytes: int, n_rows: int, reps: int
) -> tuple[int, int]:
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


def measure_gather(
    pool: HostPool,
    device: torch.device,
    row_sizes: list[int],
    row_counts: list[int],
    ceiling_gbps: float,
    reps: int,
    want_cupy: bool,
    prefer: str = "auto",
) -> tuple[dict[str, Any], Gatherer | None]:
    """Gather GB/s per backend, row size and row count; returns the report and the Gatherer for
    the decode part: per row size the faster backend (``prefer="auto"``) or the one preferred."""
    report: dict[str, Any] = {
        "ceiling_GBps": ceiling_gbps,
        "pool_bytes": pool.n_bytes,
        "pinned": pool.pinned,
        "index": "uniform random rows over the whole pool",
        "backends": {},
        "checks": {},
    }
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
                points.append(
                    {
                        "row_bytes": row_bytes,
                        "rows": n_rows,
                        "bytes": n_rows * row_bytes,
                        "median_ms": ms,
                        "GBps": rate,
                        "pct_of_copy_ceiling": 100 * rate / ceiling_gbps,
                    }
                )
                if n_rows == max(row_counts) and (row_bytes not in best or rate > best[row_bytes][0]):
                    best[row_bytes] = (rate, backend, *config)
            top = max(p["GBps"] for p in points if p["row_bytes"] == row_bytes)
            log(
                f"  gather[{backend}] {row_bytes:>5} B rows: up to {top:.1f} GB/s "
                f"({100 * top / ceiling_gbps:.0f}% of copy)"
            )
        report["backends"][backend] = {"points": points, "triton_configs": configs or None}
    if device.type == "cuda":
        report["staged_cpu_gather"] = _staged_baseline(pool, device, reps)
    variants = measure_kvrecall_variants(pool, device, row_sizes, row_counts, ceiling_gbps, reps, want_cupy)
    report["backends"].update(variants.pop("backends"))
    report["checks"].update(variants.pop("checks"))
    report.update(variants)
    if device.type == "cuda":
        report["diagnostics"] = gather_diagnostics(pool, device, ceiling_gbps, reps)
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


def _staged_baseline(
    pool: HostPool, device: torch.device, reps: int, row_bytes: int = 2048, n_rows: int = 16384
) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- kvrecall.kernels variants

SMALL_ROW_BYTES = 256  # the target: >= 90% of the copy ceiling for rows >= this


def kvrecall_variants(device: torch.device, want_cupy: bool) -> tuple[list[str], dict[str, str]]:
    """The project gather variants that can run here, and why the others cannot."""
    if not kernels.triton_usable(device):
        return [], {"kv-*": "the project kernels need CUDA or TRITON_INTERPRET=1"}
    from kvrecall.kernels.row_gather_triton import cupy_available

    names, skipped = ["triton", "triton+sort"], {}
    if not want_cupy:
        skipped["kv-cupy"] = "disabled (--no-cupy)"
    elif device.type == "cuda" and cupy_available():
        names += ["cupy", "cupy+sort"]
    else:
        skipped["kv-cupy"] = "needs CUDA and an importable cupy"
    return names, skipped


def _launcher(variant: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]:
    """The project launcher for one variant, on arguments this module built (16-byte aligned)."""
    from kvrecall.kernels.row_gather_triton import GatherVariant, gather_rows_triton

    parsed = GatherVariant.parse(variant)

    def gather(
        src: torch.Tensor, src_start: torch.Tensor, dst: torch.Tensor, dst_start: torch.Tensor, row_len: int
    ) -> None:
        gather_rows_triton(src, src_start, dst, dst_start, row_len, True, parsed)

    return gather


def _index_sets(
    n_sets: int, n_rows: int, region_rows: int, row_len: int, device: torch.device, fresh: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(src_start, dst_start) element offsets: random rows of the first ``region_rows`` rows of the
    source, into consecutive destination rows; ``fresh``: a new set per call, else one shared."""
    dst_start = torch.arange(n_rows, device=device) * row_len
    sets = []
    for _ in range(n_sets if fresh else 1):
        sets.append((torch.randint(0, region_rows, (n_rows,), device=device) * row_len, dst_start))
    return sets * (1 if fresh else n_sets)


def _time_batches(run: Callable[[], None], device: torch.device, reps: int) -> tuple[float, bool]:
    """Median ms of ``run`` (a batch of calls), replayed as a CUDA graph where capture works."""
    run()  # compiles and warms up outside any capture
    if device.type != "cuda":
        return time_fn(run, device, warmup=0, reps=reps).median_ms, False
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):  # is_pinned() queries the driver
            run()
    except Exception:  # e.g. an engine that cannot be captured: time the calls eagerly
        torch.cuda.synchronize(device)
        return time_fn(run, device, warmup=1, reps=reps).median_ms, False
    return time_fn(graph.replay, device, warmup=1, reps=reps).median_ms, True


def time_variant(
    src: torch.Tensor,
    dst: torch.Tensor,
    device: torch.device,
    variant: str,
    row_bytes: int,
    n_rows: int,
    region_rows: int,
    reps: int,
    fresh: bool = True,
) -> dict[str, Any]:
    """GB/s of one project variant: batches of calls, each on its own (or one shared) index set."""
    row_len = row_bytes // src.element_size()
    gather = _launcher(variant)
    n_bytes = n_rows * row_bytes
    calls = 1
    if device.type == "cuda":  # batches of ~2 ms (40 GB/s + 5 us a call), >= 256K fresh rows a batch
        calls = max(
            1, min(64, int(2000 / (n_bytes / 40e3 + 5))), min(64, -(-262144 // n_rows)) if fresh else 1
        )
    sets = _index_sets(calls, n_rows, region_rows, row_len, device, fresh)

    def run() -> None:
        for src_start, dst_start in sets:
            gather(src, src_start, dst, dst_start, row_len)

    ms, graphed = _time_batches(run, device, reps)
    ms /= len(sets)
    return {
        "row_bytes": row_bytes,
        "rows": n_rows,
        "bytes": n_bytes,
        "median_ms": ms,
        "GBps": gbps(n_bytes, ms),
        "calls_per_batch": len(sets),
        "graphed": graphed,
        "fresh_indices": fresh,
        "region_bytes": region_rows * row_bytes,
    }


def check_variant(
    pool: HostPool, device: torch.device, variant: str, row_bytes: int, n_rows: int
) -> str | None:
    """One call of a project variant on fresh rows against index_select. Returns an error or None."""
    src = pool.view(torch.int32)
    row_len = row_bytes // 4
    rows = torch.randint(0, src.numel() // row_len, (n_rows,), device=device)
    dst_rows = torch.randperm(n_rows, device=device)
    dst = torch.full((n_rows * row_len,), -123456, dtype=torch.int32, device=device)
    try:
        _launcher(variant)(src, rows * row_len, dst, dst_rows * row_len, row_len)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    want = torch.empty(n_rows, row_len, dtype=torch.int32)
    want[dst_rows.cpu()] = src.view(-1, row_len).index_select(0, rows.to(src.device)).cpu()
    return None if torch.equal(dst.view(n_rows, row_len).cpu(), want) else "mismatch against index_select"


def measure_kvrecall_variants(
    pool: HostPool,
    device: torch.device,
    row_sizes: list[int],
    row_counts: list[int],
    ceiling_gbps: float,
    reps: int,
    want_cupy: bool,
) -> dict[str, Any]:
    """The project kernel's variants over the same grid as the backends, fresh indices per call."""
    names, skipped = kvrecall_variants(device, want_cupy)
    out: dict[str, Any] = {"backends": {}, "checks": {}, "kvrecall_skipped": skipped}
    src = pool.view(torch.int32)
    dst = torch.empty(max(row_counts) * max(row_sizes) // 4, dtype=torch.int32, device=device)
    for variant in names:
        key = f"kv-{variant}"
        errors = {rb: check_variant(pool, device, variant, rb, min(row_counts)) for rb in row_sizes}
        out["checks"][key] = {str(rb): err or "ok" for rb, err in errors.items()}
        if any(errors.values()):
            log(f"  gather[{key}] check failed: {next(e for e in errors.values() if e)}")
            continue
        points = []
        for row_bytes in row_sizes:
            region = src.numel() * 4 // row_bytes
            for n_rows in row_counts:
                point = time_variant(src, dst, device, variant, row_bytes, n_rows, region, reps)
                point["pct_of_copy_ceiling"] = 100 * point["GBps"] / ceiling_gbps
                points.append(point)
            last = points[-1]
            log(
                f"  gather[{key}] {row_bytes:>5} B x {last['rows']}: {last['GBps']:.1f} GB/s "
                f"({last['pct_of_copy_ceiling']:.0f}% of copy, fresh rows)"
            )
        out["backends"][key] = {"points": points, "index": "fresh random rows per call, CUDA-graph batches"}
    out["kvrecall_fastest"] = _fastest(out["backends"], max(row_counts))
    return out


def _fastest(backends: dict[str, Any], n_rows: int) -> dict[str, Any]:
    """Per row size and over rows >= SMALL_ROW_BYTES: the variant with the least time at ``n_rows``."""
    per_size: dict[int, tuple[float, str]] = {}
    total: dict[str, float] = {}
    for key, report in backends.items():
        for p in report["points"]:
            if p["rows"] != n_rows:
                continue
            if p["row_bytes"] not in per_size or p["median_ms"] < per_size[p["row_bytes"]][0]:
                per_size[p["row_bytes"]] = (p["median_ms"], key)
            if p["row_bytes"] >= SMALL_ROW_BYTES:
                total[key] = total.get(key, 0.0) + p["median_ms"]
    return {
        "rows": n_rows,
        "per_row_bytes": {str(rb): k for rb, (_, k) in sorted(per_size.items())},
        "overall_rows_ge_256B": min(total, key=total.__getitem__) if total else None,
    }


# --------------------------------------------------------------------------- diagnostics (GPU)


def gather_diagnostics(
    pool: HostPool,
    device: torch.device,
    ceiling_gbps: float,
    reps: int,
    row_bytes: int = SMALL_ROW_BYTES,
    n_rows: int = 65536,
) -> dict[str, Any]:
    """Where small rows lose their bandwidth: index reuse, region size, order, page size."""
    src = pool.view(torch.int32)
    dst = torch.empty(n_rows * row_bytes // 4, dtype=torch.int32, device=device)
    pool_rows = pool.n_bytes // row_bytes
    out: dict[str, Any] = {"row_bytes": row_bytes, "rows": n_rows, "points": []}

    def point(
        label: str,
        source: torch.Tensor,
        variant: str,
        region_rows: int,
        fresh: bool = True,
        rows: int = n_rows,
    ) -> None:
        p = time_variant(
            source, dst, device, variant, row_bytes, rows, min(region_rows, pool_rows), reps, fresh
        )
        p.update(label=label, variant=variant, pct_of_copy_ceiling=100 * p["GBps"] / ceiling_gbps)
        out["points"].append(p)
        log(
            f"  diag {label:<22} {variant:<12} {rows:>6} x {row_bytes} B, region {p['region_bytes'] / GiB:6.3f} GiB"
            f"{'' if fresh else ', reused rows'}: {p['GBps']:5.1f} GB/s ({p['pct_of_copy_ceiling']:.0f}%)"
        )

    for rows in (16384, n_rows):
        point("reused-vs-fresh", src, "triton", pool_rows, fresh=False, rows=rows)
        point("reused-vs-fresh", src, "triton", pool_rows, fresh=True, rows=rows)
    for region in (64 << 20, 256 << 20, 1 << 30, pool.n_bytes):
        for variant in ("triton", "triton+sort"):
            point("region", src, variant, region // row_bytes)
    huge = HugePagePool.create(pool.n_bytes, device)
    out["huge_page_pool"] = huge.info
    if huge.data is not None:
        for variant in ("triton", "triton+sort"):
            point("2MB-THP-registered", huge.data.view(torch.int32), variant, pool_rows)
        huge.release()
    return out


class HugePagePool:
    """Host memory backed by 2 MB transparent huge pages, page-locked with cudaHostRegister.

    cudaHostAlloc (PyTorch's pinned allocator) hands out 4 KB pages; a GPU reading random rows
    of it translates one page per row. Whether the driver maps huge pages with large GPU pages
    is what this pool lets the benchmark measure. ``data`` is None where it could not be made
    (``info`` says why). The mapping is owned here; ``release`` unregisters it.
    """

    def __init__(self, data: torch.Tensor | None, info: dict[str, Any], keep: Any = None):
        self.data, self.info, self._keep = data, info, keep

    @classmethod
    def create(cls, n_bytes: int, device: torch.device) -> HugePagePool:
        info: dict[str, Any] = {
            "bytes": n_bytes,
            "thp_setting": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        }
        align = 2 << 20
        try:
            before = _anon_huge_kib()
            area = mmap.mmap(-1, n_bytes + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area.madvise(mmap.MADV_HUGEPAGE)
            whole = torch.frombuffer(area, dtype=torch.uint8)
            offset = -whole.data_ptr() % align
            data = whole[offset : offset + n_bytes]
            start = time.perf_counter()
            data.view(torch.int64).fill_(0x3F803F803F803F80)  # touch every page: bf16 ones
            info["fill_s"] = round(time.perf_counter() - start, 2)
            info["anon_huge_pages_gained_bytes"] = (_anon_huge_kib() - before) * 1024
            start = time.perf_counter()
            err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), n_bytes, 0)
            info["register_s"] = round(time.perf_counter() - start, 2)
            info["cudaHostRegister"] = int(err)
            if int(err) != 0 or not data.is_pinned():
                info["error"] = f"cudaHostRegister returned {int(err)}; is_pinned={data.is_pinned()}"
                return cls(None, info)
        except Exception as exc:
            info["error"] = f"{type(exc).__name__}: {exc}"[:300]
            return cls(None, info)
        log(
            f"  2MB-THP pool: {info['anon_huge_pages_gained_bytes'] / GiB:.2f} GiB in huge pages, "
            f"registered in {info['register_s']} s"
        )
        return cls(data, info, (area, whole))

    def release(self) -> None:
        if self.data is not None:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self.data = None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _anon_huge_kib() -> int:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0
