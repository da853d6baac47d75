"""Readers for the deployment files (compose.yaml, Dockerfiles, .dockerignore, Kubernetes
manifests) and the vendored schemas, shared by the tests in tests/deploy.

Nothing here needs Docker, a cluster or the network: the schemas are files in schemas/
(see schemas/update_schemas.py for where they come from).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE_FILE = REPO / "compose.yaml"

SOCKET_DIR = "/run/kvrecall"
SOCKET_ADDRESS = "unix:///run/kvrecall/kvrecall.sock"
IMAGE_UID = 10001

# The CLI contract (kvrecall/cli.py): the flags the deployment files may use;
# tests/deploy/test_deploy_cli.py also parses every command with the real CLI parser.
SERVE_FLAGS = {
    "--listen",
    "--device",
    "--host-pool-gb",
    "--device-pool-gb",
    "--page-kb",
    "--lease-seconds",
    "--metrics-port",
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--tokens-file",
    "--worker-quota-gb",
    "--log-level",
    "--config",
}
WORKER_FLAGS = {"--target", "--policy", "--worker-id", "--sessions", "--context-tokens", "--budget"}
# `kvrecall worker --serve`: the serving worker's own flags.
SERVING_FLAGS = {"--serve", "--port", "--host", "--model", "--max-model-len", "--max-new-tokens"}
HTTP_PORT = 8000  # a serving worker's OpenAI-compatible API inside its container
POLICIES = {"full", "streaming", "louiskv", "quest", "snapkv", "windowkv"}  # proto PolicyConfig


# ---------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def compose_variables(text: str) -> list[tuple[str, str | None, str | None]]:
    """(name, operator, argument) of every ${...} / $NAME reference in raw compose text."""
    out = []
    for m in _VAR.finditer(text):
        if m.group("escaped"):
            continue
        if m.group("braced"):
            out.append((m.group("braced"), m.group("op"), m.group("arg")))
        else:
            out.append((m.group("named"), None, None))
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation for one string (no nesting, which we do not use)."""

    def repl(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg")
        present = name in env
        val = env.get(name, "")
        if op is None:
            return val
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if present else arg
        if op == ":+":
            return arg if val else ""
        if op == "+":
            return arg if present else ""
        if op in (":?", "?"):
            if (op == ":?" and not val) or (op == "?" and not present):
                raise ValueError(f"required variable {name}: {arg}")
            return val
        raise AssertionError(op)

    return _VAR.sub(repl, value)


def _walk_interpolate(node, env):
    if isinstance(node, dict):
        return {k: _walk_interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk_interpolate(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def dotenv() -> dict[str, str]:
    """The .env file beside compose.yaml (Compose reads it for every command)."""
    lines = (REPO / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def default_profiles() -> set[str]:
    """The profiles a plain `docker compose up` activates (.env's COMPOSE_PROFILES)."""
    return {p for p in dotenv().get("COMPOSE_PROFILES", "").split(",") if p}


def compose_raw_text() -> str:
    return COMPOSE_FILE.read_text()


def load_compose(env: dict[str, str] | None = None) -> dict:
    """compose.yaml as Compose sees it: YAML anchors and merge keys resolved, variables
    interpolated from `env` (default: none set, so every default applies)."""
    data = yaml.safe_load(compose_raw_text())
    return _walk_interpolate(data, env or {})


@cache
def compose_schema() -> dict:
    return json.loads((SCHEMAS / "compose-spec.json").read_text())


def compose_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def cli_parser():
    """kvrecall's own argparse parser. A broken import of kvrecall.cli fails the caller."""
    from kvrecall.cli import build_parser

    return build_parser()


def command_list(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def flags_of(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def serving(service: dict) -> bool:
    """A `kvrecall worker --serve` service (an HTTP server, not a batch run)."""
    return role(service) == "worker" and "--serve" in command_list(service)


def role(service: dict) -> str | None:
    """'daemon' for `kvrecall serve`, 'worker' for `kvrecall worker`, else None."""
    argv = command_list(service)
    if argv[:1] == ["serve"]:
        return "daemon"
    if argv[:1] == ["worker"]:
        return "worker"
    return None


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {}) or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def device_of(service: dict) -> str | None:
    """The torch device a kvrecall service runs on (daemon: --device; worker: KVRECALL_DEVICE)."""
    return flag_value(command_list(service), "--device") or environment(service).get("KVRECALL_DEVICE")


def gpu_reservations(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    )
    return list(devices or [])


def volume_mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (short and long syntax)."""
    out = {}
    for vol in service.get("volumes", []) or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2:
                out[parts[1]] = parts[0]
        else:
            out[vol["target"]] = vol.get("source", "")
    return out


def active_services(compose: dict, profiles: set[str]) -> dict[str, dict]:
    """The services `docker compose --profile P... up` starts (no service named)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & profiles
    }


# ---------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore
# ---------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction] = field(default_factory=list)

    def stages(self) -> list[list[Instruction]]:
        """Instructions grouped by stage; stages[0] holds the ARGs before the first FROM."""
        out: list[list[Instruction]] = [[]]
        for ins in self.instructions:
            if ins.keyword == "FROM":
                out.append([])
            out[-1].append(ins)
        return out

    def final_stage(self) -> list[Instruction]:
        return self.stages()[-1]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def global_args(self) -> dict[str, str | None]:
        return parse_args(self.stages()[0])


def parse_args(instructions: list[Instruction]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            out[name.strip()] = default.strip().strip('"') if _ else None
    return out


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with line continuations joined and comment lines dropped (as Docker does)."""
    df = Dockerfile(path)
    lines = path.read_text().splitlines()
    buf, start = "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, rest = buf.partition(" ")
        df.instructions.append(Instruction(keyword.upper(), rest.strip(), start))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return df


def shared_part(path: Path, marker: str) -> str:
    """Text from the first `ARG VARIANT` line to the marker comment (the part both image
    Dockerfiles must keep identical)."""
    text = path.read_text()
    return text[text.index("ARG VARIANT=") : text.index(marker)]


def copy_sources(df: Dockerfile) -> list[str]:
    """Sources of every COPY that reads the build context (not --from)."""
    out = []
    for ins in df.all("COPY"):
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.extend(words[:-1])
    return out


def dockerignore_patterns(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def dockerignore_excludes(patterns: list[str], rel_path: str) -> bool:
    """Whether .dockerignore `patterns` exclude rel_path (last match wins; a pattern that
    matches a parent directory matches its contents). Enough of Docker's rules for an
    allowlist file; no `**` inside path segments beyond a leading `**/`."""
    parts = rel_path.strip("/").split("/")
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip("/")
        any_depth = pat.startswith("**/")
        if any_depth:
            pat = pat[3:]
        candidates = (
            ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
            if any_depth
            else ["/".join(parts[:j]) for j in range(1, len(parts) + 1)]
        )
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def load_k8s(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def k8s_bundle() -> dict:
    found = sorted(SCHEMAS.glob("k8s-*-strict-subset.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def k8s_errors(doc: dict) -> list[str]:
    bundle = k8s_bundle()
    key = f"{doc.get('apiVersion')}/{doc.get('kind')}"
    def_key = bundle["x-kinds"].get(key)
    if def_key is None:
        return [f"no schema vendored for {key}; add it to K8S_KINDS in schemas/update_schemas.py"]
    schema = {**bundle, "$ref": f"#/$defs/{def_key}"}
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)
    ]


def pod_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    if doc.get("kind") in {"Deployment", "DaemonSet", "StatefulSet", "Job"}:
        return spec["template"]["spec"]
    if doc.get("kind") == "Pod":
        return spec
    return None


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", []) or []) + list(spec.get("containers", []) or [])
