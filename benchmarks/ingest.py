"""Interaction ingestion, Kafka -> PostgreSQL, end to end, against a naive consumer.

Method: an embedded broker and a throwaway PostgreSQL cluster on loopback; N interaction
events (default 200k) over 1,000 items are produced once. Each run starts a fresh consumer
process in a new group on a fresh database and times from its first fetched message to the
commit that makes the last event durable; peak RSS is that process's ru_maxrss. The batch
consumer is ``said consumer run interactions`` (ConsumeLoop); the naive consumer polls one
message at a time and inserts it through the ORM with a commit per row, the pattern the
batch consumer replaces. The naive one runs on the first ``--naive-events`` events only
(it is slow). The bound is a bare confluent-kafka consumer on the same broker that stores
nothing: it fetches all N events in batches of ``consume_batch``, timed the same way, so
the batch consumer's rate as a % of it is the share of what the broker and client allow
here. Rates are events per second; medians over ``--runs`` runs are printed.

    python benchmarks/ingest.py [--events 200000] [--runs 3] [--smoke]

``--smoke``: 3,000 events (300 for the naive consumer), one run: checks that the benchmark
runs, not a result.
"""

# ruff: noqa: E402 (imports follow the sys.path set-up below)
from __future__ import annotations

import sys
from pathlib import Path

# The throwaway PostgreSQL cluster comes from tests/support, which is not an installed
# package: put the repository root on the path, so `python benchmarks/ingest.py` needs
# no PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import multiprocessing as mp
import queue
import resource
import statistics
import time
import uuid
from datetime import datetime

from _bench import SMOKE_NOTE  # a sibling module of the benchmarks
from confluent_kafka import Consumer, Producer

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from core.kafka import produce as produce_waiting
from core.settings import KafkaSettings, Settings
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.migrate import upgrade
from tests.support.pgcluster import ThrowawayPostgres, find_pg_bin

N_ITEMS = 1000


def produce(bootstrap: str, n_events: int) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "queue.buffering.max.messages": 1_000_000})
    for i in range(N_ITEMS):
        p.produce(
            TOPIC_ITEMS,
            key=f"i{i}",
            value=json.dumps(
                {
                    "item_id": f"i{i}",
                    "title": f"Item {i}",
                    "description": None,
                    "advertiser_id": None,
                    "event_time": "2026-01-01T00:00:00Z",
                }
            ),
        )
    for e in range(n_events):
        event = {
            "event_id": f"e{e}",
            "user_id": f"u{e % 5000}",
            "item_id": f"i{e % N_ITEMS}",
            "type": "click",
            "event_time": "2026-01-01T00:00:01Z",
        }
        produce_waiting(p, TOPIC_INTERACTIONS, key=f"u{e % 5000}", value=json.dumps(event))
        p.poll(0)
    assert p.flush(60) == 0


def fresh_db(pg: ThrowawayPostgres, bootstrap: str) -> Settings:
    url = pg.create_database()
    upgrade(url)
    s = Settings(
        database_url=url, kafka_bootstrap=bootstrap, group_id=uuid.uuid4().hex, session_timeout_ms=2000
    )
    from core.db import make_engine

    ConsumeLoop(ItemsHandler(s), make_engine(url), s).run(idle_exit=1.0)
    return s


