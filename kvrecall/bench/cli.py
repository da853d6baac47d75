"""``python -m kvrecall.bench``: run the parts, print a table, write JSON (and a PNG plot).

Each part is guarded: a failure is recorded under ``errors`` and the next part still runs, and
the JSON is rewritten after every part, so a run cut short still leaves its numbers behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvrecall.bench import kernels
from kvrecall.bench.ceilings import HostPool, copy_ceiling_gbps, measure_ceilings
from kvrecall.bench.cluster import bench_clustering
from kvrecall.bench.common import GiB, free_memory, log, run_metadata
from kvrecall.bench.decode import DecodeOptions, bench_concurrency, bench_decode
from kvrecall.bench.gather import Gatherer, measure_gather
from kvrecall.bench.model import LLAMA3_8B, TINY, ModelShape, RandomLlama
from kvrecall.bench.policies import ResidentLayout
from kvrecall.bench.report import format_table, headline, plot_decode

PARTS = ("ceilings", "gather", "decode", "concurrency", "clustering")

NOTES = [
    "Timing: CUDA events, median over repetitions after warm-up. Decode steps are captured as CUDA "
    "graphs and timed by replay (each entry says graphed=true/false).",
    "EMULATION: this benchmark models the decode step (random weights, strided fake clusters, a fixed "
    "boundary rate averaged in); `kvrecall bench e2e` measures the product path (engine + daemon).",
    "Decode attention is torch SDPA's GQA kernel (enable_gqa, query heads as heads), for every policy.",
    "Every ratio is computed from numbers measured in this run.",
    "Host KV: one pinned pool; layer l of sequence b uses host slot (l % Lh, b % Bh), as many as the "
    "pool holds (host_shared says when). Rows are gathered at random from GiBs of pinned memory, so "
    "bytes moved per step and the access pattern are those of a full-size host cache.",
    "full: when the KV of all layers exceeds --kv-mem-gib, fewer layers' buffers are allocated and "
    "shared by all layers (same bytes read per step; the entry has fits=false and says so).",
    "perstep-host-a fetches every selected page every step; perstep-host-b fetches (1 - page_overlap) "
    "of them (with random weights a replayed step selects the same pages, so the overlap is set, "
    "default 0.8, the within-segment overlap LouisKV reports).",
    "louiskv: plain step = bound + per-layer query write + boundary test; boundary step = plain step + "
    "one retrieval of all layers (centroid scoring, top-k, residency plan, gather of the missing "
    "rows); average step = (1 - r) plain + r boundary. boundary_miss=1.0 fetches the whole budget "
    "at every boundary (the worst case). Clusters are emulated as strided token sets of unit tokens.",
    "Not modelled (small next to what is): the periodic spill of window tokens to host, Quest's "
    "page-bound update for the newest page, the boundary event's RPC (in-process numbers).",
]


@dataclass
class Settings:
    """Everything a run depends on; written into the JSON."""

    shape: ModelShape
    layout: ResidentLayout
    contexts: list[int]
    batches: list[int]
    pool_bytes: int
    copy_bytes: int
    gemm_n: int
    gather_row_bytes: list[int]
    gather_rows: list[int]
    rates: list[float]
    measured_rate: float
    measured_rate_source: str
    page_overlap: float
    boundary_miss: float
    kv_mem_limit: int
    gpu_kv_cap: int
    host_cap: int
    concurrency_context: int
    cluster_tokens: int
    kmeans_iters: int
    reps: int
    use_graph: bool
    use_cupy: bool
    gather_backend: str
    time_budget_s: float
    parts: list[str]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvrecall.bench", description=__doc__)
    p.add_argument("--out", default="results.json", help="JSON output path")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--contexts", type=_ints, default=None, help="decode contexts (default 8192,32768,131072)")
    p.add_argument("--batches", type=_ints, default=None, help="decode batches (default 1,8)")
    p.add_argument("--rates", type=_floats, default=[0.05, 0.1, 0.2], help="louiskv boundary rates")
    p.add_argument("--measured-rate", type=float, default=0.1, help="boundary rate from the accuracy runs")
    p.add_argument("--measured-rate-source", default="CLI default 0.1 (not yet measured on the real model)")
    p.add_argument("--page-overlap", type=float, default=0.8, help="perstep-host-b step-to-step page overlap")
    p.add_argument("--boundary-miss", type=float, default=1.0, help="louiskv share of the budget fetched per boundary")
    p.add_argument("--host-pool-gib", type=float, default=None, help="pinned host pool (default 4)")
    p.add_argument("--kv-mem-gib", type=float, default=40.0, help="most full-KV GPU memory allocated")
    p.add_argument("--gpu-kv-cap-gib", type=float, default=None, help="concurrency GPU KV cap (default 16)")
    p.add_argument("--host-cap-gib", type=float, default=None, help="concurrency pinned host cap (default 96)")
    p.add_argument("--concurrency-context", type=int, default=None, help="default 32768")
    p.add_argument("--cluster-tokens", type=int, default=None, help="default 32768")
    p.add_argument("--kmeans-iters", type=int, default=None, help="default 5")
    p.add_argument("--gather-row-bytes", type=_ints, default=None, help="default 128,...,4096")
    p.add_argument("--gather-rows", type=_ints, default=None, help="default 1024,...,65536")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, quick 3)")
    p.add_argument("--no-graph", action="store_true", help="time decode steps eagerly")
    p.add_argument("--time-budget-s", type=float, default=360.0,
                   help="no new decode configuration or part starts after this many seconds")
    p.add_argument("--no-cupy", action="store_true", help="skip the cupy gather")
    p.add_argument("--gather-backend", choices=["auto", "triton", "cupy", "torch"], default="auto",
                   help="gather used by the decode part (auto: the faster one measured per row size)")
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    quick = args.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    return Settings(
        shape=TINY if quick else LLAMA3_8B,
        layout=ResidentLayout(n_sink=16, budget=64, window=16) if quick else ResidentLayout(),
        contexts=pick(args.contexts, [8192, 32768, 131072], [256, 512]),
        batches=pick(args.batches, [1, 8], [1, 2]),
        pool_bytes=int(pick(args.host_pool_gib, 4.0, 1 / 64) * GiB),
        copy_bytes=GiB if not quick else 16 << 20,
        gemm_n=8192 if not quick else 256,
        gather_row_bytes=pick(args.gather_row_bytes, [128, 256, 512, 1024, 2048, 4096], [128, 1024]),
        gather_rows=pick(args.gather_rows, [1 << k for k in range(10, 17)], [64, 256]),
        rates=args.rates,
        measured_rate=args.measured_rate,
        measured_rate_source=args.measured_rate_source,
        page_overlap=args.page_overlap,
        boundary_miss=args.boundary_miss,
        kv_mem_limit=int(args.kv_mem_gib * GiB),
        gpu_kv_cap=int(pick(args.gpu_kv_cap_gib, 16.0, 1 / 1024) * GiB),
        host_cap=int(pick(args.host_cap_gib, 96.0, 2 / 1024) * GiB),
        concurrency_context=pick(args.concurrency_context, 32768, 512),
        cluster_tokens=pick(args.cluster_tokens, 32768, 1024),
        kmeans_iters=pick(args.kmeans_iters, 5, 2),
        reps=pick(args.reps, 20, 3),
        use_graph=not args.no_graph,
        use_cupy=not args.no_cupy,
        gather_backend=args.gather_backend,
        time_budget_s=args.time_budget_s,
        parts=[p for p in args.parts.split(",") if p],
    )


class Run:
    """One benchmark run: the settings, the shared state between parts, and the results."""

    def __init__(self, settings: Settings, device: torch.device, argv: list[str], out: str):
        self.s, self.device, self.out = settings, device, out
        self.deadline = time.perf_counter() + settings.time_budget_s
        self.results: dict[str, Any] = {
            "meta": run_metadata(device, argv),
            "config": {**asdict(settings), "shape": asdict(settings.shape), "layout": asdict(settings.layout)},
            "notes": NOTES, "checks": {}, "errors": {}, "skipped": {}, "part_seconds": {},
        }
        self.results["config"]["measured_rate_source"] = settings.measured_rate_source
        self.pool: HostPool | None = None
        self.gatherer: Gatherer | None = None
        self.model: RandomLlama | None = None
        self.plan_backend = "triton" if kernels.triton_usable(device) else "torch"

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out, "w") as f:
            json.dump(self.results, f, indent=1, default=str)

    def part(self, name: str, fn: Callable[[], Any]) -> None:
        if name not in self.s.parts:
            self.results["skipped"][name] = "not selected (--parts)"
            return
        if time.perf_counter() > self.deadline:
            self.results["skipped"][name] = f"time budget of {self.s.time_budget_s:.0f} s spent"
            log(f"[{name}] skipped: time budget spent")
            return
        log(f"[{name}]")
        start = time.perf_counter()
        try:
            self.results[name] = fn()
        except Exception:
            self.results["errors"][name] = traceback.format_exc()[-3000:]
            log(f"  {name} failed:\n{self.results['errors'][name]}")
        self.results["part_seconds"][name] = round(time.perf_counter() - start, 1)
        log(f"  ({self.results['part_seconds'][name]} s)")
        free_memory(self.device)
        self.save()

    def host_pool(self) -> HostPool:
        if self.pool is None:
            start = time.perf_counter()
            self.pool = HostPool(self.s.pool_bytes, self.device)
            log(f"  host pool {self.s.pool_bytes / GiB:.2f} GiB {'pinned' if self.pool.pinned else 'plain'} "
                f"in {time.perf_counter() - start:.1f} s")
        return self.pool

    def llama(self) -> RandomLlama:
        if self.model is None:
            self.model = RandomLlama(self.s.shape, self.device)
            log(f"  model: {self.s.shape.weight_bytes / GiB:.1f} GiB of random bf16 weights")
        return self.model

    def gather_fn(self) -> Gatherer | None:
        """The tuned gatherer from part 2, else an untuned one where a backend can run here."""
        if self.gatherer is None:
            forced = self.s.gather_backend
            if forced != "auto":
                self.gatherer = Gatherer(forced)
            elif kernels.triton_usable(self.device):
                self.gatherer = Gatherer("triton")
            elif self.device.type != "cuda":
                self.gatherer = Gatherer("torch")
        return self.gatherer

    def ceilings(self) -> dict[str, Any]:
        return measure_ceilings(self.host_pool(), self.device, self.s.copy_bytes, self.s.gemm_n, self.s.reps)

    def gather(self) -> dict[str, Any]:
        ceiling = copy_ceiling_gbps(self.results["ceilings"]) if "ceilings" in self.results else None
        if ceiling is None:
            ceiling = copy_ceiling_gbps(self.ceilings())
        report, self.gatherer = measure_gather(self.host_pool(), self.device, self.s.gather_row_bytes,
                                               self.s.gather_rows, ceiling, self.s.reps, self.s.use_cupy,
                                               self.s.gather_backend)
        return report

    def decode_options(self) -> DecodeOptions:
        s = self.s
        return DecodeOptions(layout=s.layout, rates=s.rates, measured_rate=s.measured_rate,
                             page_overlap=s.page_overlap, boundary_miss=s.boundary_miss, kv_mem_limit=s.kv_mem_limit,
                             plan_backend=self.plan_backend, reps=s.reps, use_graph=s.use_graph,
                             deadline=self.deadline)

    def decode(self) -> dict[str, Any]:
        self.results["checks"]["plan_fetch"] = kernels.check_plan_fetch(self.device, self.plan_backend)
        gatherer = self.gather_fn()
        out = bench_decode(self.llama(), self.host_pool(), gatherer, self.s.contexts, self.s.batches,
                           self.decode_options())
        out["gather"] = gatherer.describe() if gatherer else None
        out["plan_backend"] = self.plan_backend
        return out

    def concurrency(self) -> dict[str, Any]:
        return bench_concurrency(self.llama(), self.host_pool(), self.gather_fn(), self.s.concurrency_context,
                                 self.s.gpu_kv_cap, self.s.host_cap, self.decode_options())

    def clustering(self) -> dict[str, Any]:
        backends = (["triton"] if kernels.triton_usable(self.device) else []) + ["torch"]
        return bench_clustering(self.llama(), self.s.cluster_tokens, self.s.layout.unit, self.s.kmeans_iters,
                                min(3, self.s.reps), backends)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = build_settings(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        log("no CUDA device: GPU-only measurements are skipped; code paths run on tiny CPU tensors")
        torch.set_num_threads(1)  # tiny shapes: threads only add scheduling noise on a small host
    run = Run(settings, device, argv, args.out)
    start = time.perf_counter()
    for name in PARTS:
        run.part(name, getattr(run, name))
    run.results["total_seconds"] = round(time.perf_counter() - start, 1)
    run.results["headline"] = headline(run.results)
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    plot_error = plot_decode(run.results, plot_path)
    run.results["plot"] = plot_path if plot_error is None else {"error": plot_error}
    run.save()
    print(format_table(run.results), flush=True)
    log(f"wrote {args.out} in {run.results['total_seconds']} s")
    return 0 if not run.results["errors"] else 1
