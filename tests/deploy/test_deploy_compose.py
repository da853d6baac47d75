"""compose.yaml: valid against the Compose Specification schema, and wired the way CUDA IPC,
shared memory, health checks and Prometheus need (no Docker engine involved)."""

from __future__ import annotations

import copy

import pytest
import yaml
from deploy_helpers import (
    COMPOSE_FILE,
    DOCKER,
    HTTP_PORT,
    POLICIES,
    REPO,
    SERVE_FLAGS,
    SERVING_FLAGS,
    SOCKET_ADDRESS,
    SOCKET_DIR,
    WORKER_FLAGS,
    active_services,
    command_list,
    compose_errors,
    compose_raw_text,
    compose_variables,
    default_profiles,
    device_of,
    dotenv,
    flag_value,
    flags_of,
    gpu_reservations,
    load_compose,
    role,
    serving,
    volume_mounts,
)

NS_HOLDER = "kvrecall-ns"
LOAD_BALANCERS = ("lb", "lb-gpu")
WORKER_ALIAS = "openai-worker"  # what docker/nginx.conf balances over


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def _by_role(services, wanted):
    return {n: s for n, s in services.items() if role(s) == wanted}


def _daemon_of(services, worker: dict) -> str:
    """The daemon whose socket volume the worker mounts."""
    vol = volume_mounts(worker)[SOCKET_DIR]
    owners = [n for n, s in _by_role(services, "daemon").items() if volume_mounts(s).get(SOCKET_DIR) == vol]
    assert len(owners) == 1, f"socket volume {vol!r} belongs to daemons {owners}"
    return owners[0]


# ---- the schema --------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(compose):
    errors = compose_errors(compose)
    assert not errors, "compose.yaml violates the Compose Specification:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "env",
    [
        {"KVRECALL_GPU": "3", "KVRECALL_GPU1": "5", "KVRECALL_TAG": "v1", "KVRECALL_SHM_SIZE": "64gb"},
        {"KVRECALL_HOST_POOL_GB": "128", "PROMETHEUS_PORT": "19090", "KVRECALL_POLICY_A": "full"},
    ],
)
def test_compose_file_stays_valid_with_variables_set(env):
    errors = compose_errors(load_compose(env))
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_mistakes(compose):
    # The schema is strict (unknown keys are errors); make sure that strictness is in force.
    broken = copy.deepcopy(compose)
    broken["services"]["kvrecall"]["ipcs"] = "host"
    broken["services"]["kvrecall-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capability"] = [
        "gpu"
    ]
    errors = compose_errors(broken)
    assert any("ipcs" in e for e in errors), errors
    assert any("capability" in e for e in errors), errors


def test_every_variable_has_a_default():
    # `docker compose up` must work with an .env file that sets only the profile.
    missing = sorted({name for name, op, _ in compose_variables(compose_raw_text()) if op not in (":-", "-")})
    assert not missing, f"variables without a default: {missing}"


def test_file_is_plain_yaml_without_version_key():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in raw, "the top-level version key is obsolete in the Compose Specification"
    # The project name comes from .env: the top-level `name` key breaks Compose v1 (Debian's).
    assert "name" not in raw and dotenv()["COMPOSE_PROJECT_NAME"] == "kvrecall"


# ---- topology ----------------------------------------------------------------------------


def test_default_up_starts_the_cpu_stack(compose):
    assert default_profiles() == {"cpu"}
    default = active_services(compose, default_profiles())
    assert set(_by_role(default, "daemon")) == {"kvrecall"}
    assert set(_by_role(default, "worker")) == {"worker"}
    assert set(default) == {NS_HOLDER, "kvrecall", "worker", "lb", "prometheus"}
    assert int(default["worker"]["deploy"]["replicas"]) == 2
    assert not any(gpu_reservations(s) for s in default.values()), "plain up must run without a GPU"


def test_gpu_profile_starts_the_gpu_stack_alone(compose):
    gpu = active_services(compose, {"gpu"})
    assert set(gpu) == {NS_HOLDER, "kvrecall-gpu", "worker-gpu", "lb-gpu", "prometheus"}
    assert int(gpu["worker-gpu"]["deploy"]["replicas"]) == 2
    ids = {tuple(gpu_reservations(gpu[n])[0]["device_ids"]) for n in ("kvrecall-gpu", "worker-gpu")}
    assert len(ids) == 1, f"daemon and workers must share one GPU, got {ids}"


