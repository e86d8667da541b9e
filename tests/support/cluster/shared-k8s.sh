#!/usr/bin/env bash
# Unpacks the ready-made Kubernetes server binaries of ../shared/k8s (next to the checkout; e.g.
# kubernetes-1.32.6-linux-amd64.tar.zst with its unpack.sh, which checks SHA256SUMS) into
# ~/.cache/dbshift/k8s-<version> once, and prints the bin directory, for
# `DBSHIFT_K8S_BIN=$(tests/support/cluster/shared-k8s.sh) tests/run.sh ...` or up.sh.
#
# Usage: shared-k8s.sh [--check] [SHARED_K8S_DIR]     (default: <checkout>/../shared/k8s)
#   --check  print nothing; exit 0 if the directory holds such an archive, 3 if not
# Exit status 3 (and a message) when there is no such directory or archive: a machine without
# ../shared runs the 1.20.2 build only. Environment: DBSHIFT_CACHE (default ~/.cache/dbshift).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
check=0
if [[ ${1:-} == --check ]]; then check=1; shift; fi
SRC=${1:-$HERE/../../../../shared/k8s}

log() { echo "[shared-k8s] $*" >&2; }

shopt -s nullglob
archives=("$SRC"/kubernetes-*-linux-amd64.tar.zst)
if [[ ! -x $SRC/unpack.sh || ${#archives[@]} -ne 1 ]]; then
  (( check )) || log "no Kubernetes archive with an unpack.sh in $SRC"
  exit 3
fi
(( check )) && exit 0
SRC=$(cd "$SRC" && pwd)
version=$(basename "${archives[0]}" | sed -nE 's/^kubernetes-([0-9]+\.[0-9]+\.[0-9]+)-linux-amd64\.tar\.zst$/\1/p')
[[ -n $version ]] || { log "cannot read a version from ${archives[0]}"; exit 1; }
command -v zstd >/dev/null || "$HERE/install.sh" node
dest=$CACHE/k8s-$version
if [[ ! -f $dest/bin/.complete ]]; then log "unpacking Kubernetes $version from $SRC into $dest"; fi
bin=$("$SRC/unpack.sh" "$dest")
got=$("$bin/kube-apiserver" --version)
[[ $got == "Kubernetes v$version" ]] || { log "$bin/kube-apiserver says '$got', expected v$version"; exit 1; }
echo "$bin"
