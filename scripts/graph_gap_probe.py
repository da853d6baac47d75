"""Why a captured decode step runs slower beside an embedded daemon (a probe, GPU only).

On an H200 the engine's captured step took ~0.5 ms more GPU time with the daemon embedded in the
worker's process than with a daemon process (7.03 against 6.53 ms at 32K x 1, 8.30 against 7.78 at
32K x 8; `graph_only_ms` of bench e2e, no daemon calls while it is timed), and a kernel profile
showed the difference as gaps between the graph's kernels. This replays a graph of many small
kernels (about a decode step's count) in a fresh process per state and prints the replay time,
queued back to back (CUDA events), so each state's own effect on the graph shows:

  base      nothing else in the process
  reg4      a 4 GiB host buffer registered with the driver (the daemon's host tier: PinnedBuffer)
  reg40     the same at 40 GiB (bench e2e's host pool)
  reg40-4k  40 GiB on 4 KiB pages (no huge pages advised)
  prio      a stream of the highest priority made and used once (an embedded daemon's streams)
  devpool   40 GiB of device memory allocated (the daemon's device pool in a process of its own)
  embedded  an idle EmbeddedDaemon (host pool 40 GiB), as bench e2e --daemon embedded starts it
  embedded4 the same with a 4 GiB host pool
  cupy      1 GiB allocated by CuPy (cudaMalloc), as the daemon allocates a working set
  ipcmem    the same, and its CUDA IPC handle exported (cudaIpcGetMemHandle), as the daemon does
  ipcevent  an interprocess event made, its IPC handle taken and recorded once (a session's event)
  session   an EmbeddedDaemon with one louiskv session opened over CUDA IPC (Llama-3-8B's shape)
  session-proc  the same session from a daemon process (LocalDaemon)
  X-memset / X-d2h  state X (ipcmem, cupy, base), and the graph also sets 4 KiB of that memory by
            a memset node (cudaMemsetAsync) / copies it to pinned host memory (a memcpy node), once
  X-touch   state X (ipcmem, cupy, session, session-proc), and each layer of the graph also adds
            to 4 KiB of that memory (the session's keys: its mapped working set)

Each row also has the host's time per replay (host_ms: launching the 30 replays, before the sync).

  usage: python scripts/graph_gap_probe.py [--states base,reg40,...] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

STATES = ["base", "reg4", "reg40", "reg40-4k", "prio", "devpool", "embedded", "embedded4", "cupy", "ipcmem", "ipcevent",
          "session", "session-proc"]


def _graph(layers: int, per_layer: int, touch=None, op: str = ""):
    import torch

    host = torch.empty(4096, dtype=torch.uint8, pin_memory=True)

    dev = torch.device("cuda")
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    weights = [torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) * 0.01 for _ in range(layers)]

    def step() -> None:
        h = x
        for w in weights:
            h = h @ w
            for _ in range(per_layer):
                h = h * 0.999 + 0.001
            if op == "touch":
                touch.add_(1)
        x.copy_(h)
        if op == "memset":
            import cupy

            cupy.cuda.runtime.memsetAsync(touch.data_ptr(), 0, 4096, torch.cuda.current_stream().cuda_stream)
        elif op == "d2h":
            host.copy_(touch.view(torch.uint8)[:4096], non_blocking=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _time(graph, reps: int = 30, rounds: int = 5) -> tuple[list[float], list[float]]:
    """(GPU ms per replay, host ms per replay) of each round of `reps` queued replays."""
    import torch

    out, host = [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        host.append((time.perf_counter() - t0) * 1e3 / reps)
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / reps)
    return out, host


def _one(state: str, layers: int, per_layer: int) -> dict:
    import torch

    keep = []
    touch = None
    t0 = time.perf_counter()
    torch.cuda.init()
    base_state, op = state, ""
    for suffix in ("-touch", "-memset", "-d2h"):
        if state.endswith(suffix):
            base_state, op = state.removesuffix(suffix), suffix[1:]
    if state.startswith("reg"):
        from kvrecall.server.pinned import PinnedBuffer

        gib = 4 if state == "reg4" else 40
        keep.append(PinnedBuffer(gib << 30, hugepages=not state.endswith("4k")))
    elif state == "prio":
        s = torch.cuda.Stream(priority=-100)
        with torch.cuda.stream(s):
            keep.append(torch.ones(1024, device="cuda") * 2)
        torch.cuda.synchronize()
    elif state == "devpool":
        keep.append(torch.empty(40 << 30, dtype=torch.uint8, device="cuda"))
    elif state.startswith("embedded"):
        from kvrecall.server.embedded import EmbeddedDaemon

        keep.append(EmbeddedDaemon(host_pool_gb=4 if state == "embedded4" else 40, device_pool_gb=16,
                                   device="cuda:0").start())  # fmt: skip
    elif base_state in ("cupy", "ipcmem"):
        import cupy

        memory = cupy.cuda.Memory(1 << 30)
        keep.append(memory)
        array = cupy.ndarray((1 << 30,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
        touch = torch.from_dlpack(array)[:4096]
        if base_state == "ipcmem":
            keep.append(bytes(cupy.cuda.runtime.ipcGetMemHandle(memory.ptr)))
    elif state == "ipcevent":
        event = torch.cuda.Event(interprocess=True)
        keep += [event, bytes(event.ipc_handle())]
        event.record()
        torch.cuda.synchronize()
    elif state.startswith("session"):
        from kvrecall.client import KVRecallClient, ModelSpec

        if base_state == "session":
            from kvrecall.server.embedded import EmbeddedDaemon

            daemon = EmbeddedDaemon(host_pool_gb=8, device_pool_gb=16, device="cuda:0").start()
        else:
            from kvrecall.local import LocalDaemon

            daemon = LocalDaemon(host_pool_gb=8, device_pool_gb=16, device="cuda:0").start()
        client = KVRecallClient(daemon.target, "probe")
        spec = ModelSpec(32, 8, 32, 128, torch.bfloat16, 8192)
        session = client.open_session(spec, "louiskv", {"budget": 1024}, device="cuda")
        touch = session.keys.view(-1)[:2048]
        keep += [session, client, daemon]
    setup_s = time.perf_counter() - t0
    if base_state == "base" and op:
        touch = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    graph = _graph(layers, per_layer, touch, op)
    _time(graph, reps=5, rounds=1)
    samples, host = _time(graph)
    result = {"state": state, "ms": round(statistics.median(samples), 4), "samples": [round(s, 4) for s in samples],
              "host_ms": round(statistics.median(host), 4), "kernels": layers * (per_layer * 2 + 1) + 1,
              "setup_s": round(setup_s, 1)}  # fmt: skip
    for obj in keep:
        for name in ("close", "stop"):
            if hasattr(obj, name):
                getattr(obj, name)()
                break
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", default=",".join(STATES))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--per-layer", type=int, default=20, help="elementwise pairs a layer (2 kernels each)")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the states (fresh process each)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.layers, args.per_layer)))
        return
    results = []
    for p in range(args.repeat):
        for state in args.states.split(","):
            cmd = [sys.executable, __file__, "--one", state, "--layers", str(args.layers), "--per-layer",
                   str(args.per_layer)]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            line = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = {"state": state, "error": (run.stderr or run.stdout)[-800:]}
            row["pass"] = p
            results.append(row)
            print(f"{state:12s} pass {p}: {row.get('ms', row.get('error'))} ms, host {row.get('host_ms')} ms "
                  f"(setup {row.get('setup_s')} s)",
                  flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"layers": args.layers, "per_layer": args.per_layer, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
