#!/usr/bin/env bash
# Starts a Kubernetes 1.20.2 cluster with all state under DIR: the control plane (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler; every server on 127.0.0.1) and, unless
# --no-node, one real node: containerd (root, state and socket under DIR) -> runc, a CNI bridge
# (cni0 10.88.0.1/16, no gateway, no masquerade, no routes) and a kubelet on the bridge address.
# Prints DIR/kubeconfig's path once the API server is ready and the node is Ready.
# Stop with down.sh DIR. Binaries come from build.sh (~/.cache/dbshift/k8s-1.20.2/bin, or $K8S_BIN);
# missing apt packages are installed by install.sh (needs root, like the node itself).
#
# Usage: up.sh [--no-node] DIR           (or DBSHIFT_NO_NODE=1)
# Files under DIR: pids/*.pid, logs/*.log, pki/, etcd-data/, *.kubeconfig, kubeconfig, tokens.csv,
#   node/ (containerd config, root, state and socket; kubelet config and root; CNI config),
#   env (shell syntax): APISERVER_URL, APISERVER_PORT, ETCD_URL, ADMIN_TOKEN, KUBECONFIG, K8S_BIN,
#   CA_CERT, and with a node: NODE_NAME, NODE_IP, CONTAINERD_SOCK, PAUSE_IMAGE, BRIDGE.
# Only one node per machine (the bridge, port 10250 on it and a few kubelet/containerd paths outside
# DIR are global): a second up.sh with a node refuses while another one runs.
# Environment: K8S_READY_TIMEOUT (default 90 s), DBSHIFT_BRIDGE (cni0), DBSHIFT_NODE_CIDR
#   (10.88.0.1/16: bridge address / pod network), DBSHIFT_NODE_NAME (dbshift-node).
set -euo pipefail

