#!/usr/bin/env bash
# The dbshift demo, on a real local Kubernetes cluster:
#   a MongoDB wire server with four tenant databases (one excluded), the operator installed
#   from charts/dbshift, and the example DatabaseMigration (deploy/examples/canary-rollout.yaml)
#   rolled across the tenants as one Job per tenant: canaries first, snapshots, validation.
#
#   sudo deploy/local/demo.sh          # from the repository root; needs root, cargo, python3
#   deploy/local/demo.sh --keep        # leave the cluster running (prints how to reach it)
#   DBSHIFT_K8S_BIN=DIR deploy/local/demo.sh   # on other Kubernetes binaries, e.g. v1.32.6 from
#                                      # $(tests/support/cluster/shared-k8s.sh)
#
# The first run installs packages (apt, PyPI) and builds Kubernetes 1.20.2 from Debian's source
# package (about 12 minutes, cached under ~/.cache/dbshift); later runs take about a minute.
# The operator and the Jobs run in namespaces that enforce the `restricted` Pod Security
# Standard (enforced on Kubernetes 1.23+), on the pod network: MongoDB and the API server
# listen on the node's bridge address (10.88.0.1), which pods reach without hostNetwork.
set -euo pipefail
cd "$(dirname "$0")/../.."

keep=0
[[ ${1:-} == --keep ]] && keep=1
[[ $(id -u) == 0 ]] || { echo "the local cluster runs a kubelet and containerd: run as root" >&2; exit 2; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "Installing what the demo needs (cached after the first run)"
if [[ -n ${DBSHIFT_K8S_BIN:-} ]]; then
  tests/support/cluster/install.sh node
else
  tests/support/cluster/install.sh all
  tests/support/cluster/build.sh >/dev/null
fi
tests/support/secantus.sh install >/dev/null
py=$(tests/support/chart-venv.sh)

step "Building dbshift (release) and its container image (no Docker needed)"
cargo build --release --locked --quiet
PATH=$PWD/target/release:$PATH
version=$(dbshift --version | awk '{print $2}')
work=$(mktemp -d)
image_tar=$(deploy/image/build.sh -b target/release/dbshift -t "dbshift:$version" -o "$work/dbshift.tar" 2>/dev/null)

cleanup() {
  kill "$(cat "$work/mongo.pid" 2>/dev/null)" 2>/dev/null || true
  tests/support/cluster/down.sh "$work/k8s" >/dev/null 2>&1 || true
  rm -rf "$work"
}
if (( keep )); then trap 'echo "kept: KUBECONFIG=$work/k8s/kubeconfig; stop with tests/support/cluster/down.sh $work/k8s"' EXIT
else trap cleanup EXIT; fi

step "Starting a Kubernetes cluster with one node and a MongoDB wire server (SecantusDB) on its bridge"
tests/support/cluster/up.sh "$work/k8s" >/dev/null
. "$work/k8s/env"
export KUBECONFIG
echo "Kubernetes $K8S_VERSION"
uri=$(tests/support/secantus.sh start "$work/mongo.pid" "$NODE_IP")
echo "MongoDB at $uri"
tests/support/cluster/load-image.sh "$work/k8s" "$image_tar" >/dev/null
show kubectl get nodes

step "Installing the operator from charts/dbshift"
# This cluster has no kube-proxy: the controller is told where the API server listens.
values=$(printf '{"image":{"tag":"%s","pullPolicy":"Never"},"extraEnv":[{"name":"KUBERNETES_SERVICE_HOST","value":"%s"},{"name":"KUBERNETES_SERVICE_PORT","value":"%s"}]}' "$version" "$APISERVER_HOST" "$APISERVER_PORT")
"$py" deploy/local/render_chart.py --label pod-security.kubernetes.io/enforce=restricted --kube-version "$K8S_VERSION" \
  dbshift dbshift-system "$values" \
  | kubectl apply --server-side -f - >/dev/null
show kubectl -n dbshift-system rollout status deployment/dbshift --timeout=120s

step "Seeding tenant databases"
"$(dirname "$(tests/support/secantus.sh bin)")/python" deploy/local/seed.py "$uri" \
  tenant_acme tenant_globex tenant_initech tenant_umbrella tenant_internal
show dbshift status --uri "$uri" --tenants '^tenant_' --exclude tenant_internal

step "Applying the migration: the Secret, the migration files, the DatabaseMigration"
kubectl apply -f deploy/examples/namespace.yaml >/dev/null
kubectl -n shop create secret generic shop-mongo --from-literal=uri="$uri" >/dev/null
kubectl apply -f deploy/examples/shop-migrations.configmap.yaml >/dev/null
# The example as published, plus what this cluster needs: the locally imported image.
"$py" - <<'PY' | kubectl apply -f -
import yaml
d = yaml.safe_load(open("deploy/examples/canary-rollout.yaml"))
d["spec"].setdefault("jobTemplate", {})["imagePullPolicy"] = "Never"
d["spec"]["rollout"]["maxParallel"] = 2
print(yaml.safe_dump(d))
PY

step "Watching it roll out (kubectl get dbm)"
# A line when the phase or the progress changes (the AGE column changes every second).
last=""
for _ in $(seq 1 300); do
  state=$(kubectl -n shop get dbm orders-typed-totals -o jsonpath='{.status.phase} {.status.progress.summary}' 2>/dev/null || true)
  if [[ $state != "$last" ]]; then
    kubectl -n shop get dbm orders-typed-totals --no-headers 2>/dev/null || true
    last=$state
  fi
  phase=${state%% *}
  [[ $phase == Succeeded || $phase == Failed || $phase == RolledBack ]] && break
  sleep 1
done

step "The result, as a user sees it"
show kubectl -n shop get dbm -o wide
show kubectl -n shop get jobs -L dbshift.io/tenant
kubectl -n shop get dbm orders-typed-totals -o yaml | sed -n '/^status:/,$p'
show kubectl -n shop get events --field-selector involvedObject.kind=DatabaseMigration --sort-by=.metadata.creationTimestamp -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message
show dbshift status --uri "$uri" --tenants '^tenant_' --exclude tenant_internal
[[ $phase == Succeeded ]]
