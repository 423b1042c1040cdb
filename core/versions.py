"""Queries on ``model_versions``: which aligner and scorer are active, and changing that.

One home for every statement on the table, so the rules (one active version per kind, the
newest first) are written once for ``said aligner train``, the retrainer, the worker and the scorer.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, text, update
from sqlalchemy.engine import Connection, Engine

from core.catalogue import queue_missing
from core.tables import model_versions
from core.wait import wait_until


class NoActiveVersion(RuntimeError):
    """No version of this kind was ever activated (e.g. ``said aligner train`` never ran)."""


_LOCK_KEYS = {"aligner": 0x5A1E01, "scorer": 0x5A1E02}  # PostgreSQL advisory locks


def active_version(engine: Engine, kind: str) -> tuple[str, Path] | None:
    """(version, path) of the active version of ``kind`` (``aligner`` | ``scorer``)."""
    with engine.connect() as conn:
        return _active(conn, kind)


def _active(conn: Connection, kind: str) -> tuple[str, Path] | None:
    # at most one row: a partial unique index enforces one active version per kind
    row = conn.execute(
        select(model_versions.c.version, model_versions.c.path).where(
            model_versions.c.kind == kind, model_versions.c.status == "active"
        )
    ).first()
    return (row.version, Path(row.path)) if row else None


def _lock_kind(conn: Connection, kind: str) -> None:
    """Serialise every change of ``kind``'s active version until commit (PostgreSQL; on
    SQLite ``BEGIN IMMEDIATE`` already holds the one write lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEYS.get(kind, 0x5A1E00)})


# who makes the first version of each kind: what an error or a wait says
_FIRST = {
    "aligner": "`said aligner train` makes the first (compose: its bootstrap service, with --if-none)",
    "scorer": "`said scorer train` makes the first",
}


def require_active(engine: Engine, kind: str) -> tuple[str, Path]:
    """Like ``active_version``, with a clear error when there is none."""
    found = active_version(engine, kind)
    if found is None:
        raise NoActiveVersion(f"no active {kind}: {_FIRST[kind]}")
    return found


def wait_for_active(
    engine: Engine, kind: str, stop: threading.Event | None = None
) -> tuple[str, Path] | None:
    """``active_version`` once there is one, waiting (and saying so) until then; None if
    ``stop`` is set first. A service started beside the bootstrap alignment (compose)
    waits for its aligner instead of exiting into a restart loop."""
    return wait_until(lambda: active_version(engine, kind), f"an active {kind} version: {_FIRST[kind]}", stop)


