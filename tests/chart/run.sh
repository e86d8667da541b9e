#!/usr/bin/env bash
# Tests of the Helm chart, the plain manifests, the examples and the GitOps health checks.
# Installs what they need into a cached venv (tests/support/chart-venv.sh: Helm as a library,
# kubernetes-validate, Lua, CEL, pytest; ~15 s the first time), then runs tests/chart/.
#
#   tests/chart/run.sh                    # offline: render, lint, schemas, drift, Lua, CEL
#   DBSHIFT_TEST_KUBECONFIG=DIR/kubeconfig tests/chart/run.sh
#                                         # also apply everything to that cluster (it starts no
#                                         # pod and removes only what it created)
#   tests/chart/run.sh --cluster          # start a Kubernetes control plane (no node) for the run
#                                         # (tests/support/cluster/up.sh: 1.20.2, or the binaries
#                                         # DBSHIFT_K8S_BIN names), stop it after
# Extra arguments go to pytest (e.g. -k lua). KUBECTL picks the kubectl binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

start_cluster=0
args=()
for a in "$@"; do
  if [[ $a == --cluster ]]; then start_cluster=1; else args+=("$a"); fi
done

PY=$(tests/support/chart-venv.sh)
export PYTHONDONTWRITEBYTECODE=1   # no __pycache__ in the work tree

if (( start_cluster )); then
  work=$(mktemp -d)
  # Absolute paths: the trap runs after the cd below.
  trap '"$ROOT/tests/support/cluster/down.sh" "$work/k8s" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
  # No node: these tests start no pod (Deployments are only dry-run), and a machine has one node.
  DBSHIFT_TEST_KUBECONFIG=$(DBSHIFT_NO_NODE=1 "$ROOT/tests/support/cluster/up.sh" "$work/k8s")
  export DBSHIFT_TEST_KUBECONFIG
fi

cd "$ROOT/tests/chart"
"$PY" -m pytest -p no:cacheprovider -q -rs "${args[@]}"
