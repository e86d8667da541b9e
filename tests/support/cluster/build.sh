#!/usr/bin/env bash
# Builds Kubernetes 1.20.2 (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl)
# from Debian bookworm's `kubernetes` source package, with the reflect2 fix (see
# /work/shared/REAL_CLUSTER.md), and caches the binaries in ~/.cache/dbshift/k8s-1.20.2/bin.
# Idempotent: does nothing once the `.complete` stamp exists. Needs root (apt, through install.sh build)
# on Debian bookworm.
# Prints the bin directory on stdout; progress goes to stderr.
#
# Usage: build.sh            build (once) and print the bin directory
#        build.sh --source   only fetch and unpack the source tree (once; what pause-image.sh needs
#                            when the cluster runs on other binaries) and print its path
# Environment: DBSHIFT_CACHE (default ~/.cache/dbshift), K8S_BUILD_NICE (default 10).
set -euo pipefail

VERSION=1.20.2
SRC_VERSION=1.20.5+really1.20.2
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
PREFIX=$CACHE/k8s-$VERSION
BIN=$PREFIX/bin
SRC_PARENT=$CACHE/k8s-src
TREE=$SRC_PARENT/kubernetes-$SRC_VERSION
NICE=${K8S_BUILD_NICE:-10}
TARGETS="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl"
BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl"

log() { echo "[k8s-build] $*" >&2; }

SOURCE_ONLY=0
case ${1:-} in
  --source) SOURCE_ONLY=1 ;;
  '') ;;
  *) echo "usage: build.sh [--source]" >&2; exit 2 ;;
esac

if (( SOURCE_ONLY )) && [[ -f $TREE/.dbshift-unpacked ]]; then
  echo "$TREE"
  exit 0
fi
if (( ! SOURCE_ONLY )) && [[ -f $PREFIX/.complete ]]; then
  echo "$BIN"
  exit 0
fi

# 1. Packages (and the deb-src entry `apt-get source` needs): shared with up.sh ----------------------
if (( SOURCE_ONLY )); then
  "$(cd "$(dirname "$0")" && pwd)/install.sh" source
else
  "$(cd "$(dirname "$0")" && pwd)/install.sh" build
fi

# 2. Source ---------------------------------------------------------------------------------------
mkdir -p "$SRC_PARENT"
if [[ ! -f $TREE/.dbshift-unpacked ]]; then
  rm -rf "$TREE"
  debver=$(apt-cache showsrc kubernetes | sed -n "s/^Version: \($SRC_VERSION-.*\)/\1/p" | head -n1)
  log "apt-get source kubernetes=$debver (into $SRC_PARENT)"
  ( cd "$SRC_PARENT" && apt-get source -qq "kubernetes=$debver" >&2 )
  [[ -d $TREE ]] || { log "expected $TREE after apt-get source"; exit 1; }
  touch "$TREE/.dbshift-unpacked"
fi
if (( SOURCE_ONLY )); then
  echo "$TREE"
  exit 0
fi
GOVER=$(go env GOVERSION)
log "using $GOVER"

# 3. reflect2 fix: vendored 1.0.1 faults under Go >= 1.18 (SIGSEGV in UnsafeMapType.UnsafeIterate
#    on the first custom-resource create); swap in Debian's 1.0.2 source.
R2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
R2_DST=$TREE/vendor/github.com/modern-go/reflect2
if [[ ! -f $R2_DST/.dbshift-reflect2-1.0.2 ]]; then
  [[ -f $R2_SRC/reflect2.go ]] || { log "missing $R2_SRC"; exit 1; }
  log "replacing vendored reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
  rm -rf "$R2_DST"
  mkdir -p "$R2_DST"
  # Only the package's own files (no tests), as `go mod vendor` would.
  find "$R2_SRC" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name LICENSE \) ! -name '*_test.go' \
    -exec cp -L {} "$R2_DST"/ \;
  touch "$R2_DST/.dbshift-reflect2-1.0.2"
  # vendor/modules.txt and go.mod keep saying v1.0.1 on purpose: changing one without the other
  # makes Go reject the vendor tree as inconsistent. The API is the same.
fi

# 4. Build ----------------------------------------------------------------------------------------
log "make WHAT=\"$TARGETS\" (nice $NICE; ~12 min on 2 cores)"
start=$(date +%s)
( cd "$TREE" && nice -n "$NICE" make WHAT="$TARGETS" >&2 )
log "build took $(( $(date +%s) - start )) s"

OUT=$TREE/_output/bin
[[ -d $OUT ]] || OUT=$TREE/_output/local/bin/linux/amd64
mkdir -p "$BIN"
for b in $BINARIES; do
  [[ -x $OUT/$b ]] || { log "missing $OUT/$b"; exit 1; }
  install -m 0755 "$OUT/$b" "$BIN/$b.tmp" && mv -f "$BIN/$b.tmp" "$BIN/$b"
done
"$BIN/kube-apiserver" --version >&2
{ echo "kubernetes $SRC_VERSION (Debian source) built $(date -u +%FT%TZ) with $GOVER"; echo "reflect2 1.0.2 (Debian)"; } \
  > "$PREFIX/BUILD-INFO"
touch "$PREFIX/.complete"
echo "$BIN"
