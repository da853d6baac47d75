"""GPU time of the placement kernel's plan: kernels/placement_triton.py `_launch_place` with
COPY=False, as a staged placement launches it (the copy engine's half, copy_staged, is left
out), at the Llama-3-8B shape: 256 rows (32 layers x 8 KV heads) x R = 1024 retrieved slots,
one session, and 8 sessions in one launch (place_retrieved_many's path). Not a test: a probe of
one kernel's cost, the time a worker on the same GPU loses while it runs.

Cases: `fresh` (an empty region: every selected token is new) and `shared` (the region holds
the previous selection, 3/4 of which the new one keeps); positions in runs of 16 consecutive
tokens (spans, as louiskv selects) or scattered. The pinned host pool is one page that every
page of the table points to (the plan reads no row; the reference's copies stay in bounds).
Each launch's region is restored first (untimed), then a GPU sleep lets the host queue the
launch, so the CUDA events time the GPU work (the marks' memset included), not the launch's
Python (median of --iters after a warm-up). Every case's slot_pos and counts are checked
against the PyTorch reference; with --baseline (another version's placement_triton.py, e.g.
`git show 8846c0b:kvrecall/kernels/placement_triton.py > /tmp/old.py`, the sorts' version)
that version is timed beside it, and its slot_pos, counts and plan (the k-th new token's
position and free slot: what staged_plan reads) must be equal.

    python scripts/place_kernel_probe.py [--positions 32768] [--sessions 1,8] [--iters 50] [--baseline F] [--out F]
    python scripts/place_kernel_probe.py --tiny   # CPU, Triton's interpreter (TRITON_INTERPRET=1): does it run
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

SINKS, WINDOW = 4, 64  # slots before and after the retrieved region
CASES = ("fresh", "shared")


def draw(rows: int, count: int, positions: int, run: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, count] distinct positions a row in [0, positions): count // run runs of `run`."""
    scores = torch.rand(rows, positions // run, generator=generator, device=generator.device)
    blocks = scores.topk(count // run, dim=1).indices
    return (blocks[:, :, None] * run + torch.arange(run, device=blocks.device)).reshape(rows, count)


def shuffled(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return t.gather(1, torch.rand(t.shape, generator=generator, device=t.device).argsort(dim=1))


def workload(rows: int, retrieved: int, positions: int, case: str, run: int, generator: torch.Generator):
    """slot_pos [rows, SINKS + R + WINDOW] int32 and the selection [rows, R] int64."""
    slot_pos = torch.full((rows, SINKS + retrieved + WINDOW), -1, dtype=torch.int32, device=generator.device)
    if case == "fresh":
        return slot_pos, shuffled(draw(rows, retrieved, positions, run, generator), generator)
    changed = retrieved // 4
    items = draw(rows, retrieved + changed, positions, run, generator)
    slot_pos[:, SINKS : SINKS + retrieved] = shuffled(items[:, :retrieved], generator).int()
    return slot_pos, shuffled(items[:, changed:], generator)


class Plans:
    """copy_staged's stand-in: keeps the last launch's scratch, counts and block_r (no GPU work:
    the timed launches run the kernel alone)."""

    def __init__(self) -> None:
        self.last: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __call__(self, scratch, counts, block_r, *rest) -> None:
        self.last = scratch, counts, block_r

    def plan(self) -> list[torch.Tensor]:
        """The last plan on the CPU: per row, the k-th new token's position and free slot (the
        last two BLOCK_R regions of the scratch, whatever the version's layout), 0 past the new."""
        scratch, counts, block_r = self.last
        taken = torch.arange(block_r, device=scratch.device)[None, :] < counts[:, 1:2].long()
        regions = scratch[:, -2 * block_r : -block_r], scratch[:, -block_r:]
        return [torch.where(taken, region, 0).cpu() for region in regions]


def load(path: str | None):
    """The placement module: kvrecall's, or the file at `path`; its rows stay for copy_staged."""
    if path is None:
        from kvrecall.kernels import placement_triton as module
    else:
        spec = importlib.util.spec_from_file_location("placement_baseline", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    module.staged = lambda host, keys, selection: True  # the plan only: COPY=False
    module.copy_staged = Plans()
    return module


def launcher(module, parts, selection, host, tokens_per_page: int, heads: int):
    """fn() launching module._launch_place over every session (as place_retrieved[_many]_triton do)."""
    slot_pos, keys, values, page_base, resident = parts[0]
    sessions, pages = None, None
    if len(parts) > 1:
        table = [[*module.element_offsets((p[0], p[1], p[2], p[3], p[4]), parts[0]), p[3].numel() * tokens_per_page]
                 for p in parts]  # fmt: skip
        sessions = torch.tensor(table, dtype=torch.int64, device=selection.device)
        pages = [(p[1], p[2], p[3]) for p in parts]

    def launch() -> torch.Tensor:
        return module._launch_place(slot_pos, keys, values, selection, SINKS, host, page_base, tokens_per_page, heads,
                                    resident, sessions, slot_pos.shape[0], pages)  # fmt: skip

    return launch


def timed(launch, restore, iters: int, device: torch.device) -> float:
    """Median microseconds of launch() (CUDA events; wall clock on CPU), restore() before each."""
    times = []
    for k in range(3 + iters):
        restore()
        if device.type == "cuda":
            torch.cuda._sleep(1_000_000)  # the GPU busy while the host queues the launch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch()
            end.record()
            end.synchronize()
            elapsed = 1e3 * start.elapsed_time(end)
        else:
            started = time.perf_counter()
            launch()
            elapsed = 1e6 * (time.perf_counter() - started)
        if k >= 3:
            times.append(elapsed)
    return statistics.median(times)


def measure(modules, sessions: int, case: str, run: int, args, device: torch.device) -> dict:
    from kvrecall import kernels

    rows, retrieved, dim, per_page = args.rows, args.retrieved, args.dim, args.tokens_per_page
    heads = min(8, rows)
    generator = torch.Generator(device=device).manual_seed(sessions * 7 + run + len(case))
    page_numel = rows * 2 * per_page * dim
    host = torch.randn(page_numel).to(torch.bfloat16)
    host = host.pin_memory() if device.type == "cuda" else host
    page_base = torch.zeros(args.positions // per_page, dtype=torch.int64, device=device)
    cases = [workload(rows, retrieved, args.positions, case, run, generator) for _ in range(sessions)]
    selection = torch.cat([selected for _, selected in cases])
    keys = [torch.zeros(rows, SINKS + retrieved + WINDOW, dim, dtype=torch.bfloat16, device=device)
            for _ in range(2 * sessions)]  # fmt: skip
    parts = [(slot_pos.clone(), keys[2 * s], keys[2 * s + 1], page_base, torch.zeros((), dtype=torch.int64, device=device))
             for s, (slot_pos, _) in enumerate(cases)]  # fmt: skip

    def restore() -> None:
        for part, (slot_pos, _) in zip(parts, cases, strict=True):
            part[0].copy_(slot_pos)

    row = {"sessions": sessions, "rows": sessions * rows, "retrieved": retrieved, "positions": args.positions,
           "case": case, "layout": "runs" if run > 1 else "scattered"}  # fmt: skip
    answers = []
    for name, module in modules.items():
        launch = launcher(module, parts, selection, host, per_page, heads)
        restore()
        counts = launch()
        answers.append(([part[0].cpu() for part in parts], counts.cpu(), module.copy_staged.plan()))
        row[f"{name}_us"] = round(timed(launch, restore, args.iters, device), 1)
    reference = []
    for slot_pos, selected in cases:  # the reference, session by session on the CPU
        slot_pos = slot_pos.cpu()
        kv = torch.zeros(rows, slot_pos.shape[1], dim, dtype=torch.bfloat16)
        counts = kernels.place_retrieved(slot_pos, kv, kv.clone(), selected.cpu(), SINKS, host.cpu(), page_base.cpu(),
                                         per_page, heads, impl="reference")  # fmt: skip
        reference.append((slot_pos, counts))
    new_slots, new_counts, new_plan = answers[0]
    row["equal_reference"] = (all(torch.equal(a, r) for a, (r, _) in zip(new_slots, reference, strict=True))
                              and torch.equal(new_counts, torch.cat([c for _, c in reference])))  # fmt: skip
    if len(answers) > 1:
        old_slots, old_counts, old_plan = answers[1]
        row["equal_baseline"] = (all(torch.equal(a, b) for a, b in zip(new_slots, old_slots, strict=True))
                                 and torch.equal(new_counts, old_counts)
                                 and all(torch.equal(a, b) for a, b in zip(new_plan, old_plan, strict=True)))  # fmt: skip
        row["ratio"] = round(row["baseline_us"] / max(row["kernel_us"], 1e-9), 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=32768, help="positions of each session (pages x page)")
    parser.add_argument("--sessions", default="1,8")
    parser.add_argument("--retrieved", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--baseline", default=None, help="another version's placement_triton.py, timed beside")
    parser.add_argument("--tiny", action="store_true", help="CPU under Triton's interpreter, tiny sizes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        args.positions, args.retrieved, args.iters = 300, 32, 2
    args.rows = 4 if args.tiny else 32 * 8  # layers x KV heads
    args.dim = 8 if args.tiny else 128
    args.tokens_per_page = 4 if args.tiny else 16
    device = torch.device("cpu" if args.tiny else "cuda")
    modules = {"kernel": load(None)}
    if args.baseline:
        modules["baseline"] = load(args.baseline)
    run = 4 if args.tiny else 16
    rows_out = [measure(modules, sessions, case, span, args, device)
                for sessions in [int(s) for s in args.sessions.split(",")] for case in CASES for span in (run, 1)]  # fmt: skip
    columns = ["sessions", "rows", "case", "layout", "kernel_us", "equal_reference"]
    columns += ["baseline_us", "equal_baseline", "ratio"] if args.baseline else []
    print(" ".join(f"{c:>15}" for c in columns))
    for r in rows_out:
        print(" ".join(f"{str(r[c]):>15}" for c in columns))
    if args.out:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
        }  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows_out}, f, indent=2)
    return 0 if all(r["equal_reference"] and r.get("equal_baseline", True) for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
