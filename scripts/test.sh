#!/usr/bin/env bash
# The test command (README, CI): set up, lint, then the whole suite against the real
# embedded Kafka broker and a throwaway PostgreSQL cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python3 -m ruff check .
python3 -m ruff format --check .
# Dependency audit: reported, never fatal (an advisory service outage must not block CI).
# Where the advisory services are unreachable it says "could not be audited" per package.
echo "--- pip-audit (installed packages) ---"
audit=$(python3 -m pip_audit -l --skip-editable --progress-spinner off 2>&1) || true
echo "$audit" | grep -v "could not be audited" | head -n 40
echo "($(echo "$audit" | grep -c "could not be audited" || true) packages could not be audited)"
python3 -m pytest -q -rfEx "$@"  # failures, errors and each xfail reason in the summary
