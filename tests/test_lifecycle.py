"""Item lifecycle (issue 25): a tombstone or a ``status`` on ``said.items`` takes an item out
of recommendations at once, for good (a stale snapshot and a restart included), keeps it
usable as history, and ``active`` brings it back without realignment. Through the real
broker, the items consumer, the catalogue on SQLite and PostgreSQL, and the HTTP scorer
(a real uvicorn server) while a client keeps polling ``/recommend``."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import func, select

from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.catalogue import set_serving
from core.events import TOPIC_ITEMS, Invalid, ServingEvent, parse_item, parse_tombstone
from core.tables import alignment_jobs, item_embeddings, items
from said.broker import free_port
from scorer.app import create_app
from scorer.state import ServingState
from tests.support.catalogue import add_users
from tests.support.kafka_util import committed_offsets, dlq_reasons, produce_json, produce_raw

ALL = 24  # every item of the ``aligned`` catalogue: a ranking of k=ALL shows whether one is served


class Poller:
    """A client polling ``/recommend`` (history ["i0"], every item) in the background;
    ``seen`` holds (monotonic time, ranked item ids) of every answer."""

    def __init__(self, url: str) -> None:
        self.url, self.seen, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                body = client.post(self.url, json={"history": ["i0"], "k": ALL}).json()
                self.seen.append((time.monotonic(), [x["item_id"] for x in body["items"]]))

    def gone_after(self, item_id: str, since: float, timeout: float = 15.0) -> float:
        """Seconds from ``since`` until answers stop holding ``item_id``; fails if they never
        do, or if it comes back in a later answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [(t, ranked) for t, ranked in self.seen if t > since]
            first = next((t for t, ranked in after if item_id not in ranked), None)
            if first is not None:
                time.sleep(1.0)  # a few more answers: it must stay gone
                later = [ranked for t, ranked in self.seen if t > first]
                assert later and all(item_id not in r for r in later), f"{item_id} came back"
                return first - since
            time.sleep(0.05)
        raise AssertionError(f"{item_id} still recommended {timeout} s after its withdrawal")

    def shown(self, item_id: str, since: float, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(item_id in ranked for t, ranked in self.seen if t > since):
                return True
            time.sleep(0.05)
        return False


def _state(engine, key: str, item_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(select(getattr(items.c, key)).where(items.c.item_id == item_id)).scalar_one()


def _consumed(settings, timeout: float = 15.0) -> None:
    """Wait until the items consumer has committed every message on ``said.items``."""
    group, deadline = f"{settings.consume.group_id}.items", time.monotonic() + timeout
    consumer = Consumer(settings.kafka.client_config() | {"group.id": f"{group}-peek"})
    try:
        while time.monotonic() < deadline:
            done = committed_offsets(settings, group, TOPIC_ITEMS)  # partition -> offset
            ends = {p: consumer.get_watermark_offsets(TopicPartition(TOPIC_ITEMS, p))[1] for p in done}
            if all(done[p] >= end for p, end in ends.items() if end > 0):
                return
            time.sleep(0.1)
    finally:
        consumer.close()
    raise AssertionError("the items consumer did not commit every message in time")


def _work(engine) -> tuple[int, int]:
    """(embedding rows, alignment jobs): a reactivation must add to neither."""
    with engine.connect() as conn:
        return (
            conn.execute(select(func.max(item_embeddings.c.seq))).scalar(),
            conn.execute(select(func.count()).select_from(alignment_jobs)).scalar(),
        )


@pytest.mark.slow
def test_withdrawal_reaches_a_polling_client_and_stays(served, settings, monkeypatch):
    engine, bundle, data, _ = served
    settings = settings.override(data_dir=data, index_refresh_s=0.2, snapshot_every_s=3600)
    state = ServingState.for_bundle(engine, bundle, settings)
    state.rebuild()  # a snapshot from before any withdrawal, the only one (no periodic ones)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, state, settings.api), port=port, log_level="warning")
    )
    consumer = ConsumeLoop(ItemsHandler(settings), engine, settings)
    threads = [threading.Thread(target=server.run), threading.Thread(target=consumer.run)]
    for t in threads:
        t.start()
    base = f"http://127.0.0.1:{port}"
    poller = Poller(f"{base}/recommend")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        poller.thread.start()
        assert poller.shown("i8", 0) and poller.shown("i16", 0)
        time.sleep(3)  # the items consumer has joined its group by now

        # a tombstone: withdrawn as of its timestamp
        t0 = time.monotonic()
        produce_raw(settings.kafka.bootstrap, TOPIC_ITEMS, [(b"i8", None)])
        print(f"tombstone -> out of the polled ranking: {poller.gone_after('i8', t0):.2f} s")
        assert _state(engine, "serving_state", "i8") == "withdrawn"
        shown = httpx.get(f"{base}/items/i8").json()
        assert shown["serving_state"] == "withdrawn" and not shown["servable"]
        # still usable as history: a personal ranking, not the fallback
        as_history = httpx.post(f"{base}/recommend", json={"history": ["i8"], "k": 5}).json()
        assert not as_history["fallback"] and len(as_history["items"]) == 5

        # a late event older than the tombstone never resurrects it
        old = {"item_id": "i8", "status": "active", "event_time": "2026-01-01T00:00:00Z"}
        produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [old], "item_id")
        t1 = time.monotonic()
        _consumed(settings)  # it was read and committed, so it had its chance
        assert not poller.shown("i8", t1, timeout=1.0)
        assert _state(engine, "serving_state", "i8") == "withdrawn"

        # a status-only pause
        now = datetime.now(UTC).isoformat()
        t2 = time.monotonic()
        produce_json(
            settings.kafka.bootstrap,
            TOPIC_ITEMS,
            [{"item_id": "i16", "status": "paused", "event_time": now}],
            "item_id",
        )
        print(f"pause -> out of the polled ranking: {poller.gone_after('i16', t2):.2f} s")

        # a restarted replica, from the snapshot taken before both, serves neither
        with monkeypatch.context() as m:
            m.setattr(
                ServingState, "_build", lambda *_: pytest.fail("rebuilt instead of loading the snapshot")
            )
            again = ServingState.for_bundle(engine, bundle, settings)
        assert again.served.index.ids().size == ALL - 2
        ranked = [state.item_id[i] for i, _ in again.recommend([1], ALL, set())[0]]
        assert "i8" not in ranked and "i16" not in ranked and len(ranked) == ALL - 2
        ranked, _, _, fallback = again.recommend([17], 5, set())  # i16 is idx 17: history
        assert not fallback and len(ranked) == 5

        # active again, later than the withdrawal: back, with no realignment
        work = _work(engine)
        back = {"item_id": "i8", "status": "active", "event_time": datetime.now(UTC).isoformat()}
        t3 = time.monotonic()
        produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [back], "item_id")
        assert poller.shown("i8", t3), "reactivated i8 never came back"
        assert _work(engine) == work and _state(engine, "status", "i8") != "pending"

        # a change of an unknown item is rejected with its reason, not dropped
        produce_raw(settings.kafka.bootstrap, TOPIC_ITEMS, [(b"nope", None)])
        assert "unknown_item" in dlq_reasons(settings.kafka.bootstrap, 1).values()
    finally:
        poller.stop.set()
        server.should_exit = True
        consumer.stop()
        for t in [*threads, poller.thread]:
            if t.ident is not None:  # started
                t.join(30)


