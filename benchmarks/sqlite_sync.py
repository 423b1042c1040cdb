"""What ``PRAGMA synchronous=FULL`` (the SQLite catalogue's setting) costs ingestion.

In WAL mode ``NORMAL`` may lose the last committed transactions on a power cut, after the
consumer committed their Kafka offsets; ``FULL`` syncs the WAL at every commit. Method: a
fresh, migrated SQLite catalogue per run (100 items), then ``--events`` interactions
written exactly as the interactions consumer writes them (``insert_interactions``, one
transaction per consumed batch) with batch sizes 5,000 (``SAID_CONSUME_BATCH``'s default)
and 500. Kafka is left out: the setting changes only the database side. Runs alternate
NORMAL and FULL; medians of events per second over ``--runs``.

    python benchmarks/sqlite_sync.py [--events 200000] [--runs 3] [--smoke]

``--smoke``: 10,000 events, one run: checks that the benchmark runs, not a result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _bench import SMOKE_NOTE  # a sibling module of the benchmarks
from sqlalchemy import event

from core.catalogue import insert_interactions, upsert_items
from core.db import make_engine
from core.events import InteractionEvent, ItemEvent
from said.migrate import upgrade


def rate(sync: str, events: int, batch: int) -> float:
    """Events per second written to a fresh catalogue with ``PRAGMA synchronous=sync``."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'said.db'}"
        upgrade(url)
        engine = make_engine(url)

        @event.listens_for(engine, "connect")
        def _sync(dbapi_conn, _record) -> None:  # after make_engine's own pragmas
            dbapi_conn.execute(f"PRAGMA synchronous={sync}")

        now = datetime.now(UTC)
        with engine.begin() as conn:
            upsert_items(conn, [ItemEvent(f"i{n}", f"item {n}", None, None, now) for n in range(100)], now)
        idx = {f"i{n}": n + 1 for n in range(100)}
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        evs = [
            InteractionEvent(f"e{n}", f"u{n % 997}", f"i{n % 100}", "click", t0 + timedelta(seconds=n))
            for n in range(events)
        ]
        start = time.perf_counter()
        for at in range(0, events, batch):
            with engine.begin() as conn:
                insert_interactions(conn, evs[at : at + batch], idx)
        seconds = time.perf_counter() - start
        engine.dispose()
    return events / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.events, args.runs = 10_000, 1
        print(SMOKE_NOTE)
    print(f"SQLite catalogue writes, {args.events} interactions, median of {args.runs} alternating runs")
    for batch in (5000, 500):
        rates: dict[str, list[float]] = {"NORMAL": [], "FULL": []}
        for _ in range(args.runs):
            for sync in rates:
                rates[sync].append(rate(sync, args.events, batch))
        normal, full = (statistics.median(rates[s]) for s in ("NORMAL", "FULL"))
        ratio = full / normal
        print(f"batch {batch:>5}: NORMAL {normal:,.0f} ev/s, FULL {full:,.0f} ev/s, FULL/NORMAL {ratio:.2f}")


if __name__ == "__main__":
    main()
