"""``said dlq replay``: re-publish dead-lettered messages to their source topic.

For the fixable cases: an interaction dead-lettered as ``unknown_item`` whose item has since
arrived, or a batch rejected while a limit was misconfigured. Only messages whose reason
starts with ``--reason`` are replayed; the rest are skipped and counted. The original key
and value bytes go back unchanged, so consumers validate them again; offsets on the DLQ are
committed only after the producer has flushed (at-least-once, and consumers are idempotent).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer

from consumers.runner import consumer_config, next_offsets
from core.events import TOPIC_DLQ
from core.kafka import DeliveryTracker
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    replayed: int = 0
    skipped: int = 0


def replay_dlq(settings: Settings, reason_prefix: str, idle_exit: float = 5.0) -> ReplayStats:
    """Replay matching DLQ messages until the topic has been idle for ``idle_exit`` s."""
    consumer = Consumer(consumer_config(settings, f"{settings.group_id}.dlq-replay", lambda _s: None))
    producer = Producer(settings.kafka_config() | {"enable.idempotence": True})
    consumer.subscribe([TOPIC_DLQ])
    stats = ReplayStats()
    idle_since = time.monotonic() + settings.session_timeout_ms / 1000
    tracker = DeliveryTracker()
    try:
        while time.monotonic() - idle_since < idle_exit:
            messages = [m for m in consumer.consume(1000, timeout=0.5) if m.error() is None]
            if not messages:
                continue
            idle_since = time.monotonic()
            for m in messages:
                headers = {k: v.decode() for k, v in (m.headers() or [])}
                if not headers.get("said-error", "").startswith(reason_prefix):
                    stats.skipped += 1
                    continue
                producer.produce(
                    headers["said-source-topic"], key=m.key(), value=m.value(), on_delivery=tracker
                )
                stats.replayed += 1
            tracker.flush(producer, 30, "replay stopped, DLQ offsets kept")
            consumer.commit(offsets=next_offsets(messages), asynchronous=False)
    finally:
        consumer.close()
    log.info("replayed %d, skipped %d", stats.replayed, stats.skipped)
    return stats
