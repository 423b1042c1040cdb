"""Property-based fuzzing of the consumers: arbitrary bytes, deep or huge JSON, wrong types
and extreme unicode. Every message ends in exactly one place (catalogue or DLQ), the
accounting adds up (consumed = stored + dead-lettered) and the consumer never crashes.

The validators are fuzzed directly (thousands of cases, fast); whole batches then go through
the real broker and a real SQLite catalogue per example (PostgreSQL runs the same code in
tests/test_consumers.py and the fault suite)."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.catalogue import count_rows
from core.db import make_engine
from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS, Invalid, parse_interaction, parse_item
from core.settings import Settings
from core.tables import interactions, items
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.migrate import upgrade
from tests.support.kafka_util import produce_raw, read_topic

MAX_BYTES = 64_000
LATEST = datetime(2100, 1, 1, tzinfo=UTC)  # no fuzzed time is rejected as future_time
# all of unicode, lone surrogates (which JSON escapes can carry) included
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | ANY_TEXT
    | st.integers(min_value=10**300, max_value=10**320)
)
JSON = st.recursive(
    JSON_LEAF,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(ANY_TEXT, kids, max_size=4),
    max_leaves=30,
)
TIMES = st.sampled_from(
    [
        "2026-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "2026-13-01T00:00:00Z",
        "2026-01-01T00:00:00",
        "yesterday",
        "",
    ]
)


def _field(good: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(good, good, JSON, st.just(None))


ITEM = st.fixed_dictionaries(
    {
        "item_id": _field(st.sampled_from(["a", "b", "c"])),
        "title": _field(ANY_TEXT),
        "event_time": _field(TIMES),
    },
    optional={"description": _field(ANY_TEXT), "advertiser_id": JSON},
)
CLICK = st.fixed_dictionaries(
    {
        "event_id": _field(ANY_TEXT),
        "user_id": _field(ANY_TEXT),
        "item_id": _field(st.sampled_from(["a", "b", "zz"])),
        "type": _field(st.sampled_from(["click", "view", "conversion"])),
        "event_time": _field(TIMES),
    }
)


def _encode(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode()  # \\ud800 survives as an escape


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


RAW = st.one_of(
    st.binary(max_size=300),
    st.builds(_deep, st.integers(1, 200_000)),
    st.just(None),
    st.just(b'{"title": "' + b"x" * MAX_BYTES + b'"}'),
)


def _clean(event) -> None:
    """What a parsed event must be for the catalogue to store it without error."""
    for name in ("item_id", "title", "description", "advertiser_id", "event_id", "user_id"):
        value = getattr(event, name, None)
        if value is not None:
            assert isinstance(value, str) and "\x00" not in value
            value.encode("utf-8")
    assert event.event_time.tzinfo is not None and event.event_time.utcoffset().total_seconds() == 0
    event.event_time.astimezone(UTC)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(RAW, ITEM.map(_encode), JSON.map(_encode)))
def test_item_validator_accepts_clean_events_or_rejects_with_a_reason(raw):
    try:
        _clean(parse_item(raw, max_bytes=MAX_BYTES, latest=LATEST, max_text_chars=2000))
    except Invalid as exc:
        assert exc.reason and len(exc.reason) < 64


@settings(max_examples=1500, deadline=None)
@given(st.one_of(RAW, CLICK.map(_encode), JSON.map(_encode)))
def test_interaction_validator_accepts_clean_events_or_rejects_with_a_reason(raw):
    try:
        _clean(parse_interaction(raw, max_bytes=MAX_BYTES, latest=LATEST))
    except Invalid as exc:
        assert exc.reason and len(exc.reason) < 64


BATCH_ITEMS = st.lists(st.one_of(ITEM.map(_encode), RAW, JSON.map(_encode)), min_size=1, max_size=40)
BATCH_CLICKS = st.lists(st.one_of(CLICK.map(_encode), RAW), min_size=1, max_size=40)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(BATCH_ITEMS, BATCH_CLICKS)
def test_every_message_ends_in_the_catalogue_or_the_dlq(item_msgs, click_msgs):
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(free_port()) as broker:
        url = f"sqlite:///{tmp}/fuzz.db"
        upgrade(url)
        cfg = Settings(
            database_url=url,
            kafka_bootstrap=broker.bootstrap,
            session_timeout_ms=2000,
            group_id=f"fuzz-{free_port()}",
            max_message_bytes=MAX_BYTES,
        )
        ensure_topics(cfg.kafka)
        produce_raw(broker.bootstrap, TOPIC_ITEMS, [(b"k", m) for m in item_msgs])
        produce_raw(broker.bootstrap, TOPIC_INTERACTIONS, [(b"k", m) for m in click_msgs])
        engine = make_engine(url)
        # idle from assignment: on loaded CI cores a first fetch once took over 1 s (0 consumed)
        s_items = ConsumeLoop(ItemsHandler(cfg), engine, cfg).run(idle_exit=3.0)
        s_clicks = ConsumeLoop(InteractionsHandler(cfg), engine, cfg).run(idle_exit=3.0)
        for stats, sent in ((s_items, item_msgs), (s_clicks, click_msgs)):
            assert stats.consumed == len(sent) == stats.stored + stats.dead_lettered
        valid_items = _valid(
            item_msgs, lambda m: parse_item(m, max_bytes=MAX_BYTES, latest=LATEST, max_text_chars=2000)
        )
        with engine.connect() as conn:
            assert count_rows(conn, items) == len({e.item_id for e in valid_items})
            stored_items = {r.item_id for r in conn.execute(items.select())}
            n_clicks = count_rows(conn, interactions)
        valid_clicks = _valid(click_msgs, lambda m: parse_interaction(m, max_bytes=MAX_BYTES, latest=LATEST))
        landed = [e for e in valid_clicks if e.item_id in stored_items]
        assert n_clicks == len({e.event_id for e in landed})
        dlq = read_topic(broker.bootstrap, "said.dlq", s_items.dead_lettered + s_clicks.dead_lettered)
        assert len(dlq) == s_items.dead_lettered + s_clicks.dead_lettered
        assert all(dict(m.headers()).get("said-error") for m in dlq), "every rejection says why"
        assert s_clicks.dead_lettered == len(click_msgs) - len(landed)


def _valid(msgs, parse) -> list:
    out = []
    for m in msgs:
        try:
            out.append(parse(m))
        except Invalid:
            continue  # expected: these are the DLQ's share
    return out
