"""A history checker for the consumers, in the spirit of Jepsen's Elle.

Hypothesis generates item and interaction events (items with several versions, equal
times included; interactions of items that arrive late or never; invalid messages), and
delivers them through the real broker shuffled, duplicated and partly replayed, while the
consumers crash at chosen batches: after the catalogue committed and before the offsets
did, the window a SIGKILL leaves. At the end the catalogue and the DLQ are checked
against a model of what must have happened:
- every valid interaction is stored exactly once, or is in the DLQ with a reason;
- every item's row is the version with the greatest (event_time, content tie-break);
- every invalid message is in the DLQ with its reason;
- nothing is left parked past its age.
It runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.db import make_engine
from core.events import TOPIC_DLQ, TOPIC_INTERACTIONS, TOPIC_ITEMS, content_hash
from core.parking import count_parked
from core.settings import KafkaSettings, Settings
from core.tables import interactions, items
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.migrate import upgrade
from tests.support.kafka_util import produce_raw, read_topic

IDLE = 1.0  # seconds without a message that end a consume run
TIMES = ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-02T00:00:00+00:00"]
ITEM_IDS = [f"i{n}" for n in range(6)]
GHOSTS = ["ghost1", "ghost2"]  # items that never arrive
INVALID = {
    b"{not json": "malformed_json",
    json.dumps(
        {"item_id": "i0", "title": "Far", "event_time": "9999-01-01T00:00:00Z"}
    ).encode(): "future_time",
}


class Killed(BaseException):
    """A crash between the catalogue's commit and the offsets' commit (what SIGKILL leaves):
    a BaseException, so the consume loop's poison-message handling cannot absorb it."""


class CrashAfter:
    """Wraps a handler: the ``n``-th batch is written to the catalogue, then the process
    'dies' before its offsets are committed."""

    def __init__(self, handler, n: int | None) -> None:
        self.inner, self.n, self.calls = handler, n, 0
        self.topic, self.name = handler.topic, handler.name

    def process(self, engine, messages):
        rejected = self.inner.process(engine, messages)
        self.calls += 1
        if self.calls == self.n:
            raise Killed
        return rejected

    def sweep(self, engine, dead_letter, limit):
        return self.inner.sweep(engine, dead_letter, limit)


item_versions = st.fixed_dictionaries(
    {
        "item_id": st.sampled_from(ITEM_IDS),
        "title": st.sampled_from(["Title A", "Title B", "Title C"]),
        "advertiser_id": st.sampled_from(["x", "y"]),
        "event_time": st.sampled_from(TIMES),
    }
)
clicks = st.lists(st.sampled_from(ITEM_IDS + GHOSTS), min_size=1, max_size=25)


@st.composite
def histories(draw) -> dict:
    versions = draw(st.lists(item_versions, min_size=1, max_size=14))
    item_msgs = [json.dumps(v | {"description": None}).encode() for v in versions]
    item_msgs += draw(st.lists(st.sampled_from(list(INVALID)), max_size=2))
    click_msgs = [
        json.dumps(
            {"event_id": f"e{n}", "user_id": f"u{n % 3}", "item_id": item, "type": "click"}
            | {"event_time": "2026-01-03T00:00:00Z"}
        ).encode()
        for n, item in enumerate(draw(clicks))
    ]
    return {
        "versions": versions,
        "items": draw(st.permutations(item_msgs)),
        "clicks": draw(st.permutations(click_msgs)),
        "dup_items": draw(st.lists(st.sampled_from(item_msgs), max_size=4)),
        "dup_clicks": draw(st.lists(st.sampled_from(click_msgs), max_size=6)),
        "crash_items": draw(st.none() | st.integers(1, 4)),
        "crash_clicks": draw(st.none() | st.integers(1, 6)),
        "interleave": draw(st.booleans()),  # interactions delivered before the items
        "replay": draw(st.booleans()),  # a new consumer group re-reads everything
    }


def _consume(handler, engine, s: Settings) -> None:
    """Run a loop to idleness, restarting it after each crash (as a supervisor would)."""
    while True:
        try:
            ConsumeLoop(handler, engine, s).run(idle_exit=IDLE)
            return
        except Killed:
            handler.n = None  # the restarted process does not crash again


