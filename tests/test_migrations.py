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
