"""Real components for the integration tests: the embedded Kafka broker and PostgreSQL.

Each test gets its own broker (it starts in ~0.1 s and keeps data in memory only), so
topics never leak between tests. PostgreSQL is one throwaway cluster per session with a
fresh database per test. Without PostgreSQL the PostgreSQL cases skip with a reason,
except under CI, where they fail.
"""

from __future__ import annotations

import os
import uuid

import pytest

from core.settings import KafkaSettings, Settings, get_settings
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.migrate import upgrade
from tests.support.pgcluster import ThrowawayPostgres, find_pg_bin

# Shared fixtures live in tests/support; registering them here keeps test modules from
# importing fixtures from each other.
pytest_plugins = ["tests.support.llm_fixtures", "tests.support.catalogue"]


@pytest.fixture(scope="session")
def pg():
    bin_dir = find_pg_bin()
    if bin_dir is None:
        msg = "PostgreSQL server binaries not found (install postgresql or set SAID_PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    cluster = ThrowawayPostgres(bin_dir).start()
    yield cluster
    cluster.close()


@pytest.fixture
def broker():
    b = EmbeddedBroker(free_port()).start()
    ensure_topics(KafkaSettings(bootstrap=b.bootstrap))
    yield b
    b.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A migrated, empty catalogue on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/said.db"
    else:
        url = request.getfixturevalue("pg").create_database()
    upgrade(url)
    return url


@pytest.fixture
def settings(broker, db_url, tmp_path) -> Settings:
    return Settings(
        database_url=db_url,
        kafka_bootstrap=broker.bootstrap,
        group_id=f"t{uuid.uuid4().hex[:8]}",
        session_timeout_ms=2000,
        data_dir=tmp_path / "data",
        max_text_chars=500,
        consume_batch=500,
        db_retry_max_s=1.0,
    )


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.support import faultlog

    if faultlog.ROWS:
        terminalreporter.write_sep("-", "fault injection")
        terminalreporter.write_line(faultlog.table())


@pytest.fixture
def cli_env(monkeypatch):
    """Sets ``SAID_*`` variables for an in-process ``said`` call: the process's settings
    are cached (``get_settings``), so each change clears the cache, and so does the end."""

    def set_env(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()
