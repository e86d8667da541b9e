"""The chart's alerts and dashboard: `promtool check rules` and `promtool test rules` on the
PrometheusRule the chart renders, and the dashboard's queries against the metrics the
controller exports. promtool comes from Debian's `prometheus` package (tests/support/cluster/install.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import CHART, ROOT, objects, one, render

PROMTOOL = shutil.which("promtool")


def rendered_rules(deadline: int = 3600) -> dict:
    values = {"metrics": {"prometheusRule": {"enabled": True, "runDeadlineSeconds": deadline,
                                             "labels": {"release": "kube-prometheus"}}}}
    rule = one(objects(render.render_chart(values)), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    return rule["spec"]


def exported_metrics() -> set[str]:
    """Every series name the controller exports (src/controller/metrics.rs), with the suffixes
    OpenMetrics adds to counters and histograms."""
    src = (ROOT / "src" / "controller" / "metrics.rs").read_text()
    names = set()
    for name, var in re.findall(r'registry\.register\(\s*"(\w+)",\s*"[^"]*",\s*(\w+)\.clone\(\)', src, re.S):
        kind = re.search(rf"let {var} = (?:Family::<\w+, )?(\w+)", src).group(1)
        base = f"dbshift_{name}"
        if kind == "Counter":
            names.add(base + "_total")
        elif kind == "Histogram":
            names.update(base + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(base)
    return names


def test_the_rules_are_off_by_default_and_the_file_is_the_source():
    assert not [o for o in objects(render.render_chart({})) if o["kind"] == "PrometheusRule"]
    spec = rendered_rules(deadline=7200)
    stuck = next(r for r in spec["groups"][0]["rules"] if r["alert"] == "DbshiftRunStuck")
    assert stuck["expr"].endswith("> 7200") and "7200 s" in stuck["annotations"]["description"]
    source = (CHART / "files" / "alerts.yaml").read_text().replace("RUN_DEADLINE_SECONDS", "7200")
    assert yaml.safe_load(source) == spec


def test_every_alert_names_only_series_the_controller_exports():
    known = exported_metrics()
    assert "dbshift_runs_total" in known and "dbshift_run_started_timestamp_seconds" in known
    for rule in rendered_rules()["groups"][0]["rules"]:
        used = set(re.findall(r"dbshift_\w+", rule["expr"]))
        assert used and used <= known, f"{rule['alert']}: {used - known}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (tests/support/cluster/install.sh node)")
def test_promtool_checks_and_unit_tests_the_rules(tmp_path):
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rendered_rules(), sort_keys=False))
    shutil.copy(ROOT / "tests" / "chart" / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    check = subprocess.run([PROMTOOL, "check", "rules", "alerts.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "4 rules found" in check.stdout, check.stdout
    test = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def test_the_dashboard_queries_only_exported_series():
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    known = exported_metrics()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    used = set(re.findall(r"dbshift_\w+", " ".join(exprs)))
    assert used <= known, used - known
    # Every series the controller exports has a panel.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in known}
    assert {re.sub(r"_(bucket|sum|count)$", "", n) for n in used} == families
    cm = one(objects(render.render_chart({"metrics": {"dashboard": {"enabled": True}}})), "ConfigMap",
             "dbshift-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["dbshift.json"]) == dashboard
