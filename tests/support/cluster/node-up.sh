#!/usr/bin/env bash
# Adds one real node to the control plane up.sh started under DIR: containerd (its own root, state
# and socket under DIR/node) -> runc, a CNI bridge, the pause image, and a kubelet registered as
# NODE_NAME. Returns once the node is Ready; appends the node's facts to DIR/env. up.sh calls it
# (use `up.sh DIR`, not this, unless the control plane was started with --no-node); down.sh DIR
# stops it and cleans up.
#
# Usage: node-up.sh [--network-only] DIR NODE_NAME
#   --network-only  only the machine-wide part: take the node lock, create the bridge and the CNI
#                   configuration (up.sh does this before the API server, which then listens on
#                   the bridge address); a later node-up.sh DIR NODE_NAME does the rest.
# The kubelet's version is the control plane's (K8S_BIN, K8S_VERSION in DIR/env): 1.20-1.23 get
# the flags they need (--container-runtime=remote, ...), newer ones a KubeletConfiguration that
# holds the runtime endpoint, the pod log directory (under DIR/node) and failCgroupV1: false.
# Needs root, cgroup v1 (cgroupfs driver) and overlayfs. Only one node per machine.
# Environment: K8S_READY_TIMEOUT (default 90 s), DBSHIFT_BRIDGE (cni0), DBSHIFT_NODE_CIDR (10.88.0.1/16).
#
# What the node changes outside DIR, all undone by down.sh DIR:
#   the bridge (ip link), the route `unreachable <pod network> metric 4242` (which keeps packets for
#   pods on this machine once the bridge is gone), /run/dbshift-test-node.lock, /var/log/pods, /var/log/containers,
#   /var/lib/kubelet/device-plugins, /var/lib/cni/results, /run/containerd/{s,fifo}, the cgroup
#   parent /sys/fs/cgroup/*/k8s.io, and the kernel
#   tunables the kubelet insists on (vm.overcommit_memory=1, vm.panic_on_oom=0, kernel.panic=10,
#   kernel.panic_on_oops=1; their previous values are kept in DIR/node/sysctl.orig and restored).
set -euo pipefail

