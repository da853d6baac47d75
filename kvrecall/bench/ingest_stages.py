"""Where one streamed-ingest layer's time goes in the daemon (in process, no gRPC).

`python -m kvrecall.bench.ingest_stages --device cuda --contexts 32768,131072 --out FILE`
opens a louiskv session of a Llama-3-8B-shaped layout (8 KV heads, 32 query heads, head dim
128, bf16 on CUDA, fp32 on CPU) per context and feeds it random prompt layers, timing (device
synchronised, median over the measured layers after one warm layer) each stage of
`Session.ingest` for one layer:

* host_write: the layer's K/V into the host tier (SequenceStore.write);
* window: sinks and window into the working set;
* cluster: the prompt's k-means (louiskv.cluster_segments);
* rank: the observation queries' vote over the layer's tokens (ingest_select="tokens");
* table: the clusters into the unit table;
* ingest: the whole `Session.ingest` call for one layer (what a worker waits for).

A layer's stages must fit inside the worker's compute for that layer (the worker overlaps
them with its next layer), so the table also prints the ingest per layer in GB/s of K/V.
The top kernels of one layer's ingest (torch.profiler) are written with --kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kvrecall.bench.common import run_metadata, sync


def _timed(device: torch.device, fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds fn(*args, **kwargs) takes, the device's queued work included; its result)."""
    sync(device)
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - started, value


def profile_context(T: int, layers: int, device: torch.device, kernels: bool) -> dict:
    from kvrecall.server.layout import ModelLayout
    from kvrecall.server.policies.louiskv import LouisKVConfig, LouisKVPolicy, cluster_segments
    from kvrecall.server.pools import DevicePool, HostPool
    from kvrecall.server.session import SessionRegistry
    from kvrecall.v1 import kvrecall_pb2 as pb

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, Hq, D = 8, 32, 128
    layout = ModelLayout(layers, H, Hq, D, dtype, max_tokens=T + 256)
    host = HostPool(layout.max_tokens * layout.token_bytes + (64 << 20), pinned=device.type == "cuda")
    registry = SessionRegistry(host, DevicePool(16 << 30, device), 600.0)
    config = LouisKVConfig(budget=1024)
    policy = LouisKVPolicy(config, layout)
    session = registry.open("bench", layout, policy, pb.TRANSPORT_SHM, 600.0, "stages")
    kv = torch.randn(1, 2, H, T, D, device=device).to(dtype)
    queries = torch.randn(1, Hq, config.observation, D, device=device)
    plan = session.plan
    window_from = max(plan.n_sink, T - plan.min_window)
    session.prompt_tokens, session.evicted_upto = T, window_from
    ctx = session.context()
    stages: dict[str, list[float]] = {name: [] for name in ("host_write", "window", "cluster", "rank", "table")}
    keys = kv[0, 0]
    table = policy._table(device)
    for layer in range(layers - 1):  # the stages, layer by layer, outside the session (layer 0 warms)
        slots = session.ws.window_slots(window_from, T)
        times = {
            "host_write": _timed(device, session.store.write, 0, kv, first_layer=layer)[0],
            "window": _timed(device, session.ws.write_tokens, kv, 0, window_from, T, slots, layers=slice(layer, layer + 1))[0],
            "rank": _timed(device, policy.ranking.rank_layer, ctx, layer, keys, queries[0])[0],
        }  # fmt: skip
        times["cluster"], clusters = _timed(device, cluster_segments, keys, config.cluster_size, config.kmeans_iters, 0)
        times["table"] = _timed(device, table.put, slice(layer * H, (layer + 1) * H), *clusters)[0]
        if layer:
            for name, seconds in times.items():
                stages[name].append(seconds)
    # The whole call for one layer, on a fresh session (its layers in order).
    session.release(registry.device_pool)
    registry.sessions.clear()
    session = registry.open("bench", layout, LouisKVPolicy(config, layout), pb.TRANSPORT_SHM, 600.0, "stages")
    ingest = []
    top = None
    for layer in range(layers):
        if kernels and layer == layers - 2 and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                session.ingest(layer, kv, queries)
                torch.cuda.synchronize(device)
            top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            continue
        seconds = _timed(device, session.ingest, layer, kv, queries)[0]
        if layer:
            ingest.append(seconds)
    session.release(registry.device_pool)
    result = {name: 1e3 * statistics.median(samples) for name, samples in stages.items()}
    result["ingest"] = 1e3 * statistics.median(ingest)
    result = {f"{name}_ms": value for name, value in result.items()}
    result["layer_kv_bytes"] = kv.numel() * kv.element_size()
    result["ingest_gb_per_s"] = result["layer_kv_bytes"] / (result["ingest_ms"] / 1e3) / 1e9
    if top is not None:
        result["top_kernels"] = top
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--layers", type=int, default=6, help="layers of the layout (measured: all but the first)")
    parser.add_argument("--kernels", action="store_true", help="profile one layer's ingest and keep its top kernels")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    contexts = [int(c) for c in args.contexts.split(",")]
    results = {str(T): profile_context(T, args.layers, device, args.kernels) for T in contexts}
    names = ("host_write", "window", "cluster", "rank", "table", "ingest")
    print("== one ingest layer in the daemon, ms (median)")
    print(f"{'context':>8} " + " ".join(f"{n:>10}" for n in names) + f" {'GB/s':>7}")
    for T, r in results.items():
        print(f"{T:>8} " + " ".join(f"{r[n + '_ms']:>10.2f}" for n in names) + f" {r['ingest_gb_per_s']:>7.1f}")
        if "top_kernels" in r:
            print(r["top_kernels"])
    if args.out:
        payload = {"contexts": results, "config": vars(args), "meta": run_metadata(device, ["ingest_stages", *sys.argv[1:]])}
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
