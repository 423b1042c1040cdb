"""Alignment-job leases on SQLite and PostgreSQL: disjoint, expiring, text-change safe."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from sqlalchemy import select

from core.catalogue import upsert_items
from core.db import make_engine
from core.events import ItemEvent
from core.tables import alignment_jobs, items
from updater.leases import complete_jobs, lease_jobs, pending_count


def _add_items(engine, n: int, title: str = "Item") -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        upsert_items(conn, [ItemEvent(f"i{i}", f"{title} {i}", None, None, now) for i in range(n)], now)


def test_concurrent_workers_lease_disjoint_sets_and_finish_everything(db_url):
    engine = make_engine(db_url)
    _add_items(engine, 300)
    taken: dict[str, list[int]] = {"a": [], "b": []}

    def worker(owner: str) -> None:
        while True:
            with engine.begin() as conn:
                leases = lease_jobs(conn, owner, 7, ttl_s=60)
            if not leases:
                return
            taken[owner] += [lease.item_idx for lease in leases]
            with engine.begin() as conn:
                assert complete_jobs(conn, owner, leases) == len(leases)

    threads = [threading.Thread(target=worker, args=(o,)) for o in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not set(taken["a"]) & set(taken["b"]), "no item leased by both workers"
    assert sorted(taken["a"] + taken["b"]) == list(range(1, 301))
    with engine.connect() as conn:
        assert pending_count(conn) == 0
        assert set(conn.execute(select(items.c.status)).scalars()) == {"aligned"}


def test_expired_lease_is_taken_over_and_the_old_owner_cannot_complete(db_url):
    engine = make_engine(db_url)
    _add_items(engine, 5)
    with engine.begin() as conn:
        dead = lease_jobs(conn, "dead-worker", 5, ttl_s=-1)  # already expired
    with engine.begin() as conn:
        alive = lease_jobs(conn, "alive", 5, ttl_s=60)
    assert [x.item_idx for x in alive] == [x.item_idx for x in dead]
    with engine.begin() as conn:
        assert lease_jobs(conn, "third", 5, ttl_s=60) == [], "live leases are not shared"
        assert complete_jobs(conn, "dead-worker", dead) == 0
        assert complete_jobs(conn, "alive", alive) == 5


def test_text_change_during_lease_keeps_the_item_pending(db_url):
    engine = make_engine(db_url)
    _add_items(engine, 1)
    with engine.begin() as conn:
        leases = lease_jobs(conn, "w", 1, ttl_s=60)
    _add_items(engine, 1, title="Renamed")  # consumer resets the job for the new text
    with engine.begin() as conn:
        assert complete_jobs(conn, "w", leases) == 0
        assert conn.execute(select(items.c.status)).scalar_one() == "pending"
        assert conn.execute(select(alignment_jobs.c.lease_owner)).scalar_one() is None