def versions_in(engine: Engine, kind: str, status: str) -> list[tuple[str, Path]]:
    """(version, path) of every ``kind`` version in ``status``, newest first: ``retired``
    ones are what a process falls back to when the active file cannot be read."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(model_versions.c.version, model_versions.c.path)
            .where(model_versions.c.kind == kind, model_versions.c.status == status)
            .order_by(model_versions.c.created_at.desc())
        ).all()
    return [(r.version, Path(r.path)) for r in rows]


def newest_metrics(engine: Engine, kind: str) -> dict | None:
    """Metrics of the newest version of ``kind``, active or not (rejections count too)."""
    with engine.connect() as conn:
        return conn.execute(
            select(model_versions.c.metrics)
            .where(model_versions.c.kind == kind)
            .order_by(model_versions.c.created_at.desc())
            .limit(1)
        ).scalar()


def record_version(conn: Connection, kind: str, version: str, path: Path, metrics: dict, status: str) -> None:
    """Insert a version; ``status="active"`` retires the active one of its kind first."""
    if status == "active":
        _lock_kind(conn, kind)
        _retire_active(conn, kind)
    conn.execute(
        model_versions.insert().values(
            version=version,
            kind=kind,
            path=str(path.resolve()),
            status=status,
            metrics=metrics,
            created_at=datetime.now(UTC),
        )
    )


def promote(
    conn: Connection, kind: str, version: str, path: Path, metrics: dict, expected_active: str | None
) -> bool:
    """Record ``version`` as active only if the active version is still ``expected_active``
    (what the candidate was compared with); otherwise record it ``rejected``.

    Checked under the kind's lock in the promoting transaction: an operator's ``activate``
    made while the candidate trained is never silently undone."""
    _lock_kind(conn, kind)
    current = _active(conn, kind)
    if (current[0] if current else None) != expected_active:
        record_version(
            conn, kind, version, path, metrics | {"superseded_by": current and current[0]}, "rejected"
        )
        return False
    record_version(conn, kind, version, path, metrics, "active")
    return True


def list_versions(engine: Engine, kind: str | None = None) -> list[dict]:
    """Every version (of ``kind``, or both), newest first, with its status, file and the
    figures an operator compares them by."""
    query = select(model_versions).order_by(model_versions.c.created_at.desc())
    if kind is not None:
        query = query.where(model_versions.c.kind == kind)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        {
            "version": r.version,
            "kind": r.kind,
            "status": r.status,
            "created_at": r.created_at.isoformat(),
            "path": r.path,
            "metrics": r.metrics or {},
        }
        for r in rows
    ]


def kind_of(engine: Engine, version: str) -> str:
    """The kind of an existing version (ValueError for an unknown one)."""
    with engine.connect() as conn:
        query = select(model_versions.c.kind).where(model_versions.c.version == version)
        found = conn.execute(query).scalar()
    if found is None:
        raise ValueError(f"no version {version!r}")
    return found


def roll_back(engine: Engine, kind: str) -> tuple[str, str]:
    """Make the newest retired version created before the active one active again;
    returns (from, to). A second rollback goes one further back, never forth again
    (``activate`` goes forward). ValueError when there is nothing to go back to."""
    with engine.begin() as conn:
        _lock_kind(conn, kind)
        current = _active(conn, kind)
        if current is None:
            raise ValueError(f"no active {kind} to roll back from")
        created = select(model_versions.c.created_at).where(model_versions.c.version == current[0])
        previous = conn.execute(
            select(model_versions.c.version)
            .where(
                model_versions.c.kind == kind,
                model_versions.c.status == "retired",
                model_versions.c.created_at < created.scalar_subquery(),
            )
            .order_by(model_versions.c.created_at.desc())
            .limit(1)
        ).scalar()
        if previous is None:
            raise ValueError(f"no retired {kind} older than the active {current[0]}")
        _activate(conn, kind, previous)
    return current[0], previous


def activate(engine: Engine, kind: str, version: str) -> None:
    """Make an existing ``version`` the active one of its kind (operator rollback)."""
    with engine.begin() as conn:
        _lock_kind(conn, kind)
        _activate(conn, kind, version)


def roll_back_corrupt(engine: Engine, kind: str, corrupt: str, fallback: str) -> bool:
    """Mark the active ``corrupt`` version ``corrupt`` and make ``fallback`` (a version
    whose file loads) active again, if ``corrupt`` is still the active one: True when this
    call did it.

    A file that fails its checksum is broken for every process, and while it is the active
    version every write is fenced (leases name the active version), so fresh items would
    wait until an operator acts. Rolling back keeps them flowing; the compare-and-set under
    the kind's lock makes replicas that notice together roll back once, and never undoes a
    newer activation."""
    with engine.begin() as conn:
        _lock_kind(conn, kind)
        current = _active(conn, kind)
        if current is None or current[0] != corrupt:
            return False
        conn.execute(
            update(model_versions).where(model_versions.c.version == corrupt).values(status="corrupt")
        )
        _activate(conn, kind, fallback)
    return True


def _activate(conn: Connection, kind: str, version: str) -> None:
    """In ``conn`` (holding the kind's lock): ``version`` becomes the active one. An aligner
    version also gets a job for every item it has no vector of (items that arrived or
    changed while it was not active), in the same transaction."""
    found = conn.execute(
        select(model_versions.c.version).where(
            model_versions.c.kind == kind, model_versions.c.version == version
        )
    ).first()
    if found is None:
        raise ValueError(f"no {kind} version {version!r}")
    _retire_active(conn, kind)
    conn.execute(update(model_versions).where(model_versions.c.version == version).values(status="active"))
    if kind == "aligner":
        queue_missing(conn, version)


def _retire_active(conn: Connection, kind: str) -> None:
    conn.execute(
        update(model_versions)
        .where(model_versions.c.kind == kind, model_versions.c.status == "active")
        .values(status="retired")
    )
