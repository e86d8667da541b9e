#!/usr/bin/env bash
# Runs every test of dbshift on a fresh machine. It installs and starts what the tests need:
#  - SecantusDB, a MongoDB wire-protocol server (PyPI), on a free loopback port;
#  - a Kubernetes 1.20.2 cluster built from Debian's source package (apt; built once, ~12 min,
#    cached under ~/.cache/dbshift), with a real node (kubelet, containerd, runc) — needs root;
#  - the dbshift image, built from this checkout without Docker and imported into the node.
# Then: `cargo test` (engine, CLI, operator on the cluster) and the chart tests (tests/chart).
#
#   tests/run.sh                 # everything
#   tests/run.sh --test operator # arguments go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[tests] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "the cluster tests run a kubelet and containerd: run as root (e.g. in a privileged container)" >&2
  exit 2
fi

log "installing test dependencies (cached after the first run)"
tests/support/cluster/install.sh all
tests/support/secantus.sh install >/dev/null
tests/support/cluster/build.sh >/dev/null

log "building dbshift"
cargo build --locked --all-targets

work=$(mktemp -d)
cleanup() {
  kill "$(cat "$work/mongo.pid" 2>/dev/null)" 2>/dev/null || true
  [ -d "$work/k8s" ] && tests/support/cluster/down.sh "$work/k8s" >&2 || true
  rm -rf "$work"
}
trap cleanup EXIT

DBSHIFT_TEST_MONGODB_URI=$(tests/support/secantus.sh start "$work/mongo.pid")
export DBSHIFT_TEST_MONGODB_URI
log "MongoDB wire server: $DBSHIFT_TEST_MONGODB_URI"

log "starting the cluster"
tests/support/cluster/up.sh "$work/k8s" >/dev/null
# The image holds the debug build the tests use: no second (release) compile in CI.
image_tar=$(deploy/image/build.sh -b target/debug/dbshift -t dbshift:test -o "$work/dbshift-test.tar")
tests/support/cluster/load-image.sh "$work/k8s" "$image_tar" >/dev/null
export DBSHIFT_TEST_KUBECONFIG=$work/k8s/kubeconfig DBSHIFT_TEST_RUNNER_IMAGE=dbshift:test DBSHIFT_TEST_CLUSTER_DIR=$work/k8s
# The chart, as the in-cluster test installs it: the pod uses the node's network (no kube-proxy
# here), so it reaches the API server and MongoDB on 127.0.0.1.
. "$work/k8s/env"
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
values=$(printf '{"image":{"tag":"test","pullPolicy":"Never"},"hostNetwork":true,"watchNamespace":"dbshift-e2e","metrics":{"port":%s},"extraEnv":[{"name":"KUBERNETES_SERVICE_HOST","value":"127.0.0.1"},{"name":"KUBERNETES_SERVICE_PORT","value":"%s"}]}' "$metrics_port" "$APISERVER_PORT")
"$(tests/support/chart-venv.sh)" deploy/local/render_chart.py e2e dbshift-e2e "$values" > "$work/chart-e2e.yaml"
export DBSHIFT_TEST_CHART_MANIFEST=$work/chart-e2e.yaml
log "cluster ready: KUBECONFIG=$DBSHIFT_TEST_KUBECONFIG, image dbshift:test"

status=0
# The cluster suites are #[ignore]d for a plain `cargo test`: here they run.
cargo test --locked --all-targets --no-fail-fast "$@" -- --include-ignored || status=$?
if [ $# -eq 0 ]; then
  tests/chart/run.sh || status=$?
fi
exit $status
