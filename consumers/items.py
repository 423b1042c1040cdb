"""``said.items`` -> catalogue items (+ alignment jobs for new or changed text), and the
interactions parked for them applied in the same transaction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from confluent_kafka import Message
from sqlalchemy.engine import Engine

from consumers.runner import Rejected
from core import metrics
from core.catalogue import upsert_items
from core.events import TOPIC_ITEMS, Invalid, ItemEvent, parse_item
from core.parking import apply_parked
from core.settings import Settings


class ItemsHandler:
    """Validates item events and upserts them; a changed text goes back to ``pending``."""

    topic = TOPIC_ITEMS
    name = "items"

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.consume.max_message_bytes
        self.max_text_chars = settings.consume.max_text_chars
        self.skew = timedelta(seconds=settings.consume.max_future_skew_s)

    def process(self, engine: Engine, messages: Sequence[Message]) -> list[Rejected]:
        valid: list[ItemEvent] = []
        rejected: list[Rejected] = []
        now = datetime.now(UTC)
        for m in messages:
            try:
                valid.append(
                    parse_item(
                        m.value(),
                        max_bytes=self.max_bytes,
                        max_text_chars=self.max_text_chars,
                        latest=now + self.skew,
                    )
                )
            except Invalid as exc:
                rejected.append(Rejected(m, exc.reason))
        with engine.begin() as conn:
            upsert_items(conn, valid, now)
            applied, waiting = apply_parked(conn, {ev.item_id for ev in valid})  # under the items lock
        metrics.PARKED.labels("applied").inc(applied)
        if waiting is not None:
            metrics.PARKED_NOW.set(waiting)
        return rejected

    def sweep(self, engine: Engine, dead_letter: Callable[[list[Rejected]], None], limit: int) -> int:
        return 0  # items are never parked
