#!/usr/bin/env python3
"""Rebuild the JSON schemas vendored in this folder from the PyPI packages that ship them.

    python tests/deploy/schemas/update_schemas.py              # pip-downloads the pinned wheels
    python tests/deploy/schemas/update_schemas.py --wheels DIR # or uses wheels already in DIR

The tests read only the files written here, so they need no network and no extra package:

* ``compose-spec.json``: the Compose Specification schema (compose-spec/compose-spec,
  ``schema/compose-spec.json``, Apache-2.0), copied byte for byte from the copy that the
  ``check-jsonschema`` wheel vendors (``check_jsonschema/builtin_schemas/vendor/``). The wheel
  also records its sha256, which is checked here.
* ``k8s-<version>-strict-subset.json``: the Kubernetes API schemas ("local-strict" flavour:
  unknown fields are errors) of the kinds listed in ``K8S_KINDS``, with every definition they
  reach, taken from the ``kubernetes-validate`` wheel (Apache-2.0; generated from the
  Kubernetes OpenAPI document, Apache-2.0). Descriptions are dropped to keep the file small;
  nothing that validation reads is changed. To validate a document of kind K, use
  ``{"$ref": "#/$defs/<K's key in x-kinds>"}`` against this bundle (tests/deploy/schemas.py).
* ``SOURCES.json``: package versions and the sha256 of every input and output.

Run it again to move to newer schemas (bump the pins below), then re-run tests/deploy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHECK_JSONSCHEMA = "check-jsonschema==0.39.0"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
K8S_VERSION = "1.36.0"

COMPOSE_SOURCE_URL = (
    "https://raw.githubusercontent.com/compose-spec/compose-spec/master/schema/compose-spec.json"
)
K8S_SOURCE_URL = "https://github.com/willthames/kubernetes-validate"

# apiVersion/kind -> schema file in kubernetes-validate (kind lower-cased, group's first label).
K8S_KINDS = {
    "v1/Namespace": "namespace-v1.json",
    "v1/ConfigMap": "configmap-v1.json",
    "v1/Secret": "secret-v1.json",
    "v1/Service": "service-v1.json",
    "v1/ServiceAccount": "serviceaccount-v1.json",
    "apps/v1/Deployment": "deployment-apps-v1.json",
    "apps/v1/DaemonSet": "daemonset-apps-v1.json",
    "apps/v1/StatefulSet": "statefulset-apps-v1.json",
    "batch/v1/Job": "job-batch-v1.json",
    "resource.k8s.io/v1/ResourceClaimTemplate": "resourceclaimtemplate-resource-v1.json",
}

_REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _find_wheel(folder: Path, requirement: str) -> Path:
    name, version = requirement.split("==")
    stem = name.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"no wheel for {requirement} in {folder}")
    return found[0]


def _download(folder: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(folder),
        CHECK_JSONSCHEMA,
        KUBERNETES_VALIDATE,
    ]
    subprocess.run(cmd, check=True)


def _strip(node):
    """Drop human text (descriptions) and rewrite refs to point into one bundle."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "$ref" and isinstance(value, str):
                match = _REF.match(value)
                if not match:
                    raise ValueError(f"unexpected $ref {value!r}")
                out[key] = f"#/$defs/{match.group(1)}"
                continue
            out[key] = _strip(value)
        return out
    if isinstance(node, list):
        return [_strip(item) for item in node]
    return node


