"""docker/README.md stays true to the files it documents."""

from __future__ import annotations

import hashlib
import json
import re
import shlex

import pytest
import yaml
from deploy_helpers import DOCKER, REPO, SCHEMAS, compose_errors, load_compose

README = DOCKER / "README.md"


@pytest.fixture(scope="module")
def text() -> str:
    return README.read_text()


def test_paths_mentioned_exist(text):
    paths = set(re.findall(r"`((?:docker|tests/deploy)/[\w./-]+)`", text)) | {"compose.yaml"}
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docker/README.md names missing files: {missing}"


def test_compose_commands_name_existing_services(text):
    services = set(load_compose()["services"])
    profiles = {p for s in load_compose()["services"].values() for p in s.get("profiles", [])}
    for line in re.findall(r"^docker compose .*$", text, flags=re.M):
        words = shlex.split(line.split("#", 1)[0])
        it = iter(words[2:])
        for word in it:
            if word == "--profile":
                assert next(it) in profiles, line
            elif word.startswith("-") or word in {"build", "up", "down", "logs", "ps"}:
                continue
            else:
                assert word in services, f"{line!r}: no service {word!r}"


def test_yaml_examples_are_valid_compose_files(text):
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        errors = compose_errors(yaml.safe_load(block))
        assert not errors, "README example:\n" + "\n".join(errors)


def test_every_profile_is_documented(text):
    profiles = {p for s in load_compose()["services"].values() for p in s.get("profiles", [])}
    for profile in profiles:
        assert f"`{profile}`" in text, f"profile {profile} is not documented"


def test_vendored_schemas_match_their_recorded_checksums():
    # The schemas are generated (schemas/update_schemas.py); a hand edit would show here.
    sources = json.loads((SCHEMAS / "SOURCES.json").read_text())
    for name, meta in sources.items():
        digest = hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest()
        assert digest == meta["sha256"], f"{name} differs from what update_schemas.py wrote"
