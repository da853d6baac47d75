"""`kvrecall eval --policy-config`: overrides reach every cell of their policy and nothing else."""

from __future__ import annotations

import json

import pytest

from kvrecall.eval.cells import OVERRIDES_ENV, parse_overrides, policy_config


def test_overrides_merge_into_their_policy_only(monkeypatch):
    parsed = parse_overrides(['louiskv={"threshold": 0.7}', 'louiskv={"pre_rope": true}'])
    assert parsed == {"louiskv": {"threshold": 0.7, "pre_rope": True}}
    monkeypatch.setenv(OVERRIDES_ENV, json.dumps(parsed))
    config, budget = policy_config("louiskv", "12%", 1000)
    assert budget == 120 and config == {"budget": 120, "n_sink": 16, "window": 64, "threshold": 0.7, "pre_rope": True}
    assert policy_config("quest", "128", 1000) == ({"budget": 128, "n_sink": 16, "window": 64}, 128)
    assert policy_config("full", "*", 1000) == (None, None)


@pytest.mark.parametrize(
    "spec,problem",
    [("louiskv", "expected"), ("nope={}", "expected"), ("louiskv={bad", "not JSON"), ("louiskv=[1]", "JSON object")],
)
def test_bad_overrides_say_what_is_wrong(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_overrides([spec])