def _deliver(h: dict, s: Settings, engine) -> None:
    """Produce everything (in the drawn order), then run both consumers at once, each
    restarted after its crash; then maybe a replay by a new group; then the age sweep."""
    topics = [TOPIC_INTERACTIONS, TOPIC_ITEMS] if h["interleave"] else [TOPIC_ITEMS, TOPIC_INTERACTIONS]
    msgs = {TOPIC_ITEMS: h["items"] + h["dup_items"], TOPIC_INTERACTIONS: h["clicks"] + h["dup_clicks"]}
    crash = {TOPIC_ITEMS: h["crash_items"], TOPIC_INTERACTIONS: h["crash_clicks"]}
    kinds = {TOPIC_ITEMS: ItemsHandler, TOPIC_INTERACTIONS: InteractionsHandler}
    for topic in topics:
        produce_raw(s.kafka.bootstrap, topic, [(b"k", m) for m in msgs[topic]])
    runs = [(s, crash)]
    if h["replay"]:
        runs.append((s.override(group_id=s.consume.group_id + "-replay"), {}))
    for run_settings, crashes in runs:
        threads = [
            threading.Thread(
                target=_consume,
                args=(CrashAfter(kinds[t](run_settings), crashes.get(t)), engine, run_settings),
            )
            for t in topics
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # every interaction still parked ages out: a sweep dead-letters it
    aged = s.override(park_max_age_s=1e-6)
    loop = ConsumeLoop(InteractionsHandler(aged), engine, aged)
    loop.sweep()
    loop.consumer.close()


def _check(h: dict, engine, bootstrap: str) -> None:
    expected_rows = {}
    for v in h["versions"]:
        key = (v["event_time"].replace("+00:00", "Z"), content_hash(v["title"], None, v["advertiser_id"]))
        if v["item_id"] not in expected_rows or key > expected_rows[v["item_id"]][0]:
            expected_rows[v["item_id"]] = (key, (v["title"], v["advertiser_id"]))
    with engine.connect() as conn:
        rows = {r.item_id: (r.title, r.advertiser_id) for r in conn.execute(select(items))}
        stored = conn.execute(select(interactions.c.event_id, items.c.item_id).join(items)).all()
        parked = count_parked(conn)
    assert rows == {i: row for i, (_, row) in expected_rows.items()}, "each item: the greatest version"

    clicks = {json.loads(m)["event_id"]: json.loads(m)["item_id"] for m in h["clicks"]}
    ghosts = {e for e, item in clicks.items() if item not in rows}
    invalid = [m for m in h["items"] if m in INVALID]
    dlq = read_topic(bootstrap, TOPIC_DLQ, len(ghosts) + len(invalid), timeout=10)
    dead = {}
    for m in dlq:
        reason = dict(m.headers())["said-error"].decode()
        event = json.loads(m.value()).get("event_id") if reason == "unknown_item" else m.value()
        dead.setdefault(event, set()).add(reason)
    stored_ids = [e for e, _ in stored]
    assert len(stored_ids) == len(set(stored_ids)), "no interaction stored twice"
    assert dict(stored) == {e: item for e, item in clicks.items() if e not in ghosts}, "each known click once"
    for e in ghosts:
        assert dead.get(e) == {"unknown_item"}, f"{e}: a click of an item that never came is dead-lettered"
    for m in invalid:
        assert dead.get(m) == {INVALID[m]}, f"{m[:20]!r}: an invalid message is dead-lettered with its reason"
    assert parked == 0, "nothing is left parked past its age"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@settings(max_examples=7, deadline=None, suppress_health_check=list(HealthCheck))
@given(h=histories())
def test_any_delivery_order_with_crashes_ends_in_the_model_state(backend, h, request, tmp_path_factory):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('history')}/said.db"
    else:
        url = request.getfixturevalue("pg").create_database()
    upgrade(url)
    with EmbeddedBroker(free_port()) as broker:
        ensure_topics(KafkaSettings(bootstrap=broker.bootstrap))
        s = Settings(
            database_url=url,
            kafka_bootstrap=broker.bootstrap,
            group_id=f"h{uuid.uuid4().hex[:8]}",
            session_timeout_ms=1000,
            consume_batch=3,
            db_retry_max_s=1.0,
        )
        engine = make_engine(url)
        _deliver(h, s, engine)
        _check(h, engine, broker.bootstrap)
        engine.dispose()
