"""A user's data: forgetting one user on request, and the retention of everyone's events.

What a user leaves here is their interactions and their parked interactions (those whose
item has not arrived). Forgetting deletes both in one transaction; the scorer builds a
query from the catalogue on every request, so the next request of a forgotten user is a
new user's (the fallback ranking), and the next retrain trains without them. A model
trained before keeps what it learnt from them in its weights until that retrain replaces
it. Events on the Kafka topics (the DLQ included) are kept as long as the topics'
``retention.ms`` says: set it to the retention the platform promises.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.engine import Connection

from core.catalogue import lock_item_index
from core.parking import forget_user as forget_parked
from core.parking import prune_parked
from core.tables import interactions


def forget(conn: Connection, user_id: str) -> dict[str, int]:
    """Delete every interaction and parked interaction of ``user_id``; how many of each."""
    lock_item_index(conn)  # as the items consumer does before moving parked rows in
    gone = conn.execute(delete(interactions).where(interactions.c.user_id == user_id)).rowcount
    return {"interactions": gone, "parked": forget_parked(conn, user_id)}


def prune(conn: Connection, before: datetime) -> dict[str, int]:
    """Delete every interaction and parked interaction of an event older than ``before``.
    Without the items lock, so the items consumer never waits on it: a parked event moved
    in meanwhile goes at the next prune."""
    gone = conn.execute(delete(interactions).where(interactions.c.event_time < before)).rowcount
    return {"interactions": gone, "parked": prune_parked(conn, before)}
