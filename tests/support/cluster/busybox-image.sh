#!/usr/bin/env bash
# Builds a small image for generic test pods from Debian's busybox-static, with no registry or
# container engine: /bin/busybox plus a symlink per applet (sh, cat, sleep, wget, nc, ...),
# /etc/passwd and /etc/group with root and nonroot (65532), /tmp; optionally extra files.
#
# Usage: busybox-image.sh [-t NAME:TAG] [-o OUT.tar] [SRC=/DEST ...]
#   -t  image reference (default localhost/dbshift-test/busybox:<busybox version>; a different one
#       is needed when extra files are added)
#   -o  output (default: a cache file under ~/.cache/dbshift/images/, reused while it is newer
#       than its inputs)
#   SRC=/DEST  copy the file SRC into the image at /DEST (mode kept), e.g. "$K8S_BIN/kubectl=/usr/local/bin/kubectl"
# Prints the tarball's path on stdout. Default command: ["sh"]; user root unless the pod says otherwise.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
BUSYBOX=/bin/busybox
TAG='' OUT=''
log() { echo "[busybox-image] $*" >&2; }
die() { log "$*"; exit 1; }

extras=()
while (( $# )); do
  case $1 in
    -t) TAG=${2:?}; shift 2 ;;
    -o) OUT=${2:?}; shift 2 ;;
    *=/*) extras+=("$1"); shift ;;
    *) die "usage: busybox-image.sh [-t NAME:TAG] [-o OUT.tar] [SRC=/DEST ...]" ;;
  esac
done
[[ -x $BUSYBOX ]] || die "no $BUSYBOX (apt-get install busybox-static)"
banner=$("$BUSYBOX" --help 2>&1 || true)
[[ $banner == BusyBox\ v* ]] || die "$BUSYBOX is not BusyBox"
! ldd "$BUSYBOX" >/dev/null 2>&1 || die "$BUSYBOX is not statically linked (install busybox-static, not busybox)"
version=$(sed -nE '1s/^BusyBox v([0-9.]+).*/\1/p' <<<"$banner")
if [[ -z $TAG ]]; then
  (( ${#extras[@]} == 0 )) || die "give -t NAME:TAG when adding files"
  TAG=localhost/dbshift-test/busybox:$version
fi
if [[ -z $OUT ]]; then
  key=$(printf '%s\n' "$TAG" "${extras[@]}" | sha256sum | cut -c1-12)
  OUT=$CACHE/images/busybox-$version-$key.tar
  newest=$BUSYBOX
  for e in "${extras[@]}"; do [[ ${e%%=/*} -nt $newest ]] && newest=${e%%=/*}; done
  if [[ -f $OUT && $OUT -nt $newest && $OUT -nt $HERE/../../../deploy/image/mkimage.py ]]; then
    echo "$OUT"; exit 0
  fi
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,etc,tmp,root,home/nonroot}
chmod 1777 "$stage/tmp"
cp "$BUSYBOX" "$stage/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [[ $applet == busybox ]] || ln -s busybox "$stage/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n' > "$stage/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$stage/etc/group"
for e in "${extras[@]}"; do
  src=${e%%=/*} dest=/${e#*=/}
  [[ -f $src ]] || die "no such file: $src"
  mkdir -p "$stage$(dirname "$dest")"
  cp -L "$src" "$stage$dest"
done
python3 "$HERE/../../../deploy/image/mkimage.py" --tag "$TAG" --out "$OUT" --cmd '["sh"]' \
  --chown home/nonroot=65532:65532 "$stage"
echo "$OUT"
