#!/usr/bin/env bash
# Creates (once) a Python venv with tests/chart/requirements.txt, cached under
# ~/.cache/dbshift/chart-py-<hash of that file and the Python version>, and prints its
# python's path. Used by tests/chart/run.sh and deploy/manifests/render.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
REQ=tests/chart/requirements.txt
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
key=$( { cat "$REQ"; python3 -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-12)
VENV=$CACHE/chart-py-$key

if [[ ! -f $VENV/.complete ]]; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "installing python3-venv (apt)" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "creating $VENV (pip install -r $REQ)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ" >&2
  touch "$VENV/.complete"   # last, so an interrupted install is redone
fi
echo "$VENV/bin/python"
