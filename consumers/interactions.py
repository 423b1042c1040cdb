"""``said.interactions`` -> catalogue interactions, idempotent on ``event_id``.

An interaction whose item the catalogue has never seen goes to the DLQ with reason
``unknown_item`` rather than being parked: the item stream is the producer's contract, a
missing item is an upstream bug worth seeing, and ``said dlq replay`` re-publishes such
events once the item exists. Nothing is dropped either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Message
from sqlalchemy.engine import Engine

from consumers.runner import Rejected
from core.catalogue import insert_interactions, resolve_item_ids
from core.events import TOPIC_INTERACTIONS, InteractionEvent, Invalid, parse_interaction
from core.settings import Settings


class InteractionsHandler:
    """Validates interaction events and inserts those of known items."""

    topic = TOPIC_INTERACTIONS
    name = "interactions"

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.max_message_bytes
        # item_id -> idx never changes once assigned, so a process-wide cache is safe.
        self.idx_of: dict[str, int] = {}

    def process(self, engine: Engine, messages: Sequence[Message]) -> list[Rejected]:
        parsed: list[tuple[Message, InteractionEvent]] = []
        rejected: list[Rejected] = []
        for m in messages:
            try:
                parsed.append((m, parse_interaction(m.value(), max_bytes=self.max_bytes)))
            except Invalid as exc:
                rejected.append(Rejected(m, exc.reason))
        with engine.begin() as conn:
            missing = {ev.item_id for _, ev in parsed if ev.item_id not in self.idx_of}
            if missing:
                self.idx_of.update(resolve_item_ids(conn, missing))
            known = [ev for _, ev in parsed if ev.item_id in self.idx_of]
            insert_interactions(conn, known, self.idx_of)
        rejected += [Rejected(m, "unknown_item") for m, ev in parsed if ev.item_id not in self.idx_of]
        return rejected