def run_batch(settings: Settings, n: int, out) -> None:
    """Child process: the production consumer until n events are stored."""
    from core.db import make_engine

    loop = ConsumeLoop(InteractionsHandler(settings), make_engine(settings.database_url), settings)
    first: list[float] = []
    last: list[float] = []
    submit, end = loop._submit, loop._end

    def started(messages):
        if not first:
            first.append(time.perf_counter())
        submit(messages)

    def ended(batch, refused):
        end(batch, refused)
        if loop.stats.stored >= n and not last:  # the commit that makes the last event durable
            last.append(time.perf_counter())
            loop.stop()

    loop._submit, loop._end = started, ended
    loop.run()
    out.put((last[0] - first[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def run_bound(settings: Settings, n: int, out) -> None:
    """Child process: the bound. Fetch n events and store nothing (no parse, no commit)."""
    c = Consumer(
        settings.kafka.client_config()
        | {"group.id": settings.consume.group_id + "b", "auto.offset.reset": "earliest"}
    )
    c.subscribe([TOPIC_INTERACTIONS])
    done = 0
    while not done:  # the clock starts at the first message, as the batch consumer's does
        done = sum(1 for m in c.consume(1, timeout=0.5) if m.error() is None)
    start = time.perf_counter()
    while done < n:
        batch = c.consume(min(settings.consume.batch, n - done), timeout=0.5)  # no wait on the tail
        done += sum(1 for m in batch if m.error() is None)
    elapsed = time.perf_counter() - start
    c.close()
    out.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def run_naive(settings: Settings, n: int, out) -> None:
    """Child process: poll one message, one ORM insert, one commit, per event."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session, registry

    from core.tables import interactions, items

    class Interaction:
        pass

    registry().map_imperatively(Interaction, interactions)
    engine = create_engine(settings.database_url)
    c = Consumer(
        settings.kafka.client_config()
        | {
            "group.id": settings.consume.group_id + "n",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    c.subscribe([TOPIC_INTERACTIONS])
    done, start = 0, None
    with Session(engine) as session:
        idx = dict(session.execute(select(items.c.item_id, items.c.idx)).all())
        while done < n:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            start = start or time.perf_counter()
            ev = json.loads(m.value())
            row = Interaction()
            row.event_id, row.user_id, row.type = ev["event_id"], ev["user_id"], ev["type"]
            row.item_idx = idx[ev["item_id"]]
            row.event_time = datetime.fromisoformat(ev["event_time"])
            session.add(row)
            session.commit()
            c.commit(m, asynchronous=False)
            done += 1
    c.close()
    out.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def measure(target, settings: Settings, n: int, timeout_s: float = 1800) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(settings, n, q))
    proc.start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            elapsed, rss_kb = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{target.__name__} died with exit code {proc.exitcode}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(
                    f"{target.__name__} did not store {n:,} events in {timeout_s:.0f} s"
                ) from None
    proc.join()
    return elapsed, rss_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--naive-events", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.events, args.naive_events, args.runs = 3000, 300, 1
        print(SMOKE_NOTE)
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL server binaries not found")
    pg = ThrowawayPostgres(bin_dir).start()
    try:
        with EmbeddedBroker(free_port()) as broker:
            ensure_topics(KafkaSettings(bootstrap=broker.bootstrap))
            produce(broker.bootstrap, args.events)
            rows = []
            for run in range(args.runs):
                fast_s, fast_rss = measure(run_batch, fresh_db(pg, broker.bootstrap), args.events)
                naive_s, naive_rss = measure(run_naive, fresh_db(pg, broker.bootstrap), args.naive_events)
                bound_s, bound_rss = measure(run_bound, fresh_db(pg, broker.bootstrap), args.events)
                rows.append(
                    (
                        args.events / fast_s,
                        fast_rss,
                        args.naive_events / naive_s,
                        naive_rss,
                        args.events / bound_s,
                        bound_rss,
                    )
                )
                print(
                    f"run {run + 1}: batch {rows[-1][0]:,.0f} ev/s (peak RSS {fast_rss:.0f} MiB), "
                    f"naive {rows[-1][2]:,.0f} ev/s (peak RSS {naive_rss:.0f} MiB), "
                    f"bound {rows[-1][4]:,.0f} ev/s (peak RSS {bound_rss:.0f} MiB)"
                )
    finally:
        pg.close()
    fast = statistics.median(r[0] for r in rows)
    naive = statistics.median(r[2] for r in rows)
    bound = statistics.median(r[4] for r in rows)
    print(f"\nmedian of {args.runs} runs, {args.events:,} events Kafka -> PostgreSQL:")
    print("| consumer | events/s | peak RSS MiB |\n|---|---|---|")
    print(f"| batch (said consumer run) | {fast:,.0f} | {max(r[1] for r in rows):.0f} |")
    print(f"| naive per-row ORM | {naive:,.0f} | {max(r[3] for r in rows):.0f} |")
    print(f"| bound: bare consumer, stores nothing | {bound:,.0f} | {max(r[5] for r in rows):.0f} |")
    print(f"speed-up: {fast / naive:.1f}x; batch consumer at {100 * fast / bound:.0f}% of the bound")


if __name__ == "__main__":
    main()
