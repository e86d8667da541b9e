"""deploy/: the plain manifests and the examples."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import (CLUSTER_SCOPED, EXAMPLES, ROOT, crd_json_schema, find, one, objects, render, schema_version,
                      yaml_docs)

EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.yaml"))
SCHEMA_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]

# The minimal resource, field for field as the issue gives it.
MINIMAL = """
apiVersion: dbshift.io/v1alpha1
kind: DatabaseMigration
metadata: { name: add-preferences, namespace: shop }
spec:
  connection: { secretRef: { name: shop-mongo, key: uri } }
  tenants: { pattern: "^tenant_", exclude: [tenant_internal] }
  migrations: { configMapRef: { name: shop-migrations } }
  target: "20250105000000"
  dryRun: false
  backup: { enabled: true }
  rollout: { maxParallel: 2, canaries: [tenant_acme], maxFailures: 0, onFailure: rollback }
  jobTemplate: { image: dbshift:dev, imagePullPolicy: IfNotPresent }
"""


def all_example_objects() -> list[dict]:
    return [o for p in EXAMPLE_FILES for o in yaml_docs(p)]


def test_generated_files_are_current():
    assert render.main(["--check"]) == 0, "run deploy/manifests/render.sh"


def test_plain_manifests_are_the_chart_defaults_in_dbshift_system():
    objs = yaml_docs(render.MANIFESTS)
    assert objs[0] == {"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "dbshift-system",
                                    "labels": {"app.kubernetes.io/part-of": "dbshift",
                                               "pod-security.kubernetes.io/enforce": "restricted"}}}
    kinds = [o["kind"] for o in objs]
    assert kinds.index("CustomResourceDefinition") < kinds.index("Deployment")
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")
    assert set(kinds) == {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                          "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment",
                          "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    chart = objects(render.render_chart(render.PLAIN_VALUES))
    assert objs[1:] == chart
    for o in objs[1:]:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"]["namespace"] == "dbshift-system"
    # kubectl users get no Helm keep policy; the RBAC comments survive rendering.
    assert "annotations" not in one(objs, "CustomResourceDefinition")["metadata"]
    assert "# Read the MongoDB URI a resource names in spec.connection.secretRef" in render.MANIFESTS.read_text()


def test_plain_manifests_match_kubernetes_schemas():
    for obj in yaml_docs(render.MANIFESTS):
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(obj, schema_version(obj, version), strict=True)


def test_migrations_configmap_holds_the_files():
    (cm,) = yaml_docs(EXAMPLES / "shop-migrations.configmap.yaml")
    files = {p.name: p.read_text() for p in sorted((ROOT / "migrations").glob("*.yaml"))}
    assert cm["data"] == files
    assert cm["metadata"] == {"name": "shop-migrations", "namespace": "shop"}
    assert len(yaml.dump(cm)) < 1024 * 1024


def test_minimal_example_is_the_issue_resource_verbatim():
    (dbm,) = yaml_docs(EXAMPLES / "add-preferences.yaml")
    assert dbm == yaml.safe_load(MINIMAL)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_objects_are_valid(path):
    schema = crd_json_schema(strict=True)
    docs = yaml_docs(path)
    assert docs, f"{path.name} is empty"
    for obj in docs:
        if obj["kind"] == "DatabaseMigration":
            jsonschema.Draft7Validator(schema).validate(obj)
        else:
            for version in SCHEMA_VERSIONS:
                kubernetes_validate.validate(obj, schema_version(obj, version), strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "shop", (path.name, obj["metadata"])


def test_crd_schema_check_catches_mistakes():
    """The schema used above refuses a misspelled field and an out-of-range value."""
    schema = crd_json_schema(strict=True)
    dbm = yaml.safe_load(MINIMAL)
    dbm["spec"]["rollout"]["maxParalel"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(dbm)
    dbm = yaml.safe_load(MINIMAL)
    dbm["spec"]["rollout"]["maxParallel"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(dbm)


def test_examples_cover_the_features():
    dbms = {o["metadata"]["name"]: o["spec"] for o in all_example_objects() if o["kind"] == "DatabaseMigration"}
    assert any(s.get("rollout", {}).get("canaries") and s["rollout"].get("maxParallel", 1) > 1 for s in dbms.values())
    assert any("image" in s["migrations"] for s in dbms.values())
    assert any(s.get("backup", {}).get("destination", {}).get("persistentVolumeClaim") for s in dbms.values())
    assert any(s.get("dryRun") for s in dbms.values())
    assert len(dbms) == len(set(dbms)) >= 5


def test_example_references_resolve():
    objs = all_example_objects()
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for o in objs:
        if o["kind"] != "DatabaseMigration":
            continue
        spec = o["spec"]
        assert ("Secret", spec["connection"]["secretRef"]["name"]) in names
        if "configMapRef" in spec["migrations"]:
            assert ("ConfigMap", spec["migrations"]["configMapRef"]["name"]) in names
        claim = spec.get("backup", {}).get("destination", {}).get("persistentVolumeClaim")
        if claim:
            assert ("PersistentVolumeClaim", claim["claimName"]) in names
        assert len(spec["migrations"]) == 1, "exactly one migrations source"
    # The app waits for a migration that exists, with a role the chart ships.
    app = one(objs, "Deployment", "shop-web")
    (init,) = app["spec"]["template"]["spec"]["initContainers"]
    assert init["args"][0] == "wait" and ("DatabaseMigration", init["args"][1]) in names
    binding = one(objs, "RoleBinding", "shop-web-waits-for-migrations")
    chart_roles = {o["metadata"]["name"] for o in find(yaml_docs(render.MANIFESTS), "ClusterRole")}
    assert binding["roleRef"]["name"] in chart_roles
    assert binding["roleRef"]["name"] == "dbshift-waiter"
    assert binding["subjects"][0]["name"] == app["spec"]["template"]["spec"]["serviceAccountName"]
    # Whoever approves the gated example holds the chart's approver role.
    approvers = one(objs, "RoleBinding", "shop-approvers")
    assert approvers["roleRef"]["name"] == "dbshift-approver" and "dbshift-approver" in chart_roles
    gated = one(objs, "DatabaseMigration", "orders-approved")
    assert gated["spec"]["rollout"]["approval"] == "afterCanaries"


def test_no_latest_tags_in_deploy():
    for path in list((ROOT / "deploy").rglob("*.yaml")) + list((ROOT / "deploy").rglob("Dockerfile")):
        text = path.read_text()
        assert ":latest" not in text, path
        for line in text.splitlines():
            value = line.split("image:", 1)[1].strip() if line.strip().startswith("image:") else ""
            if value and "{" not in value:
                assert ":" in value or "@" in value, f"{path}: untagged image: {line}"
