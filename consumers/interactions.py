"""``said.interactions`` -> catalogue interactions, idempotent on ``event_id``.

An interaction whose item the catalogue has not seen yet is parked (``core.parking``): the
item's arrival applies it, and only one still waiting after ``park_max_age_s`` goes to the
DLQ (reason ``unknown_item``, the original message kept), from where ``said dlq replay``
can bring it back. Nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from confluent_kafka import Message
from sqlalchemy.engine import Engine

from consumers.dead_letter import StoredMessage, message_record
from consumers.runner import Rejected
from core import metrics
from core.catalogue import insert_interactions, resolve_item_ids
from core.events import TOPIC_INTERACTIONS, InteractionEvent, Invalid, parse_interaction
from core.parking import count_parked, expired, forget, park_unknown
from core.settings import Settings


class InteractionsHandler:
    """Validates interaction events, inserts those of known items and parks the rest."""

    topic = TOPIC_INTERACTIONS
    name = "interactions"

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.consume.max_message_bytes
        self.skew = timedelta(seconds=settings.consume.max_future_skew_s)
        self.max_age = timedelta(seconds=settings.consume.park_max_age_s)
        # item_id -> idx never changes once assigned, so a process-wide cache is safe.
        self.idx_of: dict[str, int] = {}

    def process(self, engine: Engine, messages: Sequence[Message]) -> list[Rejected]:
        parsed: list[tuple[InteractionEvent, Message]] = []
        rejected: list[Rejected] = []
        now = datetime.now(UTC)
        for m in messages:
            try:
                parsed.append(
                    (parse_interaction(m.value(), max_bytes=self.max_bytes, latest=now + self.skew), m)
                )
            except Invalid as exc:
                rejected.append(Rejected(m, exc.reason))
        parked = 0
        with engine.begin() as conn:
            missing = {ev.item_id for ev, _ in parsed if ev.item_id not in self.idx_of}
            if missing:
                self.idx_of.update(resolve_item_ids(conn, missing))
            unknown = [(ev, message_record(m)) for ev, m in parsed if ev.item_id not in self.idx_of]
            if unknown:
                parked = len(unknown) - len(park_unknown(conn, unknown, self.idx_of, now))
            insert_interactions(conn, [ev for ev, _ in parsed if ev.item_id in self.idx_of], self.idx_of)
        metrics.PARKED.labels("parked").inc(parked)
        return rejected

    def expired(self, engine: Engine) -> list[Rejected]:
        """Parked interactions past their age, as DLQ-ready rejections (not yet removed:
        :meth:`forget` does that once their DLQ copies are flushed)."""
        with engine.connect() as conn:
            old = expired(conn, datetime.now(UTC) - self.max_age)
            metrics.PARKED_NOW.set(count_parked(conn))
        return [Rejected(StoredMessage(record), "unknown_item", event_id) for event_id, record in old]

    def forget(self, engine: Engine, rejected: Sequence[Rejected]) -> None:
        with engine.begin() as conn:
            forget(conn, [r.parked_id for r in rejected])
        metrics.PARKED.labels("expired").inc(len(rejected))
