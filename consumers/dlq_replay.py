"""``said dlq replay``: re-publish dead-lettered messages to their source topic.

For the fixable cases: a batch rejected while a limit was misconfigured, or a parked
interaction that aged out before its item arrived. Only messages whose reason starts with
``--reason`` are replayed; the rest are skipped and counted. The original key, value,
headers and timestamp go back unchanged (``consumers.dead_letter.replay_copy``), so
consumers validate them again.

Every replay reads the whole DLQ, from its first retained offset, and commits no consumer
group offsets. A group offset is one position for all reasons: committing it past the
messages of other reasons (as one shared group did) strands them, and a group per reason
would replay twice under overlapping prefixes and start over once the broker expires its
offsets (``offsets.retention.minutes``). Instead the catalogue records each message it
re-published (``dlq_replays``: its DLQ partition and offset, and a fingerprint), after the
producer has flushed, and a later replay skips those. Re-publishing a message again would
be harmless to the idempotent consumers, but a copy that fails again comes back to the DLQ
with one more attempt while the old copy stays: without the record, every replay would
re-publish both, and the copies would double each time. A crash between the flush and the
record, or two replays at once, publishes a message twice, which the consumers absorb.
Each replay first deletes the records below each partition's low watermark: the broker
has deleted those messages (retention), so no replay can read them again, and the table
stays as small as the DLQ.

The replay is bounded: it captures the DLQ's end offsets when it starts and stops there,
so a message that is dead-lettered again while it runs (consumers are live) waits for the
next replay instead of cycling forever. A message dead-lettered ``max_attempts`` times
stays where it is.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.engine import Engine

from consumers.dead_letter import (
    ERROR,
    HEADERS_DROPPED,
    SOURCE_TOPIC,
    TRUNCATED_FROM,
    attempts,
    header,
    replay_copy,
)
from consumers.runner import consumer_config
from core.catalogue import dialect_insert
from core.db import make_engine, retry_on_outage
from core.events import TOPIC_DLQ
from core.kafka import DeliveryTracker, produce
from core.settings import Settings
from core.tables import dlq_replays

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ReplayStats:
    replayed: int = 0
    skipped: int = 0  # another reason, or a cut-down copy
    exhausted: int = 0  # dead-lettered max_attempts times: left on the DLQ
    already: int = 0  # re-published by an earlier replay: not published twice


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
    engine = make_engine(settings.database_url)
    # a group id is required by the client; nothing is ever committed under it
    consumer = Consumer(consumer_config(settings, f"{settings.consume.group_id}.dlq-replay", lambda _s: None))
    producer = Producer(settings.kafka.client_config() | {"enable.idempotence": True})
    stats, tracker = ReplayStats(), DeliveryTracker()
    try:
        watermarks = _watermarks(consumer)
        _retried(settings, lambda: _forget_deleted(engine, {p: low for p, (low, _) in watermarks.items()}))
        todo = _assign_whole_dlq(consumer, watermarks)
        last_progress = time.monotonic()
        while todo:
            batch = [
                m
                for m in consumer.consume(1000, timeout=0.5)
                if m.error() is None and m.offset() < todo.get(m.partition(), -1)
            ]
            if not batch:
                if time.monotonic() - last_progress > stall_s:
                    raise TimeoutError(f"DLQ replay stalled before the end offsets {todo}")
                continue
            last_progress = time.monotonic()
            _replay_batch(engine, settings, batch, reason_prefix, max_attempts, producer, tracker, stats)
            for m in batch:
                if m.offset() + 1 >= todo.get(m.partition(), 0):
                    todo.pop(m.partition(), None)
    finally:
        consumer.close()
        engine.dispose()
    log.info(
        "replayed %d, skipped %d, exhausted %d, already replayed %d",
        stats.replayed,
        stats.skipped,
        stats.exhausted,
        stats.already,
    )
    return stats


def _watermarks(consumer: Consumer) -> dict[int, tuple[int, int]]:
    """Every DLQ partition's (low, high) watermark offsets, captured now."""
    meta = consumer.list_topics(TOPIC_DLQ, timeout=10).topics[TOPIC_DLQ]
    if meta.error is not None:
        raise RuntimeError(f"cannot read {TOPIC_DLQ}: {meta.error}")
    return {
        p: consumer.get_watermark_offsets(TopicPartition(TOPIC_DLQ, p), timeout=10)
        for p in sorted(meta.partitions)
    }


def _assign_whole_dlq(consumer: Consumer, watermarks: dict[int, tuple[int, int]]) -> dict[int, int]:
    """Assign every non-empty DLQ partition from its first retained offset; returns
    partition -> end offset captured at the start."""
    todo = {p: high for p, (low, high) in watermarks.items() if low < high}
    consumer.assign([TopicPartition(TOPIC_DLQ, p, OFFSET_BEGINNING) for p in todo])
    return todo


