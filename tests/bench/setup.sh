#!/usr/bin/env bash
# Installs what the engine benchmark compares against, cached under ~/.cache/dbshift:
#  - SecantusDB's Rust build (secantusd-rs; ~20 min to build once on 2 cores; needs cmake),
#    5-14x faster than the Python server, so the server does not drown what is measured;
#  - migrate-mongo (npm), the baseline for `transform`.
# Prints `KEY=value` lines: SECANTUSD_RS=... MIGRATE_MONGO=...
set -euo pipefail
CACHE=${DBSHIFT_CACHE:-$HOME/.cache/dbshift}
RS_VERSION=0.5.3-beta.196
MM_VERSION=14.0.7
mkdir -p "$CACHE"

rs=$CACHE/secantus-rs-$RS_VERSION
if [ ! -x "$rs/bin/secantusd-rs" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
  echo "building secantusd-rs $RS_VERSION (once; about 20 minutes)" >&2
  CARGO_TARGET_DIR=$CACHE/secantus-rs-target cargo install --quiet secantus-mdb --version "$RS_VERSION" \
    --ignore-rust-version --root "$rs" >&2
  rm -rf "$CACHE/secantus-rs-target"
fi
echo "SECANTUSD_RS=$rs/bin/secantusd-rs"

mm=$CACHE/migrate-mongo-$MM_VERSION
if [ ! -f "$mm/.complete" ]; then
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
  rm -rf "$mm" && mkdir -p "$mm"
  (cd "$mm" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund "migrate-mongo@$MM_VERSION" >&2)
  touch "$mm/.complete"
fi
echo "MIGRATE_MONGO=$mm/node_modules/.bin/migrate-mongo"
