"""Alignment-job leases: several workers never take the same item, a crashed or paused
worker's lease expires so another finishes its items, and a worker that lost its lease can
no longer write or complete the item.

- **Fencing.** Every lease bumps the job's ``lease_epoch``; a write (``held``) or completion
  must name the owner, the epoch and the text hash it leased. A worker paused past its TTL
  (or whose item text changed meanwhile) finds its lease gone and writes nothing.
- **Failures, not leases, are counted.** An error, an expired lease and a restart while
  holding a lease each count one failure; a database outage counts none. At
  ``MAX_FAILURES`` the item is ``failed`` with its last error (metric and alert).
- **The active version.** A lease taken for an aligner version writes and completes only
  while that version is active: a worker that has not yet noticed a new activation cannot
  finish, in the old version, an item the activation re-queued for the new one.
- **One clock.** Lease times come from the database's clock (``core.db.db_now``), so a
  worker whose clock is off neither steals live leases nor keeps dead ones.

PostgreSQL: ``SELECT .. FOR UPDATE SKIP LOCKED`` lets workers lease concurrently without
waiting on each other. SQLite: the engine begins every transaction with ``BEGIN IMMEDIATE``
(core.db), so lease transactions are serialised, which is the safe equivalent.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, select, tuple_, update
from sqlalchemy.engine import Connection

from core.catalogue import utc
from core.db import db_now
from core.events import item_text
from core.tables import alignment_jobs, items, model_versions


@dataclass(frozen=True)
class Lease:
    item_idx: int
    text_hash: str
    text: str
    received_at: datetime
    epoch: int  # the job's lease_epoch when leased: the fence of every write
    version: str | None = None  # the aligner version it is for: must still be active to write


MAX_FAILURES = 5  # an item that failed this often is marked failed, not retried forever
_PAGE = 1000  # ids per statement: far under PostgreSQL's 65,535 parameters


def lease_jobs(
    conn: Connection,
    owner: str,
    limit: int,
    ttl_s: float,
    held: Collection[int] = (),
    version: str | None = None,
) -> list[Lease]:
    """Lease up to ``limit`` free jobs for ``owner``; call inside a transaction.

    Expired leases of other owners are released first, each counted as a failure. The
    owner's own live leases count as free: after a step that failed half-way (say, the
    database restarted) the same worker redoes them at once instead of waiting ``ttl_s``.
    """
    now = db_now(conn)
    _release_expired(conn, owner, now)
    free = (alignment_jobs.c.lease_owner.is_(None)) | (alignment_jobs.c.lease_owner == owner)
    query = (
        select(alignment_jobs.c.item_idx)
        .where(free, alignment_jobs.c.failures < MAX_FAILURES, alignment_jobs.c.item_idx.not_in(list(held)))
        .order_by(alignment_jobs.c.item_idx)
        .limit(min(limit, _PAGE))
    )
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
            lease_epoch=alignment_jobs.c.lease_epoch + 1,
        )
    )
    rows = conn.execute(
        select(
            items.c.idx,
            alignment_jobs.c.text_hash,
            alignment_jobs.c.lease_epoch,
            items.c.title,
            items.c.description,
            items.c.received_at,
        )
        .join(alignment_jobs, alignment_jobs.c.item_idx == items.c.idx)
        .where(items.c.idx.in_(ids))
        .order_by(items.c.idx)
    )
    return [
        Lease(
            r.idx, r.text_hash, item_text(r.title, r.description), utc(r.received_at), r.lease_epoch, version
        )
        for r in rows
    ]


def _still_ours(owner: str, leases: list[Lease]):
    """The jobs of ``leases`` still leased to ``owner`` in the same epoch and text, while
    their aligner version (if they name one) is the active one; one condition, so it is
    checked in the very statement that writes, locks or deletes."""
    ours = and_(
        alignment_jobs.c.lease_owner == owner,
        tuple_(alignment_jobs.c.item_idx, alignment_jobs.c.lease_epoch, alignment_jobs.c.text_hash).in_(
            [(x.item_idx, x.epoch, x.text_hash) for x in leases]
        ),
    )
    versions = {x.version for x in leases} - {None}
    if not versions:
        return ours
    active = select(model_versions.c.version).where(
        model_versions.c.kind == "aligner",
        model_versions.c.status == "active",
        model_versions.c.version.in_(versions),
    )
    return and_(ours, active.exists())


def held(conn: Connection, owner: str, leases: list[Lease]) -> list[Lease]:
    """The leases ``owner`` still holds, locked until commit: write their results in the
    same transaction. A lease taken over by another worker, or whose item text changed,
    is left out, so its old result is never written over the new one."""
    found: set[int] = set()
    for start in range(0, len(leases), _PAGE):
        page = leases[start : start + _PAGE]
        query = select(alignment_jobs.c.item_idx).where(_still_ours(owner, page))
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()  # a concurrent lease or text reset waits for our commit
        found.update(conn.execute(query).scalars())
    return [x for x in leases if x.item_idx in found]


def complete_jobs(conn: Connection, owner: str, leases: list[Lease]) -> int:
    """Finish leased jobs still held in the same epoch and text; returns how many finished.

    A job whose item text changed while it was leased was reset by the item consumer (new
    hash, new epoch, lease cleared), so it stays pending for the new text.
    """
    done = 0
    for start in range(0, len(leases), _PAGE):
        page = leases[start : start + _PAGE]
        done += _finish(conn, _still_ours(owner, page), {x.item_idx: x.text_hash for x in page})
    return done


def complete_aligned(conn: Connection, aligned: dict[int, str]) -> int:
    """Finish the jobs of items aligned for exactly this text (idx -> text hash), whoever
    leases them (``said aligner train``, which leases nothing): a worker holding one is fenced."""
    pairs = list(aligned.items())
    done = 0
    for start in range(0, len(pairs), _PAGE):
        page = dict(pairs[start : start + _PAGE])
        which = tuple_(alignment_jobs.c.item_idx, alignment_jobs.c.text_hash).in_(list(page.items()))
        done += _finish(conn, which, page)
    return done


def _finish(conn: Connection, which, hashes: dict[int, str]) -> int:
    """Delete the jobs ``which`` selects and mark their items aligned (for that text)."""
    returned = delete(alignment_jobs).where(which).returning(alignment_jobs.c.item_idx)
    ids = list(conn.execute(returned).scalars())
    if ids:
        conn.execute(
            update(items)
            .where(tuple_(items.c.idx, items.c.text_hash).in_([(i, hashes[i]) for i in ids]))
            .values(status="aligned")
        )
    return len(ids)


def fail_jobs(conn: Connection, owner: str, leases: list[Lease], error: str) -> None:
    """Release leases after an error, counting one failure each (with the reason)."""
    for start in range(0, len(leases), _PAGE):
        _count_failure(conn, _still_ours(owner, leases[start : start + _PAGE]), error)


def release_jobs(conn: Connection, owner: str, leases: list[Lease]) -> None:
    """Give leases back without counting a failure (a worker asked to stop)."""
    for start in range(0, len(leases), _PAGE):
        conn.execute(
            update(alignment_jobs)
            .where(_still_ours(owner, leases[start : start + _PAGE]))
            .values(lease_owner=None, lease_expires_at=None)
        )


def renew_jobs(conn: Connection, owner: str, leases: list[Lease], ttl_s: float) -> None:
    """Extend the leases ``owner`` still holds by ``ttl_s`` from now (database clock): a
    worker that is alive and working never has its leases expire and counted as failures."""
    until = db_now(conn) + timedelta(seconds=ttl_s)
    for start in range(0, len(leases), _PAGE):
        conn.execute(
            update(alignment_jobs)
            .where(_still_ours(owner, leases[start : start + _PAGE]))
            .values(lease_expires_at=until)
        )


def release_own(conn: Connection, owner: str) -> int:
    """At a worker's start: release the leases a previous process with this owner id held
    (it crashed or was killed while working on them), one failure each, so they are redone
    at once instead of after the TTL. Returns how many."""
    return _count_failure(
        conn, alignment_jobs.c.lease_owner == owner, f"worker {owner} restarted while holding the lease"
    )


def _release_expired(conn: Connection, owner: str, now: datetime) -> None:
    """Release other owners' expired leases, one failure each."""
    stale = select(alignment_jobs.c.item_idx, alignment_jobs.c.lease_owner).where(
        alignment_jobs.c.lease_expires_at < now,
        alignment_jobs.c.lease_owner.is_not(None),
        alignment_jobs.c.lease_owner != owner,
    )
    if conn.dialect.name == "postgresql":
        stale = stale.with_for_update(skip_locked=True)  # no two workers count the same expiry
    for idx, was in conn.execute(stale).all():
        _count_failure(conn, alignment_jobs.c.item_idx == idx, f"lease of {was} expired")


