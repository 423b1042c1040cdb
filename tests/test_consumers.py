"""Kafka -> catalogue through the real broker, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import astuple
from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaException
from sqlalchemy import insert, select

from consumers import runner
from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core import metrics
from core.catalogue import count_rows
from core.db import make_engine
from core.events import TOPIC_DLQ, TOPIC_INTERACTIONS, TOPIC_ITEMS, content_hash
from core.parking import count_parked
from core.tables import alignment_jobs, dlq_replays, interactions, items
from tests.support.kafka_util import (
    click_event,
    committed_offsets,
    dlq_reasons,
    item_event,
    load_items,
    produce_json,
    produce_raw,
    read_topic,
)


def consume(settings, handler_cls, idle: float = 1.5):
    engine = make_engine(settings.database_url)
    return ConsumeLoop(handler_cls(settings), engine, settings).run(idle_exit=idle), engine


def test_items_then_interactions_are_stored_and_replay_is_harmless(settings):
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(i) for i in range(50)], "item_id")
    clicks = [click_event(e, e % 50) for e in range(300)]
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, clicks, "user_id")
    stats, engine = consume(settings, ItemsHandler)
    assert stats.stored == 50
    stats, _ = consume(settings, InteractionsHandler)
    assert (stats.stored, stats.dead_lettered) == (300, 0)
    # Replaying every event (a new group reads from the start) changes nothing.
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, clicks[:100], "user_id")
    settings = settings.override(group_id=settings.consume.group_id + "-replay")
    consume(settings, ItemsHandler)
    consume(settings, InteractionsHandler)
    with engine.connect() as conn:
        assert count_rows(conn, items) == 50
        assert count_rows(conn, interactions) == 300
        idx = sorted(conn.execute(select(items.c.idx)).scalars())
    assert idx == list(range(1, 51)), "dense, gap-free, append-only indexes"


def test_ids_with_copy_delimiters_and_escapes_are_stored_exactly(settings):
    """PostgreSQL takes interactions through COPY's text format: a tab, line break,
    backslash or COPY marker inside an id must arrive as sent, not split or end a row
    (seen failing with the escaping left out of a hand-built COPY block)."""
    odd = ["a\tb", "line\nbreak", "cr\rhere", "back\\slash", "\\.", "\\N", "é✓\u2028", "plain"]
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(1)], "item_id")
    consume(settings, ItemsHandler)
    at = "2026-01-01T00:00:01.123456+02:00"
    # each odd string a whole field (COPY reads a field of \N alone as NULL)
    clicks = [click_event(e, 1, user=o) | {"event_id": o, "event_time": at} for e, o in enumerate(odd)]
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, clicks, "user_id")
    stats, engine = consume(settings, InteractionsHandler)
    assert (stats.stored, stats.dead_lettered) == (len(odd), 0)
    with engine.connect() as conn:
        rows = conn.execute(
            select(interactions.c.event_id, interactions.c.user_id, interactions.c.event_time)
        )
        got = {r.event_id: (r.user_id, r.event_time.replace(tzinfo=r.event_time.tzinfo or UTC)) for r in rows}
    when = datetime.fromisoformat(at)
    assert got == {o: (o, when) for o in odd}


def test_changed_text_goes_back_to_pending_and_stale_events_are_ignored(settings):
    engine = make_engine(settings.database_url)
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(1), item_event(2)], "item_id")
    consume(settings, ItemsHandler)
    with engine.begin() as conn:
        conn.execute(items.update().values(status="aligned"))
        conn.execute(alignment_jobs.delete())
    newer = item_event(1, "Product number 1, now in blue", "2026-01-02T00:00:00Z")
    older = item_event(2, "An old title that arrived late", "2025-12-31T00:00:00Z")
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [newer, older], "item_id")
    consume(settings, ItemsHandler)
    with engine.connect() as conn:
        rows = {r.item_id: r for r in conn.execute(select(items))}
        jobs = conn.execute(select(alignment_jobs.c.item_idx)).scalars().all()
    assert rows["i1"].status == "pending" and rows["i1"].title.endswith("blue")
    assert rows["i2"].status == "aligned" and rows["i2"].title == "Product number 2"
    assert jobs == [rows["i1"].idx]


def test_bad_input_goes_to_dlq_with_reason_and_good_messages_are_kept(settings):
    big = "x" * 600
    bad_items = {
        b"{broken json": "malformed_json",
        json.dumps(item_event(90, title=None) | {"title": 12}).encode(): "wrong_type:title",
        json.dumps(
            {k: v for k, v in item_event(91).items() if k != "item_id"}
        ).encode(): "missing_field:item_id",
        json.dumps(item_event(92) | {"title": ""}).encode(): "empty_field:title",
        json.dumps(item_event(93) | {"title": big}).encode(): "too_long:title",
        b"\xc3\x28\xa0\xa1": "invalid_utf8",
    }
    bad_clicks = {
        json.dumps(click_event(900, 1) | {"type": "like"}).encode(): "unknown_enum:type",
        json.dumps(click_event(901, 1) | {"event_time": "9999-01-01T00:00:00Z"}).encode(): "future_time",
    }
    good_items = [item_event(i) for i in range(10)]
    raw_items = []
    for n, bad in enumerate(bad_items):  # interleave bad between good messages
        raw_items.append((b"k", json.dumps(good_items[n]).encode()))
        raw_items.append((b"k", bad))
    raw_items += [(b"k", json.dumps(g).encode()) for g in good_items[len(bad_items) :]]
    produce_raw(settings.kafka.bootstrap, TOPIC_ITEMS, raw_items)
    good_clicks = [click_event(e, e % 10) for e in range(20)]
    produce_raw(
        settings.kafka.bootstrap,
        TOPIC_INTERACTIONS,
        [(b"u", json.dumps(c).encode()) for c in good_clicks[:10]]
        + [(b"u", b) for b in bad_clicks]
        + [(b"u", json.dumps(c).encode()) for c in good_clicks[10:]],
    )
    before = metrics.MESSAGES.labels(TOPIC_ITEMS, "dlq")._value.get()
    item_stats, engine = consume(settings, ItemsHandler)
    click_stats, _ = consume(settings, InteractionsHandler)

    assert item_stats.dead_lettered == len(bad_items)
    assert metrics.MESSAGES.labels(TOPIC_ITEMS, "dlq")._value.get() - before == len(bad_items)
    assert click_stats.dead_lettered == len(bad_clicks)
    expected = bad_items | bad_clicks
    assert dlq_reasons(settings.kafka.bootstrap, len(expected)) == expected
    with engine.connect() as conn:
        assert count_rows(conn, items) == 10
        assert count_rows(conn, interactions) == 20


def test_an_interaction_before_its_item_is_parked_applied_or_dead_lettered_after_its_age(settings):
    from consumers.dlq_replay import replay_dlq

    engine = make_engine(settings.database_url)
    clicks = [click_event(1, 5), click_event(2, 6)]
    produce_raw(
        settings.kafka.bootstrap,
        TOPIC_INTERACTIONS,
        [(b"u1", json.dumps(c).encode()) for c in clicks],
        headers=[("trace", b"abc"), ("empty", None)],
    )
    stats, _ = consume(settings, InteractionsHandler)
    assert (stats.stored, stats.dead_lettered) == (2, 0), "parked, not dead-lettered"
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(5)], "item_id")
    consume(settings, ItemsHandler)
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 1, "item 5's arrival applied its parked click"
        assert count_parked(conn) == 1

    settings = settings.override(park_max_age_s=0.01)  # item 6 never comes: its click ages out to the DLQ
    stats, _ = consume(settings, InteractionsHandler, idle=0.5)
    assert stats.dead_lettered == 1
    (dead,) = read_topic(settings.kafka.bootstrap, TOPIC_DLQ, 1)
    headers = dict(dead.headers())
    assert (
        headers["said-error"] == b"unknown_item" and headers["trace"] == b"abc" and headers["empty"] is None
    )
    assert json.loads(dead.value())["item_id"] == "i6" and dead.key() == b"u1"
    with engine.connect() as conn:
        assert count_parked(conn) == 0

    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(6)], "item_id")
    consume(settings, ItemsHandler)
    assert replay_dlq(settings, "unknown_item").replayed == 1
    consume(settings, InteractionsHandler)
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 2


def test_dlq_replay_is_bounded_keeps_context_and_leaves_exhausted_messages(settings):
    from consumers.dlq_replay import replay_dlq

    def dead(reason: str, n: int, attempts: int, ts: int) -> tuple:
        headers = [("said-error", reason.encode()), ("said-source-topic", TOPIC_INTERACTIONS.encode())]
        headers += [("said-attempts", str(attempts).encode()), ("trace", None)]
        return (b"u", json.dumps(click_event(n, 1)).encode(), headers, ts)

    ts = 1_700_000_000_000
    produce_raw(
        settings.kafka.bootstrap,
        TOPIC_DLQ,
        [],
        records=[
            dead("unknown_item", 1, 1, ts),
            dead("malformed_json", 2, 1, ts),
            dead("unknown_item", 3, 5, ts),
        ],
    )
    with pytest.raises(ValueError, match="--reason"):
        replay_dlq(settings, "")
    keep_writing, written = threading.Event(), []

    def writer():  # consumers re-dead-lettering while the replay runs
        n = 100
        while not keep_writing.is_set():
            produce_raw(settings.kafka.bootstrap, TOPIC_DLQ, [], records=[dead("unknown_item", n, 1, ts)])
            written.append(f"e{n}")
            n += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    t0 = time.monotonic()
    stats = replay_dlq(settings, "unknown_item", max_attempts=5)
    keep_writing.set()
    thread.join()
    assert time.monotonic() - t0 < 30, "the replay ends at the offsets it started with"
    assert (stats.skipped, stats.exhausted, stats.already) == (1, 1, 0)
    published = read_topic(settings.kafka.bootstrap, TOPIC_INTERACTIONS, stats.replayed)
    ids = [json.loads(m.value())["event_id"] for m in published]
    # one partition (one key): the replay took e1 and the writer's first messages, in order
    assert ids == ["e1"] + written[: stats.replayed - 1]
    # the next replay takes exactly the rest, and nothing twice
    again = replay_dlq(settings, "unknown_item", max_attempts=5)
    assert astuple(again) == (len(written) + 1 - stats.replayed, 1, 1, stats.replayed)
    published = read_topic(settings.kafka.bootstrap, TOPIC_INTERACTIONS, len(written) + 1)
    assert sorted(json.loads(m.value())["event_id"] for m in published) == sorted(["e1", *written])
    (back,) = [m for m in published if b'"e1"' in m.value()]
    assert back.timestamp()[1] == ts and back.key() == b"u"
    assert dict(back.headers()) == {"said-attempts": b"1", "trace": None}, "said-error etc. dropped"


def test_replays_of_different_reasons_in_any_order_each_replay_their_own_once(settings):
    """Issue 23.1: one reason's replay must not strand another's, and replaying a reason
    again must not publish its messages twice."""
    from consumers.dlq_replay import replay_dlq

    engine = make_engine(settings.database_url)
    long_item = item_event(8, title="y" * 600)  # over max_text_chars (500): too_long:title
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [long_item], "item_id")
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, [click_event(1, 7)], "user_id")
    consume(settings, ItemsHandler)
    consume(settings, InteractionsHandler)  # parked: item 7 is late
    settings = settings.override(park_max_age_s=0.01)  # ... too late: its click ages out to the DLQ
    consume(settings, InteractionsHandler, idle=0.5)
    assert set(dlq_reasons(settings.kafka.bootstrap, 2).values()) == {"too_long:title", "unknown_item"}

    # both causes fixed: item 7 arrives, the text limit is raised
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(7)], "item_id")
    consume(settings, ItemsHandler)
    settings = settings.override(max_text_chars=1000)
    outcome = [
        (reason, astuple(replay_dlq(settings, reason)))
        for reason in ("unknown_item", "too_long", "too_long", "unknown_item")
    ]
    # (replayed, skipped: another reason, exhausted, already replayed by an earlier run)
    assert outcome == [
        ("unknown_item", (1, 1, 0, 0)),
        ("too_long", (1, 1, 0, 0)),
        ("too_long", (0, 1, 0, 1)),
        ("unknown_item", (0, 1, 0, 1)),
    ]
    item_stats, _ = consume(settings, ItemsHandler)
    click_stats, _ = consume(settings, InteractionsHandler)
    assert (item_stats.stored, item_stats.dead_lettered) == (1, 0)
    assert (click_stats.stored, click_stats.dead_lettered) == (1, 0)
    with engine.connect() as conn:
        assert sorted(conn.execute(select(items.c.item_id)).scalars()) == ["i7", "i8"]
        assert conn.execute(select(interactions.c.event_id)).scalars().all() == ["e1"]
        assert count_parked(conn) == 0
    assert len(read_topic(settings.kafka.bootstrap, TOPIC_ITEMS, 3)) == 3, "the long item once more"
    assert len(read_topic(settings.kafka.bootstrap, TOPIC_INTERACTIONS, 2)) == 2, "the click once more"
    assert len(read_topic(settings.kafka.bootstrap, TOPIC_DLQ, 2)) == 2, "nothing dead-lettered again"


def test_a_replay_forgets_the_records_of_dlq_messages_the_broker_deleted(settings):
    """Issue 23.10: ``dlq_replays`` must not grow forever. A record below its partition's
    low watermark (retention deleted the message) can never match a message again: each
    replay deletes those first, on every partition (an emptied one too); the rest stay.

    The embedded broker cannot delete records (Tansu 0.6.0 drops the connection on a
    DeleteRecords request), so every low watermark here is 0 and the records below it are
    made by hand; ``_forget_deleted`` then takes other watermarks directly."""
    from consumers.dlq_replay import _forget_deleted, replay_dlq

    def recorded() -> set[tuple[int, int]]:
        with engine.connect() as conn:
            return set(conn.execute(select(dlq_replays.c.dlq_partition, dlq_replays.c.dlq_offset)).all())

    def record(partition: int, offset: int) -> dict:
        return {
            "dlq_partition": partition,
            "dlq_offset": offset,
            "fingerprint": "f",
            "replayed_at": datetime.now(UTC),
        }

    engine = make_engine(settings.database_url)
    headers = [("said-error", b"unknown_item"), ("said-source-topic", TOPIC_INTERACTIONS.encode())]
    produce_raw(
        settings.kafka.bootstrap, TOPIC_DLQ, [(b"u", json.dumps(click_event(1, 7)).encode())], headers
    )
    assert replay_dlq(settings, "unknown_item").replayed == 1
    ((part, offset),) = recorded()
    assert offset == 0
    empty = (part + 1) % settings.kafka.topic_partitions  # low == high: nothing to read
    below = [record(part, -2), record(part, -1), record(empty, -1)]
    at_or_above = [record(part, 5), record(empty, 0), record(empty, 10**12)]
    with engine.begin() as conn:
        conn.execute(insert(dlq_replays), below + at_or_above)

    again = replay_dlq(settings, "unknown_item")
    assert (again.replayed, again.already) == (0, 1), "its own record stays: not published twice"
    assert recorded() == {(part, 0), (part, 5), (empty, 0), (empty, 10**12)}, "only those below 0 went"
    # any low watermark: below it goes, at it stays, a partition not named is left alone
    assert _forget_deleted(engine, {part: 5, empty: 0}) == 1
    assert recorded() == {(part, 5), (empty, 0), (empty, 10**12)}
    assert _forget_deleted(engine, {empty: 10**12 + 1}) == 2
    assert recorded() == {(part, 5)}
    engine.dispose()


def test_a_message_over_the_broker_default_goes_to_the_dlq_as_a_prefix(settings):
    big = json.dumps(item_event(1, title="x" * 1_000_000)).encode()
    assert len(big) > 1_000_000
    produce_raw(
        settings.kafka.bootstrap,
        TOPIC_ITEMS,
        [(b"big", big)] + [(b"k", json.dumps(item_event(i)).encode()) for i in range(2, 5)],
        max_bytes=2_000_000,
    )
    stats, engine = consume(settings, ItemsHandler)
    assert (stats.stored, stats.dead_lettered) == (3, 1)
    (dead,) = read_topic(settings.kafka.bootstrap, TOPIC_DLQ, 1)
    headers = dict(dead.headers())
    assert headers["said-error"] == b"too_large" and headers["said-truncated-from"] == str(len(big)).encode()
    assert big.startswith(dead.value()) and dead.key() == b"big"
    assert (
        settings.consume.max_message_bytes - 500 < len(dead.value()) < settings.consume.max_message_bytes
    ), "key and headers fit"
    with engine.connect() as conn:
        assert count_rows(conn, items) == 3


def test_consumers_started_before_db_upgrade_wait_for_the_schema_and_dead_letter_nothing(settings, caplog):
    """Issue 23.7: a missing schema is our own outage, not a poison message."""
    from alembic import command

    from said.migrate import alembic_config, upgrade

    command.downgrade(alembic_config(settings.database_url), "base")  # as before `said db upgrade`
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(i) for i in range(5)], "item_id")
    clicks = [click_event(e, e) for e in range(5)]
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, clicks, "user_id")
    engine = make_engine(settings.database_url)
    loops = [ConsumeLoop(h(settings), engine, settings) for h in (ItemsHandler, InteractionsHandler)]
    results: dict[str, object] = {}
    threads = [
        threading.Thread(target=lambda lp=lp: results.setdefault(lp.handler.name, lp.run(idle_exit=1.5)))
        for lp in loops
    ]
    with caplog.at_level("WARNING", logger="core.db"):
        for t in threads:
            t.start()
        time.sleep(8)  # long enough to join the group, fetch the messages and fail on them
        assert all(t.is_alive() for t in threads), "still waiting, not crashed or done"
        assert read_topic(settings.kafka.bootstrap, TOPIC_DLQ, 0, timeout=1) == []
        upgrade(settings.database_url)
        for t in threads:
            t.join(60)
    waited = [r.getMessage() for r in caplog.records if "said db upgrade" in r.getMessage()]
    assert waited, "the wait says what it waits for"
    item_stats, click_stats = results["items"], results["interactions"]
    assert (item_stats.stored, item_stats.dead_lettered) == (5, 0)
    assert (click_stats.stored, click_stats.dead_lettered) == (5, 0)
    assert read_topic(settings.kafka.bootstrap, TOPIC_DLQ, 0, timeout=1) == []
    with engine.connect() as conn:
        assert count_rows(conn, items) == 5 and count_rows(conn, interactions) == 5


class PoisonedItems(ItemsHandler):
    """The real handler, failing (as a bug would) on any batch that holds a poison key:
    ``parse-poison`` in validation, ``store-poison`` in the write."""

    def parse(self, messages):
        if any(m.key() == b"parse-poison" for m in messages):
            raise ValueError("a bug this message triggers in validation")
        return super().parse(messages)

    def store(self, engine, parsed):
        if any(m.key() == b"store-poison" for _, m in parsed.events):
            raise KeyError("a bug this message triggers in the write")
        return super().store(engine, parsed)


def test_a_batch_that_fails_is_bisected_to_its_poison_message(settings):
    good = [(b"k", json.dumps(item_event(i)).encode()) for i in range(20)]
    keys = [b"parse-poison", b"store-poison"]
    poison = {key: json.dumps(item_event(100 + n)).encode() for n, key in enumerate(keys)}
    bad = [(key, poison[key]) for key in keys]
    produce_raw(settings.kafka.bootstrap, TOPIC_ITEMS, good[:7] + bad[:1] + good[7:13] + bad[1:] + good[13:])
    stats, engine = consume(settings, PoisonedItems)
    assert (stats.stored, stats.dead_lettered) == (20, 2)
    assert dlq_reasons(settings.kafka.bootstrap, 2) == {
        poison[b"parse-poison"]: "processing_error:ValueError",
        poison[b"store-poison"]: "processing_error:KeyError",
    }
    again, _ = consume(settings, PoisonedItems)
    assert again.consumed == 0, "offsets committed: no crash loop on restart"
    with engine.connect() as conn:
        assert count_rows(conn, items) == 20


class Crash(BaseException):
    """What SIGKILL leaves: not an Exception, so no poison handling can absorb it."""


class CrashOnSecondWrite(InteractionsHandler):
    """The real handler; its second write commits, then the process 'dies' before that
    batch's offsets are committed."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.sizes: list[int] = []

    def store(self, engine, parsed):
        rejected = super().store(engine, parsed)
        self.sizes.append(len(parsed.events))
        if len(self.sizes) == 2:
            raise Crash
        return rejected