def test_every_delivery_order_ends_in_the_same_state(aligned):
    """Pauses, withdrawals and reactivations of one item, delivered in shuffled batches
    with duplicates: the state is that of the latest event (ties: the more restrictive)."""
    engine = aligned[0]
    add_users(engine, 1)
    t = datetime(2026, 6, 1, tzinfo=UTC)
    events = [
        ServingEvent("i3", "paused", t),
        ServingEvent("i3", "withdrawn", t + timedelta(minutes=1)),
        ServingEvent("i3", "active", t + timedelta(minutes=2)),
        ServingEvent("i3", "paused", t + timedelta(minutes=3)),
        ServingEvent("i3", "active", t + timedelta(minutes=3)),  # tie: paused wins
    ]
    for seed in range(6):
        order = random.Random(seed).sample(events * 2, 10)
        with engine.begin() as conn:  # a fresh start each round
            conn.execute(items.update().values(serving_state="active", serving_time=None))
        for cut in range(0, 10, 3):
            with engine.begin() as conn:
                changed, unknown = set_serving(conn, order[cut : cut + 3])
                assert unknown == []
        assert _state(engine, "serving_state", "i3") == "paused", order
    with engine.begin() as conn:
        assert set_serving(conn, [ServingEvent("zz", "paused", t)]) == ({}, ["zz"])


def test_bad_lifecycle_events_are_rejected_with_a_reason():
    latest = datetime.now(UTC) + timedelta(minutes=5)
    limits = {"max_bytes": 10_000, "max_text_chars": 1000, "latest": latest}
    cases = {
        b'{"item_id": "a", "status": "deleted", "event_time": "2026-01-01T00:00:00Z"}': "unknown_enum:status",
        b'{"item_id": "a", "status": 3, "event_time": "2026-01-01T00:00:00Z"}': "wrong_type:status",
        b'{"status": "paused", "event_time": "2026-01-01T00:00:00Z"}': "missing_field:item_id",
        b'{"item_id": "a", "status": "paused"}': "missing_field:event_time",
    }
    for raw, reason in cases.items():
        with pytest.raises(Invalid) as caught:
            parse_item(raw, **limits)
        assert caught.value.reason == reason, raw
    full = parse_item(
        b'{"item_id": "a", "title": "t", "status": "paused", "event_time": "2026-01-01T00:00:00Z"}', **limits
    )
    assert full.serving == "paused" and full.title == "t"
    ms = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)
    assert parse_tombstone(b"a", ms, latest) == ServingEvent(
        "a", "withdrawn", datetime(2026, 3, 1, tzinfo=UTC)
    )
    for key, stamp, reason in [
        (None, ms, "empty_value"),
        (b"a", None, "missing_timestamp"),
        (b"\xff", ms, "invalid_utf8:key"),
        (b"a", int((latest + timedelta(hours=1)).timestamp() * 1000), "future_time"),
    ]:
        with pytest.raises(Invalid) as caught:
            parse_tombstone(key, stamp, latest)
        assert caught.value.reason == reason
