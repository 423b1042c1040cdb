"""Interactions that arrived before their item, parked in the catalogue until it comes.

Kafka gives no order between the item and interaction topics, so an interaction can
arrive first. Parking it (instead of dead-lettering it at once) lets the item's arrival
apply it automatically, in the item's own transaction. Only one that waited longer than
``park_max_age_s`` goes to the DLQ, with its original message, so nothing is dropped.

Each parked row ends exactly once: applied (stored) by its item's arrival, or decided dead
by a sweep. Both take the row under a lock (SQLite: the one write lock; PostgreSQL: row
locks, ``apply_parked`` waits for a sweep's claim, a sweep skips the rows others hold), so
no row is both. The dead-lettering goes through an outbox table, so that no transaction is
held across a DLQ flush and no crash can leave a click both stored and dead-lettered:
  1. :func:`claim_expired` moves the page from ``parked_interactions`` to ``parked_outbox``
     (``claimed_at``: the database's clock) and counts it out, in one short transaction;
     from then on no item applies it;
  2. the sweeper produces the DLQ copies and flushes them;
  3. :func:`shipped` deletes its rows from the outbox.
A sweeper that dies between 1 and 3 leaves its rows in the outbox: any sweep claims them
again after ``RECLAIM_S`` and ships them (a crash after 2 gives a second DLQ copy, the same
message with the same ``event_id``: at least once, never stored as well). The outbox holds
only the pages in flight, so its churn stays out of the large parked table.

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

from sqlalchemy import DateTime, Table, delete, func, insert, literal, select, update
from sqlalchemy.engine import Connection

from core.catalogue import dialect_insert, insert_interactions, lock_item_index, resolve_item_ids
from core.events import InteractionEvent
from core.tables import parked_interactions, parked_outbox, sequences

PARKED = "parked_interactions"  # the ``sequences`` row that counts parked rows (migration 0007)
OVERFLOW = "park_overflow"  # the DLQ reason of an interaction that found no room
_CHUNK = 1000
# a page claimed but not shipped after this long is a dead sweeper's: far longer than the
# 30 s its DLQ flush may wait, so a live sweeper's page is not taken from under it (if one
# is, its delete finds the rows re-claimed and leaves them: a second DLQ copy at worst)
RECLAIM_S = 120.0
_pc, _oc = parked_interactions.c, parked_outbox.c

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
        chunk = ids[s : s + _CHUNK]
        for decided in (pc.event_id, _oc.event_id):  # waiting already, or on its way to the DLQ
            for event_id in conn.execute(select(decided).where(decided.in_(chunk))).scalars():
                first.pop(event_id, None)
    if not first:
        return out
    per_item: dict[str, int] = {}
    item_ids = sorted({ev.item_id for ev, _ in first.values()})
    for s in range(0, len(item_ids), _CHUNK):
        chunk = item_ids[s : s + _CHUNK]
        per_item |= dict(
            conn.execute(
                select(pc.item_id, func.count()).where(pc.item_id.in_(chunk)).group_by(pc.item_id)
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

    The rows are locked (``FOR UPDATE``): a sweep claiming some of them right now holds them
    until its claim commits, and then they are in the outbox, gone from here; it never
    takes the ones locked here (``SKIP LOCKED``)."""
    wanted = sorted(set(item_ids))
    rows = []
    for s in range(0, len(wanted), _CHUNK):
        query = select(parked_interactions).where(_pc.item_id.in_(wanted[s : s + _CHUNK]))
        rows += conn.execute(query.with_for_update()).all()
    if not rows:
        return 0, None
    idx_of = resolve_item_ids(conn, {r.item_id for r in rows})
    ready = [r for r in rows if r.item_id in idx_of]
    events = [InteractionEvent(r.event_id, r.user_id, r.item_id, r.type, r.event_time) for r in ready]
    insert_interactions(conn, events, idx_of)
    removed = _forget(conn, parked_interactions, [r.event_id for r in ready])
    return len(ready), _count_change(conn, -removed)