def test_offsets_are_committed_only_after_their_batch_and_a_replay_stores_each_event_once(settings):
    """A crash after a batch's write and before its offsets' commit (what SIGKILL can
    leave) commits nothing of it; the replay stores each event once and loses none."""
    settings = settings.override(consume_batch=10)
    load_items(settings, 5)
    produce_json(
        settings.kafka.bootstrap, TOPIC_INTERACTIONS, [click_event(e, e % 5) for e in range(60)], "user_id"
    )
    engine = make_engine(settings.database_url)
    handler = CrashOnSecondWrite(settings)
    with pytest.raises(Crash):
        ConsumeLoop(handler, engine, settings).run(idle_exit=1.5)
    group = f"{settings.consume.group_id}.interactions"
    committed = committed_offsets(settings, group, TOPIC_INTERACTIONS)
    assert sum(o for o in committed.values() if o > 0) == handler.sizes[0], "only the first batch"
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == sum(handler.sizes)
    stats, _ = consume(settings, InteractionsHandler)
    assert stats.consumed == 60 - handler.sizes[0], "the crashed batch and the rest are replayed"
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 60, "none lost (event_id is unique: none twice)"


def test_a_lone_new_item_is_stored_at_once_not_after_the_poll_wait(settings, monkeypatch):
    """One new ad on a quiet topic is stored as soon as it is fetched: the loop does not
    wait out its poll timeout hoping to fill a batch (which made every lone item and
    tombstone half a second late)."""
    monkeypatch.setattr(runner, "POLL_WAIT_S", 6.0)
    load_items(settings, 1)
    engine = make_engine(settings.database_url)
    loop = ConsumeLoop(ItemsHandler(settings), engine, settings)
    thread = threading.Thread(target=loop.run, kwargs={"idle_exit": 8.0})
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while _count_items(engine) < 1:  # joined the group and caught up
            assert time.monotonic() < deadline, "the loop never stored the first item"
            time.sleep(0.02)
        time.sleep(0.5)
        produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(7)], "item_id")
        sent = time.monotonic()
        while _count_items(engine) < 2:
            assert time.monotonic() - sent < 3.0, "the lone item waited for the poll timeout"
            time.sleep(0.02)
    finally:
        loop.stop()
        thread.join(30)


