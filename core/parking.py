"""Interactions that arrived before their item, parked in the catalogue until it comes.

Kafka gives no order between the item and interaction topics, so an interaction can
arrive first. Parking it (instead of dead-lettering it at once) lets the item's arrival
apply it automatically, in the item's own transaction. Only one that waited longer than
``park_max_age_s`` goes to the DLQ, with its original message, so nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection

from core.catalogue import dialect_insert, insert_interactions, lock_item_index, resolve_item_ids
from core.events import InteractionEvent
from core.tables import parked_interactions


def park(conn: Connection, events: Sequence[tuple[InteractionEvent, dict]], now: datetime) -> None:
    """Park (event, message record) pairs; a replayed ``event_id`` is parked once."""
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
    if rows:
        stmt = dialect_insert(conn, parked_interactions).on_conflict_do_nothing(index_elements=["event_id"])
        conn.execute(stmt, rows)


def park_unknown(
    conn: Connection, events: Sequence[tuple[InteractionEvent, dict]], idx_of: dict[str, int], now: datetime
) -> list[tuple[InteractionEvent, dict]]:
    """Park the events whose item is still unknown under the item-index lock; returns the
    ones whose item turned out to exist (committed meanwhile), and adds them to ``idx_of``.

    The lock is the one new items are inserted under, so an item is either visible here
    or inserted after this transaction, and then its insert applies what we parked."""
    lock_item_index(conn)
    idx_of.update(resolve_item_ids(conn, {ev.item_id for ev, _ in events}))
    park(conn, [(ev, m) for ev, m in events if ev.item_id not in idx_of], now)
    return [(ev, m) for ev, m in events if ev.item_id in idx_of]


def apply_parked(conn: Connection, item_ids: Iterable[str]) -> int:
    """Move the parked interactions of ``item_ids`` that now exist into ``interactions``."""
    wanted = sorted(set(item_ids))
    if not wanted:
        return 0
    rows = conn.execute(select(parked_interactions).where(parked_interactions.c.item_id.in_(wanted))).all()
    if not rows:
        return 0
    idx_of = resolve_item_ids(conn, {r.item_id for r in rows})
    ready = [r for r in rows if r.item_id in idx_of]
    events = [InteractionEvent(r.event_id, r.user_id, r.item_id, r.type, r.event_time) for r in ready]
    insert_interactions(conn, events, idx_of)
    forget(conn, [r.event_id for r in ready])
    return len(ready)


def expired(conn: Connection, before: datetime, limit: int = 1000) -> list[tuple[str, dict]]:
    """(event_id, message record) of interactions parked before ``before``, oldest first."""
    rows = conn.execute(
        select(parked_interactions.c.event_id, parked_interactions.c.message)
        .where(parked_interactions.c.parked_at < before)
        .order_by(parked_interactions.c.parked_at)
        .limit(limit)
    )
    return [(r.event_id, r.message) for r in rows]


def forget(conn: Connection, event_ids: Sequence[str]) -> None:
    for s in range(0, len(event_ids), 1000):
        conn.execute(
            delete(parked_interactions).where(parked_interactions.c.event_id.in_(event_ids[s : s + 1000]))
        )


def count_parked(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(parked_interactions)).scalar_one()
