"""Renders the generated files under deploy/ (run through render.sh, which supplies the venv).

- deploy/manifests/dbshift.yaml: the Helm chart rendered with its defaults as release `dbshift`
  in namespace `dbshift-system`, plus that Namespace, in Helm's install order. For `kubectl apply`.
- deploy/examples/shop-migrations.configmap.yaml: the ConfigMap of the repository's
  migrations/ files (keys are file names), as `kubectl create configmap --from-file` makes it.
- deploy/argocd/argocd-cm.yaml: deploy/argocd/health.lua as the argocd-cm key Argo CD reads.

`render.py --check` compares instead of writing and exits 1 on drift. The tests import
`plain_manifests()` and `migrations_configmap()` from here, so there is one renderer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dbshift"
MANIFESTS = ROOT / "deploy" / "manifests" / "dbshift.yaml"
CONFIGMAP = ROOT / "deploy" / "examples" / "shop-migrations.configmap.yaml"
ARGOCD_LUA = ROOT / "deploy" / "argocd" / "health.lua"
ARGOCD_CM = ROOT / "deploy" / "argocd" / "argocd-cm.yaml"
MIGRATIONS = ROOT / "migrations"

RELEASE = "dbshift"
NAMESPACE = "dbshift-system"
# Values of the plain manifests: the chart's defaults, except that the Helm-only keep policy
# means nothing to kubectl.
PLAIN_VALUES = {"crds": {"keep": False}}

# Helm's install order (pkg/release/util/kind_sorter.go), for the kinds this chart renders.
INSTALL_ORDER = [
    "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap",
    "StorageClass", "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition",
    "ClusterRole", "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role",
    "RoleList", "RoleBinding", "RoleBindingList", "Service", "DaemonSet", "Pod",
    "ReplicationController", "ReplicaSet", "Deployment", "HorizontalPodAutoscaler",
    "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
]


def render_chart(values: dict | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE,
                 kube_version: str | None = None, api_versions: list[str] | None = None,
                 is_upgrade: bool = False) -> dict[str, str]:
    """Renders the chart offline: template path -> text. kube_version/api_versions stand in
    for what Helm learns from the API server (Chart.render exposes neither, the library does)."""
    import helm_python
    from helm_python import _native

    opts: dict = {"name": name, "namespace": namespace}
    if is_upgrade:
        opts["is_upgrade"] = True
    else:
        opts["is_install"] = True
    if kube_version:
        opts["kube_version"] = kube_version
    if api_versions:
        opts["api_versions"] = api_versions
    with helm_python.Chart.load(CHART) as chart:
        out = _native.call_string("helm_render", chart._raw(),
                                  None if values is None else json.dumps(values), json.dumps(opts))
    return json.loads(out)


def documents(rendered: dict[str, str]) -> list[tuple[str, str, dict]]:
    """(template, text, object) for every non-empty YAML document of the rendered templates,
    NOTES.txt excluded, in Helm's install order (stable within a kind)."""
    docs = []
    for template in sorted(rendered):
        if template.endswith("NOTES.txt"):
            continue
        for text in ("\n" + rendered[template]).split("\n---"):
            obj = yaml.safe_load(text)
            if obj:
                docs.append((template, text.strip("\n"), obj))

    def rank(d):
        kind = d[2]["kind"]
        return INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)

    return sorted(docs, key=rank)


# The plain manifests are for current Kubernetes (their CRD carries CEL validation rules,
# which servers before 1.25 refuse); the chart leaves the rules out on older servers.
PLAIN_KUBE_VERSION = "v1.32.0"


def plain_manifests(kube_version: str = PLAIN_KUBE_VERSION) -> str:
    header = (
        "# dbshift: everything to run the operator without Helm, in namespace dbshift-system.\n"
        "#   kubectl apply --server-side -f deploy/manifests/dbshift.yaml\n"
        "# For Kubernetes 1.25 and later (the CRD's CEL rules); on older servers install the chart.\n"
        "# GENERATED from charts/dbshift with its default values by deploy/manifests/render.sh:\n"
        "# do not edit; change the chart and re-run the script (a test fails when they differ).\n"
    )
    namespace = (
        "apiVersion: v1\n"
        "kind: Namespace\n"
        "metadata:\n"
        f"  name: {NAMESPACE}\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: dbshift\n"
        "    # The controller meets the `restricted` Pod Security Standard (docs/operator.md).\n"
        "    pod-security.kubernetes.io/enforce: restricted"
    )
    body = [namespace] + [text for _, text, _ in documents(render_chart(PLAIN_VALUES, kube_version=kube_version))]
    return header + "---\n" + "\n---\n".join(body) + "\n"


class _Literal(str):
    pass


def _literal(dumper, data):
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


def migrations_configmap() -> str:
    data = {}
    for f in sorted(MIGRATIONS.glob("*.yaml")):
        text = f.read_text()
        # Block style keeps the files readable; it cannot hold trailing spaces or tabs.
        data[f.name] = _Literal(text) if not any(
            line != line.rstrip() or "\t" in line for line in text.splitlines()) else text
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "shop-migrations", "namespace": "shop"},
        "data": data,
    }
    dumper = yaml.SafeDumper
    dumper.add_representer(_Literal, _literal)
    header = (
        "# The migration files of the repository's migrations/ directory as a ConfigMap: each key\n"
        "# is a file name (<version>_<slug>.yaml), each value that file. The same as\n"
        "#   kubectl -n shop create configmap shop-migrations --from-file=migrations/\n"
        "# GENERATED by deploy/manifests/render.sh; a test fails when it differs from migrations/.\n"
        "# A ConfigMap holds at most 1 MiB: larger sets belong in an image (image-migrations.yaml).\n"
    )
    return header + yaml.dump(cm, Dumper=dumper, sort_keys=False, width=1000)


def argocd_cm() -> str:
    lua = ARGOCD_LUA.read_text()
    indented = "".join(("    " + line) if line.strip() else line for line in lua.splitlines(True))
    return (
        "# The DatabaseMigration health check for Argo CD: merge this key into the argocd-cm\n"
        "# ConfigMap of your Argo CD installation (with the argo-cd Helm chart: under configs.cm).\n"
        "#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file deploy/argocd/argocd-cm.yaml\n"
        "# GENERATED from deploy/argocd/health.lua by deploy/manifests/render.sh: do not edit.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: argocd-cm\n"
        "  namespace: argocd\n"
        "  labels:\n"
        "    app.kubernetes.io/name: argocd-cm\n"
        "    app.kubernetes.io/part-of: argocd\n"
        "data:\n"
        "  resource.customizations.health.dbshift.io_DatabaseMigration: |\n"
        + indented
    )


OUTPUTS = {MANIFESTS: plain_manifests, CONFIGMAP: migrations_configmap, ARGOCD_CM: argocd_cm}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, make in OUTPUTS.items():
        text = make()
        rel = path.relative_to(ROOT)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(rel))
        else:
            path.write_text(text)
            print(f"wrote {rel}", file=sys.stderr)
    if stale:
        print("stale (run deploy/manifests/render.sh): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
