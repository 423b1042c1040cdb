#!/usr/bin/env bash
# The main job on the embedded defaults (embedded broker, SQLite, SmolLM2, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec said demo "$@"
