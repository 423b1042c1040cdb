"""``said.items`` -> catalogue items (+ alignment jobs for new or changed text) and their
serving state (paused, withdrawn, active again), and the interactions parked for them
applied in the same transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message
from sqlalchemy.engine import Engine

from consumers.runner import Claim, Parsed, Rejected
from core import metrics
from core.catalogue import set_serving, upsert_items
from core.events import TOPIC_ITEMS, ItemEvent, ServingEvent, parse_item, parse_tombstone
from core.parking import apply_parked
from core.settings import Settings


class ItemsHandler:
    """Validates item events and upserts them; a changed text goes back to ``pending``. A
    ``status`` (with or without text) or a tombstone changes the item's serving state; one
    of an unknown item is rejected as ``unknown_item`` (the DLQ can replay it once the item
    exists)."""

    topic = TOPIC_ITEMS
    name = "items"

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.consume.max_message_bytes
        self.max_text_chars = settings.consume.max_text_chars
        self.skew = timedelta(seconds=settings.consume.max_future_skew_s)

    def parse(self, messages: Sequence[Message]) -> Parsed:
        latest = datetime.now(UTC) + self.skew
        return Parsed.of(messages, lambda m: self._parse(m, latest))

    def store(self, engine: Engine, parsed: Parsed) -> list[Rejected]:
        valid: list[ItemEvent] = []
        serving: list[tuple[Message, ServingEvent]] = []
        for ev, m in parsed.events:
            if isinstance(ev, ItemEvent):
                valid.append(ev)
                if ev.serving is not None:
                    serving.append((m, ServingEvent(ev.item_id, ev.serving, ev.event_time)))
            else:
                serving.append((m, ev))
        with engine.begin() as conn:
            upsert_items(conn, valid, datetime.now(UTC))
            unknown = set(set_serving(conn, [ev for _, ev in serving])[1])
            applied, waiting = apply_parked(conn, {ev.item_id for ev in valid})  # under the items lock
        metrics.PARKED.labels("applied").inc(applied)
        if waiting is not None:
            metrics.PARKED_NOW.set(waiting)
        return [Rejected(m, "unknown_item") for m, ev in serving if ev.item_id in unknown]

    def _parse(self, m: Message, latest: datetime) -> ItemEvent | ServingEvent:
        if m.value() is None:  # a tombstone: withdrawn, as of the message's timestamp
            kind, ms = m.timestamp()
            return parse_tombstone(m.key(), None if kind == TIMESTAMP_NOT_AVAILABLE else ms, latest)
        limits = {"max_bytes": self.max_bytes, "max_text_chars": self.max_text_chars}
        return parse_item(m.value(), latest=latest, **limits)

    def claim_expired(self, engine: Engine, limit: int, flushed: Claim | None = None) -> Claim:
        return Claim([])  # items are never parked

    def release(self, engine: Engine, claim: Claim) -> None:
        pass
