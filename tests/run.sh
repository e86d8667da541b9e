#!/usr/bin/env bash
# Runs every test of dbshift on a fresh machine. It installs and starts what the tests need:
#  - a Kubernetes cluster with a real node (kubelet, containerd, runc) — needs root: by default
#    1.20.2, built from Debian's source package (apt; built once, ~12 min, cached under
#    ~/.cache/dbshift), or the binaries DBSHIFT_K8S_BIN names (e.g. v1.32.6);
#  - SecantusDB, a MongoDB wire-protocol server (PyPI), on a free port of the node's bridge
#    address (10.88.0.1), where the host and the pods (without hostNetwork) both reach it;
#  - the dbshift image, built from this checkout without Docker and imported into the node.
# Then: `cargo test` (engine, CLI, operator on the cluster) and the chart tests (tests/chart).
# The test namespaces enforce the `restricted` Pod Security Standard (a no-op on 1.20, which has
# no Pod Security admission; enforced from 1.23 on).
#
#   tests/run.sh                          # everything, on Kubernetes 1.20.2
#   tests/run.sh ARGS...                  # only `cargo test ARGS...` (e.g. --test operator)
#   tests/run.sh --cluster-only [ARGS...] # only the suites that need the cluster: cargo's
#                                         # operator suite (ARGS go to it) and tests/chart/run.sh
#   DBSHIFT_K8S_BIN=DIR tests/run.sh ...  # the same on the Kubernetes binaries in DIR
#                                         # (kube-apiserver, kube-controller-manager,
#                                         # kube-scheduler, kubelet; the version is read from them)
#   DBSHIFT_K8S_BIN=$(tests/support/cluster/shared-k8s.sh) tests/run.sh --cluster-only
#                                         # on v1.32.6 from ../shared/k8s (what .ci/run does)
# Exit status: non-zero when any suite failed (every suite runs).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[tests] %s\n' "$*" >&2; }

cluster_only=0
if [ "${1:-}" = --cluster-only ]; then cluster_only=1; shift; fi

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "the cluster tests run a kubelet and containerd: run as root (e.g. in a privileged container)" >&2
  exit 2
fi

log "installing test dependencies (cached after the first run)"
if [ -n "${DBSHIFT_K8S_BIN:-}" ]; then
  tests/support/cluster/install.sh node      # the binaries are given: nothing to build
else
  tests/support/cluster/install.sh all
  tests/support/cluster/build.sh >/dev/null
fi
tests/support/secantus.sh install >/dev/null

log "building dbshift"
cargo build --locked --all-targets

work=$(mktemp -d)
cleanup() {
  kill "$(cat "$work/mongo.pid" 2>/dev/null)" 2>/dev/null || true
  [ -d "$work/k8s" ] && tests/support/cluster/down.sh "$work/k8s" >&2 || true
  rm -rf "$work"
}
trap cleanup EXIT

log "starting the cluster${DBSHIFT_K8S_BIN:+ from $DBSHIFT_K8S_BIN}"
t0=$(date +%s)
tests/support/cluster/up.sh "$work/k8s" >/dev/null
. "$work/k8s/env"
log "Kubernetes $K8S_VERSION up in $(( $(date +%s) - t0 )) s"

# On the bridge address: the Job pods reach it from the pod network, the tests from the host.
DBSHIFT_TEST_MONGODB_URI=$(tests/support/secantus.sh start "$work/mongo.pid" "$NODE_IP")
export DBSHIFT_TEST_MONGODB_URI
log "MongoDB wire server: $DBSHIFT_TEST_MONGODB_URI"

# The image holds the debug build the tests use: no second (release) compile in CI.
image_tar=$(deploy/image/build.sh -b target/debug/dbshift -t dbshift:test -o "$work/dbshift-test.tar")
tests/support/cluster/load-image.sh "$work/k8s" "$image_tar" >/dev/null
export DBSHIFT_TEST_KUBECONFIG=$work/k8s/kubeconfig DBSHIFT_TEST_RUNNER_IMAGE=dbshift:test DBSHIFT_TEST_CLUSTER_DIR=$work/k8s
# The chart, as the in-cluster test installs it, into a namespace that enforces `restricted`:
# with no kube-proxy here, the controller reaches the API server on the bridge address, where
# it listens (KUBERNETES_SERVICE_HOST/PORT), from the pod network.
values=$(printf '{"image":{"tag":"test","pullPolicy":"Never"},"watchNamespace":"dbshift-e2e","extraEnv":[{"name":"KUBERNETES_SERVICE_HOST","value":"%s"},{"name":"KUBERNETES_SERVICE_PORT","value":"%s"}]}' "$APISERVER_HOST" "$APISERVER_PORT")
"$(tests/support/chart-venv.sh)" deploy/local/render_chart.py --label pod-security.kubernetes.io/enforce=restricted --kube-version "$K8S_VERSION" \
  e2e dbshift-e2e "$values" > "$work/chart-e2e.yaml"
export DBSHIFT_TEST_CHART_MANIFEST=$work/chart-e2e.yaml
log "cluster ready: Kubernetes $K8S_VERSION, KUBECONFIG=$DBSHIFT_TEST_KUBECONFIG, image dbshift:test"

status=0
suite() { # name command...
  local name=$1 t
  shift
  t=$(date +%s)
  "$@" || { status=1; log "FAILED: $name (Kubernetes $K8S_VERSION)"; }
  log "$name took $(( $(date +%s) - t )) s (Kubernetes $K8S_VERSION); disk free: $(df -h --output=avail "$work" | tail -1 | tr -d ' ')"
}
# The cluster suites are #[ignore]d for a plain `cargo test`: here they run.
if [ $cluster_only = 1 ]; then
  suite "operator suite" cargo test --locked --test operator "$@" -- --include-ignored
  suite "chart suite" tests/chart/run.sh
else
  suite "cargo test" cargo test --locked --all-targets --no-fail-fast "$@" -- --include-ignored
  if [ $# -eq 0 ]; then
    # Each fuzz target for 15 s on the debug build (the full 10-minute runs: docs/fuzzing.md).
    suite "fuzz smoke" cargo bench --locked --profile dev --bench fuzz -- --seconds 15
    suite "chart suite" tests/chart/run.sh
  fi
fi
exit $status
