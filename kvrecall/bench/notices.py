"""What a Boundaries call's AppendNotices cost the daemon, in process (no gRPC).

`python -m kvrecall.bench.notices --out FILE [--device cuda:0] [--sessions 1,8,64]` opens S
louiskv sessions of a Llama-3-8B-shaped layout (32 layers, 8 KV heads, head dim 128, bf16 on
CUDA) on one registry, ingests a random prompt into each, fills every retrieved region (one
retrieval each, so eviction places nothing: the steady state of a decode), then times, per
call, `step_batch.serve_step` with one notice per session (spill_every new tokens written
into each ring first, as a worker would): the host wall time to the end of the call (which
syncs the daemon's stream) and the GPU time between CUDA events around it. Both notice paths
run on the same sessions, alternating: `each` (Session.append per session) and `batched`
(step_batch's batched notices). `--profile` adds each path's busiest host functions
(cProfile, own time). Prints a table and writes JSON with the date, device and command.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

from kvrecall.server import step_batch
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.louiskv import LouisKVConfig, LouisKVPolicy
from kvrecall.server.pools import DevicePool, HostPool
from kvrecall.server.session import SessionRegistry
from kvrecall.v1 import kvrecall_pb2 as pb

PATHS = ("each", "batched")


def _write_tokens(sessions, kv: torch.Tensor, upto: int) -> None:
    """Every session's ring receives tokens up to `upto` (the worker's writes)."""
    for session in sessions:
        ws = session.ws
        for position in range(session.spilled_upto, upto):
            slot = ws.plan.window_start + position % ws.plan.window
            ws.keys[:, :, slot] = kv[:, 0, :, position % kv.shape[3]]
            ws.values[:, :, slot] = kv[:, 1, :, position % kv.shape[3]]
            ws.slot_pos[:, :, slot] = position


def _top(profiler: cProfile.Profile, calls: int, top: int = 20) -> list[dict]:
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_, ncalls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename.rsplit('/', 1)[-1]}:{line}:{name}"
        rows.append({"function": where, "own_ms_per_call": round(1e3 * own / calls, 4),
                     "cum_ms_per_call": round(1e3 * cum / calls, 4), "calls_per_call": round(ncalls / calls, 2)})  # fmt: skip
    return sorted(rows, key=lambda r: -r["own_ms_per_call"])[:top]


def measure(args: argparse.Namespace, count: int) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, H, Hq, D, T = args.layers, 8, 32, args.head_dim, args.prompt
    calls = args.calls
    layout = ModelLayout(L, H, Hq, D, dtype, max_tokens=T + (2 * calls + 8) * 16 + 64)
    host = HostPool(count * (layout.max_tokens * layout.token_bytes + (4 << 20)), pinned=device.type == "cuda")
    registry = SessionRegistry(host, DevicePool(args.device_pool_gb << 30, device), 600.0)
    kv = torch.randn(L, 2, H, T, D, device=device).to(dtype)
    sessions = []
    for i in range(count):
        policy = LouisKVPolicy(LouisKVConfig(budget=args.budget), layout)
        session = registry.open("bench", layout, policy, pb.TRANSPORT_SHM, 600.0, f"n{i}")
        session.ingest(0, kv, torch.randn(L, Hq, 1, D, device=device).to(dtype))
        session.boundary(T, [], torch.randn(L, Hq, D, device=device).to(dtype))  # fills the retrieved region
        sessions.append(session)
    every = sessions[0].plan.spill_every
    position = T
    walls: dict[str, list[float]] = {p: [] for p in PATHS}
    gpu: dict[str, list[float]] = {p: [] for p in PATHS}
    profilers = {p: cProfile.Profile() for p in PATHS}
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []
    for i in range(2 * calls + 4):
        path = PATHS[i % 2]
        position += every
        _write_tokens(sessions, kv, position)
        step_events = [pb.StepEvent(position=position, notice=True) for _ in sessions]
        if cuda:
            torch.cuda.synchronize(device)
            events[0].record()
        profiler = profilers[path] if args.profile and i >= 4 else None
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        step_batch.serve_step(sessions, step_events, batch_notices=path == "batched")
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - started
        if cuda:
            events[1].record()
            torch.cuda.synchronize(device)
        if i >= 4:  # the first calls compile
            walls[path].append(wall)
            gpu[path].append(events[0].elapsed_time(events[1]) / 1e3 if cuda else 0.0)
    result: dict = {"sessions": count}
    for path in PATHS:
        result[path] = {
            "wall_ms_p50": round(1e3 * statistics.median(walls[path]), 3),
            "wall_ms_mean": round(1e3 * statistics.fmean(walls[path]), 3),
            "gpu_ms_p50": round(1e3 * statistics.median(gpu[path]), 3),
            "wall_ms_per_session": round(1e3 * statistics.median(walls[path]) / count, 4),
            "n": len(walls[path]),
        }
        if args.profile:
            result[path]["host_profile"] = _top(profilers[path], len(walls[path]))
    for session in sessions:
        registry.close(session)
    host.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sessions", default="1,8,64", help="comma-separated session counts")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=24, help="timed calls per path")
    parser.add_argument("--device-pool-gb", type=int, default=24)
    parser.add_argument("--profile", action="store_true", help="each path's busiest host functions (cProfile)")
    args = parser.parse_args(argv)
    rows = [measure(args, int(s)) for s in args.sessions.split(",")]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m kvrecall.bench.notices", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "layout": {"layers": args.layers, "kv_heads": 8, "head_dim": args.head_dim, "prompt": args.prompt,
                   "budget": args.budget},  # fmt: skip
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'sessions':>8s} {'path':>8s} {'wall p50 ms':>12s} {'per session':>12s} {'gpu p50 ms':>11s}")
    for row in rows:
        for path in PATHS:
            r = row[path]
            print(f"{row['sessions']:8d} {path:>8s} {r['wall_ms_p50']:12.3f} {r['wall_ms_per_session']:12.4f} "
                  f"{r['gpu_ms_p50']:11.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
