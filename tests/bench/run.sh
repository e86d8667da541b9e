#!/usr/bin/env bash
# The engine benchmark: installs its baselines (cached), then runs it in release mode.
#   tests/bench/run.sh                       # everything
#   DBSHIFT_BENCH_ONLY=transform tests/bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/support/secantus.sh install >/dev/null
eval "$(tests/bench/setup.sh)"
export SECANTUSD_RS MIGRATE_MONGO
cargo bench --bench engine -- --bench
