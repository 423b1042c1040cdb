"""Interactions that arrived before their item, parked in the catalogue until it comes.

Kafka gives no order between the item and interaction topics, so an interaction can
arrive first. Parking it (instead of dead-lettering it at once) lets the item's arrival
apply it automatically, in the item's own transaction. Only one that waited longer than
``park_max_age_s`` goes to the DLQ, with its original message, so nothing is dropped.

Each parked row ends exactly once: applied (stored) by its item's arrival, or decided dead
by a sweep. Both take the row under a lock (SQLite: the one write lock; PostgreSQL: row
locks, ``apply_parked`` waits for a sweep's claim, a sweep skips the rows others hold), so
no row is both. The dead-lettering goes through an outbox, so that no transaction is held
across a DLQ flush and no crash can leave a row both stored and dead-lettered:
  1. :func:`claim_expired` marks the page dead (``dead_at``, the database's clock) and
     counts it out, in one short transaction; from then on no item applies it;
  2. the sweeper produces the DLQ copies and flushes them;
  3. :func:`shipped` deletes the rows it claimed.
A sweeper that dies between 1 and 3 leaves its rows dead, not parked: any sweep claims
them again after ``RECLAIM_S`` and ships them (a crash after 2 gives a second DLQ copy,
the same message with the same ``event_id``: at least once, never stored as well).

Parking is capped (``park_max_per_item``, ``park_max_total``): what does not fit is
returned as overflow, for the DLQ. The total is a counter row in ``sequences``
(``PARKED``), changed by every transaction that adds or removes parked rows, as its last
statement there (its row lock is then held only until the commit right after): no
``count(*)`` over the table on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from core.catalogue import dialect_insert, insert_interactions, lock_item_index, resolve_item_ids
from core.events import InteractionEvent
from core.tables import parked_interactions, sequences

PARKED = "parked_interactions"  # the ``sequences`` row that counts parked rows (migration 0007)
OVERFLOW = "park_overflow"  # the DLQ reason of an interaction that found no room
_CHUNK = 1000
# a page claimed but not shipped after this long is a dead sweeper's: far longer than the
# 30 s a DLQ flush may take, so a live sweeper's page is never taken from under it
RECLAIM_S = 120.0
_pc = parked_interactions.c
LIVE = _pc.dead_at.is_(None)  # waiting for its item, not yet decided

Parkable = tuple[InteractionEvent, dict]  # (event, message record)


@dataclass(frozen=True)
class Caps:
    per_item: int
    total: int


@dataclass
class Parking:
    """What ``park_unknown`` did: events whose item exists after all, events that found no
    room (for the DLQ, reason ``OVERFLOW``), and the parked count after it (None: unchanged)."""

    known: list[Parkable] = field(default_factory=list)
    overflow: list[Parkable] = field(default_factory=list)
    parked: int = 0  # rows added (a redelivered event parked already adds none)
    waiting: int | None = None


def waiting(conn: Connection) -> int:
    """Interactions parked now, from the counter (one row read)."""
    value = conn.execute(select(sequences.c.value).where(sequences.c.name == PARKED)).scalar()
    return int(value or 0)


def _count_change(conn: Connection, delta: int) -> int:
    """Add ``delta`` to the parked count; the new count. Call it last among the statements
    that touch parked rows (see the module docstring)."""
    if not delta:
        return waiting(conn)
    stmt = dialect_insert(conn, sequences).values(name=PARKED, value=delta)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], set_={"value": sequences.c.value + stmt.excluded.value}
    ).returning(sequences.c.value)
    return int(conn.execute(stmt).scalar_one())


def park(conn: Connection, events: Sequence[Parkable], now: datetime) -> int:
    """Park (event, message record) pairs; a replayed ``event_id`` is parked once. Returns
    how many rows it added; the caller counts them (``_count_change``)."""
    rows = [
        {
            "event_id": ev.event_id,
            "user_id": ev.user_id,
            "item_id": ev.item_id,
            "type": ev.type,
            "event_time": ev.event_time,
            "parked_at": now,
            "message": message,
        }
        for ev, message in events
    ]
    added = 0
    for s in range(0, len(rows), _CHUNK):
        stmt = dialect_insert(conn, parked_interactions).values(rows[s : s + _CHUNK])
        stmt = stmt.on_conflict_do_nothing(index_elements=["event_id"]).returning(
            parked_interactions.c.event_id
        )
        added += len(conn.execute(stmt).all())
    return added


def park_unknown(
    conn: Connection, events: Sequence[Parkable], idx_of: dict[str, int], now: datetime, caps: Caps
) -> Parking:
    """Park the events whose item is still unknown under the item-index lock, within the
    caps; adds the items that turned out to exist (committed meanwhile) to ``idx_of``.

    The lock is the one new items are inserted under, so an item is either visible here
    or inserted after this transaction, and then its insert applies what we parked. It
    also serialises parkers, so the caps are checked against counts nobody else changes
    upwards meanwhile. A redelivered event that is parked already stays as it is."""
    lock_item_index(conn)
    idx_of.update(resolve_item_ids(conn, {ev.item_id for ev, _ in events}))
    out = Parking(known=[(ev, m) for ev, m in events if ev.item_id in idx_of])
    first: dict[str, Parkable] = {}
    for ev, m in events:
        if ev.item_id not in idx_of:
            first.setdefault(ev.event_id, (ev, m))
    pc = parked_interactions.c
    ids = list(first)
    for s in range(0, len(ids), _CHUNK):
        for event_id in conn.execute(
            select(pc.event_id).where(pc.event_id.in_(ids[s : s + _CHUNK]))
        ).scalars():
            del first[event_id]
    if not first:
        return out
    per_item: dict[str, int] = {}
    item_ids = sorted({ev.item_id for ev, _ in first.values()})
    for s in range(0, len(item_ids), _CHUNK):
        chunk = item_ids[s : s + _CHUNK]
        per_item |= dict(
            conn.execute(
                select(pc.item_id, func.count()).where(pc.item_id.in_(chunk), LIVE).group_by(pc.item_id)
            ).all()
        )
    total = waiting(conn)
    accepted = []
    for ev, m in first.values():
        held = per_item.get(ev.item_id, 0)
        if held >= caps.per_item or total >= caps.total:
            out.overflow.append((ev, m))
            continue
        per_item[ev.item_id] = held + 1
        total += 1
        accepted.append((ev, m))
    out.parked = park(conn, accepted, now)
    out.waiting = _count_change(conn, out.parked)
    return out


def apply_parked(conn: Connection, item_ids: Iterable[str]) -> tuple[int, int | None]:
    """Move the parked interactions of ``item_ids`` that now exist into ``interactions``;
    returns (how many, the parked count after; None if unchanged).

    The live rows are locked (``FOR UPDATE``): a sweep claiming some of them right now holds
    them until its claim commits, and then they are dead and no longer match here; it never
    takes the ones locked here (``SKIP LOCKED``)."""
    wanted = sorted(set(item_ids))
    rows = []
    for s in range(0, len(wanted), _CHUNK):
        query = select(parked_interactions).where(_pc.item_id.in_(wanted[s : s + _CHUNK]), LIVE)
        rows += conn.execute(query.with_for_update()).all()
    if not rows:
        return 0, None
    idx_of = resolve_item_ids(conn, {r.item_id for r in rows})
    ready = [r for r in rows if r.item_id in idx_of]
    events = [InteractionEvent(r.event_id, r.user_id, r.item_id, r.type, r.event_time) for r in ready]
    insert_interactions(conn, events, idx_of)
    removed = _forget(conn, [r.event_id for r in ready])
    return len(ready), _count_change(conn, -removed)


def claim_expired(conn: Connection, now: datetime, before: datetime, limit: int) -> list[tuple[str, dict]]:
    """Mark dead up to ``limit`` rows, oldest first, and return their (event_id, message
    record) for the caller to dead-letter after this transaction commits (then
    :func:`shipped`): first rows a dead sweeper claimed before ``now - RECLAIM_S``, then
    live rows parked before ``before``. ``now`` is the database's clock. On PostgreSQL rows
    held by another transaction (a concurrent sweep, an arriving item) are skipped; on
    SQLite the transaction holds the write lock."""
    stale = now - timedelta(seconds=RECLAIM_S)
    taken = _claim(conn, now, _pc.dead_at < stale, _pc.dead_at, limit)
    fresh = _claim(conn, now, LIVE & (_pc.parked_at < before), _pc.parked_at, limit - len(taken))
    _count_change(conn, -len(fresh))
    return taken + fresh


def _claim(conn: Connection, now: datetime, where, order, limit: int) -> list[tuple[str, dict]]:
    if limit <= 0:
        return []
    page = select(_pc.event_id).where(where).order_by(order).limit(limit).with_for_update(skip_locked=True)
    claimed = update(parked_interactions).where(_pc.event_id.in_(page)).values(dead_at=now)
    rows = conn.execute(claimed.returning(_pc.event_id, _pc.parked_at, _pc.message)).all()
    rows.sort(key=lambda r: (r.parked_at, r.event_id))
    return [(r.event_id, r.message) for r in rows]


def shipped(conn: Connection, event_ids: Sequence[str], claimed_at: datetime) -> int:
    """Delete claimed rows whose DLQ copies are flushed; how many. Rows another sweeper
    claimed again meanwhile (their ``dead_at`` moved on) are its to delete."""
    removed = 0
    for s in range(0, len(event_ids), _CHUNK):
        chunk = event_ids[s : s + _CHUNK]
        stmt = delete(parked_interactions).where(_pc.event_id.in_(chunk), _pc.dead_at == claimed_at)
        removed += conn.execute(stmt).rowcount
    return removed


def _forget(conn: Connection, event_ids: Sequence[str]) -> int:
    removed = 0
    for s in range(0, len(event_ids), _CHUNK):
        chunk = event_ids[s : s + _CHUNK]
        removed += conn.execute(
            delete(parked_interactions).where(parked_interactions.c.event_id.in_(chunk))
        ).rowcount
    return removed


def count_parked(conn: Connection) -> int:
    """Rows in the table (a full count: for tests and checks, not the hot path)."""
    return conn.execute(select(func.count()).select_from(parked_interactions)).scalar_one()


def forget_user(conn: Connection, user_id: str) -> int:
    """Delete a user's parked interactions (a request to be forgotten); how many. Locked
    like ``apply_parked``, so a sweep or an arriving item never moves one of them meanwhile."""
    query = select(_pc.event_id, LIVE.label("live")).where(_pc.user_id == user_id)
    rows = conn.execute(query.with_for_update()).all()
    removed = _forget(conn, [r.event_id for r in rows])
    _count_change(conn, -sum(r.live for r in rows))
    return removed


def prune_parked(conn: Connection, before: datetime) -> int:
    """Delete parked interactions of events older than ``before`` (retention); how many."""
    query = select(_pc.event_id).where(_pc.event_time < before, LIVE)
    ids = conn.execute(query.with_for_update(skip_locked=True)).scalars().all()
    removed = _forget(conn, list(ids))
    _count_change(conn, -removed)
    return removed