def _count_failure(conn: Connection, which, error: str) -> int:
    """Release the jobs ``which`` selects, one failure each; exhausted items become failed."""
    ids = list(
        conn.execute(
            update(alignment_jobs)
            .where(which)
            .values(
                lease_owner=None,
                lease_expires_at=None,
                failures=alignment_jobs.c.failures + 1,
                last_error=error[:2000],
            )
            .returning(alignment_jobs.c.item_idx)
        ).scalars()
    )
    exhausted = select(alignment_jobs.c.item_idx).where(
        alignment_jobs.c.item_idx.in_(ids), alignment_jobs.c.failures >= MAX_FAILURES
    )
    if ids:
        conn.execute(update(items).where(items.c.idx.in_(exhausted)).values(status="failed"))
    return len(ids)


def pending_count(conn: Connection) -> int:
    """Jobs that will still be tried (failed ones are counted by ``failed_count``)."""
    return conn.execute(
        select(func.count()).select_from(alignment_jobs).where(alignment_jobs.c.failures < MAX_FAILURES)
    ).scalar_one()


def failed_count(conn: Connection) -> int:
    """Items whose alignment failed ``MAX_FAILURES`` times (see ``alignment_jobs.last_error``)."""
    return conn.execute(
        select(func.count()).select_from(items).where(items.c.status == "failed")
    ).scalar_one()