def _forget_deleted(engine: Engine, lows: dict[int, int]) -> int:
    """Delete the records of messages below their partition's low watermark (``lows``:
    partition -> low watermark), which the broker deleted; returns how many went. One
    short transaction: a replay publishes nothing before it ends."""
    if not lows:
        return 0
    t = dlq_replays.c
    below = or_(*(and_(t.dlq_partition == p, t.dlq_offset < low) for p, low in lows.items()))
    with engine.begin() as conn:
        gone = conn.execute(delete(dlq_replays).where(below)).rowcount
    if gone:
        log.info("forgot %d replay records of DLQ messages the broker has deleted", gone)
    return gone


def _replay_batch(
    engine: Engine,
    settings: Settings,
    batch: Sequence[Message],
    prefix: str,
    max_attempts: int,
    producer: Producer,
    tracker: DeliveryTracker,
    stats: ReplayStats,
) -> None:
    """Re-publish the batch's matching messages, flush, then record them as replayed: a
    message is recorded only once its copy is safely on the source topic."""

    done = _retried(settings, lambda: _replayed_before(engine, batch))
    published = [m for m in batch if _replay_one(m, prefix, max_attempts, done, producer, tracker, stats)]
    tracker.flush(producer, 30, "replay stopped; the messages published so far may be published again")
    if published:
        _retried(settings, lambda: _record_replayed(engine, published))


def _retried(settings: Settings, fn: Callable[[], T]) -> T:
    """``fn`` (one transaction) retried while the database is down: an outage pauses the
    replay instead of failing it halfway."""
    return retry_on_outage(fn, max_backoff_s=settings.db_retry_max_s)


def _replay_one(
    m: Message,
    prefix: str,
    max_attempts: int,
    done: dict[tuple[int, int], str],
    producer: Producer,
    tracker: DeliveryTracker,
    stats: ReplayStats,
) -> bool:
    """Publish ``m`` back to its source topic if it is due; True when it was."""
    headers = m.headers()
    source = header(headers, SOURCE_TOPIC)
    if not (header(headers, ERROR) or "").startswith(prefix) or not source:
        stats.skipped += 1
    elif header(headers, TRUNCATED_FROM) is not None or header(headers, HEADERS_DROPPED) is not None:
        stats.skipped += 1  # a cut-down copy: replaying it would publish a corrupt event
    elif done.get((m.partition(), m.offset())) == fingerprint(m):
        stats.already += 1
    elif attempts(headers) >= max_attempts:
        stats.exhausted += 1
    else:
        produce(producer, source, on_delivery=tracker, **replay_copy(m))
        stats.replayed += 1
        return True
    return False


def fingerprint(m: Message) -> str:
    """A digest of everything a DLQ message carries, to tell it from another message that
    took its partition and offset on a re-created topic."""
    digest = hashlib.sha256()
    parts = [m.key(), m.value(), str(m.timestamp()).encode()]
    parts += [item for k, v in (m.headers() or []) for item in (k.encode(), v)]
    for part in parts:
        digest.update(b"-" if part is None else len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def _replayed_before(engine: Engine, batch: Sequence[Message]) -> dict[tuple[int, int], str]:
    """(partition, offset) -> fingerprint of the batch's messages an earlier replay published."""
    spans: dict[int, tuple[int, int]] = {}
    for m in batch:
        low, high = spans.get(m.partition(), (m.offset(), m.offset()))
        spans[m.partition()] = (min(low, m.offset()), max(high, m.offset()))
    t = dlq_replays.c
    where = or_(*(and_(t.dlq_partition == p, t.dlq_offset.between(lo, hi)) for p, (lo, hi) in spans.items()))
    with engine.connect() as conn:
        rows = conn.execute(select(t.dlq_partition, t.dlq_offset, t.fingerprint).where(where)).all()
    return {(r.dlq_partition, r.dlq_offset): r.fingerprint for r in rows}


def _record_replayed(engine: Engine, published: Sequence[Message]) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "dlq_partition": m.partition(),
            "dlq_offset": m.offset(),
            "fingerprint": fingerprint(m),
            "replayed_at": now,
        }
        for m in published
    ]
    with engine.begin() as conn:
        stmt = dialect_insert(conn, dlq_replays)
        stmt = stmt.on_conflict_do_update(
            index_elements=["dlq_partition", "dlq_offset"],
            set_={"fingerprint": stmt.excluded.fingerprint, "replayed_at": stmt.excluded.replayed_at},
        )
        conn.execute(stmt, rows)
