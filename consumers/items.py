"""``said.items`` -> catalogue items (+ alignment jobs for new or changed text)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from confluent_kafka import Message
from sqlalchemy.engine import Engine

from consumers.runner import Rejected
from core.catalogue import upsert_items
from core.events import TOPIC_ITEMS, Invalid, ItemEvent, parse_item
from core.settings import Settings


class ItemsHandler:
    """Validates item events and upserts them; a changed text goes back to ``pending``."""

    topic = TOPIC_ITEMS
    name = "items"

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.max_message_bytes
        self.max_text_chars = settings.max_text_chars

    def process(self, engine: Engine, messages: Sequence[Message]) -> list[Rejected]:
        valid: list[ItemEvent] = []
        rejected: list[Rejected] = []
        for m in messages:
            try:
                valid.append(
                    parse_item(m.value(), max_bytes=self.max_bytes, max_text_chars=self.max_text_chars)
                )
            except Invalid as exc:
                rejected.append(Rejected(m, exc.reason))
        with engine.begin() as conn:
            upsert_items(conn, valid, datetime.now(UTC))
        return rejected
