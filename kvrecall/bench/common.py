"""Timing, CUDA graphs, memory helpers and run metadata shared by the benchmark's parts."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

GiB = 1 << 30


def log(msg: str) -> None:
    """Progress line (the device tool returns only the output's tail, so keep lines short)."""
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return cached blocks (and dead graphs' pools) to the driver between configurations."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_metadata(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """Device, software versions, date and command line of this run."""
    meta: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([sys.executable, "-m", "kvrecall.bench", *argv]),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device_type": device.type,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    try:
        import cupy

        meta["cupy"] = cupy.__version__
    except ImportError:
        meta["cupy"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device=props.name, sm_count=props.multi_processor_count,
                    gpu_memory_bytes=props.total_memory,
                    l2_bytes=getattr(props, "L2_cache_size", None),
                    capability=f"{props.major}.{props.minor}")
    else:
        meta["device"] = "cpu"
    return meta


@dataclass
class Timing:
    """Milliseconds per call: median and spread over ``reps`` measured repetitions."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "reps": self.reps}


def _summarise(samples: list[float]) -> Timing:
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return Timing(statistics.median(samples), pick(0.1), pick(0.9), len(samples))


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 10,
            inner: int = 1) -> Timing:
    """Time ``fn``: warm up, then ``reps`` samples of ``inner`` back-to-back calls each.

    On a GPU each sample is bracketed by CUDA events on the current stream (the device time of
    the calls, launch gaps included); on a CPU by a host clock after the calls return.
    Returns per-call milliseconds.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in pairs:
            start.record(stream)
            for _ in range(inner):
                fn()
            end.record(stream)
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / inner for start, end in pairs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return _summarise(samples)


def inner_for(fn: Callable[[], Any], device: torch.device, target_ms: float = 1.0, cap: int = 200) -> int:
    """How many back-to-back calls make one sample last about ``target_ms`` (small kernels)."""
    probe = time_fn(fn, device, warmup=1, reps=3)
    return max(1, min(cap, int(target_ms / max(probe.median_ms, 1e-4))))


def gbps(n_bytes: float, ms: float) -> float:
    """Gigabytes (1e9) per second."""
    return n_bytes / (ms * 1e-3) / 1e9


def probe_args(doc: str) -> argparse.Namespace:
    """A kernel probe's command line (scripts/*_probe.py): --iters (timed calls a case) and --out
    (a JSON file, or none)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default="")
    return parser.parse_args()


def write_probe(path: str, device: torch.device, script: str, results: list[dict[str, Any]], **extra: Any) -> None:
    """A probe's results as JSON at `path` (nothing without one), with its date, device, torch
    and command."""
    if not path:
        return
    meta = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "command": f"python {script}", **extra}  # fmt: skip
    with open(path, "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)

