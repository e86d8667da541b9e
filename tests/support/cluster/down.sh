#!/usr/bin/env bash
# Stops what up.sh DIR started (the pids under DIR/pids) and removes DIR. With a node, first
# stops the kubelet, kills every container (through containerd, then runc for stragglers), stops
# containerd and its shims, unmounts what is still mounted under DIR, removes the bridge and the
# paths the kubelet and containerd write outside DIR, and restores the kernel tunables the kubelet
# changed, so the machine can run up.sh again.
#
# Usage: down.sh [--keep] [--node-only] DIR
#   --keep       stop everything but leave DIR (logs, certs) for inspection
#   --node-only  stop and clean up the node only; leave DIR in place, and the control plane running
#                unless its API server listens on the bridge address (up.sh with a node does that)
# The node's network goes last, after every process of the cluster; the route `unreachable
# <pod network>` that node-up.sh adds keeps packets for it on this machine until no connection is
# left there (a FIN to a pod that is gone can be retransmitted for minutes).
set -uo pipefail
keep=0 node_only=0
while [[ ${1:-} == --* ]]; do
  case $1 in
    --keep) keep=1 ;;
    --node-only) node_only=1; keep=1 ;;
    *) echo "usage: down.sh [--keep] [--node-only] DIR" >&2; exit 2 ;;
  esac
  shift
done
DIR=${1:?usage: down.sh [--keep] [--node-only] DIR}
[[ -d $DIR ]] || exit 0
DIR=$(cd "$DIR" && pwd)
log() { echo "[k8s-down] $*" >&2; }

# stop NAME...: SIGTERM to all of them at once, up to 10 s for them to exit, then SIGKILL.
stop() {
  local n f pid pids=()
  for n in "$@"; do
    f=$DIR/pids/$n.pid
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    # Only signal a process that still is the one we started (guards against pid reuse).
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q -- "$DIR"; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$f"
  done
  wait_gone "${pids[@]}"
}
# wait_gone PID...: up to 10 s for them to exit, then SIGKILL.
wait_gone() {
  local pid alive
  for _ in $(seq 1 100); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1
  done
  for pid in "$@"; do kill -KILL "$pid" 2>/dev/null; done
}

