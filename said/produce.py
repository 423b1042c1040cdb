"""Replay a data set as ``said.items`` then ``said.interactions`` events.

Event times are synthetic but ordered: items at a fixed base time, each user's
interactions one second apart in sequence order, so the catalogue keeps the file's order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from confluent_kafka import Producer
from tqdm import tqdm

from core.dataset import Dataset
from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from core.kafka import DeliveryTracker, produce

log = logging.getLogger(__name__)
BASE_TIME = datetime(2014, 1, 1, tzinfo=UTC)


def item_events(ds: Dataset) -> Iterator[tuple[str, dict]]:
    for item_id, title, desc in zip(ds.item_ids, ds.titles, ds.descriptions, strict=True):
        yield (
            item_id,
            {
                "item_id": item_id,
                "title": title,
                "description": desc,
                "advertiser_id": None,
                "event_time": BASE_TIME.isoformat(),
            },
        )


def interaction_events(ds: Dataset) -> Iterator[tuple[str, dict]]:
    for user_id, seq in ds.sequences:
        for pos, item_id in enumerate(seq):
            yield (
                user_id,
                {
                    "event_id": f"{user_id}:{pos}",
                    "user_id": user_id,
                    "item_id": item_id,
                    "type": "click",
                    "event_time": (BASE_TIME + timedelta(seconds=pos)).isoformat(),
                },
            )


def produce_events(kafka_config: dict, topic: str, events: Iterator[tuple[str, dict]], total: int) -> int:
    """Produce keyed JSON events with a progress bar; raises if any delivery failed."""
    producer = Producer(
        kafka_config | {"linger.ms": 20, "queue.buffering.max.messages": 500_000, "enable.idempotence": True}
    )
    tracker = DeliveryTracker()
    sent = 0
    for key, value in tqdm(events, total=total, desc=f"produce {topic}", unit="ev"):
        payload = json.dumps(value, ensure_ascii=False).encode()
        produce(producer, topic, key=key.encode(), value=payload, on_delivery=tracker)
        producer.poll(0)
        sent += 1
    tracker.flush(producer, 60, f"not every {topic} event was published")
    return sent


def replay_dataset(kafka_config: dict, ds: Dataset) -> tuple[int, int]:
    """Items first, then interactions, so that every interaction's item already exists."""
    n_items = produce_events(kafka_config, TOPIC_ITEMS, item_events(ds), len(ds.item_ids))
    n_inter = produce_events(kafka_config, TOPIC_INTERACTIONS, interaction_events(ds), ds.n_interactions)
    return n_items, n_inter
