"""Shared helpers of the chart, manifest and GitOps tests (run by tests/chart/run.sh)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "manifests"))

import render  # noqa: E402  (deploy/manifests/render.py: the one renderer)

CHART = ROOT / "charts" / "dbshift"
CRD_FILE = ROOT / "crds" / "databasemigration.yaml"
EXAMPLES = ROOT / "deploy" / "examples"
RELEASE_NAMESPACE = "dbshift-system"

# The value sets every chart test runs against: the defaults and each non-default the brief names.
VARIANTS = {
    "default": {},
    "watch-namespace": {"watchNamespace": "shop"},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s",
                                                       "labels": {"release": "prometheus"}}}},
    "crds-off": {"crds": {"install": False}},
    "replicas-2": {"replicaCount": 2},
    "host-network": {
        "hostNetwork": True,
        "metrics": {"port": 18080},
        "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                     {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}],
    },
}


# Built-in kinds that exist only from a Kubernetes version on, with that version: the chart
# renders them only for servers that have them.
SINCE = {"ValidatingAdmissionPolicy": "1.30.0", "ValidatingAdmissionPolicyBinding": "1.30.0"}
# Kinds without a namespace.
CLUSTER_SCOPED = ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", *SINCE)


def schema_version(obj: dict, version: str) -> str:
    """The Kubernetes version to validate `obj` against, for a check at `version`."""
    since = SINCE.get(obj["kind"])
    if since and tuple(map(int, version.split("."))) < tuple(map(int, since.split("."))):
        return since
    return version


def objects(rendered: dict[str, str]) -> list[dict]:
    return [obj for _, _, obj in render.documents(rendered)]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crd() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


def crd_json_schema(strict: bool = True) -> dict:
    """The CRD's openAPIV3Schema as a JSON Schema: nullable and int-or-string translated and,
    with strict, unknown fields refused where the CRD does not preserve them (what the API
    server's strict field validation does on current Kubernetes)."""
    schema = copy.deepcopy(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])

    def walk(s: dict) -> dict:
        if s.pop("x-kubernetes-int-or-string", False):
            s.pop("type", None)
            s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if s.pop("nullable", False) and "type" in s:
            s["type"] = [s["type"], "null"]
        preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
        for key in ("properties",):
            for v in s.get(key, {}).values():
                walk(v)
        if isinstance(s.get("additionalProperties"), dict):
            walk(s["additionalProperties"])
        if isinstance(s.get("items"), dict):
            walk(s["items"])
        if strict and "properties" in s and "additionalProperties" not in s and not preserve:
            s["additionalProperties"] = False
        return s

    walk(schema)
    schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                 "metadata": {"type": "object"}})
    return schema


@pytest.fixture(scope="session")
def rendered_variants() -> dict[str, dict[str, str]]:
    return {name: render.render_chart(values, namespace=RELEASE_NAMESPACE)
            for name, values in VARIANTS.items()}
