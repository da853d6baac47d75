"""The command line a first-time user meets: `--version`, help on every flag, and `--policy`
choices that are the daemon's policy registry."""

from __future__ import annotations

import argparse

import pytest

import kvrecall
from kvrecall.cli import POLICY_CHOICES, build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvrecall {kvrecall.__version__}"


def test_every_flag_has_help():
    missing = [
        f"kvrecall {name} {action.option_strings[0]}"
        for name, parser in subcommands().items()
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, f"flags without help: {missing}"


def test_policy_choices_are_the_registry():
    from kvrecall.server.policies import policy_names

    assert sorted(POLICY_CHOICES) == policy_names()
    for name in ("demo", "worker"):
        (policy,) = [a for a in subcommands()[name]._actions if "--policy" in a.option_strings]
        assert tuple(policy.choices) == POLICY_CHOICES
        assert all(p in subcommands()[name].format_help() for p in POLICY_CHOICES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--policy", "nope"])


def test_policy_config_adds_fields_under_the_budget():
    from kvrecall.demo import policy_config

    args = build_parser().parse_args(["demo", "--budget", "64", "--policy-config", '{"min_gap": 0, "budget": 9}'])
    assert policy_config(args.policy, args.budget, args.policy_config) == {"min_gap": 0, "budget": 64}
    assert policy_config("louiskv", None, '{"chunk_span": 4}') == {"chunk_span": 4}
    assert policy_config("louiskv", None, None) is None
    with pytest.raises(SystemExit, match="--policy-config: not JSON"):
        policy_config("louiskv", None, "{min_gap: 0}")
    with pytest.raises(SystemExit, match="--policy-config: must be a JSON object"):
        policy_config("louiskv", None, "[1, 2]")


def test_worker_lag_is_checked_at_the_edge(capsys):
    """`worker --lag`: default None (the engine's), 0..MAX_LAG accepted, anything else refused
    with the flag named before a model or a daemon is touched."""
    from kvrecall.cli import MAX_LAG
    from kvrecall.engine.engine import DEFAULT_LAG

    assert build_parser().parse_args(["worker", "--target", "x:1"]).lag is None
    assert build_parser().parse_args(["worker", "--target", "x:1", "--lag", str(MAX_LAG)]).lag == MAX_LAG
    from kvrecall.server.policies.base import DEFAULT_SPILL_EVERY

    assert 0 <= DEFAULT_LAG <= MAX_LAG < DEFAULT_SPILL_EVERY
    for bad in ("-1", str(MAX_LAG + 1), "eight"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["worker", "--target", "x:1", "--lag", bad])
        assert "--lag" in capsys.readouterr().err


def test_worker_switch_names_the_engines_modes(capsys):
    """`worker --switch`: the engine's modes exactly (the CLI keeps its own copy to stay torch-free);
    another word is refused with the flag named."""
    from kvrecall.cli import SWITCHES
    from kvrecall.engine.engine import SWITCHES as ENGINE_SWITCHES

    assert SWITCHES == ENGINE_SWITCHES
    assert build_parser().parse_args(["worker", "--target", "x:1"]).switch == "fixed"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--target", "x:1", "--switch", "eager"])
    assert "--switch" in capsys.readouterr().err
