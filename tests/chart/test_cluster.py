"""The chart's and the examples' objects against a real API server (skipped without one).

Given DBSHIFT_TEST_KUBECONFIG, this creates the CRD, namespaces dbshift-system, shop,
dbshift-shop and dbshift-ha, and cluster roles named dbshift-*, and deletes at the end those it
created (unless DBSHIFT_TEST_KEEP=1). Deployments are only dry-run on the server, so no pod is
ever started. It:
- renders the chart the way `helm install` would against that server (its version and API
  groups), for the defaults (as the plain manifests), a watchNamespace release and a
  two-replica hostNetwork release, and applies them with server-side apply;
- applies every file of deploy/examples and checks the API server kept them, with the CRD's
  defaults filled in, and refuses an invalid DatabaseMigration;
- asks the API server what each ServiceAccount may do (`kubectl auth can-i --as=...`);
- creates each Deployment's pod as a server dry run in its namespace, where Pod Security
  admission (Kubernetes 1.23+) enforces the level the namespace is labelled with: `restricted`
  everywhere but the hostNetwork release's namespace, which needs `privileged`.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import tempfile
import time

import pytest
import yaml

from conftest import EXAMPLES, render, yaml_docs

KUBECONFIG = os.environ.get("DBSHIFT_TEST_KUBECONFIG")
if not KUBECONFIG:
    pytest.skip("DBSHIFT_TEST_KUBECONFIG not set: no cluster to apply to", allow_module_level=True)

MANAGER = "dbshift-chart-test"
CRD_NAME = "databasemigrations.dbshift.io"
CONTROLLER = "system:serviceaccount:dbshift-system:dbshift"
SHOP_CONTROLLER = "system:serviceaccount:dbshift-shop:dbshift-shop"
# The extra releases (the default one is deploy/manifests/dbshift.yaml, release `dbshift`).
RELEASES = {
    # release name, namespace, values
    "dbshift-shop": ("dbshift-shop", {"watchNamespace": "shop", "crds": {"install": False},
                                      "rbac": {"waiterRole": False, "aggregateToDefaultRoles": False}}),
    "dbshift-ha": ("dbshift-ha", {"replicaCount": 2, "hostNetwork": True, "crds": {"install": False},
                                  "rbac": {"waiterRole": False, "aggregateToDefaultRoles": False},
                                  "metrics": {"port": 18080},
                                  "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                                               {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]}),
}
# The Pod Security level each namespace enforces: dbshift-system (deploy/manifests) and shop
# (deploy/examples/namespace.yaml) carry their labels themselves. hostNetwork needs `privileged`
# (even `baseline` forbids host namespaces).
POD_SECURITY = {"dbshift-system": "restricted", "shop": "restricted", "dbshift-shop": "restricted",
                "dbshift-ha": "privileged"}
POD_SECURITY_LABEL = "pod-security.kubernetes.io/enforce"


def kubectl_bin() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        k8s_bin = os.environ.get("K8S_BIN", os.path.expanduser("~/.cache/dbshift/k8s-1.20.2/bin"))
        found = os.path.join(k8s_bin, "kubectl")
    return found


# kubectl's discovery cache, emptied once the CRD exists: kubectl 1.20 does not refresh a cache
# that predates a CRD when asked for its resources (`the server doesn't have a resource type`).
CACHE_DIR = tempfile.mkdtemp(prefix="dbshift-kubectl-cache-")


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [kubectl_bin(), "--kubeconfig", KUBECONFIG, f"--cache-dir={CACHE_DIR}", *args]
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[4:])} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


# Kinds validated with a server-side dry run instead of being created: a Deployment would start
# pods (a controller watching every namespace, on a cluster with a node), which this test must
# not do to a cluster other tests may share.
DRY_RUN_KINDS = {"Deployment"}


def apply_docs(text: str) -> dict[tuple[str, str], dict]:
    """Applies the YAML documents of `text` (server-side); DRY_RUN_KINDS only as a server dry
    run. Returns what the API server answered for the dry-run objects, by (kind, name)."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    real = [d for d in docs if d["kind"] not in DRY_RUN_KINDS]
    if real:
        kubectl("apply", "--server-side", "--force-conflicts", f"--field-manager={MANAGER}", "-f", "-",
                input=yaml.safe_dump_all(real))
    answered = {}
    for d in docs:
        if d["kind"] in DRY_RUN_KINDS:
            out = kubectl("apply", "--server-side", "--force-conflicts", f"--field-manager={MANAGER}",
                          "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump(d)).stdout
            answered[(d["kind"], d["metadata"]["name"])] = json.loads(out)
    return answered


def get(kind: str, name: str, namespace: str | None = None) -> dict:
    ns = ["-n", namespace] if namespace else []
    return json.loads(kubectl("get", kind, name, *ns, "-o", "json").stdout)


def can_i(user: str, verb: str, resource: str, namespace: str | None = None, *extra: str) -> bool:
    ns = ["-n", namespace] if namespace else ["--all-namespaces"]
    proc = kubectl("auth", "can-i", verb, resource, f"--as={user}", *ns, *extra, check=False)
    answer = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {proc.stderr}{proc.stdout}"
    return answer == "yes"


def server_capabilities() -> tuple[str, list[str]]:
    version = json.loads(kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    groups = kubectl("api-versions").stdout.split()
    return version, groups


def names(kind: str) -> set[str]:
    return set(kubectl("get", kind, "-o", "jsonpath={.items[*].metadata.name}").stdout.split())


@pytest.fixture(scope="module")
def cluster():
    version, groups = server_capabilities()
    our_ns = ["dbshift-system", "shop", "dbshift-shop", "dbshift-ha"]
    # A previous run's namespaces may still be terminating: objects cannot be created in them.
    deadline = time.time() + 120
    for ns in our_ns:
        while kubectl("get", "namespace", ns, "-o", "jsonpath={.status.phase}", check=False).stdout == "Terminating":
            assert time.time() < deadline, f"namespace {ns} still terminating"
            time.sleep(1)
    minor = int(re.match(r"v1\.(\d+)", version).group(1))
    # What exists already is left alone at the end. The approval policy exists from 1.30.
    policies = ["validatingadmissionpolicybindings", "validatingadmissionpolicies"] if minor >= 30 else []
    kinds = ["clusterrolebindings", "clusterroles", *policies, "namespaces", "crd"]
    before = {kind: names(kind) for kind in kinds}
    answered = {}
    # The default release, exactly as kubectl users get it; before 1.25, which refuses the
    # CRD's CEL rules, as the chart renders it for that server (what the docs tell them to use).
    plain = render.MANIFESTS.read_text() if minor >= 25 else render.plain_manifests(kube_version=version)
    answered.update(apply_docs(plain))
    kubectl("wait", "--for=condition=established", "--timeout=60s", f"crd/{CRD_NAME}")
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    apply_docs((EXAMPLES / "namespace.yaml").read_text())
    rendered = {}
    for release, (namespace, values) in RELEASES.items():
        kubectl("create", "namespace", namespace, check=False)
        kubectl("label", "--overwrite", "namespace", namespace, f"{POD_SECURITY_LABEL}={POD_SECURITY[namespace]}")
        out = render.render_chart(values, name=release, namespace=namespace,
                                  kube_version=version, api_versions=groups)
        rendered[release] = out
        answered.update(apply_docs("\n---\n".join(text for _, text, _ in render.documents(out))))
    # Every example (after the chart: the app's RoleBinding names the chart's waiter role).
    for path in sorted(EXAMPLES.glob("*.yaml")):
        answered.update(apply_docs(path.read_text()))
    yield {"version": version, "groups": groups, "rendered": rendered, "answered": answered}
    if os.environ.get("DBSHIFT_TEST_KEEP") != "1":
        # Namespaces first (their DatabaseMigrations go with them), then the CRD; waiting until
        # both are gone, so whatever runs next on this cluster can create them again.
        for kind in kinds:
            new = sorted(n for n in names(kind) - before[kind] if kind != "namespaces" or n in our_ns)
            if new:
                kubectl("delete", kind, *new, "--ignore-not-found", "--wait=true", "--timeout=180s", check=False)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


def test_chart_objects_are_accepted(cluster):
    answered = cluster["answered"]
    deploy = answered[("Deployment", "dbshift")]
    assert deploy["metadata"]["namespace"] == "dbshift-system"
    assert deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert get("clusterrole", "dbshift-controller")["rules"]
    assert get("role", "dbshift-shop-controller", "shop")["rules"]
    assert get("serviceaccount", "dbshift", "dbshift-system")["automountServiceAccountToken"] is True
    ha = answered[("Deployment", "dbshift-ha")]["spec"]["template"]["spec"]
    assert ha["hostNetwork"] is True and ha["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert kubectl("get", "deployments", "--all-namespaces", "-l", "app.kubernetes.io/part-of=dbshift",
                   "-o", "name").stdout == "", "the test must not start controllers"
    # The PDB's API group is the one this server serves.
    pdb_group = "policy/v1" if "policy/v1" in cluster["groups"] else "policy/v1beta1"
    (pdb,) = [o for o in render.documents(cluster["rendered"]["dbshift-ha"]) if o[2]["kind"] == "PodDisruptionBudget"]
    assert pdb[2]["apiVersion"] == pdb_group
    got = json.loads(kubectl("get", f"poddisruptionbudgets.{pdb_group.split('/')[1]}.policy", "dbshift-ha",
                             "-n", "dbshift-ha", "-o", "json").stdout)
    assert got["spec"]["minAvailable"] == 1


def test_crd_is_served(cluster):
    crd = get("crd", CRD_NAME)
    assert crd["spec"]["names"]["shortNames"] == ["dbm"]
    assert kubectl("get", "dbm", "--all-namespaces").returncode == 0


def test_examples_are_accepted(cluster):
    answered = cluster["answered"]
    app = answered[("Deployment", "shop-web")]["spec"]["template"]["spec"]
    assert app["initContainers"][0]["args"] == ["wait", "add-preferences"]
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for obj in yaml_docs(path):
            if obj["kind"] in DRY_RUN_KINDS:
                continue
            ns = obj["metadata"].get("namespace")
            kind = obj["kind"].lower() + ("." + obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"]
                                          and "." in obj["apiVersion"].split("/")[0] else "")
            got = get(kind, obj["metadata"]["name"], ns)
            assert got["metadata"]["name"] == obj["metadata"]["name"]
    # The API server filled in the CRD's defaults.
    canary = get("dbm", "orders-typed-totals", "shop")["spec"]
    assert canary["connection"]["secretRef"]["key"] == "uri"
    assert canary["dryRun"] is False and canary["allowChanged"] is False
    minimal = get("dbm", "add-preferences", "shop")["spec"]
    assert minimal["backup"] == {"enabled": True, "retention": 3}
    image = get("dbm", "release-2025-01", "shop")["spec"]
    assert image["rollout"]["onFailure"] == "rollback" and image["rollout"]["maxFailures"] == 0


def test_invalid_resource_is_refused(cluster):
    bad = yaml.safe_load((EXAMPLES / "add-preferences.yaml").read_text())
    bad["metadata"]["name"] = "invalid-max-parallel"
    bad["spec"]["rollout"]["maxParallel"] = 0
    proc = kubectl("apply", "--server-side", f"--field-manager={MANAGER}", "-f", "-",
                   input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0 and "maxParallel" in proc.stderr, proc.stderr


@pytest.mark.parametrize("verb, resource, namespace, allowed", [
    ("list", "databasemigrations.dbshift.io", None, True),
    ("watch", "databasemigrations.dbshift.io", "shop", True),
    ("patch", "databasemigrations.dbshift.io", "shop", True),
    ("delete", "databasemigrations.dbshift.io", "shop", False),
    ("create", "databasemigrations.dbshift.io", "shop", False),
    ("create", "jobs.batch", "shop", True),
    ("delete", "jobs.batch", "shop", False),
    ("deletecollection", "jobs.batch", "shop", True),
    ("update", "jobs.batch", "shop", False),
    ("list", "pods", "shop", True),
    ("patch", "pods", "shop", True),
    ("delete", "pods", "shop", False),
    ("create", "pods", "shop", True),
    ("get", "secrets", "shop", True),
    ("list", "secrets", "shop", False),
    ("watch", "secrets", "shop", False),
    ("get", "configmaps", "shop", True),
    ("create", "configmaps", "shop", True),
    ("list", "configmaps", "shop", False),
    ("update", "configmaps", "shop", False),
    ("delete", "configmaps", "shop", True),
    ("create", "events.events.k8s.io", "shop", True),
    ("create", "events", "shop", False),
    ("create", "leases.coordination.k8s.io", "dbshift-system", True),
    ("create", "leases.coordination.k8s.io", "shop", False),
    ("create", "deployments.apps", "shop", False),
])
def test_controller_rbac(cluster, verb, resource, namespace, allowed):
    assert can_i(CONTROLLER, verb, resource, namespace) is allowed


def test_controller_rbac_subresources_and_lease_names(cluster):
    assert can_i(CONTROLLER, "patch", "databasemigrations.dbshift.io", "shop", "--subresource=status")
    assert can_i(CONTROLLER, "update", "databasemigrations.dbshift.io", "shop", "--subresource=finalizers")
    assert not can_i(CONTROLLER, "delete", "databasemigrations.dbshift.io", "shop", "--subresource=status")
    assert can_i(CONTROLLER, "update", "leases.coordination.k8s.io/dbshift-controller", "dbshift-system")
    assert can_i(CONTROLLER, "get", "leases.coordination.k8s.io/dbshift-controller", "dbshift-system")
    assert not can_i(CONTROLLER, "update", "leases.coordination.k8s.io/someone-else", "dbshift-system")


def test_watch_namespace_release_is_confined(cluster):
    assert can_i(SHOP_CONTROLLER, "list", "databasemigrations.dbshift.io", "shop")
    assert can_i(SHOP_CONTROLLER, "create", "jobs.batch", "shop")
    assert not can_i(SHOP_CONTROLLER, "list", "databasemigrations.dbshift.io", "default")
    assert not can_i(SHOP_CONTROLLER, "list", "databasemigrations.dbshift.io", None)
    assert not can_i(SHOP_CONTROLLER, "get", "secrets", "default")
    assert can_i(SHOP_CONTROLLER, "update", "leases.coordination.k8s.io/dbshift-shop-controller", "dbshift-shop")


def test_waiter_role(cluster):
    app = "system:serviceaccount:shop:shop-web"
    for verb in ("get", "list", "watch"):
        assert can_i(app, verb, "databasemigrations.dbshift.io", "shop")
    assert not can_i(app, "list", "databasemigrations.dbshift.io", "default")
    assert not can_i(app, "create", "databasemigrations.dbshift.io", "shop")
    assert not can_i(app, "get", "secrets", "shop")


def test_default_roles_aggregate(cluster):
    kubectl("create", "rolebinding", "dbshift-test-viewer", "--clusterrole=view", "--user=dbshift-test-viewer",
            "-n", "shop", check=False)
    kubectl("create", "rolebinding", "dbshift-test-editor", "--clusterrole=edit", "--user=dbshift-test-editor",
            "-n", "shop", check=False)
    deadline = time.time() + 30  # the controller-manager aggregates the rules asynchronously
    while time.time() < deadline:
        if can_i("dbshift-test-viewer", "list", "databasemigrations.dbshift.io", "shop") and \
                can_i("dbshift-test-editor", "create", "databasemigrations.dbshift.io", "shop"):
            break
        time.sleep(1)
    assert can_i("dbshift-test-viewer", "list", "databasemigrations.dbshift.io", "shop")
    assert not can_i("dbshift-test-viewer", "create", "databasemigrations.dbshift.io", "shop")
    assert can_i("dbshift-test-editor", "create", "databasemigrations.dbshift.io", "shop")
    assert not can_i("dbshift-test-editor", "list", "databasemigrations.dbshift.io", "default")


def pod_security_admission(version: str) -> bool:
    """Whether the server enforces Pod Security labels (beta and on by default since 1.23)."""
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    return (major, minor) >= (1, 23)


def pod_of(deployment: dict, namespace: str | None = None) -> dict:
    """The Pod a Deployment's ReplicaSet would create from its template."""
    template = deployment["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": deployment["metadata"]["name"] + "-pod-security",
                         "namespace": namespace or deployment["metadata"]["namespace"],
                         "labels": template["metadata"].get("labels", {})},
            "spec": template["spec"]}


def create_dry_run(obj: dict) -> subprocess.CompletedProcess:
    return kubectl("create", "--dry-run=server", "-o", "name", "-f", "-", input=json.dumps(obj), check=False)


def test_pods_meet_their_namespaces_pod_security(cluster):
    for ns, level in POD_SECURITY.items():
        assert get("namespace", ns)["metadata"]["labels"].get(POD_SECURITY_LABEL) == level, ns
    deployments = {name: obj for (kind, name), obj in cluster["answered"].items() if kind == "Deployment"}
    assert {"dbshift", "dbshift-shop", "dbshift-ha", "shop-web"} <= set(deployments)
    for name, deployment in deployments.items():
        proc = create_dry_run(pod_of(deployment))
        assert proc.returncode == 0, f"the pod of {name} is refused in its namespace:\n{proc.stderr}"
    # The hostNetwork controller in a `restricted` namespace (with that namespace's account).
    pod = pod_of(deployments["dbshift-ha"], namespace="dbshift-system")
    pod["spec"]["serviceAccountName"] = deployments["dbshift"]["spec"]["template"]["spec"]["serviceAccountName"]
    proc = create_dry_run(pod)
    if pod_security_admission(cluster["version"]):
        assert proc.returncode != 0 and "hostNetwork" in proc.stderr, proc.stderr or proc.stdout
    else:  # no Pod Security admission (1.20): the labels are inert
        assert proc.returncode == 0, proc.stderr


def test_approver_may_change_only_the_approval(cluster):
    """The approver role on a DatabaseMigration of the examples: it may set the approval
    annotation; from 1.30 the chart's admission policy refuses it anything else (before 1.30 RBAC
    alone cannot, as docs/fleet-control.md says). An editor is not held to it."""
    minor = int(re.match(r"v1\.(\d+)", cluster["version"]).group(1))
    approver, editor = "dbshift-test-approver", "dbshift-test-editor2"
    kubectl("create", "rolebinding", approver, "--clusterrole=dbshift-approver", f"--user={approver}",
            "-n", "shop", check=False)
    kubectl("create", "rolebinding", editor, "--clusterrole=edit", f"--user={editor}", "-n", "shop", check=False)
    assert can_i(approver, "patch", "databasemigrations.dbshift.io", "shop")
    assert can_i(approver, "approve", "databasemigrations.dbshift.io", "shop")
    assert not can_i(approver, "update", "databasemigrations.dbshift.io", "shop")
    assert not can_i(approver, "create", "databasemigrations.dbshift.io", "shop")
    assert not can_i(approver, "patch", "databasemigrations.dbshift.io", "default")
    dbm = ["dbm", "add-preferences", "-n", "shop"]
    kubectl("annotate", "--overwrite", *dbm, "dbshift.io/approve=add-preferences-g1-test", f"--as={approver}")
    assert get("dbm", "add-preferences", "shop")["metadata"]["annotations"]["dbshift.io/approve"] == \
        "add-preferences-g1-test"
    suspend = ["patch", *dbm, "--type=merge", "-p", '{"spec":{"suspend":true}}']
    if minor >= 30:
        # The policy takes effect a moment after it is created: ask with server dry runs (they
        # pass admission too, and change nothing) until it answers.
        deadline = time.time() + 60
        while True:
            proc = kubectl(*suspend, "--dry-run=server", f"--as={approver}", check=False)
            if proc.returncode != 0 or time.time() > deadline:
                break
            time.sleep(1)
        assert "an approver may change only the dbshift.io/approve annotation" in proc.stderr, proc.stderr
        proc = kubectl(*suspend, f"--as={approver}", check=False)
        assert proc.returncode != 0, proc.stdout
        other = kubectl("label", *dbm, "team=approvers", f"--as={approver}", check=False)
        assert other.returncode != 0 and "approve annotation" in other.stderr, other.stderr
        assert "suspend" not in get("dbm", "add-preferences", "shop")["spec"]
    else:
        # No admission policy: RBAC's patch lets the approver change the spec too.
        kubectl(*suspend, f"--as={approver}")
    # Whoever may update DatabaseMigrations (the edit role) changes what they like.
    kubectl("patch", *dbm, "--type=merge", "-p", '{"spec":{"suspend":null}}', f"--as={editor}")
    kubectl("annotate", *dbm, "dbshift.io/approve-", f"--as={editor}")
    assert "suspend" not in get("dbm", "add-preferences", "shop")["spec"]
