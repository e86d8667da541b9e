#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image for the test node without any registry: Kubernetes' own
# build/pause/linux/pause.c from the 1.20.2 source tree build.sh unpacks, compiled with
# `gcc -Os -static` (as its Makefile does) and wrapped by deploy/image/mkimage.py into a
# docker-archive tarball named localhost/dbshift/pause:3.4 (containerd's sandbox_image in up.sh).
# Cached in ~/.cache/dbshift/pause-3.4-k8s1.20.2/ (binary and tarball); a no-op once built.
#
# Usage: pause-image.sh          prints the tarball's path
#        pause-image.sh --ref    prints the image reference
# Environment: DBSHIFT_CACHE (default ~/.cache/dbshift).
set -euo pipefail

PAUSE_TAG=3.4                      # build/pause/Makefile's TAG in Kubernetes 1.20.2
K8S_VERSION=1.20.2
SRC_VERSION=1.20.5+really1.20.2
REF=localhost/dbshift/pause:$PAUSE_TAG
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
OUT=$CACHE/pause-$PAUSE_TAG-k8s$K8S_VERSION
SRC=$CACHE/k8s-src/kubernetes-$SRC_VERSION/build/pause/linux/pause.c

log() { echo "[pause-image] $*" >&2; }

if [[ ${1:-} == --ref ]]; then echo "$REF"; exit 0; fi
if [[ -f $OUT/.complete ]]; then echo "$OUT/pause.tar"; exit 0; fi

# The source tree build.sh unpacks; only that part of it when the cluster runs other binaries.
[[ -f $SRC ]] || "$HERE/build.sh" --source >/dev/null
[[ -f $SRC ]] || { log "missing $SRC after build.sh --source"; exit 1; }
mkdir -p "$OUT"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
log "gcc -Os -static $SRC"
gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_TAG-k8s$K8S_VERSION-dbshift" -o "$stage/pause" "$SRC"
strip "$stage/pause"
cp "$stage/pause" "$OUT/pause"
python3 "$HERE/../../../deploy/image/mkimage.py" --tag "$REF" --out "$OUT/pause.tar" \
  --entrypoint '["/pause"]' --user 65535:65535 "$stage"
touch "$OUT/.complete"
echo "$OUT/pause.tar"
