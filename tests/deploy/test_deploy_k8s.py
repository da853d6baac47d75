"""docker/k8s/*.yaml: every object valid against the (strict) Kubernetes API schema of its kind,
and the pod wired like compose.yaml: shared socket and /dev/shm, shared PID namespace, one GPU
shared by the daemon and its workers, health probes, metrics."""

from __future__ import annotations

import copy

import pytest
from deploy_helpers import (
    IMAGE_UID,
    POLICIES,
    SERVE_FLAGS,
    SERVING_FLAGS,
    SOCKET_ADDRESS,
    SOCKET_DIR,
    WORKER_FLAGS,
    containers,
    flag_value,
    flags_of,
    k8s_errors,
    k8s_files,
    load_k8s,
    pod_spec,
)

NAMESPACE = "kvrecall"
FILES = {p.name: p for p in k8s_files()}


def test_manifests_exist():
    assert {"kvrecall.yaml", "kvrecall-dra.yaml"} <= set(FILES)


@pytest.fixture(scope="module", params=sorted(FILES))
def manifest(request):
    return request.param, load_k8s(FILES[request.param])


def _workloads(docs):
    return [d for d in docs if pod_spec(d) is not None]


def _daemon(spec):
    found = [c for c in containers(spec) if c.get("args", [])[:1] == ["serve"]]
    assert len(found) == 1, "one daemon container per pod (one daemon per GPU)"
    return found[0]


def _workers(spec):
    return [c for c in containers(spec) if c.get("args", [])[:1] == ["worker"]]


# ---- schema --------------------------------------------------------------------------------


def test_every_object_is_valid_against_the_kubernetes_schema(manifest):
    name, docs = manifest
    for doc in docs:
        errors = k8s_errors(doc)
        assert not errors, f"{name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}:\n" + "\n".join(
            errors
        )


def test_the_schema_check_catches_mistakes():
    doc = copy.deepcopy(_workloads(load_k8s(FILES["kvrecall.yaml"]))[0])
    spec = doc["spec"]["template"]["spec"]
    spec["containers"][0]["volumeMount"] = []  # typo'd field
    spec["shareProcessNamespace"] = "yes"  # wrong type
    errors = k8s_errors(doc)
    assert any("volumeMount" in e for e in errors), errors
    assert any("shareProcessNamespace" in e for e in errors), errors


# ---- structure -----------------------------------------------------------------------------


def test_objects_have_identity_and_live_in_the_namespace(manifest):
    name, docs = manifest
    kinds = [d["kind"] for d in docs]
    assert "Namespace" in kinds, f"{name}: creates no Namespace"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{name}: {doc}"
        assert doc.get("metadata", {}).get("name"), f"{name}: {doc['kind']} without a name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']} namespace"


