#!/usr/bin/env bash
# Installs (apt, Debian bookworm) what the local test cluster needs. Idempotent: a quick no-op
# (one dpkg-query) when everything is present; `apt-get update` runs only when something is missing.
#
# Usage: install.sh [GROUP...]        GROUP: source | build | node | all (default: all)
#   source what `apt-get source kubernetes` needs: dpkg-dev and a deb-src entry for bookworm main
#          (build.sh --source: the tree pause-image.sh compiles the pod sandbox from).
#   build  what build.sh needs to compile Kubernetes 1.20.2 from Debian's source package: Go, make,
#          gcc, the reflect2 fix, plus everything of `source`.
#   node   what up.sh needs to run the control plane and a node: etcd, containerd, runc, the CNI
#          plugins, iproute2, openssl, gcc (the pause binary), busybox-static (test images),
#          binutils (strip, for image builds), python3 (image tarballs, free ports), python3-venv
#          (SecantusDB, the MongoDB wire server smoke.sh and the tests use), curl, zstd (the v1.32
#          binaries of ../shared/k8s, unpacked by shared-k8s.sh), prometheus (a real Prometheus that
#          scrapes the controller in the operator suite, and promtool for the chart's alert rules).
# Needs root (or sudo). Progress goes to stderr; nothing on stdout.
set -euo pipefail

SRC_VERSION=1.20.5+really1.20.2        # Debian's `kubernetes` source package (upstream 1.20.2)
SRC_LIST=/etc/apt/sources.list.d/dbshift-debsrc.sources

SOURCE_PKGS="dpkg-dev"
BUILD_PKGS="golang-go rsync jq gcc libc6-dev make dpkg-dev golang-github-modern-go-reflect2-dev etcd-server openssl curl"
NODE_PKGS="etcd-server openssl curl python3 python3-venv ca-certificates containerd runc containernetworking-plugins iproute2
           busybox-static gcc libc6-dev binutils zstd prometheus"

log() { echo "[k8s-install] $*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

groups=("$@")
(( ${#groups[@]} )) || groups=(all)
want_source=0 want_build=0 want_node=0
for g in "${groups[@]}"; do
  case $g in
    source) want_source=1 ;;
    build) want_source=1; want_build=1 ;;
    node) want_node=1 ;;
    all) want_source=1; want_build=1; want_node=1 ;;
    *) echo "usage: install.sh [source|build|node|all]..." >&2; exit 2 ;;
  esac
done

pkgs=() list=()
if (( want_source )); then read -ra list <<<"$SOURCE_PKGS"; pkgs+=("${list[@]}"); fi
if (( want_build )); then read -ra list <<<"$BUILD_PKGS"; pkgs+=("${list[@]}"); fi
if (( want_node )); then read -ra list <<<"${NODE_PKGS//$'\n'/ }"; pkgs+=("${list[@]}"); fi
mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)

# One dpkg-query for all of them: packages not installed are missing.
missing=()
installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${pkgs[@]}" 2>/dev/null | awk '$NF=="installed"{print $1}' || true)
for p in "${pkgs[@]}"; do
  grep -qx "$p" <<<"$installed" || missing+=("$p")
done

need_update=0
if (( want_source )); then
  # deb-src entry for bookworm main, on the same Debian host as the existing binary sources.
  # Host of the first non-security Debian entry (URIs: in deb822 files, `deb URL` in one-line files;
  # comments and this script's own file ignored), else deb.debian.org.
  mirror=$( { for f in /etc/apt/sources.list.d/*.sources; do [[ $f == "$SRC_LIST" ]] || cat "$f"; done 2>/dev/null \
                | grep -hE '^[[:space:]]*URIs:' | sed -E 's/^[[:space:]]*URIs:[[:space:]]*//' | tr ' ' '\n'
              grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
                | sed -E 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//; s/[[:space:]].*//'
            } | grep -E '^https?://[^ ]*/debian/?$' | head -n1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  want="Types: deb-src
URIs: ${mirror%/}
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
  if [[ ! -f $SRC_LIST || "$(cat "$SRC_LIST")" != "$want" ]]; then
    log "writing deb-src entry (${mirror%/} bookworm main) to $SRC_LIST"
    printf '%s\n' "$want" | as_root tee "$SRC_LIST" >/dev/null
    need_update=1
  fi
  apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: $SRC_VERSION-" || need_update=1
fi

if (( need_update )) || (( ${#missing[@]} )); then
  log "apt-get update"
  as_root apt-get update -qq >&2
fi
if (( want_source )); then
  apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: $SRC_VERSION-" \
    || { log "source package kubernetes $SRC_VERSION not found after apt-get update (check $SRC_LIST)"; exit 1; }
fi
if (( ${#missing[@]} )); then
  log "installing: ${missing[*]}"
  # etcd-server's and containerd's postinst start services where an init system exists; the
  # cluster scripts never use those (they run their own, with state under their directory).
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
exit 0
