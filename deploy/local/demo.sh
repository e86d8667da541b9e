#!/usr/bin/env bash
# The local demo: a throwaway MongoDB wire server, three tenant databases (plus one that is
# excluded), and the example migrations in migrations/ rolled across them.
#
#   deploy/local/demo.sh            # from the repository root; needs only cargo and python3
#
# It installs what it needs (SecantusDB from PyPI, cached under ~/.cache/dbshift), builds
# dbshift, and stops the server when it ends.
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "Building dbshift (release)"
cargo build --release --quiet
PATH=$PWD/target/release:$PATH

step "Starting a throwaway MongoDB wire server (SecantusDB, in memory, 127.0.0.1)"
work=$(mktemp -d)
trap 'kill "$(cat "$work/mongo.pid")" 2>/dev/null || true; rm -rf "$work"' EXIT
uri=$(tests/support/secantus.sh start "$work/mongo.pid")
echo "server at $uri"
export DBSHIFT_MONGODB_URI=$uri

step "Seeding tenant databases"
"$(dirname "$(tests/support/secantus.sh bin)")/python" deploy/local/seed.py "$uri" tenant_acme tenant_globex tenant_initech tenant_internal

sel=(--tenants '^tenant_' --exclude tenant_internal)

step "Status before: every migration pending on every tenant"
show dbshift status "${sel[@]}"

step "Plan: what would run, with document estimates (writes nothing)"
show dbshift plan "${sel[@]}" --to 20250102090000

step "Snapshot every tenant before changing it"
show dbshift backup "${sel[@]}" --out "$work/snapshots" --gzip

step "Apply, two tenants at a time"
show dbshift up "${sel[@]}" --parallel 2

step "Status after (the staging-only fixture is skipped without --profile staging)"
show dbshift status "${sel[@]}"

step "Validate every applied migration"
show dbshift validate "${sel[@]}"

step "Roll back the whole release on one tenant, then restore another from its snapshot"
show dbshift down --batch --tenant tenant_acme
show dbshift restore --from "$work/snapshots/tenant_globex"
show dbshift status --tenant tenant_acme --tenant tenant_globex

step "Done: the server and snapshots were temporary"
