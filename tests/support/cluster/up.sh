#!/usr/bin/env bash
# Starts a Kubernetes cluster with all state under DIR: the control plane (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler) and, unless --no-node, one real node:
# containerd (root, state and socket under DIR) -> runc, a CNI bridge (cni0 10.88.0.1/16, no
# gateway, no masquerade, no routes) and a kubelet on the bridge address.
# Prints DIR/kubeconfig's path once the API server is ready and the node is Ready.
# Stop with down.sh DIR. Missing apt packages are installed by install.sh (needs root, like the
# node itself).
#
# Usage: up.sh [--no-node] DIR           (or DBSHIFT_NO_NODE=1)
#
# Binaries: $DBSHIFT_K8S_BIN (K8S_BIN is an older alias), a directory holding kube-apiserver,
#   kube-controller-manager, kube-scheduler and kubelet (e.g. v1.32.6 unpacked by
#   shared-k8s.sh); without it the 1.20.2 build of build.sh (~/.cache/dbshift/k8s-1.20.2/bin).
#   The version is read from `kube-apiserver --version`; what differs between 1.20 and current
#   releases (flags removed in 1.24+, the kubelet's configuration) is handled here and in
#   node-up.sh. kubectl: DIR/kubectl of the binaries if there, else the one on PATH for a
#   current server, else the 1.20.2 build's (env: KUBECTL).
# Addresses: etcd, the controller-manager and the scheduler listen on 127.0.0.1. The API server
#   listens on 127.0.0.1 without a node; with a node it listens on the bridge address instead
#   (10.88.0.1; the host reaches it too), so pods reach it without hostNetwork: in-cluster
#   clients set KUBERNETES_SERVICE_HOST=$APISERVER_HOST and KUBERNETES_SERVICE_PORT=$APISERVER_PORT
#   (there is no kube-proxy). Its serving certificate names 127.0.0.1 and the bridge address.
# Files under DIR: pids/*.pid, logs/*.log, pki/, etcd-data/, *.kubeconfig, kubeconfig, tokens.csv,
#   node/ (containerd config, root, state and socket; kubelet config and root; CNI config; pod logs),
#   env (shell syntax): APISERVER_URL, APISERVER_HOST, APISERVER_PORT, ETCD_URL, ADMIN_TOKEN,
#   KUBECONFIG, K8S_BIN, K8S_VERSION (e.g. 1.32.6), KUBECTL, CA_CERT, and with a node: NODE_NAME,
#   NODE_IP, CONTAINERD_SOCK, PAUSE_IMAGE, BRIDGE.
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
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
DEFAULT_BIN=$CACHE/k8s-1.20.2/bin
BIN=${DBSHIFT_K8S_BIN:-${K8S_BIN:-$DEFAULT_BIN}}
ETCD=${ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}
READY_TIMEOUT=${K8S_READY_TIMEOUT:-90}

log() { echo "[k8s-up] $*" >&2; }
die() { log "$*"; exit 1; }

if [[ $BIN == "$DEFAULT_BIN" ]]; then
  [[ -f $BIN/../.complete ]] || die "no Kubernetes binaries in $BIN: run $HERE/build.sh first"
