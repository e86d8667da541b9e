#!/usr/bin/env bash
# Runs every test of dbshift on a fresh machine: installs what the tests need (SecantusDB, a
# MongoDB wire-protocol server, from PyPI; cached under ~/.cache/dbshift), starts one on a
# free loopback port, runs `cargo test`, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 2
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv (apt)" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi

tests/support/secantus.sh install >/dev/null
work=$(mktemp -d)
trap 'kill "$(cat "$work/mongo.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT
DBSHIFT_TEST_MONGODB_URI=$(tests/support/secantus.sh start "$work/mongo.pid")
export DBSHIFT_TEST_MONGODB_URI
echo "test MongoDB wire server: $DBSHIFT_TEST_MONGODB_URI" >&2

cargo test --locked --all-targets --no-fail-fast "$@"
