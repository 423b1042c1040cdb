"""Run the Alembic migrations programmatically (``said db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations, for the given database URL."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the catalogue schema up to ``revision``; safe to run repeatedly."""
    command.upgrade(alembic_config(url), revision)