fi
BIN=$(cd "$BIN" 2>/dev/null && pwd) || die "no such directory: ${DBSHIFT_K8S_BIN:-$K8S_BIN}"
need=(kube-apiserver kube-controller-manager kube-scheduler)
if (( NODE )); then need+=(kubelet); fi
for b in "${need[@]}"; do [[ -x $BIN/$b ]] || die "no $b in $BIN"; done
# "Kubernetes v1.32.6" -> 1.32.6; what the start-up flags depend on.
K8S_VERSION=$("$BIN/kube-apiserver" --version 2>/dev/null | sed -nE 's/^Kubernetes v([0-9]+\.[0-9]+\.[0-9]+).*/\1/p')
[[ -n $K8S_VERSION ]] || die "cannot read the version of $BIN/kube-apiserver"
K8S_MINOR=$(cut -d. -f2 <<<"$K8S_VERSION")
[[ $(cut -d. -f1 <<<"$K8S_VERSION") == 1 && $K8S_MINOR -ge 20 ]] || die "Kubernetes $K8S_VERSION: only 1.20 and later are supported"
# kubectl: the binaries' own, else (for a current server) the machine's, else the 1.20.2 build's.
if [[ -n ${KUBECTL:-} ]]; then :
elif [[ -x $BIN/kubectl ]]; then KUBECTL=$BIN/kubectl
elif (( K8S_MINOR > 20 )) && command -v kubectl >/dev/null; then KUBECTL=$(command -v kubectl)
elif [[ -x $DEFAULT_BIN/kubectl ]]; then KUBECTL=$DEFAULT_BIN/kubectl
else die "no kubectl (none in $BIN, none on PATH, no 1.20.2 build: run $HERE/build.sh)"
fi
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
NODE_CIDR=${DBSHIFT_NODE_CIDR:-10.88.0.1/16}
NODE_IP=${NODE_CIDR%/*}
NODE_NAME=${DBSHIFT_NODE_NAME:-dbshift-node}

# With a node, the API server listens on the bridge address, so the bridge comes first.
API_HOST=127.0.0.1
if (( NODE )); then
  "$HERE/node-up.sh" --network-only "$DIR" "$NODE_NAME" || die "the node's network could not be set up"
  API_HOST=$NODE_IP
fi

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
subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
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
cat > "$DIR/tokens.csv" <<TOK
$ADMIN_TOKEN,admin,admin,system:masters
$CM_TOKEN,system:kube-controller-manager,system:kube-controller-manager
$SCHED_TOKEN,system:kube-scheduler,system:kube-scheduler
$NODE_TOKEN,system:node:$NODE_NAME,system:node:$NODE_NAME,system:nodes
TOK
chmod 600 "$DIR/tokens.csv"

APISERVER_URL=https://$API_HOST:$API_PORT
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
# Flags that 1.24 removed: the API server's insecure port and the controllers' plain-HTTP ports
# (off here) are gone, not just off by default.
API_OLD=() CTRL_OLD=()
if (( K8S_MINOR < 24 )); then API_OLD=(--insecure-port=0); CTRL_OLD=(--port=0); fi
log "kube-apiserver $K8S_VERSION on $APISERVER_URL"
start kube-apiserver "$BIN/kube-apiserver" \
  --advertise-address="$API_HOST" --bind-address="$API_HOST" --secure-port="$API_PORT" \
  "${API_OLD[@]}" \
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
  --bind-address=127.0.0.1 --secure-port="$CM_PORT" "${CTRL_OLD[@]}" \
  --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --v=1
start kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig="$DIR/scheduler.kubeconfig" \
  --authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
  --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" "${CTRL_OLD[@]}" \
  --leader-elect=false --v=1

# The controller-manager must have made the `default` ServiceAccount before pods can be created.
until "$KUBECTL" --kubeconfig "$DIR/kubeconfig" -n default get serviceaccount default >/dev/null 2>&1; do
  for n in kube-controller-manager kube-scheduler; do
    kill -0 "$(cat "$DIR/pids/$n.pid")" 2>/dev/null || die "$n exited: $(tail -n 5 "$DIR/logs/$n.log")"
  done
  (( $(date +%s) < deadline )) || die "no default ServiceAccount after ${READY_TIMEOUT}s"
  sleep 0.5
done

cat > "$DIR/env" <<ENV
APISERVER_URL=$APISERVER_URL
APISERVER_HOST=$API_HOST
APISERVER_PORT=$API_PORT
ETCD_URL=$ETCD_URL
ADMIN_TOKEN=$ADMIN_TOKEN
KUBECONFIG=$DIR/kubeconfig
K8S_BIN=$BIN
K8S_VERSION=$K8S_VERSION
KUBECTL=$KUBECTL
CA_CERT=$PKI/ca.crt
ENV

if (( NODE )); then
  "$HERE/node-up.sh" "$DIR" "$NODE_NAME" || die "the node did not come up (logs in $DIR/logs)"
fi
ok=1
log "ready"
echo "$DIR/kubeconfig"
