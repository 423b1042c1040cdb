"""Alembic migrations of the catalogue; run with ``said db upgrade``."""
