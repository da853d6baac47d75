"""Which policies run, and the session config of each (policy, budget label) cell of the eval.

Budgets. ``B`` is the retrieved-token budget per (layer, KV head). louiskv, quest and snapkv
take ``{"budget": B}`` and keep ``n_sink=16`` sinks and a ``window=64`` ring on top;
streaming has no retrieved region, so it gets ``{"window": B + 64}``: the same resident size
(16 + B + 64) as the others. windowkv takes ``{"budget": B}`` (kept prompt tokens per layer)
with its own sink and window defaults, and ``{"budget_fraction": P / 100}`` for ``"P%"``.
``"P%"`` means P% of the context of the sample: the prompt for long-input tasks, prompt +
generated tokens for fidelity (windowkv's fraction is of the prompt only: it selects once, at
prefill). ``full`` has no budget; its cells use the label :data:`FULL_BUDGET`.
"""

from __future__ import annotations

import json
import os

POLICIES = ("full", "streaming", "snapkv", "quest", "louiskv", "windowkv")
"""Every policy the harness knows, in report order; only the registered ones run."""

FULL_BUDGET = "*"
N_SINK, WINDOW = 16, 64

BUDGET_NOTE = (
    "louiskv/quest/snapkv {budget: B, n_sink: 16, window: 64}; streaming {n_sink: 16, window: B + 64} "
    "(same resident size); windowkv {budget: B} or {budget_fraction: P/100} (its own sink/window "
    "defaults); 'P%' = P% of the prompt tokens (fidelity: of prompt + generated tokens, except "
    "windowkv whose fraction is of the prompt)"
)


def available_policies() -> list[str]:
    """The policies of :data:`POLICIES` the daemon package registers (windowkv once it lands)."""
    from kvrecall.server.policies import policy_names

    registered = set(policy_names())
    return [p for p in POLICIES if p in registered]


def check_budget_label(label: str) -> str:
    """Validate a budget label: a positive token count ("512") or a percentage ("12%")."""
    try:
        value = float(label[:-1]) if label.endswith("%") else int(label)
    except ValueError:
        raise ValueError(
            f"budget {label!r} must be a token count like 512 or a percentage like 12%"
        ) from None
    if value <= 0 or (label.endswith("%") and value > 100):
        raise ValueError(f"budget {label!r} must be positive (a percentage at most 100%)")
    return label


def budget_tokens(label: str, context_tokens: int) -> int:
    """Resolve a budget label ("512" or "12%") to tokens for a context of ``context_tokens``."""
    if label.endswith("%"):
        return max(1, round(float(label[:-1]) / 100 * context_tokens))
    return int(label)


OVERRIDES_ENV = "KVRECALL_EVAL_POLICY_CONFIG"
"""JSON {policy: {field: value}} merged into every cell's config (``--policy-config``); an
environment variable so that the eval's worker processes see it too."""


def parse_overrides(specs: list[str]) -> dict[str, dict]:
    """``["louiskv={\"threshold\": 0.7}", ...]`` -> ``{"louiskv": {"threshold": 0.7}}``."""
    out: dict[str, dict] = {}
    for spec in specs:
        policy, sep, text = spec.partition("=")
        if not sep or policy not in POLICIES:
            raise ValueError(
                f"--policy-config {spec!r}: expected <policy>=<JSON object>, policy one of {POLICIES}"
            )
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--policy-config {spec!r}: not JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"--policy-config {spec!r}: the config must be a JSON object")
        out.setdefault(policy, {}).update(fields)
    return out


def overrides() -> dict[str, dict]:
    return json.loads(os.environ.get(OVERRIDES_ENV) or "{}")


def policy_config(policy: str, label: str, context_tokens: int) -> tuple[dict | None, int | None]:
    """``(session config, budget in tokens)`` of ``policy`` at budget ``label`` for a context of
    ``context_tokens`` tokens (``full``: ``(None, None)``), with ``--policy-config`` overrides."""
    config, budget = _policy_config(policy, label, context_tokens)
    extra = overrides().get(policy)
    if extra:
        config = {**(config or {}), **extra}
    return config, budget


def _policy_config(policy: str, label: str, context_tokens: int) -> tuple[dict | None, int | None]:
    if policy == "full":
        return None, None
    budget = budget_tokens(label, context_tokens)
    if policy == "streaming":
        return {"n_sink": N_SINK, "window": budget + WINDOW}, budget
    if policy == "windowkv":
        if label.endswith("%"):
            return {"budget_fraction": float(label[:-1]) / 100}, budget
        return {"budget": budget}, budget
    return {"budget": budget, "n_sink": N_SINK, "window": WINDOW}, budget


def cells(policies: list[str], budgets: tuple[str, ...]) -> list[tuple[str, str]]:
    """(policy, budget label) pairs, full first (once)."""
    return [("full", FULL_BUDGET)] + [(p, b) for p in policies if p != "full" for b in budgets]
