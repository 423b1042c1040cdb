"""Alignment-job leases: several workers never take the same item, and a crashed worker's
lease expires so another finishes its items.

PostgreSQL: ``SELECT .. FOR UPDATE SKIP LOCKED`` lets workers lease concurrently without
waiting on each other. SQLite: the engine begins every transaction with ``BEGIN IMMEDIATE``
(core.db), so lease transactions are serialised, which is the safe equivalent.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.engine import Connection

from core.catalogue import utc
from core.events import item_text
from core.tables import alignment_jobs, items


@dataclass(frozen=True)
class Lease:
    item_idx: int
    text_hash: str
    text: str
    received_at: datetime


MAX_ATTEMPTS = 5  # an item that failed this often is marked failed, not retried forever


def lease_jobs(
    conn: Connection, owner: str, limit: int, ttl_s: float, held: Collection[int] = ()
) -> list[Lease]:
    """Lease up to ``limit`` free or expired jobs for ``owner``; call inside a transaction.

    The owner's own live leases count as free: after a step that failed half-way (say,
    the database restarted) the same worker redoes them at once instead of waiting ``ttl_s``.
    """
    now = datetime.now(UTC)
    free = or_(
        alignment_jobs.c.lease_expires_at.is_(None),
        alignment_jobs.c.lease_expires_at < now,
        alignment_jobs.c.lease_owner == owner,
    )
    query = (
        select(alignment_jobs.c.item_idx)
        .where(free, alignment_jobs.c.attempts < MAX_ATTEMPTS, alignment_jobs.c.item_idx.not_in(list(held)))
        .order_by(alignment_jobs.c.item_idx)
    )
    query = query.limit(limit)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = list(conn.execute(query).scalars())
    if not ids:
        return []
    conn.execute(
        update(alignment_jobs)
        .where(alignment_jobs.c.item_idx.in_(ids))
        .values(
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=ttl_s),
            attempts=alignment_jobs.c.attempts + 1,
        )
    )
    rows = conn.execute(
        select(items.c.idx, items.c.text_hash, items.c.title, items.c.description, items.c.received_at)
        .where(items.c.idx.in_(ids))
        .order_by(items.c.idx)
    )
    return [Lease(r.idx, r.text_hash, item_text(r.title, r.description), utc(r.received_at)) for r in rows]


def complete_jobs(conn: Connection, owner: str, leases: list[Lease]) -> int:
    """Finish leased jobs whose text did not change meanwhile; returns how many finished.

    A job whose item text changed while it was leased was reset by the item consumer (new
    hash, lease cleared), so the hash condition leaves it pending for the new text.
    """
    done = 0
    for lease in leases:
        still_ours = and_(
            alignment_jobs.c.item_idx == lease.item_idx,
            alignment_jobs.c.text_hash == lease.text_hash,
            alignment_jobs.c.lease_owner == owner,
        )
        if conn.execute(delete(alignment_jobs).where(still_ours)).rowcount:
            conn.execute(
                update(items)
                .where(items.c.idx == lease.item_idx, items.c.text_hash == lease.text_hash)
                .values(status="aligned")
            )
            done += 1
    return done


def fail_jobs(conn: Connection, owner: str, leases: list[Lease], error: str) -> None:
    """Release leases after an error (kept with the job); at MAX_ATTEMPTS the item is failed."""
    ids = [x.item_idx for x in leases]
    mine = and_(alignment_jobs.c.item_idx.in_(ids), alignment_jobs.c.lease_owner == owner)
    conn.execute(
        update(alignment_jobs)
        .where(mine)
        .values(lease_owner=None, lease_expires_at=None, last_error=error[:2000])
    )
    dead = select(alignment_jobs.c.item_idx).where(
        alignment_jobs.c.item_idx.in_(ids), alignment_jobs.c.attempts >= MAX_ATTEMPTS
    )
    conn.execute(update(items).where(items.c.idx.in_(dead)).values(status="failed"))


def pending_count(conn: Connection) -> int:
    from sqlalchemy import func

    return conn.execute(
        select(func.count()).select_from(alignment_jobs).where(alignment_jobs.c.attempts < MAX_ATTEMPTS)
    ).scalar_one()
