"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import json
import time

from confluent_kafka import Consumer, Producer

from said.events import TOPIC_DLQ


def produce_raw(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]):
    """Produce (key, value) byte pairs exactly as given and wait for delivery."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    errors = []
    for key, value in messages:
        while True:
            try:
                p.produce(topic, key=key, value=value, on_delivery=lambda e, _m: e and errors.append(e))
                break
            except BufferError:
                p.poll(0.1)
    assert p.flush(30) == 0 and not errors, errors


def produce_json(bootstrap: str, topic: str, events: list[dict], key: str) -> None:
    produce_raw(bootstrap, topic, [(e[key].encode(), json.dumps(e).encode()) for e in events])


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 20.0) -> list:
    """Read ``expected`` messages from the start of ``topic`` (fails on timeout)."""
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "session.timeout.ms": 2000, "heartbeat.interval.ms": 400,
    })  # fmt: skip
    c.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        out += [m for m in c.consume(1000, 0.5) if m.error() is None]
    # a short extra poll catches messages beyond what we expected
    out += [m for m in c.consume(1000, 1.0) if m.error() is None]
    c.close()
    return out


def dlq_reasons(bootstrap: str, expected: int) -> dict[bytes, str]:
    """DLQ messages as original value -> reason header."""
    msgs = read_topic(bootstrap, TOPIC_DLQ, expected)
    return {m.value(): dict(m.headers())["said-error"].decode() for m in msgs}