def test_every_kvrecall_service_has_a_known_role(services):
    for name, svc in services.items():
        if name in (NS_HOLDER, "prometheus", *LOAD_BALANCERS):
            continue
        assert role(svc) in ("daemon", "worker"), f"{name}: command must start with serve or worker"


def test_commands_use_only_the_cli_flags(services):
    for name, svc in services.items():
        argv = command_list(svc)
        if role(svc) == "daemon":
            assert flags_of(argv) <= SERVE_FLAGS, (
                f"{name}: unknown serve flags {flags_of(argv) - SERVE_FLAGS}"
            )
            for needed in ("--listen", "--device", "--metrics-port"):
                assert flag_value(argv, needed), f"{name}: {needed} missing"
        elif role(svc) == "worker":
            allowed = WORKER_FLAGS | SERVING_FLAGS if serving(svc) else WORKER_FLAGS
            assert flags_of(argv) <= allowed, f"{name}: unknown worker flags {flags_of(argv) - allowed}"
            for needed in ("--target", "--policy"):
                assert flag_value(argv, needed), f"{name}: {needed} missing"
            assert flag_value(argv, "--policy") in POLICIES, name
            # A serving worker's id is its host name: every replica its own quota.
            assert (flag_value(argv, "--worker-id") is None) == serving(svc), name


def test_worker_ids_are_unique_per_daemon(services):
    seen: dict[tuple[str, str], str] = {}
    for name, svc in _by_role(services, "worker").items():
        if serving(svc):
            continue  # ids from host names
        key = (_daemon_of(services, svc), flag_value(command_list(svc), "--worker-id"))
        assert key not in seen, f"{name} and {seen[key]} use the same worker id on one daemon"
        seen[key] = name


# ---- the socket volume -------------------------------------------------------------------


def test_every_service_using_the_socket_mounts_a_named_volume_there(compose, services):
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        argv = command_list(svc)
        address = flag_value(argv, "--listen") or flag_value(argv, "--target")
        if role(svc) is None:
            continue
        assert address == SOCKET_ADDRESS, f"{name}: socket address {address!r}"
        source = volume_mounts(svc).get(SOCKET_DIR)
        assert source, f"{name}: nothing mounted at {SOCKET_DIR}"
        assert source in named_volumes, f"{name}: {source!r} is not a named volume of the project"


def test_each_daemon_has_its_own_socket_volume(services):
    daemons = _by_role(services, "daemon")
    volumes = [volume_mounts(s)[SOCKET_DIR] for s in daemons.values()]
    assert len(set(volumes)) == len(volumes), (
        f"daemons share a socket volume: {dict(zip(daemons, volumes, strict=True))}"
    )


def test_workers_mount_the_same_volume_as_their_daemon_and_wait_for_it(services):
    for name, svc in _by_role(services, "worker").items():
        daemon = _daemon_of(services, svc)
        assert set(svc.get("profiles") or []) == set(services[daemon].get("profiles") or []), (
            f"{name} and its daemon {daemon} must be in the same profiles"
        )
        dep = (svc.get("depends_on") or {}).get(daemon)
        assert dep and dep.get("condition") == "service_healthy", (
            f"{name} must depend on {daemon} with condition service_healthy"
        )


@pytest.mark.parametrize("daemon, worker", [("kvrecall", "worker"), ("kvrecall-gpu", "worker-gpu")])
def test_stack_workers_share_their_daemons_socket(services, daemon, worker):
    vols = {n: volume_mounts(services[n])[SOCKET_DIR] for n in (daemon, worker)}
    assert len(set(vols.values())) == 1, vols


# ---- namespaces (CUDA IPC, /dev/shm) -------------------------------------------------------


def test_namespace_holder_owns_a_shareable_ipc_namespace(services):
    holder = services[NS_HOLDER]
    assert holder.get("ipc") == "shareable"
    assert holder.get("shm_size"), "the shared /dev/shm needs an explicit size (Docker's default is 64 MB)"
    assert not holder.get("profiles"), "every stack needs the holder: it must not be in a profile"
    assert "pid" not in holder, "the holder is the PID namespace's init; it must not join another"
    assert holder.get("restart") in ("always", "unless-stopped")


def test_daemons_and_workers_share_ipc_and_pid_namespaces(services):
    for name, svc in services.items():
        if role(svc) is None:
            continue
        assert svc.get("ipc") == f"service:{NS_HOLDER}", f"{name}: ipc must be service:{NS_HOLDER}"
        assert svc.get("pid") == f"service:{NS_HOLDER}", f"{name}: pid must be service:{NS_HOLDER}"
        assert "shm_size" not in svc, f"{name}: shm_size belongs to the IPC namespace holder"


