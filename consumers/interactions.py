"""``said.interactions`` -> catalogue interactions, idempotent on ``event_id``.

An interaction whose item the catalogue has not seen yet is parked (``core.parking``): the
item's arrival applies it, and only one still waiting after ``park_max_age_s`` goes to the
DLQ (reason ``unknown_item``, the original message kept), from where ``said dlq replay``
can bring it back. One that finds no room (``park_max_per_item``, ``park_max_total``) goes
there at once (``park_overflow``). Nothing is dropped.

A row's park time and the sweep's cut-off both come from the database's clock
(``core.db.db_now``): consumers on hosts whose clocks disagree must not dead-letter each
other's rows early, nor keep them past their age.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from confluent_kafka import Message
from sqlalchemy.engine import Connection, Engine

from consumers.dead_letter import StoredMessage, message_record
from consumers.runner import Claim, Parsed, Rejected
from core import metrics, parking
from core.catalogue import copy_text, insert_interactions, resolve_item_ids
from core.db import db_now
from core.events import TOPIC_INTERACTIONS, InteractionEvent, parse_interaction
from core.parking import OVERFLOW, Caps, park_unknown
from core.settings import Settings


class InteractionsHandler:
    """Validates interaction events, inserts those of known items and parks the rest."""

    topic = TOPIC_INTERACTIONS
    name = "interactions"

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.consume.max_message_bytes
        self.skew = timedelta(seconds=settings.consume.max_future_skew_s)
        self.max_age = timedelta(seconds=settings.consume.park_max_age_s)
        self.caps = Caps(settings.consume.park_max_per_item, settings.consume.park_max_total)
        # item_id -> idx never changes once assigned, so a process-wide cache is safe.
        self.idx_of: dict[str, int] = {}

    def parse(self, messages: Sequence[Message]) -> Parsed:
        """Each valid click with its COPY text (``core.catalogue.copy_text``), formatted
        here, while the batch before is written, rather than on the writer thread."""
        latest = datetime.now(UTC) + self.skew

        def one(m: Message) -> tuple[InteractionEvent, tuple[str, str]]:
            event = parse_interaction(m.value(), max_bytes=self.max_bytes, latest=latest)
            return event, copy_text(event)

        return Parsed.of(messages, one)

    def store(self, engine: Engine, parsed: Parsed) -> list[Rejected]:
        clicks: list[tuple[InteractionEvent, tuple[str, str], Message]] = [
            (ev, text, m) for (ev, text), m in parsed.events
        ]
        parking = None
        with engine.begin() as conn:
            missing = {ev.item_id for ev, _, _ in clicks if ev.item_id not in self.idx_of}
            if missing:
                self.idx_of.update(resolve_item_ids(conn, missing))
            unknown = [(ev, message_record(m)) for ev, _, m in clicks if ev.item_id not in self.idx_of]
            if unknown:
                parking = park_unknown(conn, unknown, self.idx_of, db_now(conn), self.caps)
            known = [(ev, text) for ev, text, _ in clicks if ev.item_id in self.idx_of]
            insert_interactions(conn, [ev for ev, _ in known], self.idx_of, [text for _, text in known])
        if parking is None:
            return []
        overflow = [Rejected(StoredMessage(record), OVERFLOW) for _, record in parking.overflow]
        metrics.PARKED.labels("parked").inc(parking.parked)
        metrics.PARKED.labels("overflow").inc(len(overflow))
        if parking.waiting is not None:
            metrics.PARKED_NOW.set(parking.waiting)
        return overflow

    def claim_expired(self, engine: Engine, limit: int, flushed: Claim | None = None) -> Claim:
        """Up to ``limit`` parked interactions past their age, oldest first, moved to the
        outbox in one transaction (``core.parking``: on PostgreSQL rows others hold are
        skipped), which first releases ``flushed``. The loop then dead-letters them and
        releases the claim; a crash or a failed flush in between leaves them in the outbox,
        for a later sweep to ship: never lost, never applied by an arriving item as well."""
        with engine.begin() as conn:
            if flushed is not None:
                self._release(conn, flushed)
            now = db_now(conn)
            page, waiting = parking.claim_expired(conn, now, now - self.max_age, limit)
        metrics.PARKED_NOW.set(waiting)
        metrics.PARKED.labels("expired").inc(len(page))
        return Claim([Rejected(StoredMessage(record), "unknown_item", eid) for eid, record in page], now)

    def release(self, engine: Engine, claim: Claim) -> None:
        with engine.begin() as conn:
            self._release(conn, claim)

    @staticmethod
    def _release(conn: Connection, claim: Claim) -> None:
        parking.shipped(conn, [r.parked_id for r in claim.rejected], claim.at)
