"""The embedded daemon's slower captured step, inside the bench's own process (a probe, GPU only).

`bench e2e --daemon embedded` times the engine's captured step ~0.5 ms slower than with a daemon
process (0.44 against 0.09 us between consecutive kernels; scripts/graph_gap_probe.py did not
reproduce it with an idle embedded daemon, a session, IPC exports or pinned pools). This runs the
bench with its arguments and, where it times the captured step alone (graph_only_ms), also times
the probe's synthetic graph (32 layers of a GEMV and 40 elementwise kernels) in the same process
at that moment: slower there too means a state of the whole CUDA context; the same as in a bare
process means something of the engine's graph. Prints SYNTH lines and writes them to --synth-out.

With --dump-dir, every CUDA graph the bench captures is also written there as Graphviz
(CUDAGraph.debug_dump: its nodes, their kinds and parameters), to compare the two daemons' graphs.

With --recapture, the step whose replay was just timed is captured again into a new graph and timed
too (RECAPTURE lines). Each timing also prints the timing thread's current stream and its priority.

  usage: python scripts/graph_gap_inbench.py [--synth-out synth.json] [--dump-dir DIR] [--recapture] BENCH E2E ARGS...
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import statistics
import sys

import kvrecall.bench.e2e as e2e

_spec = importlib.util.spec_from_file_location("graph_gap_probe", pathlib.Path(__file__).with_name("graph_gap_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _dump_graphs(directory: str) -> None:
    """Every graph captured through torch.cuda.graph from now on keeps its debug data and is
    written to `directory` once its capture ends (the patched CUDAGraph prints a line when made,
    so a patch that did not take shows). (On 2026-12-04 a first form, overriding capture_end,
    wrote nothing and was not debugged for lack of device time.)"""
    import torch

    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    base_graph, base_capture = torch.cuda.CUDAGraph, torch.cuda.graph
    count = [0]

    class Dumped(base_graph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.enable_debug_mode()
            print("DUMP graph made with debug mode", flush=True)

    class capture(base_capture):
        def __exit__(self, *exc):
            result = super().__exit__(*exc)
            count[0] += 1
            path = pathlib.Path(directory) / f"graph-{count[0]}.dot"
            try:
                self.cuda_graph.debug_dump(str(path))
                print(f"DUMP {path} {path.stat().st_size if path.exists() else 'not written'}", flush=True)
            except Exception as error:  # a probe: say so and go on
                print(f"DUMP failed: {error!r}", flush=True)
            return result

    torch.cuda.CUDAGraph = torch.cuda.graphs.CUDAGraph = Dumped
    torch.cuda.graph = torch.cuda.graphs.graph = capture


def main() -> int:
    argv = sys.argv[1:]
    out = dump = ""
    recapture = False
    while argv[:1] in (["--synth-out"], ["--dump-dir"], ["--recapture"]):
        if argv[0] == "--recapture":
            recapture, argv = True, argv[1:]
            continue
        if argv[0] == "--synth-out":
            out = argv[1]
        else:
            dump = argv[1]
        argv = argv[2:]
    if dump:
        _dump_graphs(dump)
    rows = []
    original = e2e.time_fn

    def timed(fn, device, **kw):
        result = original(fn, device, **kw)
        import torch

        stream = torch.cuda.current_stream(device)
        print("STREAM", stream, "priority", stream.priority, flush=True)
        if recapture and hasattr(fn, "fn") and getattr(fn, "graph", None) is not None:
            # the same step captured again now (the daemon idle, every session open): slow again
            # means the graph's content; fast means the conditions of the first capture
            from kvrecall.engine.graph import GraphStep

            again = GraphStep(fn.fn, device)
            timing = original(again, device, **kw)
            print("RECAPTURE", json.dumps({"first_ms": round(result.median_ms, 4), "again_ms": round(timing.median_ms, 4),
                                           "graphed": again.graphed}), flush=True)  # fmt: skip
            rows.append({"first_ms": round(result.median_ms, 4), "recaptured_ms": round(timing.median_ms, 4)})
        graph = probe._graph(32, 20)
        probe._time(graph, reps=5, rounds=1)
        samples, _ = probe._time(graph)
        row = {"engine_graph_ms": round(result.median_ms, 4), "synthetic_ms": round(statistics.median(samples), 4)}
        print("SYNTH", json.dumps(row), flush=True)
        rows.append(row)
        return result

    e2e.time_fn = timed
    code = e2e.main(argv)
    if out:
        pathlib.Path(out).write_text(json.dumps(rows, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