def test_namespace_sharing_is_documented(services):
    text = compose_raw_text()
    for needle in ("PID namespace", "IPC namespace", "cudaIpcOpenMemHandle", "/dev/shm"):
        assert needle in text, f"compose.yaml should explain {needle!r}"


# ---- GPUs --------------------------------------------------------------------------------


def test_gpu_services_reserve_one_nvidia_gpu_by_id(services):
    for name, svc in services.items():
        device = device_of(svc) or ""
        if not device.startswith("cuda"):
            continue
        res = gpu_reservations(svc)
        assert len(res) == 1, f"{name}: runs on {device} but reserves {res}"
        (dev,) = res
        assert dev.get("driver") == "nvidia", name
        assert "gpu" in dev.get("capabilities", []), name
        # device_ids, not count: daemon and workers must get the same physical GPU.
        assert "count" not in dev and len(dev.get("device_ids", [])) == 1, (
            f"{name}: pin one GPU by device_ids"
        )
        assert device == "cuda:0", f"{name}: the one reserved GPU is cuda:0 inside the container"


def test_workers_reserve_their_daemons_gpu(services):
    for name, svc in _by_role(services, "worker").items():
        daemon = services[_daemon_of(services, svc)]
        assert gpu_reservations(svc) == gpu_reservations(daemon), f"{name}: not on its daemon's GPU"
        assert (device_of(svc) or "").split(":")[0] == (device_of(daemon) or "").split(":")[0], name


def test_multi_gpu_profile_runs_one_daemon_per_gpu(compose):
    stack = active_services(compose, {"gpu", "multi-gpu"})
    daemons = _by_role(stack, "daemon")
    assert len(daemons) >= 2, f"multi-gpu profile starts daemons {sorted(daemons)}"
    gpu_ids = [tuple(gpu_reservations(s)[0]["device_ids"]) for s in daemons.values()]
    assert len(set(gpu_ids)) == len(gpu_ids), (
        f"two daemons on one GPU: {dict(zip(daemons, gpu_ids, strict=True))}"
    )
    assert {g for (g,) in gpu_ids} >= {"0", "1"}
    sockets = [volume_mounts(s)[SOCKET_DIR] for s in daemons.values()]
    assert len(set(sockets)) == len(sockets)
    assert all(role(s) != "daemon" or (device_of(s) or "").startswith("cuda") for s in stack.values())


def test_cpu_profile_services_have_no_gpu_anything(compose, services):
    cpu = {n: s for n, s in services.items() if "cpu" in (s.get("profiles") or [])}
    assert set(_by_role(cpu, "daemon")) == {"kvrecall"}
    assert set(_by_role(cpu, "worker")) == {"worker"}
    for name, svc in cpu.items():
        assert not gpu_reservations(svc), f"{name}: GPU reservation in the cpu profile"
        assert "gpus" not in svc and "runtime" not in svc, name
        if name in LOAD_BALANCERS:
            continue
        assert device_of(svc) == "cpu", f"{name}: device {device_of(svc)!r}"
        assert svc["build"]["args"]["VARIANT"] == "cpu", f"{name}: must build the CPU variant"
        assert "ulimits" not in svc, f"{name}: the CPU stack pins no memory (and low-memlock hosts refuse -1)"
        # Everything a cpu service depends on must run without a GPU too.
        for dep in svc.get("depends_on") or {}:
            assert not gpu_reservations(services[dep]), f"{name} depends on GPU service {dep}"


def test_gpu_services_are_not_in_the_cpu_profile(services):
    for name, svc in services.items():
        if gpu_reservations(svc):
            assert "cpu" not in (svc.get("profiles") or []), name


# ---- images and builds -------------------------------------------------------------------


