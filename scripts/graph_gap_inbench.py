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

  usage: python scripts/graph_gap_inbench.py [--synth-out synth.json] [--dump-dir DIR] BENCH E2E ARGS...
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
    """Every torch.cuda.CUDAGraph made from now on keeps its debug data and writes it at capture's end."""
    import torch

    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    base = torch.cuda.CUDAGraph
    count = [0]

    class Dumped(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.enable_debug_mode()

        def capture_end(self):
            super().capture_end()
            count[0] += 1
            self.debug_dump(str(pathlib.Path(directory) / f"graph-{count[0]}.dot"))

    torch.cuda.CUDAGraph = Dumped
    torch.cuda.graphs.CUDAGraph = Dumped


def main() -> int:
    argv = sys.argv[1:]
    out = dump = ""
    while argv[:1] in (["--synth-out"], ["--dump-dir"]):
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