def test_selectors_match_the_pod_labels(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        labels = wl["spec"]["template"]["metadata"]["labels"]
        assert wl["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for svc in (d for d in docs if d["kind"] == "Service"):
            assert svc["spec"]["selector"].items() <= labels.items(), f"{name}: Service selects no pod"


def test_containers_have_pinned_images(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        for c in containers(pod_spec(wl)):
            image = c.get("image", "")
            assert image, f"{name}: container {c['name']} has no image"
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{name}: {c['name']}: pin an image tag ({image})"


def test_volume_mounts_refer_to_pod_volumes(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{name}: {c['name']} mounts undefined volume {m['name']}"


def test_socket_and_shm_are_shared_by_every_container(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        volumes = {v["name"]: v for v in spec["volumes"]}
        socket_vols, shm_vols = set(), set()
        for c in containers(spec):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert SOCKET_DIR in mounts, f"{name}: {c['name']} does not mount the socket dir"
            assert "/dev/shm" in mounts, f"{name}: {c['name']} does not mount the shared /dev/shm"
            socket_vols.add(mounts[SOCKET_DIR])
            shm_vols.add(mounts["/dev/shm"])
        assert len(socket_vols) == 1 and len(shm_vols) == 1, f"{name}: containers use different volumes"
        assert "emptyDir" in volumes[socket_vols.pop()]
        shm = volumes[shm_vols.pop()]
        assert shm.get("emptyDir", {}).get("medium") == "Memory", (
            f"{name}: /dev/shm must be a memory emptyDir"
        )
        assert shm["emptyDir"].get("sizeLimit"), f"{name}: size the shared /dev/shm"


def test_pod_shares_the_pid_namespace_and_runs_non_root(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        assert spec.get("shareProcessNamespace") is True, f"{name}: CUDA IPC needs one PID namespace"
        assert not spec.get("hostPID") and not spec.get("hostIPC"), f"{name}: no host namespaces needed"
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == IMAGE_UID, f"{name}: {sc}"
        for c in containers(spec):
            csc = c.get("securityContext", {})
            assert csc.get("allowPrivilegeEscalation") is False, f"{name}: {c['name']}"
            assert not csc.get("privileged"), f"{name}: {c['name']}"
            assert csc.get("runAsUser", IMAGE_UID) == IMAGE_UID, (
                f"{name}: {c['name']} must keep uid {IMAGE_UID}"
            )


def test_service_links_are_off(manifest):
    # A Service named kvrecall-metrics would otherwise inject KVRECALL_METRICS_PORT=tcp://...,
    # which the daemon reads as its --metrics-port.
    name, docs = manifest
    for wl in _workloads(docs):
        assert pod_spec(wl).get("enableServiceLinks") is False, name


# ---- daemon and workers --------------------------------------------------------------------


def test_daemon_is_a_native_sidecar_with_kvrecall_health_probes(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        daemon = _daemon(spec)
        assert daemon in spec.get("initContainers", []) and daemon.get("restartPolicy") == "Always", (
            f"{name}: the daemon should be a native sidecar so workers start after it is healthy"
        )
        args = daemon["args"]
        assert flags_of(args) <= SERVE_FLAGS, f"{name}: unknown serve flags {flags_of(args) - SERVE_FLAGS}"
        assert flag_value(args, "--listen") == SOCKET_ADDRESS
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            cmd = daemon[probe]["exec"]["command"]
            assert cmd[:3] == ["kvrecall", "health", "--target"] and cmd[3] == SOCKET_ADDRESS, (
                f"{name}: {probe}"
            )


def test_workers_are_servers_that_talk_to_the_daemon_socket(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        workers = _workers(spec)
        assert workers, f"{name}: no worker in the pod"
        ports = set()
        for w in workers:
            args = w["args"]
            allowed = WORKER_FLAGS | SERVING_FLAGS
            assert flags_of(args) <= allowed, f"{name}: {w['name']}: {flags_of(args) - allowed}"
            assert "--serve" in args, f"{name}: {w['name']} must serve (a batch run would crash-loop)"
            assert flag_value(args, "--target") == SOCKET_ADDRESS
            assert flag_value(args, "--policy") in POLICIES
            port = int(flag_value(args, "--port"))
            ports.add(port)
            assert {"name": "openai", "containerPort": port} in w["ports"], f"{name}: {w['name']} port"
            for probe in ("startupProbe", "readinessProbe"):
                assert w[probe]["httpGet"] == {"path": "/health", "port": port}, f"{name}: {w['name']} {probe}"
        assert len(ports) == len(workers), f"{name}: the pod's workers share one network namespace"
        # One worker per pod: its id is the pod's host name (more workers would need --worker-id).
        assert len(workers) == 1 or all(flag_value(w["args"], "--worker-id") for w in workers)


def test_openai_service_selects_the_pods_on_the_worker_port(manifest):
    name, docs = manifest
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kvrecall-openai"]
    (wl,) = _workloads(docs)
    labels = wl["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"].get("clusterIP") != "None", f"{name}: a balancing Service, not a headless one"
    (worker,) = _workers(pod_spec(wl))
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == int(flag_value(worker["args"], "--port"))


def test_metrics_port_annotation_and_service_agree(manifest):
    name, docs = manifest
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        daemon = _daemon(spec)
        port = int(flag_value(daemon["args"], "--metrics-port"))
        ports = {p["name"]: p["containerPort"] for p in daemon["ports"]}
        assert ports.get("metrics") == port, f"{name}: container port 'metrics' must be {port}"
        ann = wl["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port
        assert ann.get("prometheus.io/path", "/metrics") == "/metrics"
        (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kvrecall-metrics"]
        # A number: a named port of a native sidecar resolves only from Kubernetes 1.32.
        assert any(p["port"] == port and p["targetPort"] == port for p in svc["spec"]["ports"]), name


# ---- GPU -----------------------------------------------------------------------------------


def test_device_plugin_manifest_gives_every_container_the_one_gpu():
    docs = load_k8s(FILES["kvrecall.yaml"])
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        for c in containers(spec):
            limits = c.get("resources", {}).get("limits", {})
            assert str(limits.get("nvidia.com/gpu")) == "1", f"{c['name']}: nvidia.com/gpu limit must be 1"
        # Per-container GPUs are the same GPU only on one-GPU nodes (time-sliced).
        assert spec["nodeSelector"].get("nvidia.com/gpu.count") == "1"
        assert wl["spec"].get("strategy", {}).get("type") == "Recreate"


def test_dra_manifest_shares_one_claim_across_the_pod():
    docs = load_k8s(FILES["kvrecall-dra.yaml"])
    templates = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ResourceClaimTemplate"}
    for wl in _workloads(docs):
        spec = pod_spec(wl)
        (claim,) = spec["resourceClaims"]
        template = templates[claim["resourceClaimTemplateName"]]
        (request,) = template["spec"]["spec"]["devices"]["requests"]
        assert request["exactly"]["deviceClassName"] == "gpu.nvidia.com"
        assert request["exactly"].get("count", 1) == 1
        for c in containers(spec):
            res = c.get("resources", {})
            assert [x["name"] for x in res.get("claims", [])] == [claim["name"]], (
                f"{c['name']}: not on the pod's GPU"
            )
            assert "nvidia.com/gpu" not in res.get("limits", {}), f"{c['name']}: mixes device plugin and DRA"


def test_both_flavours_run_the_same_pod_apart_from_the_gpu():
    def normalise(path):
        (wl,) = _workloads(load_k8s(path))
        spec = copy.deepcopy(pod_spec(wl))
        spec.pop("resourceClaims", None)
        spec.pop("nodeSelector", None)  # device plugin: GPU nodes with one GPU; DRA: the claim decides
        for c in containers(spec):
            c.get("resources", {}).pop("claims", None)
            c.get("resources", {}).get("limits", {}).pop("nvidia.com/gpu", None)
        return spec

    assert normalise(FILES["kvrecall.yaml"]) == normalise(FILES["kvrecall-dra.yaml"])