def test_builds_point_at_existing_dockerfiles(services):
    for name, svc in services.items():
        build = svc.get("build")
        if not build:
            continue
        assert build["context"] == ".", f"{name}: build from the repository root"
        assert (REPO / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        assert build.get("args", {}).get("VARIANT") in ("cuda", "cpu"), name


def test_one_image_name_is_built_one_way(services):
    # Two services tagging one image name from different builds would overwrite each other.
    seen: dict[str, tuple] = {}
    for svc in services.values():
        if "build" not in svc:
            continue
        key = (svc["build"]["dockerfile"], tuple(sorted((svc["build"].get("args") or {}).items())))
        prior = seen.setdefault(svc["image"], key)
        assert prior == key, f"image {svc['image']} is built two ways ({prior} vs {key})"


def test_kvrecall_services_do_not_override_the_non_root_user(services):
    for name, svc in services.items():
        if role(svc) is not None:
            assert "user" not in svc, f"{name}: keep the image's user (uid 10001 owns the socket)"
            assert not svc.get("privileged"), name


# ---- health ------------------------------------------------------------------------------


def test_daemons_have_a_kvrecall_health_check_on_their_socket(services):
    for name, svc in _by_role(services, "daemon").items():
        test = svc.get("healthcheck", {}).get("test")
        assert test, f"{name}: no healthcheck"
        argv = test[1:] if isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") else test
        argv = argv if isinstance(argv, list) else argv.split()
        assert argv[:2] == ["kvrecall", "health"], f"{name}: healthcheck is {test}"
        assert flag_value(argv, "--target") == flag_value(command_list(svc), "--listen"), name


# ---- metrics -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_targets() -> set[str]:
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = set()
    for job in cfg["scrape_configs"]:
        for sc in job.get("static_configs", []):
            targets.update(sc["targets"])
    return targets


def test_prometheus_scrapes_every_daemons_metrics_port(services, prometheus_targets):
    for name, svc in _by_role(services, "daemon").items():
        port = flag_value(command_list(svc), "--metrics-port")
        assert f"{name}:{port}" in prometheus_targets, f"prometheus.yml does not scrape {name}:{port}"
        assert str(port) in {str(p) for p in svc.get("expose", [])}, f"{name}: expose {port}"


def test_prometheus_targets_are_services(services, prometheus_targets):
    for target in prometheus_targets:
        host = target.rsplit(":", 1)[0]
        assert host == "localhost" or host in services, f"prometheus target {target} is not a service"


def test_prometheus_service_mounts_the_config(services):
    prom = services["prometheus"]
    mounts = volume_mounts(prom)
    assert mounts.get("/etc/prometheus/prometheus.yml", "").endswith("docker/prometheus.yml")
    assert any(a.startswith("--config.file=/etc/prometheus/prometheus.yml") for a in command_list(prom))
    assert not prom.get("depends_on"), "Prometheus must start with any stack (cpu or gpu)"
    assert not prom.get("profiles")


def test_environment_values_are_strings(services):
    # YAML would turn an unquoted 1, true or 0.5 into a number or a boolean; keep them quoted.
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if isinstance(env, dict):
            for key, value in env.items():
                assert isinstance(value, str), f"{name}: environment {key} = {value!r} is not a string"


# ---- serving workers and the load balancer ---------------------------------------------------


def test_serving_workers_are_ready_when_they_answer_http(services):
    for name, svc in services.items():
        if not serving(svc):
            continue
        argv = command_list(svc)
        assert flag_value(argv, "--port") == str(HTTP_PORT), name
        test = svc["healthcheck"]["test"]
        assert test[1:4] == ["kvrecall", "health", "--http"], f"{name}: readiness is {test}"
        assert test[4] == f"http://127.0.0.1:{HTTP_PORT}/health", name
        assert svc["restart"] == "unless-stopped", f"{name}: a server is restarted when it fails"
        assert WORKER_ALIAS in svc["networks"]["default"]["aliases"], f"{name}: the balancer cannot find it"
        assert any(str(p).endswith(f"::{HTTP_PORT}") for p in svc["ports"]), f"{name}: publish {HTTP_PORT}"
        assert volume_mounts(svc).get("/models") == "kvrecall-models", f"{name}: no model volume"


@pytest.mark.parametrize("lb, worker", [("lb", "worker"), ("lb-gpu", "worker-gpu")])
def test_load_balancer_fronts_its_stacks_workers(services, lb, worker):
    svc = services[lb]
    assert svc["profiles"] == services[worker]["profiles"]
    assert svc["depends_on"][worker]["condition"] == "service_healthy"
    assert volume_mounts(svc)["/etc/nginx/nginx.conf"] == "./docker/nginx.conf"
    assert any(str(p).endswith(":8080") for p in svc["ports"])
    conf = (DOCKER / "nginx.conf").read_text()
    assert f"server {WORKER_ALIAS}:{HTTP_PORT}" in conf and "listen 8080;" in conf
    assert "proxy_buffering off;" in conf, "server-sent events must stream through"
