"""GPU memory a captured louiskv selection holds (capture_selection, kvrecall/captured.py): a
Llama-3-8B-shaped session's unit table at CONTEXT tokens (random units of 16 tokens), the
selection captured, then the CUDA caching allocator's reserved and allocated bytes before and
after, per session, for SESSIONS sessions. Also the eager and replayed selection's time.

    python scripts/capture_memory.py [--context 32768] [--sessions 8] [--out capture-memory.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvrecall import captured
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.louiskv import LouisKVConfig, LouisKVPolicy

L, H, G, D, UNIT = 32, 8, 4, 128, 16


def session(context: int, budget: int) -> LouisKVPolicy:
    layout = ModelLayout(L, H, H * G, D, torch.bfloat16, max_tokens=context + 1536)
    policy = LouisKVPolicy(LouisKVConfig(budget=budget), layout)
    table = policy._table(torch.device("cuda"))
    units = context // UNIT
    table.reps[:, :units] = torch.randn(L * H, units, D, device="cuda").to(table.reps.dtype)
    table.sizes[:, :units] = UNIT
    table.valid[:, :units] = True
    order = torch.rand(L * H, context, device="cuda").argsort(dim=1)
    table.position[:, :context] = order.int()  # grouped by unit: UNIT columns each
    table.advance(units, context)
    policy.pinned = order[:, : policy.config.pinned_tokens].sort(dim=1).values
    return policy


def timed(fn, reps: int = 20) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--out", default="capture-memory.json")
    args = p.parse_args()
    policies = [session(args.context, args.budget) for _ in range(args.sessions)]
    q = torch.randn(L * H, G, D, device="cuda").to(torch.bfloat16)
    eager_ms = timed(lambda: policies[0]._choose_every_layer(q.view(L, H * G, D)))
    torch.cuda.synchronize()
    before = (torch.cuda.memory_reserved(), torch.cuda.memory_allocated())
    captured.configure(True)
    for policy in policies:
        policy._choose_captured(q)  # eager + capture
    torch.cuda.synchronize()
    after = (torch.cuda.memory_reserved(), torch.cuda.memory_allocated())
    replay_ms = timed(lambda: policies[0]._choose_captured(q))
    MiB = 1 << 20
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": args.context,
        "sessions": args.sessions, "budget": args.budget, "stats": dict(captured.STATS),
        "reserved_mib_per_session": round((after[0] - before[0]) / MiB / args.sessions, 2),
        "allocated_mib_per_session": round((after[1] - before[1]) / MiB / args.sessions, 2),
        "table_mib_per_session": round(sum(t.numel() * t.element_size() for t in (
            policies[0].units.reps, policies[0].units.sizes, policies[0].units.valid, policies[0].units.position,
        )) / MiB, 1),  # fmt: skip
        "eager_select_ms": round(eager_ms, 3), "replayed_select_ms": round(replay_ms, 3),
        "date": time.strftime("%Y-%m-%d"), "command": "python scripts/capture_memory.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