NODE=1
[[ ${DBSHIFT_NO_NODE:-} == 1 ]] && NODE=0
if [[ ${1:-} == --no-node ]]; then NODE=0; shift; fi
DIR=${1:?usage: up.sh [--no-node] DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${K8S_BIN:-${DBSHIFT_CACHE:-$HOME/.cache/dbshift}/k8s-1.20.2/bin}
ETCD=${ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}
READY_TIMEOUT=${K8S_READY_TIMEOUT:-90}

log() { echo "[k8s-up] $*" >&2; }
die() { log "$*"; exit 1; }

[[ -f $BIN/../.complete ]] || die "no Kubernetes binaries in $BIN: run $HERE/build.sh first"
if (( NODE )); then "$HERE/install.sh" node; fi
[[ -x $ETCD ]] || die "etcd not found (apt-get install etcd-server)"
command -v openssl >/dev/null || die "openssl not found"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [[ -d $DIR/pids ]] && compgen -G "$DIR/pids/*.pid" >/dev/null; then
  for f in "$DIR"/pids/*.pid; do
    kill -0 "$(cat "$f")" 2>/dev/null && die "a cluster is already running under $DIR (down.sh $DIR first)"
  done
fi
mkdir -p "$DIR"/{pids,logs,pki,etcd-data}
PKI=$DIR/pki

# If anything fails from here on, stop what was started.
ok=0
trap '(( ok )) || { log "failed; stopping what was started (logs in $DIR/logs)"; "$HERE/down.sh" --keep "$DIR" >&2 || true; }' EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); API_PORT=$(free_port)
CM_PORT=$(free_port); SCHED_PORT=$(free_port)

# --- PKI (openssl): CA, apiserver serving cert, service-account key pair -------------------------
log "certificates"
openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
openssl req -x509 -new -nodes -key "$PKI/ca.key" -sha256 -days 3650 -subj "/CN=dbshift-test-ca" \
  -out "$PKI/ca.crt" 2>/dev/null
openssl genrsa -out "$PKI/apiserver.key" 2048 2>/dev/null
cat > "$PKI/apiserver.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EXT
openssl req -new -key "$PKI/apiserver.key" -subj "/CN=kube-apiserver" -out "$PKI/apiserver.csr" 2>/dev/null
openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
  -days 3650 -sha256 -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt" 2>/dev/null
# The API server's client certificate for kubelet calls (logs, exec): the kubelet trusts ca.crt.
openssl genrsa -out "$PKI/apiserver-kubelet-client.key" 2048 2>/dev/null
openssl req -new -key "$PKI/apiserver-kubelet-client.key" -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
  -out "$PKI/apiserver-kubelet-client.csr" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
  > "$PKI/client.ext"
openssl x509 -req -in "$PKI/apiserver-kubelet-client.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
  -days 3650 -sha256 -extfile "$PKI/client.ext" -out "$PKI/apiserver-kubelet-client.crt" 2>/dev/null
openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
chmod 600 "$PKI"/*.key

# --- Tokens (static token file) ------------------------------------------------------------------
tok() { openssl rand -hex 16; }
ADMIN_TOKEN=$(tok); CM_TOKEN=$(tok); SCHED_TOKEN=$(tok); NODE_TOKEN=$(tok)
NODE_NAME=${DBSHIFT_NODE_NAME:-dbshift-node}
cat > "$DIR/tokens.csv" <<TOK
$ADMIN_TOKEN,admin,admin,system:masters
$CM_TOKEN,system:kube-controller-manager,system:kube-controller-manager
$SCHED_TOKEN,system:kube-scheduler,system:kube-scheduler
$NODE_TOKEN,system:node:$NODE_NAME,system:node:$NODE_NAME,system:nodes
TOK
chmod 600 "$DIR/tokens.csv"

APISERVER_URL=https://127.0.0.1:$API_PORT
kubeconfig() { # file user token
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: dbshift-test
  cluster:
    server: $APISERVER_URL
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: dbshift-test
  context: {cluster: dbshift-test, user: $2}
current-context: dbshift-test
KC
  chmod 600 "$1"
}
kubeconfig "$DIR/kubeconfig" admin "$ADMIN_TOKEN"
kubeconfig "$DIR/controller-manager.kubeconfig" system:kube-controller-manager "$CM_TOKEN"
kubeconfig "$DIR/scheduler.kubeconfig" system:kube-scheduler "$SCHED_TOKEN"
kubeconfig "$DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" "$NODE_TOKEN"

start() { # name command...
  local name=$1; shift
  "$@" > "$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name.pid"
}

# --- etcd ------------------------------------------------------------------------------------------
ETCD_URL=http://127.0.0.1:$ETCD_PORT
log "etcd on $ETCD_URL"
start etcd "$ETCD" --name dbshift-test --data-dir "$DIR/etcd-data" \
  --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "dbshift-test=http://127.0.0.1:$ETCD_PEER_PORT" \
  --quota-backend-bytes=$((1024*1024*1024))
for _ in $(seq 1 100); do
  curl -fsS "$ETCD_URL/health" 2>/dev/null | grep -q '"health":"true"' && break
  kill -0 "$(cat "$DIR/pids/etcd.pid")" 2>/dev/null || die "etcd exited: $(tail -n 5 "$DIR/logs/etcd.log")"
  sleep 0.2
done
curl -fsS "$ETCD_URL/health" 2>/dev/null | grep -q '"health":"true"' || die "etcd not healthy"

# --- kube-apiserver -------------------------------------------------------------------------------
log "kube-apiserver on $APISERVER_URL"
start kube-apiserver "$BIN/kube-apiserver" \
  --advertise-address=127.0.0.1 --bind-address=127.0.0.1 --secure-port="$API_PORT" \
  --insecure-port=0 \
  --etcd-servers="$ETCD_URL" \
  --cert-dir="$PKI" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --token-auth-file="$DIR/tokens.csv" \
  --authorization-mode=Node,RBAC \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.0.0.0/24 \
  --kubelet-preferred-address-types=InternalIP \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$PKI/ca.crt" \
  --enable-admission-plugins=NamespaceLifecycle,ServiceAccount,DefaultStorageClass,ResourceQuota \
  --allow-privileged=true \
  --profiling=false \
  --v=1

# --- wait for /readyz -----------------------------------------------------------------------------
deadline=$(( $(date +%s) + READY_TIMEOUT ))
ready() { curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
            "$APISERVER_URL/readyz" 2>/dev/null | grep -qx ok; }
until ready; do
  kill -0 "$(cat "$DIR/pids/kube-apiserver.pid")" 2>/dev/null \
    || die "kube-apiserver exited: $(tail -n 5 "$DIR/logs/kube-apiserver.log")"
  (( $(date +%s) < deadline )) || die "kube-apiserver not ready after ${READY_TIMEOUT}s"
  sleep 0.5
done

# --- kube-controller-manager, kube-scheduler ------------------------------------------------------
log "kube-controller-manager, kube-scheduler"
start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig="$DIR/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$CM_PORT" --port=0 \
  --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --v=1
start kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig="$DIR/scheduler.kubeconfig" \
  --authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
  --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 \
  --leader-elect=false --v=1

# The controller-manager must have made the `default` ServiceAccount before pods can be created.
until "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" -n default get serviceaccount default >/dev/null 2>&1; do
  for n in kube-controller-manager kube-scheduler; do
    kill -0 "$(cat "$DIR/pids/$n.pid")" 2>/dev/null || die "$n exited: $(tail -n 5 "$DIR/logs/$n.log")"
  done
  (( $(date +%s) < deadline )) || die "no default ServiceAccount after ${READY_TIMEOUT}s"
  sleep 0.5
done

cat > "$DIR/env" <<ENV
APISERVER_URL=$APISERVER_URL
APISERVER_PORT=$API_PORT
ETCD_URL=$ETCD_URL
ADMIN_TOKEN=$ADMIN_TOKEN
KUBECONFIG=$DIR/kubeconfig
K8S_BIN=$BIN
CA_CERT=$PKI/ca.crt
ENV

if (( NODE )); then
  "$HERE/node-up.sh" "$DIR" "$NODE_NAME" || die "the node did not come up (logs in $DIR/logs)"
fi
ok=1
log "ready"
echo "$DIR/kubeconfig"
