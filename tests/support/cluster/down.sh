#!/usr/bin/env bash
# Stops what up.sh DIR started (the pids under DIR/pids) and removes DIR.
# --keep: stop the processes but leave DIR (logs, certs) for inspection.
set -uo pipefail
keep=0
if [[ ${1:-} == --keep ]]; then keep=1; shift; fi
DIR=${1:?usage: down.sh [--keep] DIR}
[[ -d $DIR ]] || exit 0

# stop NAME...: SIGTERM to all of them at once, up to 10 s for them to exit, then SIGKILL.
stop() {
  local n f pids=()
  for n in "$@"; do
    f=$DIR/pids/$n.pid
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    # Only signal a process that still is the one we started (guards against pid reuse).
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$DIR"; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$f"
  done
  for _ in $(seq 1 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}

others=()
for f in "$DIR"/pids/*.pid; do
  [[ -f $f ]] || continue
  n=$(basename "$f" .pid)
  [[ $n == etcd ]] || others+=("$n")
done
(( ${#others[@]} )) && stop "${others[@]}"   # the API server and its clients (and a node, if any)
stop etcd                                     # etcd last
(( keep )) || rm -rf "$DIR"
exit 0