# Mount points at or below $1, deepest first (from mountinfo; \040-style escapes decoded).
mounts_under() {
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do printf '%b\n' "$m"; done \
    | awk -v d="$1" 'index($0, d "/") == 1 || $0 == d' | sort -r
}
unmount_under() {
  local m
  for _ in 1 2 3; do
    mapfile -t ms < <(mounts_under "$1")
    (( ${#ms[@]} )) || return 0
    for m in "${ms[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  done
  mapfile -t ms < <(mounts_under "$1")
  (( ${#ms[@]} == 0 )) || log "still mounted under $1: ${ms[*]}"
}

node_down() {
  local N=$DIR/node BRIDGE='' RUNC_ROOT='' CONTAINERD_SOCK='' LOCK='' id
  [[ -f $N/facts ]] || return 0
  # shellcheck disable=SC1091
  source "$N/facts"
  stop kubelet
  # Every container and pod sandbox: kill and delete through containerd while it runs...
  if [[ -S $CONTAINERD_SOCK ]] && ctr -a "$CONTAINERD_SOCK" version >/dev/null 2>&1; then
    local c=(ctr -a "$CONTAINERD_SOCK" -n k8s.io)
    mapfile -t ids < <("${c[@]}" tasks ls -q 2>/dev/null)
    for id in "${ids[@]}"; do "${c[@]}" tasks kill -s SIGKILL "$id" >/dev/null 2>&1; done
    for id in "${ids[@]}"; do "${c[@]}" tasks rm -f "$id" >/dev/null 2>&1; done
  fi
  # ...then through runc for anything left (e.g. containerd already dead).
  if [[ -d $RUNC_ROOT ]]; then
    for root in "$RUNC_ROOT"/*/; do
      [[ -d $root ]] || continue
      for id in $(runc --root "$root" list -q 2>/dev/null); do
        runc --root "$root" delete --force "$id" >/dev/null 2>&1
      done
    done
  fi
  stop containerd
  # Shims of this containerd (they outlive it): found by the socket path in their command line.
  local shims=()
  for p in /proc/[0-9]*; do
    tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -q -- "containerd-shim.* -address $CONTAINERD_SOCK" \
      && shims+=("${p#/proc/}")
  done
  if (( ${#shims[@]} )); then
    kill -TERM "${shims[@]}" 2>/dev/null
    wait_gone "${shims[@]}"
  fi
  # Secret/configMap tmpfs mounts, container rootfs overlays, network namespaces, shm.
  unmount_under "$N"
  # Paths outside DIR (fixed in the kubelet and containerd).
  rm -rf /var/log/pods /var/log/containers /var/lib/kubelet/device-plugins /var/lib/cni/results
  rmdir /var/lib/kubelet /var/lib/cni 2>/dev/null
  # /run/containerd/{s,fifo} hold shim sockets and fifos of every containerd on the machine: only
  # remove them when no other containerd runs.
  local other=0
  for p in /proc/[0-9]*; do
    [[ $(cat "$p/comm" 2>/dev/null) == containerd ]] && other=1
  done
  if (( ! other )); then
    rm -rf /run/containerd/s /run/containerd/fifo
    rmdir /run/containerd 2>/dev/null
  fi
  # The cgroup parent containerd made for pods (the kubelet runs with cgroupsPerQOS=false), if empty.
  for cg in /sys/fs/cgroup/*/k8s.io; do [[ -d $cg ]] && rmdir "$cg" 2>/dev/null; done
}

# Sockets (not TIME-WAIT) with an address in SUBNET; with `owned`, only those a process holds
# (not the orphans the kernel still retransmits a FIN for).
subnet_sockets() { # subnet [owned]
  ss -Htanp "( dst $1 or src $1 )" 2>/dev/null | awk -v owned="${2:-}" '$1 != "TIME-WAIT" && (owned == "" || /users:/)'
}

# The machine-wide part of the node, once every process of the cluster stopped. Packets to the pod
# network must never leave by the default route once the bridge is gone: node-up.sh adds the
# route `unreachable SUBNET` (below the bridge's own); it goes last, when no socket is left there.
node_net_down() {
  local N=$DIR/node BRIDGE='' LOCK='' SUBNET='' GUARD_METRIC='' left=''
  [[ -f $N/facts ]] || return 0
  # shellcheck disable=SC1091
  source "$N/facts"
  if [[ -n ${BRIDGE:-} ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    if [[ -n $SUBNET ]]; then
      left=$(subnet_sockets "$SUBNET" owned)
      [[ -z $left ]] || log "processes still use the pod network $SUBNET (its packets stay on this machine):"$'\n'"$left"
    fi
    ip link del "$BRIDGE" || log "could not delete $BRIDGE"
  fi
  # Kernel tunables the kubelet changed.
  if [[ -f $N/sysctl.orig ]]; then
    while IFS='=' read -r k v; do
      [[ -n $k && -w /proc/sys/$k ]] && [[ $(cat "/proc/sys/$k") != "$v" ]] && echo "$v" > "/proc/sys/$k"
    done < "$N/sysctl.orig"
  fi
  [[ -n $LOCK && -f $LOCK && $(cat "$LOCK") == "$DIR" ]] && rm -f "$LOCK"
  if [[ -n $SUBNET && -n $GUARD_METRIC ]]; then
    for _ in $(seq 1 50); do
      left=$(subnet_sockets "$SUBNET")
      [[ -z $left ]] && break
      sleep 0.1
    done
    if [[ -z $left ]]; then
      ip route del unreachable "$SUBNET" metric "$GUARD_METRIC" 2>/dev/null
    else
      log "leaving the route 'unreachable $SUBNET' while connections there drain (harmless; the next up.sh and down.sh reuse and remove it):"$'\n'"$left"
    fi
  fi
  rm -f "$N/facts"
}

control_plane_down() {
  local others=() f n
  for f in "$DIR"/pids/*.pid; do
    [[ -f $f ]] || continue
    n=$(basename "$f" .pid)
    [[ $n == etcd ]] || others+=("$n")
  done
  (( ${#others[@]} )) && stop "${others[@]}"   # the API server and its clients
  stop etcd                                     # etcd last
}

# The API server of a cluster with a node listens on the bridge address: it goes with the bridge.
api_on_bridge() {
  local host
  host=$(sed -n 's/^APISERVER_HOST=//p' "$DIR/env" 2>/dev/null)
  [[ -n $host && $host != 127.0.0.1 && -f $DIR/node/facts ]]
}

node_down
if (( ! node_only )); then
  control_plane_down
elif api_on_bridge && compgen -G "$DIR/pids/*.pid" >/dev/null; then
  log "the API server under $DIR listens on the node's bridge address: stopping the control plane too"
  control_plane_down
fi
node_net_down
if (( ! node_only )); then
  unmount_under "$DIR"
  (( keep )) || rm -rf "$DIR"
fi
exit 0
