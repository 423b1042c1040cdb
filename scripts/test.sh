#!/usr/bin/env bash
# The test command (README, CI): set up, lint, then the whole suite against the real
# embedded Kafka broker and a throwaway PostgreSQL cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python3 -m ruff check .
python3 -m pytest -q "$@"
