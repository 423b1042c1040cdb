"""Kafka -> catalogue through the real broker, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from sqlalchemy import select

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core import metrics
from core.catalogue import count_rows
from core.db import make_engine
from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from core.tables import alignment_jobs, interactions, items
from tests.support.kafka_util import click_event, dlq_reasons, item_event, produce_json, produce_raw


def consume(settings, handler_cls, idle: float = 1.5):
    engine = make_engine(settings.database_url)
    return ConsumeLoop(handler_cls(settings), engine, settings).run(idle_exit=idle), engine


def test_items_then_interactions_are_stored_and_replay_is_harmless(settings):
    produce_json(settings.kafka_bootstrap, TOPIC_ITEMS, [item_event(i) for i in range(50)], "item_id")
    clicks = [click_event(e, e % 50) for e in range(300)]
    produce_json(settings.kafka_bootstrap, TOPIC_INTERACTIONS, clicks, "user_id")
    stats, engine = consume(settings, ItemsHandler)
    assert stats.stored == 50
    stats, _ = consume(settings, InteractionsHandler)
    assert (stats.stored, stats.dead_lettered) == (300, 0)
    # Replaying every event (a new group reads from the start) changes nothing.
    produce_json(settings.kafka_bootstrap, TOPIC_INTERACTIONS, clicks[:100], "user_id")
    settings.group_id += "-replay"
    consume(settings, ItemsHandler)
    consume(settings, InteractionsHandler)
    with engine.connect() as conn:
        assert count_rows(conn, items) == 50
        assert count_rows(conn, interactions) == 300
        idx = sorted(conn.execute(select(items.c.idx)).scalars())
    assert idx == list(range(1, 51)), "dense, gap-free, append-only indexes"


def test_changed_text_goes_back_to_pending_and_stale_events_are_ignored(settings):
    engine = make_engine(settings.database_url)
    produce_json(settings.kafka_bootstrap, TOPIC_ITEMS, [item_event(1), item_event(2)], "item_id")
    consume(settings, ItemsHandler)
    with engine.begin() as conn:
        conn.execute(items.update().values(status="aligned"))
        conn.execute(alignment_jobs.delete())
    newer = item_event(1, "Product number 1, now in blue", "2026-01-02T00:00:00Z")
    older = item_event(2, "An old title that arrived late", "2025-12-31T00:00:00Z")
    produce_json(settings.kafka_bootstrap, TOPIC_ITEMS, [newer, older], "item_id")
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
        json.dumps(click_event(901, 777)).encode(): "unknown_item",
    }
    good_items = [item_event(i) for i in range(10)]
    raw_items = []
    for n, bad in enumerate(bad_items):  # interleave bad between good messages
        raw_items.append((b"k", json.dumps(good_items[n]).encode()))
        raw_items.append((b"k", bad))
    raw_items += [(b"k", json.dumps(g).encode()) for g in good_items[len(bad_items) :]]
    produce_raw(settings.kafka_bootstrap, TOPIC_ITEMS, raw_items)
    good_clicks = [click_event(e, e % 10) for e in range(20)]
    produce_raw(
        settings.kafka_bootstrap,
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
    assert dlq_reasons(settings.kafka_bootstrap, len(expected)) == expected
    with engine.connect() as conn:
        assert count_rows(conn, items) == 10
        assert count_rows(conn, interactions) == 20


def test_dlq_replay_recovers_an_interaction_that_arrived_before_its_item(settings):
    from consumers.dlq_replay import replay_dlq

    produce_json(
        settings.kafka_bootstrap, TOPIC_INTERACTIONS, [click_event(1, 5), click_event(2, 6)], "user_id"
    )
    produce_raw(settings.kafka_bootstrap, TOPIC_ITEMS, [(b"k", b"{bad")])
    stats, engine = consume(settings, InteractionsHandler)
    assert stats.dead_lettered == 2
    consume(settings, ItemsHandler)  # the bad item goes to the DLQ too
    produce_json(settings.kafka_bootstrap, TOPIC_ITEMS, [item_event(5)], "item_id")
    consume(settings, ItemsHandler)
    replayed = replay_dlq(settings, "unknown_item", idle_exit=1.5)
    assert (replayed.replayed, replayed.skipped) == (2, 1)
    stats, _ = consume(settings, InteractionsHandler)
    assert (stats.stored, stats.dead_lettered) == (1, 1), "item 6 is still unknown"
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 1
