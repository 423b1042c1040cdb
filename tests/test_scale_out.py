"""Scaling out on one machine: two consumers of one group and two updater workers split
the work, with nothing lost and nothing done twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml
from sqlalchemy import select

from consumers.interactions import InteractionsHandler
from consumers.runner import ConsumeLoop
from core import metrics
from core.catalogue import count_rows
from core.db import make_engine
from core.events import TOPIC_INTERACTIONS
from core.tables import interactions, item_embeddings
from tests.support.catalogue import SAID_ROWS, add_items
from tests.support.kafka_util import click_event, load_items, produce_json
from updater.leases import pending_count
from updater.worker import UpdateWorker, worker_owner

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
# What Docker gives two replicas of one service: the same environment, and each container
# its own hostname (its short id), kept across restarts; the entrypoint runs as pid 1.
REPLICA_HOSTS = ("3f2a9c1b7d4e", "8e1d0a6c5b2f")


def compose_replica_ids(service: str, pid: int = 1) -> list[str]:
    """The lease owner of each of two replicas of ``service``, from docker-compose.yml."""
    configured = COMPOSE["services"][service]["environment"].get("SAID_WORKER_ID")
    return [worker_owner(configured, host, pid) for host in REPLICA_HOSTS]


def test_two_consumers_in_one_group_split_the_partitions(settings):
    load_items(settings, 50)
    events = [click_event(e, e % 50, user=f"u{e % 101}") for e in range(8000)]
    loops = [
        ConsumeLoop(InteractionsHandler(settings), make_engine(settings.database_url), settings)
        for _ in range(2)
    ]
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda n=n: results.setdefault(n, loops[n].run())) for n in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30  # produce only once both members own partitions
    while time.monotonic() < deadline and not all(lp.assigned for lp in loops):
        time.sleep(0.1)
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, events, "user_id")
    engine = make_engine(settings.database_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if count_rows(conn, interactions) >= 8000:
                break
        time.sleep(0.2)
    for lp in loops:
        lp.stop()
    for t in threads:
        t.join(60)
    consumed = [results[n].consumed for n in range(2)]
    assert all(c > 0 for c in consumed), f"both members got partitions: {consumed}"
    assert sum(consumed) >= 8000
    with engine.connect() as conn:
        assert count_rows(conn, interactions) == 8000


def test_two_workers_split_fresh_items_without_overlap(aligned):
    engine, bundle, lm, settings, data = aligned
    add_items(engine, 24, 16)
    workers = [
        UpdateWorker(
            engine,
            bundle,
            lm,
            settings.override(worker_batch=2, refine_epochs=1, worker_id=f"w{n}"),
        )
        for n in range(2)
    ]
    fenced = _run_to_idle(workers, engine)
    with engine.connect() as conn:
        kinds = (
            conn.execute(select(item_embeddings.c.kind).where(item_embeddings.c.item_idx > 24, SAID_ROWS))
            .scalars()
            .all()
        )
    assert kinds == ["refined"] * 16
    assert metrics.FENCED_WRITES._value.get() == fenced, "no item was leased by both workers at once"


def test_two_compose_updater_replicas_split_fresh_items_without_fencing_each_other(aligned):
    """Issue 23.8: ``docker compose up --scale updater=2`` gave both replicas one worker id,
    so each start released the other's live leases as its own."""
    ids = compose_replica_ids("updater")
    assert len(set(ids)) == 2, f"replicas need distinct lease owners: {ids}"
    assert compose_replica_ids("updater", pid=7) == ids, "stable across a restart"
    engine, bundle, lm, settings, _data = aligned
    add_items(engine, 24, 16)
    workers = [
        UpdateWorker(engine, bundle, lm, settings.override(worker_batch=2, refine_epochs=1, worker_id=i))
        for i in ids
    ]
    assert [w.owner for w in workers] == ids
    fenced = _run_to_idle(workers, engine)
    assert metrics.FENCED_WRITES._value.get() == fenced, "no replica fenced the other"


def _run_to_idle(workers: list[UpdateWorker], engine) -> float:
    """Run the workers side by side until idle; each must have completed some of the 16
    fresh items and together all of them, once (an item completed by both would make 17+).
    Returns the fenced-writes count from before they ran."""
    fenced = metrics.FENCED_WRITES._value.get()
    threads = [threading.Thread(target=w.run, kwargs={"idle_exit": 0.5}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done = [w.done for w in workers]
    assert sum(done) == 16 and all(d > 0 for d in done), done
    with engine.connect() as conn:
        assert pending_count(conn) == 0
    return fenced
