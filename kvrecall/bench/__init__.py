"""GPU benchmark of kvrecall's decode path against the physical bound and honest baselines.

Run ``python -m kvrecall.bench --out results.json`` (``--quick`` for tiny shapes, also on CPU).
Parts: copy ceilings, host->GPU gather, whole-model decode step per policy, concurrency under a
GPU KV cap, clustering vs prefill. See ``cli.py`` for the options and the notes in the JSON.
"""

from kvrecall.bench.cli import main

__all__ = ["main"]
