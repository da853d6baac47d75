"""Every kvrecall command line in the deployment files (compose commands and health checks,
Dockerfile CMDs and HEALTHCHECKs, Kubernetes args and probes) is accepted by the real CLI
parser, so a renamed flag or subcommand breaks a test instead of a deployment."""

from __future__ import annotations

import contextlib
import io
import json
import shlex

import pytest
from deploy_helpers import (
    DOCKER,
    cli_parser,
    command_list,
    containers,
    k8s_files,
    load_compose,
    load_k8s,
    parse_dockerfile,
    pod_spec,
)


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `kvrecall`) for every kvrecall invocation in the deployment files."""
    out = []
    for name, svc in load_compose()["services"].items():
        argv = command_list(svc)
        if argv[:1] in (["serve"], ["worker"]):
            out.append((f"compose.yaml {name} command", argv))
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[1:2] == ["kvrecall"]:
            out.append((f"compose.yaml {name} healthcheck", test[2:]))
    for which in ("daemon", "worker"):
        df = parse_dockerfile(DOCKER / f"Dockerfile.{which}")
        (cmd,) = [i for i in df.final_stage() if i.keyword == "CMD"]
        out.append((f"Dockerfile.{which} CMD", json.loads(cmd.args)))
        (hc,) = df.all("HEALTHCHECK")
        words = shlex.split(hc.args.split(" CMD ", 1)[1])
        # The default of ${KVRECALL_HEALTH_TARGET:-...} is what runs.
        words = [w.replace("${KVRECALL_HEALTH_TARGET:-", "").rstrip("}") for w in words]
        out.append((f"Dockerfile.{which} HEALTHCHECK", words[1:]))
    for path in k8s_files():
        for doc in load_k8s(path):
            spec = pod_spec(doc)
            for c in containers(spec) if spec else []:
                out.append((f"{path.name} {c['name']} args", c.get("args", [])))
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    cmd = c.get(probe, {}).get("exec", {}).get("command")
                    if cmd:
                        out.append((f"{path.name} {c['name']} {probe}", cmd[1:]))
    return out


COMMANDS = _commands()


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_is_accepted_by_the_kvrecall_cli(where, argv):
    parser = cli_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(
                f"{where}: `kvrecall {shlex.join(argv)}` is rejected (exit {exc.code}):\n{err.getvalue()}"
            )
