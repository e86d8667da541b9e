#!/usr/bin/env bash
# Builds the dbshift container image without Docker: a docker-archive tarball (the `docker save`
# format) from a release binary. Load it with `docker load -i`, `podman load -i`,
# `ctr -n k8s.io images import`, `kind load image-archive`, or tests/support/cluster/load-image.sh.
#
# Usage: deploy/image/build.sh [-b BINARY] [-t NAME:TAG] [-o OUT.tar] [--no-strip]
#   -b  the dbshift binary (default target/release/dbshift; build it with `cargo build --release --locked`)
#   -t  image reference (default dbshift:<version `BINARY --version` prints>; never :latest)
#   -o  output file (default target/image/<name>-<tag>.tar)
#   --no-strip  keep the debug info (the release profile has `debug = 1`: ~180 MB instead of ~26 MB)
# Prints the tarball's path on stdout; progress goes to stderr.
#
# The image, the same as deploy/image/Dockerfile builds on distroless/cc-debian12:nonroot:
#   /usr/local/bin/dbshift        entrypoint ["/usr/local/bin/dbshift"], user 65532:65532
#   the shared libraries `ldd` lists and the dynamic loader, at the paths ldd reports
#   /etc/passwd, /etc/group       root and nonroot (65532), home /home/nonroot
#   /etc/nsswitch.conf            hosts: files dns
#   /etc/ssl/certs/ca-certificates.crt (from the build machine's ca-certificates)
#   /tmp (1777)                   mount an emptyDir there when the root filesystem is read-only
# Needs: python3, ldd, objcopy (binutils) unless --no-strip, /etc/ssl/certs/ca-certificates.crt.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BINARY=$ROOT/target/release/dbshift
TAG=
OUT=
STRIP=1
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { echo "[image] $*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

while (( $# )); do
  case $1 in
    -b) BINARY=${2:?}; shift 2 ;;
    -t) TAG=${2:?}; shift 2 ;;
    -o) OUT=${2:?}; shift 2 ;;
    --no-strip) STRIP=0; shift ;;
    -h|--help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done

[[ -x $BINARY ]] || die "no executable at $BINARY (cargo build --release --locked)"
[[ -f $CA ]] || die "no CA bundle at $CA (apt-get install ca-certificates, or set CA_BUNDLE)"
if [[ -z $TAG ]]; then
  version=$("$BINARY" --version | awk '{print $2}')
  [[ -n $version ]] || die "could not read the version from $BINARY --version"
  TAG=dbshift:$version
fi
[[ ${TAG##*/} == *:* && $TAG != *:latest ]] || die "tag must be NAME:TAG with a tag other than latest: $TAG"
name=${TAG%:*}; name=${name##*/}
OUT=${OUT:-$ROOT/target/image/$name-${TAG##*:}.tar}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{usr/local/bin,etc/ssl/certs,tmp,home/nonroot}
chmod 1777 "$stage/tmp"

if (( STRIP )); then
  # --strip-debug keeps the symbol table, so panics still show function names.
  objcopy --strip-debug "$BINARY" "$stage/usr/local/bin/dbshift"
else
  cp "$BINARY" "$stage/usr/local/bin/dbshift"
fi
chmod 0755 "$stage/usr/local/bin/dbshift"

# Shared libraries and the loader, copied (symlinks resolved) to the paths ldd reports.
if ldd "$BINARY" >/dev/null 2>&1; then
  while read -r lib; do
    [[ -n $lib ]] || continue
    [[ -f $lib ]] || die "ldd lists $lib, which does not exist"
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
    log "library $lib"
  done < <(ldd "$BINARY" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
else
  log "$BINARY is statically linked: no libraries to copy"
fi

cat > "$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$stage/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
echo "hosts: files dns" > "$stage/etc/nsswitch.conf"
cp -L "$CA" "$stage/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$stage"/etc/passwd "$stage"/etc/group "$stage"/etc/nsswitch.conf "$stage"/etc/ssl/certs/ca-certificates.crt

python3 "$HERE/mkimage.py" --tag "$TAG" --out "$OUT" \
  --entrypoint '["/usr/local/bin/dbshift"]' --user 65532:65532 --workdir /home/nonroot \
  --label org.opencontainers.image.title=dbshift \
  --label "org.opencontainers.image.version=${TAG##*:}" \
  --chown home/nonroot=65532:65532 \
  "$stage"
echo "$OUT"
