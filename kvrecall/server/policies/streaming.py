"""`streaming` (StreamingLLM, Xiao et al., arXiv 2309.17453): attention sinks + recent window.

The simplest sparse baseline: the first `n_sink` tokens and the last `window` tokens stay
resident; everything else is dropped from the working set (it stays in the host tier).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrecall.server.layout import WorkingSetPlan
from kvrecall.server.policies.base import DEFAULT_SPILL_EVERY, Policy, check, register


@dataclass
class StreamingConfig:
    n_sink: int = 16   # tokens
    window: int = 256  # ring slots (keeps window - spill_every .. window recent tokens)

    def __post_init__(self) -> None:
        check(self.window >= 2 * DEFAULT_SPILL_EVERY, "window", f"must be >= {2 * DEFAULT_SPILL_EVERY}")
        check(self.n_sink <= 4096, "n_sink", "must be <= 4096")
        check(self.window <= 1 << 20, "window", "must be <= 1048576")


@register
class StreamingPolicy(Policy):
    name = "streaming"
    proto_field = "streaming"
    Config = StreamingConfig

    def plan(self) -> WorkingSetPlan:
        return WorkingSetPlan(
            n_sink=self.config.n_sink, retrieved=0, window=self.config.window, spill_every=DEFAULT_SPILL_EVERY
        )
