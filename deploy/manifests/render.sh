#!/usr/bin/env bash
# Regenerates deploy/manifests/dbshift.yaml (the chart rendered for kubectl users) and
# deploy/examples/shop-migrations.configmap.yaml (migrations/ as a ConfigMap).
#   deploy/manifests/render.sh           # write them
#   deploy/manifests/render.sh --check   # exit 1 when they differ from what would be written
# Needs python3; the Helm library comes from PyPI into a cached venv (tests/support/chart-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(tests/support/chart-venv.sh)
export PYTHONDONTWRITEBYTECODE=1   # no __pycache__ in the work tree
exec "$PY" deploy/manifests/render.py "$@"
