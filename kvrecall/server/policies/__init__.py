"""KV policies, one file each, registered by import."""

from kvrecall.server.policies import full, louiskv, quest, snapkv, streaming, windowkv  # noqa: F401
from kvrecall.server.policies.base import Policy, build_policy, policy_names

__all__ = ["Policy", "build_policy", "policy_names"]
