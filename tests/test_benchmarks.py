"""Benchmarks that cannot rot: every script under benchmarks/ runs at ``--smoke`` size, as
``python benchmarks/X.py --smoke`` from the repository root with no PYTHONPATH, exits 0
and prints its figures; the GPU shell scripts pass ``bash -n``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.pgcluster import find_pg_bin

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

# script -> (needs, a pattern each of its figures' lines must match in the output)
SCRIPTS: dict[str, tuple[set[str], list[str]]] = {
    "alignment_fidelity.py": (
        {"llm"},
        [
            r"^SAID alignment of .* items, k=1",
            r"^  token_accuracy\s+\d",
            r"^  flop_bound_items_per_second\s+\d",
        ],
    ),
    "alignment_speed.py": (
        {"llm"},
        [r"^FLOP bound [\d.]+ items/s", r"^\| sdpa \| [\d.]+ \|", r"^\| eager \| [\d.]+ \|"],
    ),
    "alignment_sweep.py": (
        {"llm"},
        [r"^FLOP bound [\d.]+ items/s", r"^candidate\s+acc/pass\s+tok acc", r"^default@eager\s+[\d. ]+\d"],
    ),
    "freshness.py": (
        {"llm"},
        [
            r"^\| stage \| n \| median s",
            r"^\| event -> servable \(first estimate\) \| 3 \| \d",
            r"^\| event -> refined \| 3 \| \d",
        ],
    ),
    "index_update.py": (set(), [r"^\| items \| updates \| items/s upserted", r"^\| 1,500 \| yes \| \d+ \|"]),
    "ingest.py": (
        {"pg"},
        [
            r"^\| batch \(said consumer run\) \| [\d,]+ \|",
            r"^\| naive per-row ORM \| [\d,]+ \|",
            r"^speed-up: ",
        ],
    ),
    "load.py": (
        {"llm", "pg"},
        [
            r"^target .* stored [\d,]+, lost 0;",
            r"^consumer lag \(messages\)",
            r"^\| serve \| \d+ \| \d+ \| \d+ \|",
        ],
    ),
    "park_soak.py": (set(), [r'^ "exactly_once": \{', r'^  "lost": 0,', r'^  "left_parked": 0']),
    "quality.py": (
        {"llm"},
        [r"^Quality of .* \(60 items", r"^\| standard \| said \| 1 \| \d", r"^default variant "],
    ),
    "scorer_latency.py": (
        set(),
        [
            r"^\| cosine 576-d \(baseline\) \| 400 \| exact \| 2 \| history \| 4 \| [\d.]+ \|",
            r"^\| composite \d+-d \| 1,500 \| HNSW \| 1 \| user_id \| 1 \| [\d.]+ \| [\d.]+ \| \d+ \| 0 \|",
            r"^\| composite \d+-d \| 1,500 \| HNSW \| 2 \| history \| 4 \| [\d.]+ \| [\d.]+ \| \d+ \| 0 \|",
            r"^\| 1,500 \| 128 \(served\) \| [01]\.\d+ \| [\d.]+ \| [01]\.\d+ \| [\d.]+ \| \d+ \|",
            r"^\| 1,500 \| 512 \| [01]\.\d+ \| [\d.]+ \| [01]\.\d+ \| [\d.]+ \| \d+ \|",
        ],
    ),
    "sqlite_sync.py": (set(), [r"^batch  5000: NORMAL [\d,]+ ev/s, FULL [\d,]+ ev/s, FULL/NORMAL \d"]),
}


def _missing(needs: set[str]) -> str | None:
    if "pg" in needs and find_pg_bin() is None:
        msg = "PostgreSQL server binaries not found (install postgresql or set SAID_PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        return msg
    if "llm" in needs:
        from models.llm import LLMMissing, default_gguf

        try:
            default_gguf()  # the smoke runs' tiny LLM uses its real tokenizer
        except LLMMissing as exc:
            return str(exc)
    return None


def test_every_benchmark_is_smoked():
    assert sorted(SCRIPTS) == sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_smoke(script: str):
    needs, patterns = SCRIPTS[script]
    if reason := _missing(needs):
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SAID_")}
    try:
        done = subprocess.run(
            [sys.executable, f"benchmarks/{script}", "--smoke"],
            cwd=REPO,
            env=env | {"PYTHONUNBUFFERED": "1"},
            capture_output=True,
            text=True,
            timeout=150,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} --smoke ran past 150 s; output:\n{(exc.stdout or b'')[-3000:]!r}")
    tail = f"{script} --smoke exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, tail
    assert "smoke size:" in done.stdout, tail
    for pattern in patterns:
        assert re.search(pattern, done.stdout, re.M), f"no line matches {pattern!r}\n{tail}"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("gpu_*.sh")))
def test_gpu_script_syntax(script: str):
    done = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