def claim_expired(
    conn: Connection, now: datetime, before: datetime, limit: int
) -> tuple[list[tuple[str, dict]], int]:
    """Claim up to ``limit`` rows for the DLQ, oldest first, and return their (event_id,
    message record), with the parked count after it, for the caller to dead-letter once
    this transaction commits (then :func:`shipped`): first outbox rows a dead sweeper
    claimed before ``now - RECLAIM_S``, then parked rows parked before ``before``, moved
    to the outbox. ``now`` is the
    database's clock. On PostgreSQL rows held by another transaction (a concurrent sweep,
    an arriving item) are skipped; on SQLite the transaction holds the write lock."""
    taken = _reclaim(conn, now, now - timedelta(seconds=RECLAIM_S), limit)
    fresh = _move_expired(conn, now, before, limit - len(taken))
    return taken + fresh, _count_change(conn, -len(fresh))


def _reclaim(conn: Connection, now: datetime, stale: datetime, limit: int) -> list[tuple[str, dict]]:
    if limit <= 0:
        return []
    page = select(_oc.event_id).where(_oc.claimed_at < stale).order_by(_oc.claimed_at).limit(limit)
    claimed = update(parked_outbox).where(_oc.event_id.in_(page.with_for_update(skip_locked=True)))
    rows = conn.execute(claimed.values(claimed_at=now).returning(_oc.event_id, _oc.parked_at, _oc.message))
    return _oldest_first(rows.all())


def _move_expired(conn: Connection, now: datetime, before: datetime, limit: int) -> list[tuple[str, dict]]:
    """Move a page of expired rows to the outbox inside the database (``INSERT ... SELECT``):
    the messages cross to Python once, for their DLQ copies, never to be written back."""
    if limit <= 0:
        return []
    page = select(_pc.event_id).where(_pc.parked_at < before).order_by(_pc.parked_at).limit(limit)
    ids = list(conn.execute(page.with_for_update(skip_locked=True)).scalars())
    if not ids:
        return []
    names = [c.name for c in parked_interactions.c]
    rows = select(*_pc, literal(now, DateTime(timezone=True))).where(_pc.event_id.in_(ids))
    conn.execute(insert(parked_outbox).from_select([*names, "claimed_at"], rows))
    taken = delete(parked_interactions).where(_pc.event_id.in_(ids))
    return _oldest_first(conn.execute(taken.returning(_pc.event_id, _pc.parked_at, _pc.message)).all())


def _oldest_first(rows) -> list[tuple[str, dict]]:
    return [(r.event_id, r.message) for r in sorted(rows, key=lambda r: (r.parked_at, r.event_id))]


def shipped(conn: Connection, event_ids: Sequence[str], claimed_at: datetime) -> int:
    """Delete outbox rows whose DLQ copies are flushed; how many. Rows another sweeper
    claimed again meanwhile (their ``claimed_at`` moved on) are its to delete."""
    return _forget(conn, parked_outbox, event_ids, _oc.claimed_at == claimed_at)


def _forget(conn: Connection, table: Table, event_ids: Sequence[str], *where) -> int:
    removed = 0
    for s in range(0, len(event_ids), _CHUNK):
        chunk = event_ids[s : s + _CHUNK]
        removed += conn.execute(delete(table).where(table.c.event_id.in_(chunk), *where)).rowcount
    return removed


def count_parked(conn: Connection) -> int:
    """Rows in the table (a full count: for tests and checks, not the hot path)."""
    return conn.execute(select(func.count()).select_from(parked_interactions)).scalar_one()


def forget_user(conn: Connection, user_id: str) -> int:
    """Delete a user's parked interactions (a request to be forgotten), those in the outbox
    too; how many. Locked like ``apply_parked``, so a sweep or an arriving item never moves
    one of them meanwhile; an outbox page being flushed right now may still reach the DLQ."""
    in_flight = conn.execute(delete(parked_outbox).where(_oc.user_id == user_id)).rowcount
    query = select(_pc.event_id).where(_pc.user_id == user_id)
    ids = conn.execute(query.with_for_update()).scalars().all()
    removed = _forget(conn, parked_interactions, list(ids))
    _count_change(conn, -removed)  # last, as in every transaction (the module docstring)
    return removed + in_flight


def prune_parked(conn: Connection, before: datetime) -> int:
    """Delete parked interactions of events older than ``before`` (retention); how many."""
    query = select(_pc.event_id).where(_pc.event_time < before)
    ids = conn.execute(query.with_for_update(skip_locked=True)).scalars().all()
    removed = _forget(conn, parked_interactions, list(ids))
    _count_change(conn, -removed)
    return removed
