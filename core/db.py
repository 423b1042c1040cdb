"""Engine creation and the database-outage retry loop.

SQLite and PostgreSQL go through the same SQLAlchemy code; the only dialect-specific bits
live here (SQLite pragmas and ``BEGIN IMMEDIATE``) and in ``catalogue.dialect_insert``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_engine(url: str) -> Engine:
    """An engine with pre-ping (survives a database restart) and safe SQLite settings."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: in WAL mode NORMAL can lose a committed transaction on power loss, after the
        # consumer committed its Kafka offsets: an event acknowledged and then gone.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # Take the write lock up front: two writers that both read max(idx) and then try to
        # upgrade their read lock would deadlock, which busy_timeout cannot resolve. A
        # read-only connection (``read_only``) opens no transaction: each statement reads
        # its own snapshot, as under PostgreSQL's READ COMMITTED, which the readers are
        # written for.
        if not conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


READ_ONLY = "said_read_only"


def read_only(engine: Engine) -> Engine:
    """The same engine (and pool) for connections that only read: on SQLite they open no
    transaction, so in WAL mode a request's read neither waits behind the consumer's write
    transaction nor holds the write lock itself (``BEGIN IMMEDIATE`` did both: a scorer
    read queued behind ingest), and costs one statement, not three. PostgreSQL's reads
    never lock writers."""
    return engine.execution_options(**{READ_ONLY: True})


def db_now(conn: Connection) -> datetime:
    """The database's clock (PostgreSQL: the transaction's start time), so that lease times
    written and compared by workers on different hosts share one clock. SQLite is embedded:
    its clock is this host's."""
    if conn.dialect.name == "postgresql":
        return conn.execute(select(func.now())).scalar_one()
    return datetime.now(UTC)


def is_outage(exc: BaseException) -> bool:
    """True for connection-level failures worth retrying; False for bugs and bad SQL."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


# PostgreSQL's undefined_table and undefined_column: the code is newer than the schema
MISSING_SCHEMA_SQLSTATES = ("42P01", "42703")
SQLITE_MISSING_SCHEMA = ("no such table", "no such column")


def is_missing_schema(exc: BaseException) -> bool:
    """True when a table or column the code needs is not there: ``said db upgrade`` has not
    run yet (or not to this version). That is an outage of our own making, not a bad
    message: worth waiting for, never worth dead-lettering a batch for."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if isinstance(exc, ProgrammingError):
        return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) in MISSING_SCHEMA_SQLSTATES
    return isinstance(exc, OperationalError) and str(orig).startswith(SQLITE_MISSING_SCHEMA)


def should_wait(exc: BaseException) -> bool:
    """The failures :func:`retry_on_outage` waits out: outages and a missing schema."""
    return is_outage(exc) or is_missing_schema(exc)


def retry_on_outage(
    fn: Callable[[], T],
    *,
    max_backoff_s: float,
    should_stop: Callable[[], bool] = lambda: False,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``fn`` until it succeeds, backing off exponentially while the database is down
    or its schema is missing (waiting for ``said db upgrade``).

    ``fn`` must be one transaction, so a retry after a failure repeats it whole. A stop
    request during an outage re-raises, and the caller then exits without committing
    offsets: the batch is consumed again after restart.
    """
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            if not should_wait(exc) or should_stop():
                raise
            if on_retry:
                on_retry(exc)
            if is_missing_schema(exc):
                log.warning(
                    "catalogue schema missing (%s): waiting for `said db upgrade`; retrying in %.1fs",
                    str(getattr(exc, "orig", exc)).splitlines()[0],
                    delay,
                )
            else:
                log.warning("database unavailable (%s); retrying in %.1fs", type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_backoff_s)
