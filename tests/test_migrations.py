"""Alembic migrations run on both backends, twice (idempotent), and down again."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from core.db import make_engine
from said.migrate import alembic_config, upgrade


def test_upgrade_is_idempotent_and_downgrade_drops_everything(db_url):
    upgrade(db_url)  # the fixture already upgraded once
    engine = make_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    assert {"items", "interactions", "item_embeddings", "alignment_jobs", "model_versions"} <= tables
    engine.dispose()
    command.downgrade(alembic_config(db_url), "base")
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}


def test_settings_redact_secrets():
    from core.settings import Settings

    s = Settings(database_url="postgresql+psycopg://u:hunter2@h/db", kafka_sasl_password="s3cret")
    shown = str(s.redacted())
    assert "hunter2" not in shown and "s3cret" not in shown
    assert s.kafka_config()["sasl.password"] == "s3cret"


def test_sqlite_commits_survive_a_power_cut(tmp_path):
    """synchronous=FULL: in WAL mode NORMAL may roll back a committed transaction on power
    loss, after the consumer has committed its Kafka offsets for it."""
    from core.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path}/said.db")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