def _refs(node, acc: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                acc.add(value.rsplit("/", 1)[-1])
            else:
                _refs(value, acc)
    elif isinstance(node, list):
        for item in node:
            _refs(item, acc)
    return acc


def build_compose(wheel: Path) -> tuple[bytes, dict]:
    base = "check_jsonschema/builtin_schemas/vendor/"
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(base + "compose-spec.json")
        recorded = zf.read(base + "sha256/compose-spec.sha256").decode().strip()
        license_text = zf.read(base + "licenses/LICENSE.compose-spec")
    if _sha256(data) != recorded:
        raise SystemExit("compose-spec.json does not match the sha256 that check-jsonschema records")
    json.loads(data)  # must parse
    (HERE / "LICENSE.compose-spec").write_bytes(license_text)
    return data, {"sha256_recorded_by_wheel": recorded}


def build_k8s(wheel: Path) -> bytes:
    base = f"kubernetes_validate/kubernetes-json-schema/v{K8S_VERSION}-local-strict/"
    with zipfile.ZipFile(wheel) as zf:
        definitions = json.loads(zf.read(base + "_definitions.json"))["$defs"]
        kinds = {key: json.loads(zf.read(base + fname)) for key, fname in K8S_KINDS.items()}
        license_text = zf.read(next(n for n in zf.namelist() if n.endswith("licenses/LICENSE")))
    (HERE / "LICENSE.kubernetes-validate").write_bytes(license_text)

    bundle_defs: dict[str, object] = {}
    kind_keys: dict[str, str] = {}
    todo: list[str] = []
    for key, schema in kinds.items():
        # "/" would need escaping in a JSON pointer; $id/$schema would re-root the refs.
        def_key = "kind:" + key.replace("/", ".")
        bundle_defs[def_key] = _strip({k: v for k, v in schema.items() if k not in ("$id", "$schema")})
        kind_keys[key] = def_key
        todo.extend(_refs(bundle_defs[def_key], set()))
    while todo:
        name = todo.pop()
        if name in bundle_defs:
            continue
        bundle_defs[name] = _strip(definitions[name])
        todo.extend(_refs(bundle_defs[name], set()) - bundle_defs.keys())
    bundle = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"Subset of kubernetes-validate's v{K8S_VERSION}-local-strict schemas, descriptions "
            "removed; built by update_schemas.py. Apache-2.0."
        ),
        "x-kinds": kind_keys,
        "$defs": dict(sorted(bundle_defs.items())),
    }
    return (json.dumps(bundle, indent=1, sort_keys=False) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wheels", type=Path, help="folder holding the two wheels (else pip downloads them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.wheels or Path(tmp)
        if args.wheels is None:
            _download(folder)
        cj_wheel = _find_wheel(folder, CHECK_JSONSCHEMA)
        kv_wheel = _find_wheel(folder, KUBERNETES_VALIDATE)
        compose, compose_meta = build_compose(cj_wheel)
        k8s = build_k8s(kv_wheel)
        k8s_name = f"k8s-{K8S_VERSION}-strict-subset.json"
        (HERE / "compose-spec.json").write_bytes(compose)
        (HERE / k8s_name).write_bytes(k8s)
        sources = {
            "compose-spec.json": {
                "schema": "Compose Specification",
                "upstream": COMPOSE_SOURCE_URL,
                "license": "Apache-2.0 (LICENSE.compose-spec)",
                "taken_from": f"{cj_wheel.name} (PyPI), check_jsonschema/builtin_schemas/vendor/compose-spec.json",
                "wheel_sha256": _sha256(cj_wheel.read_bytes()),
                "sha256": _sha256(compose),
                **compose_meta,
            },
            k8s_name: {
                "schema": f"Kubernetes v{K8S_VERSION} API, strict (no unknown fields)",
                "kinds": sorted(K8S_KINDS),
                "upstream": K8S_SOURCE_URL,
                "license": "Apache-2.0 (LICENSE.kubernetes-validate; Kubernetes OpenAPI: The Kubernetes Authors)",
                "taken_from": f"{kv_wheel.name} (PyPI), kubernetes_validate/kubernetes-json-schema/v{K8S_VERSION}-local-strict/",
                "wheel_sha256": _sha256(kv_wheel.read_bytes()),
                "sha256": _sha256(k8s),
            },
        }
        (HERE / "SOURCES.json").write_text(json.dumps(sources, indent=2) + "\n")
    print(f"wrote compose-spec.json ({len(compose)} B), {k8s_name} ({len(k8s)} B), SOURCES.json")


if __name__ == "__main__":
    main()
