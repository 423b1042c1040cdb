"""`said retrain --watch` follows the active aligner version, as the worker and the scorer do.

Before, the watching retrainer kept the aligner version it started with: after `said align`
activated v2, every later candidate trained on v1 vectors, and every replica declined it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from core.catalogue import insert_interactions
from core.events import InteractionEvent
from core.versions import newest_metrics
from updater.full_align import align_catalogue


def _clicks(engine, users: range) -> None:
    """Users who click three items of one kind in a row (new event ids: new interactions)."""
    t0 = datetime(2026, 2, 1, tzinfo=UTC)
    events = [
        InteractionEvent(f"w{u}-{s}", f"w{u}", f"i{i}", "click", t0 + timedelta(minutes=s))
        for u in users
        for s, i in enumerate(range(u % 8, 24, 8))
    ]
    with engine.begin() as conn:
        insert_interactions(conn, events, {f"i{i}": i + 1 for i in range(24)})


def _wait_for_scorer(engine, aligner: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = newest_metrics(engine, "scorer")
        if found and found.get("aligner_version") == aligner:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the retrainer exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    last = newest_metrics(engine, "scorer")
    pytest.fail(
        f"no scorer trained on {aligner} in {timeout}s; newest: {last and last.get('aligner_version')}"
    )


@pytest.mark.slow
def test_the_watching_retrainer_trains_on_a_newly_activated_aligner(aligned):
    engine, v1, lm, settings, data = aligned
    _clicks(engine, range(30))
    env = os.environ | {
        "SAID_DATABASE_URL": settings.database_url,
        "SAID_DATA_DIR": str(data),
        "SAID_DEVICE": "cpu",
        "SAID_RETRAIN_POLL_S": "0.3",
        "SAID_RETRAIN_MIN_INTERACTIONS": "1",
        "SAID_RETRAIN_EPOCHS": "1",
        "SAID_RETRAIN_VALID_USERS": "20",
    }
    cmd = [sys.executable, "-m", "said.cli", "retrain", "--watch"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        _wait_for_scorer(engine, v1.version, proc)
        v2 = align_catalogue(engine, lm, settings, progress=False)  # `said align`: v2 is active
        _clicks(engine, range(30, 40))  # enough new events: the next retrain is due
        trained = _wait_for_scorer(engine, v2.version, proc)
        assert trained["aligner_version"] == v2.version != v1.version
    finally:
        proc.terminate()
        proc.wait(30)
