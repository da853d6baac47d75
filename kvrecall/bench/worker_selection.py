"""An emulation for one design question: what a retrieval's selection costs the decode step when
the *worker* launches its kernels, in its own CUDA context, instead of a daemon process.

A daemon process's kernels time-slice with the worker's step and cost it 3-5x their own GPU time
(DEVELOPERS.md, "The process daemon's boundary cost"); an embedded daemon's run beside the step. The design
that would keep the daemon a process of its own and its kernels out of time slices: the worker
runs louiskv's selection over the session's unit table (mapped from the daemon like the working
set) and the daemon only moves the rows by the copy engine (since built: the daemon's
worker_selection, kvrecall/client/selection.py; this emulation stays as one arm of its A/B,
scripts/gpu_worker_selection.sh). It measures the selection's GPU side alone: `bench e2e --worker-selection` attaches a WorkerSelection to
the engine (`Engine.on_crossings`), which, after each step's crossings are sent, runs
`louiskv.choose_units` for every crossed slot, with the slot's real retrieval query, over a
synthetic unit table of that context's size (32 layers x 8 KV heads of ~context / 16 units of
8-24 tokens, 256 pinned tokens a row), on a stream of its own at the highest priority (as an
embedded daemon's). Its result is discarded. With the daemon's retrievals dry
(`--daemon-env KVRECALL_DRY_RETRIEVALS=1`: answered without selecting or placing), the step at
11.7% then pays what the worker-side selection would cost it; the placement's plan kernel and the
worker's copies of the staged rows (built: worker copies) are not in it. An emulation: its rows say
`worker_selection`, and no figure from it is a measurement of kvrecall's product path.
"""

from __future__ import annotations

import contextlib

import torch

from kvrecall.server.policies.louiskv import choose_units
from kvrecall.server.streams import HIGHEST

UNIT_TOKENS = 16  # louiskv's mean unit size over a prompt (the clusters of ~16 keys)


class WorkerSelection:
    """`__call__(queries)`: louiskv's selection once per query [rows, G, D] over one synthetic
    table (module docstring), queued on this object's stream; `selections` counts them."""

    def __init__(
        self, device: torch.device, context: int, budget: int, rows: int = 32 * 8, groups: int = 4,
        head_dim: int = 128, pinned: int = 256, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
    ) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        units = max(1, context // UNIT_TOKENS)
        sizes = torch.randint(8, 25, (rows, units), generator=g, dtype=torch.int32)
        total = int(sizes.sum(dim=1).max())
        self.rows, self.groups, self.head_dim, self.budget = rows, groups, head_dim, budget
        self.reps = torch.randn(rows, units, head_dim, generator=g).to(device=device, dtype=dtype)
        self.valid = torch.ones(rows, units, dtype=torch.bool, device=device)
        self.sizes = sizes.to(device)
        self.position = torch.randint(0, context, (rows, total), generator=g, dtype=torch.int32).to(device)
        keep = min(pinned, budget // 2, context)
        stride = context // max(1, keep)  # distinct, ascending: one pinned token per stride, at a random offset
        offsets = torch.randint(0, max(1, stride), (rows, 1), generator=g)
        self.pinned = (torch.arange(keep)[None, :] * stride + offsets).to(device) if keep else None
        self.stream = torch.cuda.Stream(device, priority=HIGHEST) if device.type == "cuda" else None
        self.selections = 0

    def __call__(self, queries: list[torch.Tensor]) -> None:
        if not queries:
            return
        # No wait: the step that wrote the queries has run (the engine synced on it), and the step
        # launched ahead may overwrite them meanwhile, which changes nothing the emulation measures.
        scope = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with scope:
            for query in queries:
                q = query.reshape(self.rows, self.groups, self.head_dim)
                choose_units(q, self.reps, self.valid, self.sizes, self.position, self.pinned, self.budget, "max")
                self.selections += 1
