"""The Argo CD health check (Lua, run for real) and the Flux health expressions (CEL, evaluated
for real) against the same DatabaseMigration fixtures."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import lupa.lua51
import pytest
import yaml

from conftest import ROOT, crd_json_schema

ARGOCD = ROOT / "deploy" / "argocd"
FLUX = ROOT / "deploy" / "flux"
HEALTH_LUA = (ARGOCD / "health.lua").read_text()
ARGO_TESTS = yaml.safe_load((ARGOCD / "health_test.yaml").read_text())["tests"]
FLUX_TESTS = yaml.safe_load((FLUX / "healthcheck_test.yaml").read_text())["tests"]
CM_KEY = "resource.customizations.health.dbshift.io_DatabaseMigration"

# Runs a health script the way Argo CD runs a custom check from argocd-cm: Lua 5.1 (gopher-lua)
# with the base and table libraries only; no string/math/io/os, and no string methods.
SANDBOX = """
local script, obj = ...
local env = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
  print = print, rawequal = rawequal, rawget = rawget, rawset = rawset, select = select,
  tonumber = tonumber, tostring = tostring, type = type, unpack = unpack,
  table = table, obj = obj,
}
local f = assert(loadstring(script, "=health.lua"))
setfenv(f, env)
return f()
"""


def lua_runtime():
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"
    lua.execute('debug.setmetatable("", nil)')  # strings have no methods without the string library
    return lua


def run_health(obj: dict) -> dict:
    lua = lua_runtime()
    result = lua.execute(SANDBOX, HEALTH_LUA, lua.table_from(obj, recursive=True))
    return dict(result.items())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("case", ARGO_TESTS, ids=lambda c: Path(c["inputPath"]).stem)
def test_argocd_health(case):
    obj = load(ARGOCD / case["inputPath"])
    assert run_health(obj) == case["healthStatus"]


def test_argocd_health_reads_generations_given_as_strings():
    # Argo CD hands json.Number values to Lua as strings.
    obj = load(ARGOCD / "testdata" / "succeeded.yaml")
    obj["metadata"]["generation"] = "3"
    obj["status"]["observedGeneration"] = "3"
    assert run_health(obj)["status"] == "Healthy"
    obj["metadata"]["generation"] = "4"
    assert run_health(obj)["status"] == "Progressing"


def test_the_sandbox_has_no_string_library():
    with pytest.raises(lupa.lua51.LuaError):
        lua = lua_runtime()
        lua.execute(SANDBOX, 'return { status = string.format("%s", "x") }', lua.table_from({}))
    with pytest.raises(lupa.lua51.LuaError):
        lua = lua_runtime()
        lua.execute(SANDBOX, 'return { status = ("x"):upper() }', lua.table_from({}))


def test_every_phase_and_outcome_has_a_fixture():
    phases = {load(ARGOCD / c["inputPath"]).get("status", {}).get("phase") for c in ARGO_TESTS}
    assert {"Pending", "Migrating", "Succeeded", "Failed", "RollingBack", "RolledBack"} <= phases
    assert {c["healthStatus"]["status"] for c in ARGO_TESTS} == {"Healthy", "Progressing", "Degraded", "Suspended"}


@pytest.mark.parametrize("case", ARGO_TESTS, ids=lambda c: Path(c["inputPath"]).stem)
def test_fixtures_are_valid_resources(case):
    jsonschema.Draft7Validator(crd_json_schema(strict=True)).validate(load(ARGOCD / case["inputPath"]))


def test_argocd_cm_snippet_carries_the_script():
    cm = load(ARGOCD / "argocd-cm.yaml")
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"] == {CM_KEY: HEALTH_LUA}


# --- Flux -------------------------------------------------------------------------------------

def flux_exprs() -> dict:
    docs = [d for d in yaml.safe_load_all((FLUX / "kustomizations.yaml").read_text()) if d]
    exprs = [e for d in docs for e in d["spec"].get("healthCheckExprs", [])
             if e["apiVersion"] == "dbshift.io/v1alpha1" and e["kind"] == "DatabaseMigration"]
    assert len(exprs) == 1
    return exprs[0]


def flux_status(obj: dict) -> str:
    """fluxcd/pkg runtime/cel StatusEvaluator.Evaluate: expressions parsed (not type-checked) with
    optional types, evaluated with the object's top-level fields as variables."""
    from cel_expr_python import cel
    from cel_expr_python.ext import ext_optional

    observed = obj.get("status", {}).get("observedGeneration")
    if observed is not None and observed != obj["metadata"].get("generation"):
        return "InProgress"
    exprs = flux_exprs()
    env = cel.NewEnv(variables={k: cel.Type.DYN for k in obj}, extensions=[ext_optional.ExtOptional()])
    for key, status in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key not in exprs:
            continue
        try:
            value = env.compile(exprs[key], disable_check=True).eval(data=obj).value()
        except Exception:
            return "Error"
        if value is True:
            return status
        if value is not False:
            return "Error"
    return "InProgress"


@pytest.mark.parametrize("case", FLUX_TESTS, ids=lambda c: Path(c["inputPath"]).stem)
def test_flux_health_expressions(case):
    assert flux_status(load(FLUX / case["inputPath"])) == case["status"]


def test_flux_and_argocd_agree():
    """Healthy <-> Current, Degraded <-> Failed, Progressing <-> InProgress (or not yet evaluable),
    Suspended (waits for a person) <-> InProgress."""
    argo = {Path(c["inputPath"]).name: c["healthStatus"]["status"] for c in ARGO_TESTS}
    flux = {Path(c["inputPath"]).name: c["status"] for c in FLUX_TESTS}
    assert argo.keys() == flux.keys()
    same = {"Healthy": {"Current"}, "Degraded": {"Failed"}, "Progressing": {"InProgress", "Error"},
            "Suspended": {"InProgress"}}
    for name in argo:
        assert flux[name] in same[argo[name]], name


def test_docs_show_the_tested_checks():
    doc = (ROOT / "docs" / "gitops.md").read_text()
    exprs = flux_exprs()
    assert exprs["current"] in doc and exprs["failed"] in doc
    assert CM_KEY in doc
