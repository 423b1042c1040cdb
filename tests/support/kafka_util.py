"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.db import make_engine
from core.events import TOPIC_DLQ, TOPIC_ITEMS

log = logging.getLogger(__name__)


def produce_raw(
    bootstrap: str,
    topic: str,
    messages: list[tuple[bytes | None, bytes | None]],
    headers: list | None = None,
    records: list[tuple] = (),
    max_bytes: int = 1_000_000,
):
    """Produce (key, value) byte pairs exactly as given (each with ``headers``), then
    (key, value, headers, timestamp ms) ``records``, and wait for delivery."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": max_bytes})
    errors: list = []
    rows = [(k, v, headers, None) for k, v in messages] + list(records)
    for key, value, hdrs, ts in rows:
        extra = {"headers": hdrs} if hdrs else {}
        extra |= {"timestamp": ts} if ts else {}
        while True:
            try:
                p.produce(
                    topic, key=key, value=value, on_delivery=lambda e, _m: e and errors.append(e), **extra
                )
                break
            except BufferError:
                p.poll(0.1)
    assert p.flush(30) == 0 and not errors, errors


def produce_json(bootstrap: str, topic: str, events: list[dict], key: str) -> None:
    produce_raw(bootstrap, topic, [(e[key].encode(), json.dumps(e).encode()) for e in events])


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 20.0) -> list:
    """Read ``expected`` messages from the start of ``topic``, then poll briefly for more.
    A short read is logged with where it stopped (per-partition counts and offsets, the
    consumer's errors): the caller's assertion then says what is missing, this says why."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 400,
        }
    )
    c.subscribe([topic])
    out, errors, started = [], [], time.monotonic()
    deadline = started + timeout

    def take(batch: list) -> None:
        for m in batch:
            (errors if m.error() is not None else out).append(m.error() or m)

    while len(out) < expected and time.monotonic() < deadline:
        take(c.consume(1000, 0.5))
    take(c.consume(1000, 1.0))  # a short extra poll catches messages beyond what we expected
    if len(out) < expected:
        per = Counter(m.partition() for m in out)
        marks = {
            tp.partition: (tp.offset, c.get_watermark_offsets(tp, cached=True), _asked(c, tp))
            for tp in c.position(c.assignment())
        }
        log.warning(
            "read %d of %d messages of %s in %.1f s; per partition %s; (position, cached"
            " watermarks, the broker's answer) %s; %d consumer errors, e.g. %s",
            len(out),
            expected,
            topic,
            time.monotonic() - started,
            dict(per),
            marks,
            len(errors),
            errors[:3],
        )
    c.close()
    return out


def _asked(consumer: Consumer, tp: TopicPartition) -> tuple[int, int] | str:
    """The broker's watermarks of ``tp`` (the embedded broker's uncached answer can be
    wrong, DESIGN.md; the cached one is empty for a partition never fetched)."""
    try:
        return consumer.get_watermark_offsets(tp, timeout=5)
    except KafkaException as exc:
        return f"unknown ({exc})"


def dlq_reasons(bootstrap: str, expected: int) -> dict[bytes, str]:
    """DLQ messages as original value -> reason header."""
    msgs = read_topic(bootstrap, TOPIC_DLQ, expected)
    return {m.value(): dict(m.headers())["said-error"].decode() for m in msgs}


def item_event(i: int, title: str | None = None, t: str = "2026-01-01T00:00:00Z") -> dict:
    return {
        "item_id": f"i{i}",
        "title": title or f"Product number {i}",
        "description": None,
        "advertiser_id": "adv",
        "event_time": t,
    }


def click_event(e: int, item: int, user: str = "u1") -> dict:
    return {
        "event_id": f"e{e}",
        "user_id": user,
        "item_id": f"i{item}",
        "type": "click",
        "event_time": "2026-01-01T00:00:01Z",
    }


def load_items(settings, n: int) -> None:
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(i) for i in range(n)], "item_id")
    stats = ConsumeLoop(ItemsHandler(settings), make_engine(settings.database_url), settings).run(1.5)
    assert stats.stored == n


def committed_offsets(settings, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (negative: none)."""
    c = Consumer(settings.kafka.client_config() | {"group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            tp.partition: tp.offset
            for tp in c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        }
    finally:
        c.close()
