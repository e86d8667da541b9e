#!/usr/bin/env bash
# Imports image tarballs (docker-archive or OCI layout, e.g. from deploy/image/build.sh or
# busybox-image.sh) into the containerd of the node that up.sh DIR started, in the `k8s.io`
# namespace the kubelet uses, unpacked for its overlayfs snapshotter. Pods then use the image with
# `imagePullPolicy: Never` (or IfNotPresent); "dbshift:0.1.0" and "docker.io/library/dbshift:0.1.0"
# are the same reference.
#
# Usage: load-image.sh DIR IMAGE.tar...
# Prints each imported image reference on stdout.
set -euo pipefail

DIR=${1:?usage: load-image.sh DIR IMAGE.tar...}
shift
(( $# )) || { echo "usage: load-image.sh DIR IMAGE.tar..." >&2; exit 2; }
log() { echo "[load-image] $*" >&2; }

[[ -f $DIR/env ]] || { log "no $DIR/env: is a cluster up under $DIR?"; exit 1; }
# DIR/node/facts while the node is coming up, DIR/env once it is Ready.
CONTAINERD_SOCK=$(cat "$DIR/env" "$DIR/node/facts" 2>/dev/null | sed -n 's/^CONTAINERD_SOCK=//p' | head -n1 || true)
[[ -n $CONTAINERD_SOCK && -S $CONTAINERD_SOCK ]] || { log "no node under $DIR (started with --no-node?)"; exit 1; }

for tar in "$@"; do
  [[ -f $tar ]] || { log "no such file: $tar"; exit 1; }
  out=$(ctr -a "$CONTAINERD_SOCK" -n k8s.io images import --all-platforms --snapshotter overlayfs "$tar" 2>&1) \
    || { log "import of $tar failed: $out"; exit 1; }
  # ctr prints "unpacking REF (sha256:...)...done" per image.
  refs=$(sed -nE 's/^unpacking ([^ ]+) \(sha256:.*/\1/p' <<<"$out")
  [[ -n $refs ]] || { log "import of $tar printed no image: $out"; exit 1; }
  log "imported $(tr '\n' ' ' <<<"$refs")from $tar"
  echo "$refs"
done
