"""`full`: every token stays resident — exact attention, the accuracy reference.

The window ring is sized to the whole sequence (max_tokens + spill_every), so nothing is
ever evicted. Shapes: none beyond the working set.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrecall.server.layout import WorkingSetPlan
from kvrecall.server.policies.base import DEFAULT_SPILL_EVERY, Policy, register


@dataclass
class FullConfig:
    """No hyper-parameters."""


@register
class FullPolicy(Policy):
    name = "full"
    proto_field = "full"
    Config = FullConfig

    def plan(self) -> WorkingSetPlan:
        a = DEFAULT_SPILL_EVERY
        return WorkingSetPlan(n_sink=0, retrieved=0, window=self.layout.max_tokens + a, spill_every=a)
