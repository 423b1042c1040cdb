"""The at-least-once consume loop shared by every topic consumer.

Per batch, in the quix-streams checkpoint order:
  1. validate the batch (no I/O), then write it to the catalogue in one transaction
     (retried while the database is down or its schema is missing: a consumer started
     before ``said db upgrade`` waits for it, it does not dead-letter everything); a batch
     that fails for any other reason, in either step, is split in halves until the message
     that breaks it (a poison pill) is alone, and that one is dead-lettered with the reason
     ``processing_error:<exception>``, so no message can crash-loop a partition;
  2. produce rejected messages to ``said.dlq`` and flush the producer, failing on any
     undelivered message;
  3. commit the batch's offsets synchronously.

A crash anywhere before 3 replays the batch, which the idempotent writes make harmless.

The writes run on a writer thread, one batch at a time, while the loop polls and validates
the next batch and then takes steps 2 and 3 of the one before: the database's work and the
consumer's own (fetching, JSON, validation, the broker's round trips) overlap instead of
waiting on each other. Each batch still takes steps 1, 2 and 3 in that order, and offsets
are committed in batch order. Batch N+1 is written before batch N's offsets are committed,
which at-least-once allows: a crash replays every batch whose offsets were not committed,
and the idempotent writes absorb what had been stored. A loop that stops on an error drops
the batch in flight uncommitted (``run``'s ``finally``), so no later commit covers a batch
whose DLQ copies were not flushed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from sqlalchemy.engine import Engine

from consumers.dead_letter import dlq_copy
from core import metrics
from core.db import retry_on_outage, should_wait
from core.events import TOPIC_DLQ, Invalid
from core.kafka import DeliveryTracker, produce
from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
JOIN_WAIT_S = 60.0  # an idle-exit loop with no partition after this long gives up
SWEEP_PAGE = 500  # expired messages claimed and dead-lettered at a time
POLL_WAIT_S = 0.5  # an idle loop blocks this long for a first message, then looks again


@dataclass(frozen=True, slots=True)
class Rejected:
    message: Message  # or a ``consumers.dead_letter.StoredMessage``
    reason: str
    parked_id: str | None = None  # the parked interaction it comes from, if any


@dataclass(frozen=True)
class Claim:
    """Stored messages a handler decided to dead-letter (committed), to be produced and
    flushed, then released; ``at`` tells this claim from a later reclaim of the same rows."""

    rejected: list[Rejected]
    at: datetime | None = None


@dataclass
class Parsed:
    """A validated batch: each valid message's event, with its message, and the messages
    validation refused. Split in halves to isolate a poison message."""

    events: list[tuple[Any, Message]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @classmethod
    def of(cls, messages: Sequence[Message], parse_one: Callable[[Message], Any]) -> Parsed:
        """Each message through ``parse_one``; one it refuses (``Invalid``) keeps its reason."""
        parsed = cls()
        for m in messages:
            try:
                parsed.events.append((parse_one(m), m))
            except Invalid as exc:
                parsed.rejected.append(Rejected(m, exc.reason))
        return parsed

    def __add__(self, other: Parsed) -> Parsed:
        return Parsed(self.events + other.events, self.rejected + other.rejected)

    def halves(self) -> tuple[Parsed, Parsed]:
        """The events in two halves, for the writer (validation's refusals stay decided)."""
        half = len(self.events) // 2
        return Parsed(self.events[:half]), Parsed(self.events[half:])


class Handler(Protocol):
    """Validates and stores one batch of a topic; one transaction, idempotent."""

    topic: str
    name: str

    def parse(self, messages: Sequence[Message]) -> Parsed:
        """Validate, with no I/O: it runs while the batch before is being written."""
        ...

    def store(self, engine: Engine, parsed: Parsed) -> list[Rejected]:
        """Write the valid events in one transaction; returns what the catalogue refused."""
        ...

    def claim_expired(self, engine: Engine, limit: int, flushed: Claim | None = None) -> Claim:
        """Up to ``limit`` stored messages that waited too long, decided dead (one
        transaction, committed) for the loop to dead-letter; ``flushed`` (an earlier claim
        whose copies are flushed) is released in the same transaction."""
        ...

    def release(self, engine: Engine, claim: Claim) -> None:
        """Forget a claim whose DLQ copies are flushed (one transaction; repeatable)."""
        ...


@dataclass(frozen=True)
class InFlight:
    """A batch handed to the writer: its messages, validation's refusals, the write."""

    messages: list[Message]
    rejected: list[Rejected]
    written: Future[list[Rejected]]
    started: float  # perf_counter when the writer got it, for the batch-time metric


@dataclass
class RunStats:
    consumed: int = 0
    stored: int = 0
    dead_lettered: int = 0
    batches: int = 0
    commit_failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def consumer_config(settings: Settings, group: str, stats_cb: Callable[[str], None]) -> dict:
    return settings.kafka.client_config() | {
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": settings.consume.session_timeout_ms,
        "heartbeat.interval.ms": max(100, settings.consume.session_timeout_ms // 5),
        "max.poll.interval.ms": max(300_000, settings.consume.session_timeout_ms + 1),
        "statistics.interval.ms": 5000,
        "stats_cb": stats_cb,
    }


def _record_lag(stats_json: str) -> None:
    """Consumer lag from librdkafka statistics: the watermarks it cached from fetches."""
    stats = json.loads(stats_json)
    for topic, tstats in stats.get("topics", {}).items():
        for part, pstats in tstats.get("partitions", {}).items():
            lag = pstats.get("consumer_lag", -1)
            if part != "-1" and lag >= 0:
                metrics.CONSUMER_LAG.labels(topic, part).set(lag)


def next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """Offsets to commit: one past the highest processed offset of each partition."""
    top: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        top[key] = max(top.get(key, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in top.items()]


class ConsumeLoop:
    """Drives one :class:`Handler` until stopped or idle; see the module docstring."""

    def __init__(self, handler: Handler, engine: Engine, settings: Settings) -> None:
        if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
            # each thread would get its own empty database: the writer's, and the sweep's
            raise ValueError(
                "the consume loop writes from a thread of its own: use a SQLite file, not :memory:"
            )
        self.handler = handler
        self.engine = engine
        self.settings = settings
        self.stats = RunStats()
        self.stopping = False
        self.assigned: set[tuple[str, int]] = set()  # owned partitions, from the callbacks
        self._in_flight: InFlight | None = None  # the batch the writer has, not yet committed
        group = f"{settings.consume.group_id}.{handler.name}"
        self.consumer = Consumer(consumer_config(settings, group, _record_lag))
        self.producer = Producer(
            settings.kafka.client_config() | {"enable.idempotence": True, "linger.ms": 5}
        )

    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit (signal-handler safe)."""
        self.stopping = True

    def run(self, idle_exit: float | None = None) -> RunStats:
        """Consume until :meth:`stop` or ``idle_exit`` seconds without work.

        Idleness counts only while partitions are assigned (a slow group join under load is
        not an empty topic); a loop never assigned any gives up after ``JOIN_WAIT_S``. A
        sweep cut short by its budget is work too: a loop holding partitions does not exit
        on an idle topic while expired parked clicks wait for it (they would sit there
        until the next run), nor wait on its poll between their pages."""
        self.consumer.subscribe(
            [self.handler.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._idle_since = time.monotonic()  # reset by every (re)assignment
        started = time.monotonic()
        next_sweep, drained = 0.0, True
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"said-{self.handler.name}-writer")
        try:
            while not self.stopping:
                if time.monotonic() >= next_sweep:
                    self._finish()  # a sweep starts from a settled catalogue
                    drained = self.sweep()  # if not, sweep again right after one poll
                    next_sweep = time.monotonic() + (self.settings.consume.park_sweep_s if drained else 0)
                    if not drained:
                        self._idle_since = time.monotonic()
                    if self.stopping:
                        break
                # a batch in flight is work: look for the next one, but do not wait for it
                waits = drained and self._in_flight is None
                messages = self._poll(POLL_WAIT_S if waits else 0.0)
                if messages:
                    self._submit(messages)
                    self._idle_since = time.monotonic()
                elif self._in_flight is not None:
                    self._finish()  # nothing more fetched: end the batch in flight now
                elif idle_exit is not None and self._idle(idle_exit, started):
                    break
            self._finish()
        finally:
            self.stopping = True  # a write still waiting out an outage gives up: it replays
            self._writer.shutdown(wait=True)
            # a batch not ended above is replayed: close() revokes the partitions, and the
            # revocation must not commit offsets past a batch that failed its DLQ flush
            self._in_flight = None
            self.consumer.close()  # leaves the group at once; offsets are already committed
            self.producer.flush(10)
        return self.stats

    def _idle(self, idle_exit: float, started: float) -> bool:
        now = time.monotonic()
        if self.assigned and now - self._idle_since > idle_exit:
            log.info("idle for %.1fs, exiting", idle_exit)
            return True
        if not self.assigned and now - started > JOIN_WAIT_S + idle_exit:
            log.warning("no partition assigned in %.0fs, exiting", JOIN_WAIT_S)
            return True
        return False

    def _poll(self, wait: float) -> list[Message]:
        """Wait up to ``wait`` s for one message, then take what is already fetched, up to a
        batch. A loop with an unfinished sweep does not wait: its backlog is work.

        ``consume(n, timeout)`` alone returns only once n messages arrived or the timeout
        passed with none arriving (confluent-kafka-python#407), so a lone new ad or
        tombstone sat in the client for the whole timeout before it was stored. Under load
        the client's prefetched queue still fills whole batches."""
        batch = self.settings.consume.batch
        fetched = self.consumer.consume(1, timeout=wait)
        if fetched and batch > 1:
            fetched += self.consumer.consume(batch - 1, timeout=0)
        good = []
        for m in fetched:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
        return good

    def _submit(self, messages: list[Message]) -> None:
        """Validate ``messages`` while the batch in flight is written; once that write is
        done, hand this batch to the writer, then end the other (its DLQ copies and
        offsets) while this one is written."""
        parsed = self._parse(messages)
        before, self._in_flight = self._in_flight, None
        refused = before.written.result() if before is not None else []  # the writer's error, if any
        written = self._writer.submit(self._store, parsed)
        self._in_flight = InFlight(messages, parsed.rejected, written, time.perf_counter())
        if before is not None:
            self._end(before, refused)

    def _finish(self) -> None:
        """End the batch in flight, if any: wait for its transaction, then :meth:`_end` it."""
        batch, self._in_flight = self._in_flight, None
        if batch is not None:
            self._end(batch, batch.written.result())  # re-raises the writer's error

    def _end(self, batch: InFlight, refused: list[Rejected]) -> None:
        """A batch whose transaction committed: dead-letter what validation and the
        catalogue refused, then commit its offsets (module docstring, steps 2 and 3)."""
        rejected = batch.rejected + refused
        self._dead_letter(rejected)
        self._audit(batch.messages)
        try:
            self.consumer.commit(offsets=next_offsets(batch.messages), asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance took the partitions: the new owner replays the
            # batch, which the idempotent writes absorb. Nothing is lost.
            self.stats.commit_failures += 1
            log.warning("offset commit failed, batch will be replayed: %s", exc)
        self._idle_since = time.monotonic()  # a long write is work: idleness counts from its end
        topic = self.handler.topic
        metrics.BATCH_SECONDS.labels(topic).observe(time.perf_counter() - batch.started)
        stored = len(batch.messages) - len(rejected)
        self.stats.consumed += len(batch.messages)
        self.stats.stored += stored
        self.stats.dead_lettered += len(rejected)
        self.stats.batches += 1
        metrics.MESSAGES.labels(topic, "stored").inc(stored)
        metrics.MESSAGES.labels(topic, "dlq").inc(len(rejected))

    def _audit(self, messages: list[Message]) -> None:
        """With ``consumer_audit_log`` set: one line per processed message, written after
        its batch is stored and before its offsets are committed, so the log counts every
        delivery, re-deliveries after a crash included."""
        if self.settings.consume.audit_log is None:
            return
        with open(self.settings.consume.audit_log, "a") as f:
            f.writelines(f"{m.topic()} {m.partition()} {m.offset()}\n" for m in messages)

    def _with_retries(self, fn: Callable[[], T]) -> T:
        """``fn`` (one transaction) retried while the database is down."""
        return retry_on_outage(
            fn,
            max_backoff_s=self.settings.db_retry_max_s,
            should_stop=lambda: self.stopping,
            on_retry=lambda _e: metrics.DB_RETRIES.inc(),
        )

    def sweep(self) -> bool:
        """Dead-letter what the handler kept too long (parked interactions), a page at a
        time, until none is left (True) or ``park_sweep_budget_s`` is spent. Each page is
        moved to an outbox before its DLQ flush and removed from it after (``core.parking``):
        a crash in between dead-letters it twice, never zero times, and never lets its item
        store it as well. A flushed page is released in the next page's claim transaction
        (one transaction a page, as a single-transaction sweep would take), the last one on
        its own. Each transaction has its own retry: an outage never re-claims a page."""
        deadline = time.monotonic() + self.settings.consume.park_sweep_budget_s
        flushed: Claim | None = None
        try:
            while not self.stopping:
                claim = self._with_retries(
                    lambda f=flushed: self.handler.claim_expired(self.engine, SWEEP_PAGE, f)
                )
                flushed = None
                if claim.rejected:
                    self._dead_letter(claim.rejected, "the page stays in the outbox, shipped again later")
                    flushed = claim
                n = len(claim.rejected)
                self.stats.dead_lettered += n
                if n < SWEEP_PAGE:
                    return True
                if time.monotonic() >= deadline:
                    return False
            return False
        finally:
            if flushed is not None:
                self._with_retries(lambda: self.handler.release(self.engine, flushed))

    def _parse(self, messages: list[Message]) -> Parsed:
        """Validate ``messages``; a bug that breaks validation is bisected to its message,
        which is rejected, as :meth:`_store` does for the write."""
        try:
            return self.handler.parse(messages)
        except Exception as exc:
            if len(messages) == 1:
                return Parsed(rejected=[self._poison(messages[0], exc)])
            half = len(messages) // 2
            return self._parse(messages[:half]) + self._parse(messages[half:])

    def _store(self, parsed: Parsed) -> list[Rejected]:
        """Store ``parsed`` (one transaction, retried through outages; on the writer
        thread); if that fails for another reason, bisect until the poison message is
        isolated, and reject it."""
        if not parsed.events:
            return []
        try:
            return self._with_retries(lambda: self.handler.store(self.engine, parsed))
        except Exception as exc:
            if should_wait(exc):  # a stop requested while waiting: replay after restart
                raise
            if len(parsed.events) == 1:
                return [self._poison(parsed.events[0][1], exc)]
            first, second = parsed.halves()
            return self._store(first) + self._store(second)

    @staticmethod
    def _poison(m: Message, exc: Exception) -> Rejected:
        log.error("poison message %s[%d]@%d isolated", m.topic(), m.partition(), m.offset(), exc_info=exc)
        return Rejected(m, f"processing_error:{type(exc).__name__}")

    def _dead_letter(
        self, rejected: list[Rejected], failed: str = "DLQ offsets not committed, the batch will be replayed"
    ) -> None:
        tracker = DeliveryTracker()
        for r in rejected:
            m = r.message
            copy = dlq_copy(m, r.reason, self.settings.consume.max_message_bytes)
            produce(self.producer, TOPIC_DLQ, on_delivery=tracker, **copy)
            self.stats.reasons[r.reason] = self.stats.reasons.get(r.reason, 0) + 1
            metrics.DEAD_LETTERS.labels(m.topic(), r.reason).inc()
            log.info("dead-lettered %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), r.reason)
        tracker.flush(self.producer, 30, failed)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._idle_since = time.monotonic()
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("assigned %s", [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The batch in flight is ended (stored, dead-lettered, committed) before the
        # partitions go, so their new owner does not replay it; every batch before it is
        # already committed (see module docstring).
        self._finish()
        self.assigned -= {(p.topic, p.partition) for p in partitions}

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Offsets of finished batches were committed synchronously; an in-flight batch's
        # commit will fail and be replayed by the new owner.
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        log.warning("partitions lost: %s", [(p.topic, p.partition) for p in partitions])