def _count_items(engine) -> int:
    with engine.connect() as conn:
        return count_rows(conn, items)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_same_item_events_in_any_order_give_the_same_row(settings, order):
    events = [item_event(1, "Title A"), item_event(1, "Title B"), item_event(1, "Title A")]
    events[1]["advertiser_id"] = "other"
    engine = make_engine(settings.database_url)
    for i in order:  # one batch per event: the stored row must decide, not the batch
        produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [events[i]], "item_id")
        consume(settings, ItemsHandler, idle=0.3)
    with engine.connect() as conn:
        row = conn.execute(select(items.c.title, items.c.advertiser_id)).one()
    assert tuple(row) == WINNER


WINNER = max(
    [("Title A", "adv"), ("Title B", "other")],
    key=lambda r: content_hash(r[0], None, r[1]),
)


class OverlapProbe(InteractionsHandler):
    """The real handler; each write waits (up to 2 s) for the validation of a later batch
    to begin, and records whether it did."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.parses = 0
        self.parsed = threading.Condition()
        self.overlapped: list[bool] = []

    def parse(self, messages):
        with self.parsed:
            self.parses += 1
            self.parsed.notify_all()
        return super().parse(messages)

    def store(self, engine, parsed):
        with self.parsed:
            seen = self.parses
            self.overlapped.append(self.parsed.wait_for(lambda: self.parses > seen, timeout=2))
        return super().store(engine, parsed)


def test_the_next_batch_is_validated_while_one_is_written_and_offsets_follow_the_writes(settings):
    """The loop validates batch N+1 while batch N's transaction runs (a serial loop would
    leave every write waiting out its 2 s); each batch is still stored once and its offsets
    committed after it, so a new run of the group finds nothing left."""
    settings = settings.override(consume_batch=10)
    load_items(settings, 5)
    produce_json(
        settings.kafka.bootstrap, TOPIC_INTERACTIONS, [click_event(e, e % 5) for e in range(60)], "user_id"
    )
    handler = OverlapProbe(settings)
    engine = make_engine(settings.database_url)
    stats = ConsumeLoop(handler, engine, settings).run(idle_exit=1.5)
    assert any(handler.overlapped), f"no write overlapped a validation: {handler.overlapped}"
    assert (stats.consumed, stats.stored, stats.batches) == (60, 60, len(handler.overlapped))
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 60
    again, _ = consume(settings, InteractionsHandler)
    assert again.consumed == 0, "every batch's offsets committed"


class DeadLetterDown(ConsumeLoop):
    """The production loop, whose DLQ flush fails once (as an unreachable broker's would):
    when it ends a batch while the next one is already with the writer."""

    failed_at: int | None = None  # messages ended (offsets committed) before the failure

    def _dead_letter(self, rejected, *failed) -> None:
        if self.failed_at is None and self._in_flight is not None:
            self.failed_at = self.stats.consumed
            raise KafkaException("the DLQ flush failed")
        super()._dead_letter(rejected, *failed)


def test_a_batch_whose_dlq_flush_failed_leaves_no_offset_committed_behind_it(settings):
    """A batch that failed its DLQ flush ends the loop with its offsets uncommitted, and
    the next batch's too, which was already stored: that commit would cover the failed
    batch's offsets. The replay then stores each event once."""
    settings = settings.override(consume_batch=10)
    load_items(settings, 5)
    produce_json(
        settings.kafka.bootstrap, TOPIC_INTERACTIONS, [click_event(e, e % 5) for e in range(60)], "user_id"
    )
    engine = make_engine(settings.database_url)
    loop = DeadLetterDown(InteractionsHandler(settings), engine, settings)
    with pytest.raises(KafkaException, match="DLQ flush failed"):
        loop.run(idle_exit=1.5)
    group = f"{settings.consume.group_id}.interactions"
    committed = sum(o for o in committed_offsets(settings, group, TOPIC_INTERACTIONS).values() if o > 0)
    assert committed == loop.failed_at, "only the batches ended before the failure"
    with engine.connect() as conn:
        assert count_rows(conn, interactions) > committed, "the failed batch and the next were stored"
    stats, _ = consume(settings, InteractionsHandler)
    assert stats.consumed == 60 - committed, "the rest replayed"
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 60
