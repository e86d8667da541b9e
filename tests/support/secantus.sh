#!/usr/bin/env bash
# Installs SecantusDB (a MongoDB wire-protocol server, from PyPI) into a cached venv and,
# with `start`, runs one on a free port of 127.0.0.1 (or of HOST).
#
#   tests/support/secantus.sh install               # venv under ~/.cache/dbshift (once per version)
#   tests/support/secantus.sh start PIDFILE [HOST]  # prints the mongodb:// URI once it answers
#
# HOST must be an address of this machine, e.g. the test node's bridge address (10.88.0.1), where
# pods reach it without hostNetwork and the host reaches it too. The server advertises HOST:PORT
# as its replica-set member, so every client connects there.
#
# SecantusDB is GPL-2.0: it only ever runs as a separate process, never linked into dbshift.
set -euo pipefail

VERSION=0.7.0b3
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
VENV=$CACHE/secantus-$VERSION
BIN=$VENV/bin/secantusd-py

install() {
  # The stamp is written last, so an interrupted install is redone, not half-used.
  if [ -f "$VENV/.complete" ]; then return 0; fi
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "SecantusDB==$VERSION" >&2
  touch "$VENV/.complete"
}

free_port() { # host
  python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1]); s.close()' "$1"
}

start() {
  local pidfile=$1 host=${2:-127.0.0.1}
  install
  local port
  port=$(free_port "$host")
  # In memory, every suite's data (and the oplog) must fit in WiredTiger's cache: its default
  # 1G overflowed (WT_CACHE_FULL) once the large-document tests ran beside the rest.
  "$BIN" --host "$host" --port "$port" --storage-path :memory: --cache-size 4G >"${pidfile%.pid}.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 100); do
    if python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('$host',$port)))" 2>/dev/null; then
      echo "mongodb://$host:$port"
      return 0
    fi
    sleep 0.1
  done
  echo "SecantusDB did not start; log: ${pidfile%.pid}.log" >&2
  return 1
}

case "${1:-}" in
  install) install; echo "$BIN" ;;
  start) start "${2:?pidfile}" "${3:-}" ;;
  bin) echo "$BIN" ;;
  *) echo "usage: $0 install | start PIDFILE [HOST] | bin" >&2; exit 2 ;;
esac
