"""The Helm chart, rendered offline with the real Helm library (helm-python-sdk)."""

from __future__ import annotations

import json
import re
import subprocess

import helm_python
import kubernetes_validate
import pytest
import yaml

from conftest import (CHART, CLUSTER_SCOPED, CRD_FILE, RELEASE_NAMESPACE, ROOT, VARIANTS, crd, find, objects, one,
                      render, schema_version)

# Exactly what the controller's contract grants: (apiGroup, resource) -> verbs.
CONTROLLER_RULES = {
    ("dbshift.io", "databasemigrations"): {"get", "list", "watch", "patch"},
    ("dbshift.io", "databasemigrations/status"): {"patch"},
    ("dbshift.io", "databasemigrations/finalizers"): {"update"},
    ("batch", "jobs"): {"list", "watch", "create", "deletecollection"},
    ("", "pods"): {"list", "patch", "create"},  # create: dry runs of a runner pod only
    ("", "secrets"): {"get"},
    ("", "configmaps"): {"get", "create", "delete"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
# Kubernetes versions the built-in objects are validated against (kubernetes-validate's oldest
# schema and the newest); 1.20 itself is covered by the real API server (test_cluster.py).
SCHEMA_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


def verbs_by_resource(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def controller_container(objs):
    deploy = one(objs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return deploy, container


def env_of(container) -> dict:
    return {e["name"]: e for e in container["env"]}


# --- lint -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_is_clean(variant):
    report = helm_python.lint(CHART, VARIANTS[variant], strict=True, namespace=RELEASE_NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    # An icon is only "recommended" (severity 1, info); everything else must be clean.
    assert not problems, problems


# --- every variant ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_no_latest_or_untagged_images(rendered_variants, variant):
    objs = objects(rendered_variants[variant])
    _, container = controller_container(objs)
    images = [container["image"], env_of(container)["DBSHIFT_RUNNER_IMAGE"]["value"]]
    for image in images:
        assert re.fullmatch(r"[^:@]+(:[\w][\w.-]*|@sha256:[0-9a-f]{64})", image), image
        assert not image.endswith(":latest"), image
    assert container["image"] == "dbshift:0.1.0"
    assert "latest" not in "".join(rendered_variants[variant].values()).replace("Latest", "")


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_contexts(rendered_variants, variant):
    deploy, c = controller_container(objects(rendered_variants[variant]))
    pod = deploy["spec"]["template"]["spec"]
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532 and psc["runAsGroup"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    # /tmp is the only writable path: an emptyDir.
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_contract(rendered_variants, variant):
    values = VARIANTS[variant]
    objs = objects(rendered_variants[variant])
    deploy, c = controller_container(objs)
    env = env_of(c)
    port = values.get("metrics", {}).get("port", 8080)
    assert c["args"][0] == "controller"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["DBSHIFT_RUNNER_IMAGE"]["value"] == c["image"]
    if values.get("watchNamespace"):
        assert env["DBSHIFT_WATCH_NAMESPACE"]["value"] == values["watchNamespace"]
    else:  # the controller reads an empty value as a namespace named ""
        assert "DBSHIFT_WATCH_NAMESPACE" not in env
    assert env["DBSHIFT_LISTEN"]["value"] == f"0.0.0.0:{port}"
    assert env["DBSHIFT_LEADER_ELECTION"]["value"] == "true"
    assert env["DBSHIFT_LOG_FORMAT"]["value"] == "json"
    assert env["RUST_LOG"]["value"] == "info"
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["resources"]["requests"]["memory"] == "64Mi"
    assert c["imagePullPolicy"] == "IfNotPresent"
    # The Lease the controller is told to use is the one its Role lets it renew.
    lease_role = one(objs, "Role", "dbshift-leader-election")
    assert lease_role["metadata"]["namespace"] == RELEASE_NAMESPACE
    named = [r for r in lease_role["rules"] if r.get("resourceNames")]
    assert [f"--lease-name={n}" for r in named for n in r["resourceNames"]] == [c["args"][1]]
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "dbshift"


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_verbs_are_exactly_the_contract(rendered_variants, variant):
    objs = objects(rendered_variants[variant])
    ns = VARIANTS[variant].get("watchNamespace")
    kind = "Role" if ns else "ClusterRole"
    role = one(objs, kind, "dbshift-controller")
    assert verbs_by_resource(role) == CONTROLLER_RULES
    binding = one(objs, kind + "Binding", "dbshift-controller")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind,
                                  "name": "dbshift-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dbshift",
                                    "namespace": RELEASE_NAMESPACE}]
    if ns:
        assert role["metadata"]["namespace"] == ns == binding["metadata"]["namespace"]
        assert not find(objs, "ClusterRole", "dbshift-controller")
        assert not find(objs, "ClusterRoleBinding")
    else:
        assert not find(objs, "Role", "dbshift-controller")
    # Secrets: get by name only.
    assert not any(r.get("resourceNames") for r in role["rules"])
    lease = one(objs, "Role", "dbshift-leader-election")
    assert verbs_by_resource(lease) == LEASE_RULES
    # The user-facing roles read (waiter, view) or edit DatabaseMigrations and nothing else.
    waiter = one(objs, "ClusterRole", "dbshift-waiter")
    assert verbs_by_resource(waiter) == {("dbshift.io", "databasemigrations"): {"get", "list", "watch"}}
    view = one(objs, "ClusterRole", "dbshift-view")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert verbs_by_resource(view) == verbs_by_resource(waiter)
    edit = one(objs, "ClusterRole", "dbshift-edit")
    assert set(verbs_by_resource(edit)) == {("dbshift.io", "databasemigrations")}
    # The approver reads and patches DatabaseMigrations; `approve` marks who it is for the
    # admission policy that keeps it to the approval annotation.
    approver = one(objs, "ClusterRole", "dbshift-approver")
    assert verbs_by_resource(approver) == {("dbshift.io", "databasemigrations"):
                                           {"get", "list", "watch", "patch", "approve"}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rbac_rule_says_why(rendered_variants, variant):
    for template in ("rbac.yaml", "rbac-users.yaml"):
        text = rendered_variants[variant][f"dbshift/templates/{template}"]
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                assert lines[i - 1].strip().startswith("# "), f"{template}: rule without a comment: {line}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_builtin_objects_match_kubernetes_schemas(rendered_variants, variant):
    for obj in objects(rendered_variants[variant]):
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # not a Kubernetes API; checked in test_service_monitor
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(obj, schema_version(obj, version), strict=True)


def test_the_approval_policy_only_where_kubernetes_has_it():
    def kinds(version):
        return {o["kind"] for o in objects(render.render_chart({}, kube_version=version))}
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds("v1.30.0")
    assert "ValidatingAdmissionPolicy" not in kinds("v1.29.4")
    assert "ClusterRole" in kinds("v1.20.2")
    off = objects(render.render_chart({"rbac": {"approverRole": False}}, kube_version="v1.32.0"))
    assert not find(off, "ValidatingAdmissionPolicy") and not find(off, "ClusterRole", "dbshift-approver")


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_are_labelled_and_in_the_release_namespace(rendered_variants, variant):
    ns = VARIANTS[variant].get("watchNamespace")
    for obj in objects(rendered_variants[variant]):
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == "dbshift", meta["name"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "dbshift"
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta
        else:
            assert meta["namespace"] in (RELEASE_NAMESPACE, ns), (obj["kind"], meta)


# --- particular variants ----------------------------------------------------------------------

def test_crd_is_the_committed_crd(rendered_variants):
    rendered = one(objects(rendered_variants["default"]), "CustomResourceDefinition")
    committed = crd()
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert rendered["metadata"]["labels"]["app.kubernetes.io/name"] == "dbshift"
    rendered["metadata"] = {"name": rendered["metadata"]["name"]}
    assert rendered == committed
    assert not find(objects(rendered_variants["crds-off"]), "CustomResourceDefinition")
    keepless = objects(render.render_chart({"crds": {"keep": False, "annotations": {"argocd.argoproj.io/sync-wave": "-1"}}}))
    assert one(keepless, "CustomResourceDefinition")["metadata"]["annotations"] == {
        "argocd.argoproj.io/sync-wave": "-1"}


def test_crd_template_is_the_committed_file_byte_for_byte():
    template = (CHART / "templates" / "crd.yaml").read_text()
    body = "".join(line for line in template.splitlines(True) if "{{" not in line)
    assert body == CRD_FILE.read_text(), "run charts/sync-crd.sh"
    # comment, if, metadata, end, and an if/end pair around each block of CEL rules
    blocks = CRD_FILE.read_text().count("x-kubernetes-validations:")
    assert blocks >= 5
    assert sum("{{" in line for line in template.splitlines()) == 4 + 2 * blocks
    subprocess.run([str(ROOT / "charts" / "sync-crd.sh"), "--check"], check=True)


def test_crd_carries_cel_rules_only_for_servers_that_know_them():
    def crd_of(version: str) -> dict:
        return one(objects(render.render_chart({}, kube_version=version)), "CustomResourceDefinition")
    current, old = json.dumps(crd_of("v1.32.6")), json.dumps(crd_of("v1.20.2"))
    assert current.count("x-kubernetes-validations") == CRD_FILE.read_text().count("x-kubernetes-validations")
    assert "x-kubernetes-validations" not in old
    # Without the rules, the CRD is the committed one otherwise.
    assert json.loads(old) == strip_validations(json.loads(current))


def strip_validations(v):
    if isinstance(v, dict):
        return {k: strip_validations(x) for k, x in v.items() if k != "x-kubernetes-validations"}
    if isinstance(v, list):
        return [strip_validations(x) for x in v]
    return v


def test_defaults_have_no_pdb_and_no_service_monitor(rendered_variants):
    objs = objects(rendered_variants["default"])
    assert not find(objs, "PodDisruptionBudget")
    assert not find(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert one(objs, "Deployment")["spec"]["replicas"] == 1
    assert "hostNetwork" not in one(objs, "Deployment")["spec"]["template"]["spec"]


def test_watch_namespace(rendered_variants):
    objs = objects(rendered_variants["watch-namespace"])
    _, c = controller_container(objs)
    assert env_of(c)["DBSHIFT_WATCH_NAMESPACE"]["value"] == "shop"
    notes = rendered_variants["watch-namespace"]["dbshift/templates/NOTES.txt"]
    assert "watches namespace shop only" in notes


def test_service_monitor(rendered_variants):
    objs = objects(rendered_variants["service-monitor"])
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                        "scrapeTimeout": "10s"}]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    svc = one(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    with pytest.raises(helm_python.HelmRenderError, match="metrics.service.enabled"):
        render.render_chart({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})


def test_two_replicas_get_a_pdb_policy_v1_on_current_kubernetes(rendered_variants):
    objs = objects(rendered_variants["replicas-2"])
    assert one(objs, "Deployment")["spec"]["replicas"] == 2
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_two_replicas_get_a_policy_v1beta1_pdb_on_kubernetes_1_20():
    # What Helm sees from a 1.20 API server: no policy/v1.
    objs = objects(render.render_chart({"replicaCount": 2}, kube_version="v1.20.2",
                                       api_versions=["policy/v1beta1"]))
    assert one(objs, "PodDisruptionBudget")["apiVersion"] == "policy/v1beta1"


def test_two_replicas_without_leader_election_are_refused():
    with pytest.raises(helm_python.HelmRenderError, match="leaderElection"):
        render.render_chart({"replicaCount": 2, "leaderElection": {"enabled": False}})


def test_leader_election_off(rendered_variants):
    objs = objects(render.render_chart({"leaderElection": {"enabled": False}}))
    _, c = controller_container(objs)
    assert env_of(c)["DBSHIFT_LEADER_ELECTION"]["value"] == "false"
    assert c["args"] == ["controller"]
    assert not find(objs, "Role", "dbshift-leader-election")


def test_host_network(rendered_variants):
    objs = objects(rendered_variants["host-network"])
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (c,) = pod["containers"]
    names = [e["name"] for e in c["env"]]
    assert names[-2:] == ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"]
    assert env_of(c)["KUBERNETES_SERVICE_PORT"]["value"] == "6443"


def test_image_overrides():
    objs = objects(render.render_chart({"image": {"repository": "registry.example.com/dbshift", "tag": "0.1.1"},
                                        "runnerImage": "registry.example.com/dbshift-runner:0.1.1",
                                        "extraArgs": ["--log-format=text"]}))
    _, c = controller_container(objs)
    assert c["image"] == "registry.example.com/dbshift:0.1.1"
    assert env_of(c)["DBSHIFT_RUNNER_IMAGE"]["value"] == "registry.example.com/dbshift-runner:0.1.1"
    assert c["args"][-1] == "--log-format=text"
    digest = "sha256:" + "a" * 64
    _, c = controller_container(objects(render.render_chart({"image": {"digest": digest}})))
    assert c["image"] == f"dbshift@{digest}" == env_of(c)["DBSHIFT_RUNNER_IMAGE"]["value"]


def test_job_policy_reaches_the_controller():
    _, c = controller_container(objects(render.render_chart({})))
    assert "DBSHIFT_JOB_ALLOW" not in env_of(c)
    _, c = controller_container(objects(render.render_chart({"jobPolicy": {"allow": ["hostNetwork", "runAsRoot"]}})))
    assert env_of(c)["DBSHIFT_JOB_ALLOW"]["value"] == "hostNetwork,runAsRoot"


def test_release_names_follow_the_fullname_rule():
    objs = objects(render.render_chart({}, name="shop-ops"))
    assert one(objs, "Deployment")["metadata"]["name"] == "shop-ops-dbshift"
    assert find(objs, "ClusterRole", "shop-ops-dbshift-waiter")


@pytest.mark.parametrize("values, message", [
    ({"watchNamespaces": "shop"}, "watchNamespaces"),            # a typo is refused, not ignored
    ({"image": {"tag": "latest"}}, "tag"),
    ({"logFormat": "xml"}, "logFormat"),
    ({"replicaCount": "two"}, "replicaCount"),
    ({"watchNamespace": "Shop_Prod"}, "watchNamespace"),
    ({"jobPolicy": {"allow": ["root"]}}, "jobPolicy"),
])
def test_schema_refuses_bad_values(values, message):
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render.render_chart(values)


def test_every_value_is_documented():
    """Each key of values.yaml has a comment line right above it (or above its parent)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    documented = set()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if m and i > 0 and lines[i - 1].strip().startswith("#"):
            documented.add(m.group(2))

    def walk(d: dict, parent_documented: bool):
        for k, v in d.items():
            ok = k in documented
            if isinstance(v, dict) and v and not ok:
                walk(v, False)
            else:
                assert ok or parent_documented, f"values.yaml: {k} has no comment"

    walk(values, False)
    schema_keys = set(helm_python.Chart.load(CHART).schema["properties"]) - {"global"}
    assert schema_keys == set(values), "values.schema.json and values.yaml list different keys"


def test_notes_render(rendered_variants):
    notes = rendered_variants["default"]["dbshift/templates/NOTES.txt"]
    assert "kubectl -n dbshift-system rollout status deployment/dbshift" in notes
    assert '"dbshift-waiter"' in notes
    assert "crds.install=false" in rendered_variants["crds-off"]["dbshift/templates/NOTES.txt"]
