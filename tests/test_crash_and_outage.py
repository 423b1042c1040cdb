"""No loss, no duplicates: SIGKILLed consumers and a database outage mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from said.catalogue import count_rows
from said.db import make_engine
from said.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from said.tables import interactions
from tests.kafka_util import produce_json
from tests.test_consumers import _click, _item


def _env(settings, **extra) -> dict:
    return os.environ | {
        "SAID_DATABASE_URL": settings.database_url,
        "SAID_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SAID_GROUP_ID": settings.group_id,
        "SAID_SESSION_TIMEOUT_MS": "2000",
        "SAID_LOG_LEVEL": "WARNING",
    } | extra


def _rows(engine) -> int:
    try:
        with engine.connect() as conn:
            return count_rows(conn, interactions)
    except Exception:  # noqa: BLE001 - SQLite may be busy for a moment; poll again
        return -1


def _load_items(settings, n: int) -> None:
    produce_json(settings.kafka_bootstrap, TOPIC_ITEMS, [_item(i) for i in range(n)], "item_id")
    stats = ConsumeLoop(ItemsHandler(settings), make_engine(settings.database_url), settings).run(1.5)
    assert stats.stored == n


@pytest.mark.slow
def test_sigkill_three_times_loses_and_duplicates_nothing(settings):
    _load_items(settings, 100)
    distinct = [_click(e, e % 100, user=f"u{e % 97}") for e in range(18_000)]
    events = distinct + distinct[:2000]  # 2k replays by the producer
    produce_json(settings.kafka_bootstrap, TOPIC_INTERACTIONS, events, "user_id")
    engine = make_engine(settings.database_url)
    cmd = [sys.executable, "-m", "said.cli", "consume", "interactions", "--idle-exit", "3"]
    env = _env(settings, SAID_CONSUME_BATCH="100")
    kills = 0
    for threshold in (3000, 8000, 13000):
        proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 60
        while _rows(engine) < threshold and time.monotonic() < deadline:
            assert proc.poll() is None, "consumer exited before it was killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert _rows(engine) < len(distinct), "the kill must land mid-stream"
    subprocess.run(cmd, env=env, check=True, timeout=120)
    assert kills == 3
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == len(distinct)


@pytest.mark.slow
def test_database_outage_mid_stream_counts_exact(broker, pg):
    from said.migrate import upgrade
    from said.settings import Settings

    url = pg.create_database()
    upgrade(url)
    settings = Settings(database_url=url, kafka_bootstrap=broker.bootstrap, group_id="outage",
                        session_timeout_ms=2000, consume_batch=200, db_retry_max_s=0.5)  # fmt: skip
    _load_items(settings, 50)
    events = [_click(e, e % 50, user=f"u{e % 31}") for e in range(10_000)]
    produce_json(settings.kafka_bootstrap, TOPIC_INTERACTIONS, events, "user_id")
    engine = make_engine(url)
    loop = ConsumeLoop(InteractionsHandler(settings), make_engine(url), settings)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("stats", loop.run(idle_exit=4)))
    worker.start()
    while _rows(engine) < 1000:
        time.sleep(0.01)
    pg.restart_after(3.0)  # the consumer retries with backoff meanwhile
    worker.join(120)
    assert not worker.is_alive()
    stats = result["stats"]
    assert stats.stored == 10_000 and stats.dead_lettered == 0
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 10_000