NETWORK_ONLY=0
if [[ ${1:-} == --network-only ]]; then NETWORK_ONLY=1; shift; fi
DIR=${1:?usage: node-up.sh [--network-only] DIR NODE_NAME}
NODE_NAME=${2:?usage: node-up.sh [--network-only] DIR NODE_NAME}
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=$(cd "$DIR" && pwd)
READY_TIMEOUT=${K8S_READY_TIMEOUT:-90}
BRIDGE=${DBSHIFT_BRIDGE:-cni0}
NODE_CIDR=${DBSHIFT_NODE_CIDR:-10.88.0.1/16}
NODE_IP=${NODE_CIDR%/*}
LOCK=/run/dbshift-test-node.lock
N=$DIR/node
PKI=$DIR/pki
CONTAINERD_SOCK=$N/containerd.sock
KUBELET_PORT=10250
GUARD_METRIC=4242   # of the route `unreachable <pod network>` (the bridge's own route has metric 0)

log() { echo "[k8s-node] $*" >&2; }
die() { log "$*"; exit 1; }

if (( ! NETWORK_ONLY )); then
  [[ -f $DIR/env ]] || die "no $DIR/env: start the control plane with up.sh first"
  # shellcheck disable=SC1091
  source "$DIR/env"
fi
[[ $(id -u) -eq 0 ]] || die "the node needs root (containerd, runc, the bridge, mounts)"
for c in containerd containerd-shim-runc-v2 runc ctr ip gcc python3; do
  command -v "$c" >/dev/null || die "$c not found: run $HERE/install.sh node"
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] \
  || die "CNI plugins not found in /usr/lib/cni: run $HERE/install.sh node"
# A unix socket path must fit in sun_path (108 bytes); containerd also adds ".ttrpc".
(( ${#CONTAINERD_SOCK} + 6 < 108 )) || die "DIR is too long for a unix socket path: $CONTAINERD_SOCK"

# --- the machine-wide part (once per DIR; up.sh runs it first with --network-only) ----------------
# NETWORK=1, the last line of DIR/node/facts, says it is done.
if ! grep -qx NETWORK=1 "$N/facts" 2>/dev/null; then

# down.sh DIR reads what to clean from DIR/node/facts, written as things are made.
mkdir -p "$N"/{containerd/root,containerd/state,containerd/opt,runc,cni/net.d,cni/networks,kubelet/root,kubelet/volume-plugins}
cat > "$N/facts" <<FACTS
RUNC_ROOT=$N/runc
CONTAINERD_SOCK=$CONTAINERD_SOCK
FACTS

# --- one node per machine --------------------------------------------------------------------------
if [[ -f $LOCK && $(cat "$LOCK") != "$DIR" ]]; then
  other=$(cat "$LOCK")
  for n in kubelet containerd; do
    f=$other/pids/$n.pid
    [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null \
      && die "a node of the cluster under $other is running (down.sh $other first)"
  done
  log "stale node lock from $other (its processes are gone): cleaning up after it"
  "$HERE/down.sh" --node-only "$other" >&2 || true
  # Its bridge, if its directory (and so its facts) is gone, and nothing uses its address any more
  # (without the address, packets to it would leave by the default route).
  if [[ -f $LOCK ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    busy=$(ss -Htanp "( src $NODE_IP )" 2>/dev/null | awk '$1 != "TIME-WAIT" && /users:/')
    [[ -z $busy ]] || die "the stale bridge $BRIDGE is still in use on $NODE_IP: $busy"
    ip route replace unreachable "$(python3 -c "import ipaddress,sys; print(ipaddress.ip_interface(sys.argv[1]).network)" "$NODE_CIDR")" metric "$GUARD_METRIC"
    ip link del "$BRIDGE"
  fi
fi
echo "$DIR" > "$LOCK"
echo "LOCK=$LOCK" >> "$N/facts"
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  die "network interface $BRIDGE already exists and no dbshift node owns it (set DBSHIFT_BRIDGE, or ip link del $BRIDGE)"
fi

# --- kernel tunables: the kubelet sets these; remember the old values for down.sh -----------------
: > "$N/sysctl.orig"
for k in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  if [[ -r /proc/sys/$k ]]; then echo "$k=$(cat "/proc/sys/$k")" >> "$N/sysctl.orig"; fi
done

# --- bridge: the node's address; pods get 10.88.x.y on it and reach nothing beyond -----------------
subnet=$(python3 -c "import ipaddress,sys; print(ipaddress.ip_interface(sys.argv[1]).network)" "$NODE_CIDR")
# First a guard: packets for the pod network never leave by the default route, also once the bridge
# is gone and a connection to a pod that was there still retransmits (down.sh removes it last).
ip route replace unreachable "$subnet" metric "$GUARD_METRIC"
printf 'SUBNET=%s\nGUARD_METRIC=%s\n' "$subnet" "$GUARD_METRIC" >> "$N/facts"
log "bridge $BRIDGE $NODE_CIDR"
# A fixed MAC address: a bridge without one takes the lowest of its ports' (the pods' veths), so it
# changes when such a pod goes, and the running pods' ARP entries for the node's address then point
# nowhere: their connections to MongoDB or the API server on it stall until the entries expire.
BRIDGE_MAC=$(printf '02:db:%02x:%02x:%02x:%02x' ${NODE_IP//./ })
ip link add "$BRIDGE" address "$BRIDGE_MAC" type bridge
echo "BRIDGE=$BRIDGE" >> "$N/facts"
ip addr add "$NODE_CIDR" dev "$BRIDGE"
ip link set "$BRIDGE" up
cat > "$N/cni/net.d/10-dbshift.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "dbshift",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$subnet", "gateway": "$NODE_IP"}]],
        "dataDir": "$N/cni/networks"
      }
    }
  ]
}
CNI
echo "NETWORK=1" >> "$N/facts"
fi
(( NETWORK_ONLY )) && exit 0

# --- containerd ------------------------------------------------------------------------------------
PAUSE_TAR=$("$HERE/pause-image.sh")
PAUSE_IMAGE=$("$HERE/pause-image.sh" --ref)
cat > "$N/containerd/config.toml" <<TOML
version = 2
root = "$N/containerd/root"
state = "$N/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "$CONTAINERD_SOCK"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$N/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_apparmor = true
    # Without it runc fails with "can't get final child's PID" (no CAP_SYS_RESOURCE in here).
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    enable_selinux = false
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "$N/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$N/cni/net.d"
      max_conf_num = 1
TOML

start() { # name command...
  local name=$1; shift
  "$@" > "$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name.pid"
}
alive() { kill -0 "$(cat "$DIR/pids/$1.pid")" 2>/dev/null || die "$1 exited: $(tail -n 5 "$DIR/logs/$1.log")"; }
deadline=$(( $(date +%s) + READY_TIMEOUT ))

log "containerd on $CONTAINERD_SOCK"
start containerd containerd --config "$N/containerd/config.toml"
until ctr -a "$CONTAINERD_SOCK" version >/dev/null 2>&1; do
  alive containerd
  (( $(date +%s) < deadline )) || die "containerd not answering after ${READY_TIMEOUT}s"
  sleep 0.2
done
"$HERE/load-image.sh" "$DIR" "$PAUSE_TAR" >/dev/null

# --- kubelet ---------------------------------------------------------------------------------------
# Serving certificate for the bridge address, signed by the cluster CA (the API server checks it).
openssl genrsa -out "$PKI/kubelet.key" 2048 2>/dev/null
openssl req -new -key "$PKI/kubelet.key" -subj "/CN=$NODE_NAME" -out "$PKI/kubelet.csr" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:%s,DNS:%s\n' \
  "$NODE_IP" "$NODE_NAME" > "$PKI/kubelet.ext"
openssl x509 -req -in "$PKI/kubelet.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
  -days 3650 -sha256 -extfile "$PKI/kubelet.ext" -out "$PKI/kubelet.crt" 2>/dev/null
chmod 600 "$PKI/kubelet.key"

# Pods resolve nothing: no cluster DNS, and the machine's resolvers are none of the pods' business.
echo "nameserver 127.0.0.1" > "$N/resolv.conf"
HEALTHZ_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
K8S_VERSION=${K8S_VERSION:-$("$K8S_BIN/kube-apiserver" --version | sed -nE 's/^Kubernetes v([0-9.]+).*/\1/p')}
K8S_MINOR=$(cut -d. -f2 <<<"$K8S_VERSION")
cat > "$N/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $HEALTHZ_PORT
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
# Only clients with a certificate from the cluster CA (the API server) may call the kubelet.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
resolvConf: $N/resolv.conf
# Images cannot be pulled back here: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# No eviction for disk: this node shares the machine's disk with the build (a cold cargo build
# takes ~8 GiB), and a kubelet under DiskPressure taints the node, so every Job's pod stays Pending
# and each operator test times out (the CI run on f0d25a2: 17 of them, on both versions). "0%" is
# what kind uses to turn the signal off; tests/run.sh says how much disk is free instead.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
# Leave the machine's iptables alone (no kube-proxy here anyway).
makeIPTablesUtilChains: false
serializeImagePulls: false
runtimeRequestTimeout: 5m
# Ready sooner after registration (default 10s); status is still only posted when it changes.
nodeStatusUpdateFrequency: 2s
YAML
if (( K8S_MINOR >= 27 )); then
  # Current kubelets (tested: 1.32) take these from the file (the flags are gone or deprecated):
  # the runtime endpoint (remote is the only runtime), the pod logs under DIR (no flag; the default
  # is /var/log/pods), and cgroup v1 allowed (1.31+ refuses it by default; this host has no v2).
  mkdir -p "$N/pod-logs"
  cat >> "$N/kubelet/config.yaml" <<YAML
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
imageServiceEndpoint: unix://$CONTAINERD_SOCK
volumePluginDir: $N/kubelet/volume-plugins
podLogsDir: $N/pod-logs
failCgroupV1: false
YAML
  OLD_FLAGS=()
else
  OLD_FLAGS=(--container-runtime=remote
    --container-runtime-endpoint="unix://$CONTAINERD_SOCK"
    --image-service-endpoint="unix://$CONTAINERD_SOCK"
    --volume-plugin-dir="$N/kubelet/volume-plugins")
fi

log "kubelet $K8S_VERSION $NODE_NAME on $NODE_IP:$KUBELET_PORT"
start kubelet "$K8S_BIN/kubelet" \
  --config="$N/kubelet/config.yaml" \
  --kubeconfig="$DIR/kubelet.kubeconfig" \
  --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
  "${OLD_FLAGS[@]}" \
  --root-dir="$N/kubelet/root" \
  --v=1

KUBECTL=("${KUBECTL:-$K8S_BIN/kubectl}" --kubeconfig "$DIR/kubeconfig")
until [[ $("${KUBECTL[@]}" get node "$NODE_NAME" \
           -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]; do
  alive containerd
  alive kubelet
  (( $(date +%s) < deadline )) || die "node $NODE_NAME not Ready after ${READY_TIMEOUT}s: $(tail -n 5 "$DIR/logs/kubelet.log")"
  sleep 0.5
done

cat >> "$DIR/env" <<ENV
NODE_NAME=$NODE_NAME
NODE_IP=$NODE_IP
CONTAINERD_SOCK=$CONTAINERD_SOCK
PAUSE_IMAGE=$PAUSE_IMAGE
BRIDGE=$BRIDGE
ENV
log "node $NODE_NAME Ready"
