"""``said dlq replay``: re-publish dead-lettered messages to their source topic.

For the fixable cases: a batch rejected while a limit was misconfigured, or a parked
interaction that aged out before its item arrived. Only messages whose reason starts with
``--reason`` are replayed; the rest are skipped and counted. The original key, value,
headers and timestamp go back unchanged (``consumers.dead_letter.replay_copy``), so
consumers validate them again.

The replay is bounded: it captures the DLQ's end offsets when it starts and stops there,
so a message that is dead-lettered again while it runs (consumers are live) waits for the
next replay instead of cycling forever. A message dead-lettered ``max_attempts`` times
stays where it is. DLQ offsets are committed only after the producer has flushed
(at-least-once; consumers are idempotent).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from consumers.dead_letter import (
    ERROR,
    HEADERS_DROPPED,
    SOURCE_TOPIC,
    TRUNCATED_FROM,
    attempts,
    header,
    replay_copy,
)
from consumers.runner import consumer_config, next_offsets
from core.events import TOPIC_DLQ
from core.kafka import DeliveryTracker, produce
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    replayed: int = 0
    skipped: int = 0  # another reason
    exhausted: int = 0  # dead-lettered max_attempts times: left on the DLQ


def replay_dlq(
    settings: Settings, reason_prefix: str, max_attempts: int | None = None, stall_s: float = 30.0
) -> ReplayStats:
    """Replay matching DLQ messages up to the end offsets seen at the start, then return.

    Raises ``ValueError`` for an empty reason (it would replay every dead letter, including
    malformed ones, into the live topics) and ``TimeoutError`` if the broker stops serving
    the captured range for ``stall_s`` seconds."""
    if not reason_prefix.strip():
        raise ValueError("--reason must name the reasons to replay, e.g. unknown_item or malformed_json")
    max_attempts = max_attempts or settings.consume.dlq_max_attempts
    consumer = Consumer(consumer_config(settings, f"{settings.consume.group_id}.dlq-replay", lambda _s: None))
    producer = Producer(settings.kafka.client_config() | {"enable.idempotence": True})
    stats, tracker = ReplayStats(), DeliveryTracker()
    try:
        todo = _assign_up_to_end(consumer)
        last_progress = time.monotonic()
        while todo:
            batch = []
            for m in consumer.consume(1000, timeout=0.5):
                if m.error() is None and m.offset() < todo.get(m.partition(), -1):
                    batch.append(m)
            if not batch:
                if time.monotonic() - last_progress > stall_s:
                    raise TimeoutError(f"DLQ replay stalled before the end offsets {todo}")
                continue
            last_progress = time.monotonic()
            for m in batch:
                _replay_one(m, reason_prefix, max_attempts, producer, tracker, stats)
            tracker.flush(producer, 30, "replay stopped, DLQ offsets kept")
            consumer.commit(offsets=next_offsets(batch), asynchronous=False)
            for tp in next_offsets(batch):
                if tp.offset >= todo[tp.partition]:
                    del todo[tp.partition]
    finally:
        consumer.close()
    log.info("replayed %d, skipped %d, exhausted %d", stats.replayed, stats.skipped, stats.exhausted)
    return stats


def _assign_up_to_end(consumer: Consumer) -> dict[int, int]:
    """Assign every DLQ partition with messages past the group's committed offset;
    returns partition -> end offset captured now."""
    meta = consumer.list_topics(TOPIC_DLQ, timeout=10).topics[TOPIC_DLQ]
    if meta.error is not None:
        raise RuntimeError(f"cannot read {TOPIC_DLQ}: {meta.error}")
    parts = [TopicPartition(TOPIC_DLQ, p) for p in sorted(meta.partitions)]
    committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    todo, assign = {}, []
    for tp in parts:
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
        start = max(committed[tp.partition], low)  # a negative offset means none committed
        if start < high:
            todo[tp.partition] = high
            offset = committed[tp.partition] if committed[tp.partition] >= low else OFFSET_BEGINNING
            assign.append(TopicPartition(TOPIC_DLQ, tp.partition, offset))
    consumer.assign(assign)
    return todo


def _replay_one(
    m: Message, prefix: str, max_attempts: int, producer: Producer, tracker, stats: ReplayStats
) -> None:
    headers = m.headers()
    source = header(headers, SOURCE_TOPIC)
    if not (header(headers, ERROR) or "").startswith(prefix) or not source:
        stats.skipped += 1
    elif header(headers, TRUNCATED_FROM) is not None or header(headers, HEADERS_DROPPED) is not None:
        stats.skipped += 1  # a cut-down copy: replaying it would publish a corrupt event
    elif attempts(headers) >= max_attempts:
        stats.exhausted += 1
    else:
        produce(producer, source, on_delivery=tracker, **replay_copy(m))
        stats.replayed += 1
