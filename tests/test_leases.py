"""Alignment-job leases on SQLite and PostgreSQL: disjoint, expiring, text-change safe."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from core.catalogue import upsert_items
from core.db import make_engine
from core.events import ItemEvent
from core.tables import alignment_jobs, items
from updater.leases import (
    MAX_FAILURES,
    complete_aligned,
    complete_jobs,
    fail_jobs,
    failed_count,
    held,
    lease_jobs,
    pending_count,
    release_own,
)


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


def _job(engine):
    with engine.connect() as conn:
        return conn.execute(select(alignment_jobs).order_by(alignment_jobs.c.item_idx)).first()


def test_a_taken_over_lease_fences_the_old_owners_writes(db_url):
    """Worker A's lease expired (paused) and B took the item: A may neither write nor
    complete it, even with the same text; the expiry counts one failure."""
    engine = make_engine(db_url)
    _add_items(engine, 1)
    with engine.begin() as conn:
        a = lease_jobs(conn, "a", 1, ttl_s=-1)
    with engine.begin() as conn:
        b = lease_jobs(conn, "b", 1, ttl_s=60)
    assert a[0].text_hash == b[0].text_hash and b[0].epoch == a[0].epoch + 1
    with engine.begin() as conn:
        assert held(conn, "a", a) == []
        assert complete_jobs(conn, "a", a) == 0
        assert held(conn, "b", b) == b
    job = _job(engine)
    assert job.failures == 1 and job.last_error == "lease of a expired"


def test_a_text_change_fences_the_lease_of_the_old_text(db_url):
    engine = make_engine(db_url)
    _add_items(engine, 1)
    with engine.begin() as conn:
        old = lease_jobs(conn, "a", 1, ttl_s=60)
    _add_items(engine, 1, title="Renamed")
    with engine.begin() as conn:
        assert held(conn, "a", old) == []
        new = lease_jobs(conn, "a", 1, ttl_s=60)  # the same owner leases the new text at once
        assert held(conn, "a", new) == new and new[0].text_hash != old[0].text_hash


def test_outages_never_exhaust_a_job_failures_do(db_url):
    """Re-leasing after an outage (the owner's own live lease) is free; five real failures
    mark the item failed, visible in failed_count and out of pending_count."""
    engine = make_engine(db_url)
    _add_items(engine, 1)
    for _ in range(2 * MAX_FAILURES):
        with engine.begin() as conn:
            leases = lease_jobs(conn, "w", 1, ttl_s=60)
    assert len(leases) == 1 and _job(engine).failures == 0
    for n in range(MAX_FAILURES):
        with engine.begin() as conn:
            leases = lease_jobs(conn, "w", 1, ttl_s=60)
            assert len(leases) == 1, f"leasable after {n} failures"
            fail_jobs(conn, "w", leases, "ValueError: boom")
    with engine.begin() as conn:
        assert lease_jobs(conn, "w", 1, ttl_s=60) == []
        assert pending_count(conn) == 0 and failed_count(conn) == 1
        assert conn.execute(select(items.c.status)).scalar_one() == "failed"


def test_a_restarted_worker_releases_its_old_leases_at_once(db_url):
    engine = make_engine(db_url)
    _add_items(engine, 3)
    with engine.begin() as conn:
        lease_jobs(conn, "host-1", 3, ttl_s=600)  # then the process is killed
    with engine.begin() as conn:
        assert release_own(conn, "host-1") == 3
        taken = lease_jobs(conn, "other", 3, ttl_s=60)
    assert len(taken) == 3, "not stranded until the TTL"
    assert _job(engine).last_error == "worker host-1 restarted while holding the lease"


def test_lease_times_come_from_the_database_clock(pg, monkeypatch):
    """A worker whose clock runs two hours ahead must not see live leases as expired."""
    import core.db
    from said.migrate import upgrade

    url = pg.create_database()
    upgrade(url)
    engine = make_engine(url)
    _add_items(engine, 2)
    with engine.begin() as conn:
        lease_jobs(conn, "a", 2, ttl_s=60)

    class Ahead(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(hours=2)

    import updater.leases

    monkeypatch.setattr(core.db, "datetime", Ahead)
    monkeypatch.setattr(updater.leases, "datetime", Ahead)  # a regression to the local clock fails
    with engine.begin() as conn:
        assert lease_jobs(conn, "skewed", 2, ttl_s=60) == []


def test_jobs_past_the_parameter_limit_are_completed_in_pages(pg):
    """70,000 items: one IN list would exceed PostgreSQL's 65,535 parameters."""
    from said.migrate import upgrade

    url = pg.create_database()
    upgrade(url)
    engine = make_engine(url)
    _add_items(engine, 70_000)
    with engine.begin() as conn:
        hashes = dict(conn.execute(select(items.c.idx, items.c.text_hash)).all())
        assert complete_aligned(conn, hashes) == 70_000
        assert pending_count(conn) == 0
