#!/usr/bin/env bash
# The operator benchmark (tests/bench/operator.rs): a small migration across N tenant databases
# (default 1,000) through the controller, against the same Jobs created directly, in one run.
#   sudo tests/bench/operator.sh                       # 1,000 tenants, 10 Jobs at a time
#   DBSHIFT_BENCH_TENANTS=100 tests/bench/operator.sh
# Starts its own cluster (with a node), SecantusDB's Rust build (tests/bench/setup.sh) and the
# image from the release binary; stops them at the end. Results: stdout and target/bench-operator.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/support/cluster/install.sh all
tests/support/cluster/build.sh >/dev/null
eval "$(tests/bench/setup.sh | grep SECANTUSD_RS)"
cargo build --release --locked --quiet
work=$(mktemp -d)
cleanup() {
  kill "$(cat "$work/mongo.pid" 2>/dev/null)" 2>/dev/null || true
  tests/support/cluster/down.sh "$work/k8s" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/db"
"$SECANTUSD_RS" --host 127.0.0.1 --port "$port" --storage-path "$work/db" >/dev/null 2>&1 &
echo $! > "$work/mongo.pid"
tests/support/cluster/up.sh "$work/k8s" >/dev/null
tar=$(deploy/image/build.sh -b target/release/dbshift -t dbshift:bench -o "$work/image.tar" 2>/dev/null)
tests/support/cluster/load-image.sh "$work/k8s" "$tar" >/dev/null
kubectl --kubeconfig "$work/k8s/kubeconfig" apply --server-side -f crds/databasemigration.yaml >/dev/null
kubectl --kubeconfig "$work/k8s/kubeconfig" wait --for condition=established crd/databasemigrations.dbshift.io >/dev/null
export DBSHIFT_BENCH_KUBECONFIG=$work/k8s/kubeconfig DBSHIFT_BENCH_MONGODB_URI=mongodb://127.0.0.1:$port
export DBSHIFT_BENCH_RUNNER_IMAGE=dbshift:bench DBSHIFT_BENCH_DBSHIFT=$PWD/target/release/dbshift
cargo bench --locked --bench operator -- --bench
