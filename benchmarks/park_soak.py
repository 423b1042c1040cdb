"""Parking soak: a steady rate of clicks, half of them for items that never arrive.

Method: the production consumers, started through the CLI (``said consumer run items`` and
``said consumer run interactions``) on an embedded broker and a throwaway PostgreSQL (or SQLite
with ``--db sqlite``). Set-up publishes ``--items`` items. Then, for ``--seconds``, this
process produces clicks at ``--rate`` per second (10 ms ticks): even event numbers for the
known items, odd ones for ``--ghosts`` item ids that never arrive, which are parked and,
after ``--park-age`` seconds, dead-lettered by the sweep. Every second it samples the
parked table (rows, and the largest count for one item) against the caps, the consumer's
lag (high watermarks minus the group's committed offsets) and the interaction consumer's
RSS. At the end it waits until everything is stored or dead-lettered and checks exactly
once: every known click stored once, every ghost click in the DLQ (duplicates counted),
none in both, nothing left parked.

    python benchmarks/park_soak.py [--rate 5000] [--seconds 120] [--db postgresql]
    python benchmarks/park_soak.py --smoke      # 1,000 clicks/s for 8 s on SQLite: ~25 s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, here and in the consumers it starts

from _bench import SMOKE_NOTE, rss_mib  # noqa: E402  (a sibling module of the benchmarks)

from core.db import make_engine  # noqa: E402
from core.events import TOPIC_DLQ, TOPIC_INTERACTIONS, TOPIC_ITEMS  # noqa: E402
from core.kafka import produce  # noqa: E402
from core.parking import waiting  # noqa: E402
from core.settings import get_settings  # noqa: E402
from core.tables import interactions, items, parked_interactions  # noqa: E402
from said.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from said.migrate import upgrade  # noqa: E402

T = "2026-06-01T00:00:00Z"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=5000, help="clicks/s, half for items that never arrive")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--ghosts", type=int, default=1000, help="item ids that never arrive")
    ap.add_argument("--park-age", type=float, default=5.0)
    ap.add_argument("--max-per-item", type=int, default=10_000)
    ap.add_argument("--max-total", type=int, default=1_000_000)
    ap.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    ap.add_argument("--smoke", action="store_true", help="1,000 clicks/s for 8 s on SQLite")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if args.smoke:
        args.rate, args.seconds, args.db, args.park_age = 1000, 8.0, "sqlite", 2.0
        print(SMOKE_NOTE, flush=True)
    print(f"method: {__doc__.split('Method: ', 1)[1].split(chr(10) + chr(10), 1)[0]}", flush=True)
    pg = None
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(free_port()) as broker:
        if args.db == "postgresql":
            from tests.support.pgcluster import ThrowawayPostgres, find_pg_bin

            pg = ThrowawayPostgres(find_pg_bin()).start()
            url = pg.create_database()
        else:
            url = f"sqlite:///{tmp}/soak.db"
        upgrade(url)
        ensure_topics(get_settings().kafka.model_copy(update={"bootstrap": broker.bootstrap}))
        env = os.environ | {
            "PYTHONPATH": str(ROOT),
            "SAID_DATABASE_URL": url,
            "SAID_DATA_DIR": tmp,
            "SAID_KAFKA_BOOTSTRAP": broker.bootstrap,
            "SAID_LOG_LEVEL": "WARNING",
            "SAID_SESSION_TIMEOUT_MS": "6000",
            "SAID_PARK_MAX_AGE_S": str(args.park_age),
            "SAID_PARK_SWEEP_S": "1",
            "SAID_PARK_MAX_PER_ITEM": str(args.max_per_item),
            "SAID_PARK_MAX_TOTAL": str(args.max_total),
        }
        said = [sys.executable, "-m", "said.cli", "consume"]
        procs = {n: subprocess.Popen([*said, n], env=env) for n in ("items", "interactions")}
        try:
            report = _soak(args, broker.bootstrap, make_engine(url), procs["interactions"].pid)
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(30)
            if pg:
                pg.close()
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    ok = report["exactly_once"]
    if ok["stored_twice"] or ok["both"] or ok["lost"] or ok["left_parked"]:
        sys.exit("exactly-once violated")


def _click(e: int, items: int, ghosts: int) -> tuple[str, str]:
    item = f"k{(e // 2) % items}" if e % 2 == 0 else f"ghost{(e // 2) % ghosts}"
    user = f"u{e % 5000}"
    value = json.dumps(
        {"event_id": f"s{e}", "user_id": user, "item_id": item, "type": "click", "event_time": T}
    )
    return user, value


def _lag(watcher: Consumer, parts: list[TopicPartition]) -> int:
    total = 0
    for tp in watcher.committed(parts, timeout=10):
        _low, high = watcher.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
        total += max(high - max(tp.offset, 0), 0)  # (the embedded broker can report one less)
    return total


def _soak(args, bootstrap: str, engine, pid: int) -> dict:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "queue.buffering.max.messages": 2_000_000}
    )
    for i in range(args.items):
        value = json.dumps(
            {"item_id": f"k{i}", "title": f"Known item {i}", "description": None, "event_time": T}
        )
        produce(producer, TOPIC_ITEMS, key=f"k{i}", value=value)
    assert producer.flush(60) == 0
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": "said.interactions"})
    parts = [TopicPartition(TOPIC_INTERACTIONS, p) for p in range(get_settings().kafka.topic_partitions)]
    print("items produced", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while True:  # the items consumer stored them all: the known clicks will find their item
        with engine.connect() as conn:
            if conn.execute(select(func.count()).select_from(items)).scalar() >= args.items:
                break
        if time.monotonic() > deadline:
            sys.exit(f"the items consumer stored fewer than {args.items} items in 120 s")
        time.sleep(0.5)
    time.sleep(3)  # the interaction consumer joins its group
    rss = [rss_mib(pid)]
    samples, produced = [], 0
    t0 = time.monotonic()
    next_sample = t0 + 1
    while (now := time.monotonic()) - t0 < args.seconds:
        due = int((now - t0) * args.rate) - produced
        for e in range(produced, produced + due):
            key, value = _click(e, args.items, args.ghosts)
            produce(producer, TOPIC_INTERACTIONS, key=key, value=value)
        produced += due
        producer.poll(0)
        if now >= next_sample:
            samples.append(_sample(engine, watcher, parts, pid, now - t0))
            next_sample += 1
        time.sleep(0.01)
    assert producer.flush(120) == 0
    produce_s = time.monotonic() - t0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # drain: stored, and the ghosts aged out to the DLQ
        s = _sample(engine, watcher, parts, pid, time.monotonic() - t0)
        samples.append(s)
        if s["lag"] == 0 and s["parked"] == 0:
            break
        time.sleep(1)
    drain_s = time.monotonic() - t0 - produce_s
    rss.append(rss_mib(pid))
    watcher.close()
    with engine.connect() as conn:
        stored = list(conn.execute(select(interactions.c.event_id)).scalars())
        left = conn.execute(select(func.count()).select_from(parked_interactions)).scalar()
        counter = waiting(conn)
    dead = _read_dlq(bootstrap)
    known = {f"s{e}" for e in range(0, produced, 2)}
    ghost = {f"s{e}" for e in range(1, produced, 2)}
    dead_ids = set(dead)
    return {
        "produced": produced,
        "rate_achieved": round(produced / produce_s),
        "drain_s_after_last_click": round(drain_s, 1),
        "parked_max": max(s["parked"] for s in samples),
        "parked_max_one_item": max(s["max_one_item"] for s in samples),
        "caps": {"total": args.max_total, "per_item": args.max_per_item},
        "lag_max": max(s["lag"] for s in samples),
        "rss_mib_start_end": [round(r) for r in rss],
        "rss_mib_max": round(max(s["rss_mib"] for s in samples)),
        "exactly_once": {
            "known_sent": len(known),
            "stored": len(set(stored)),
            "stored_twice": len(stored) - len(set(stored)),
            "ghost_sent": len(ghost),
            "dead_lettered": len(dead_ids & ghost),
            "dlq_duplicates": sum(dead.values()) - len(dead_ids),
            "dlq_reasons": sorted({r for r in dead.reasons}),
            "both": len(set(stored) & dead_ids),
            "lost": len((known - set(stored)) | (ghost - dead_ids)),
            "left_parked": left,
            "counter_after": counter,
        },
    }


def _sample(engine, watcher, parts, pid: int, t: float) -> dict:
    out = _measure(engine, watcher, parts, pid, t)
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def _measure(engine, watcher, parts, pid: int, t: float) -> dict:
    pc = parked_interactions.c
    with engine.connect() as conn:
        parked = conn.execute(select(func.count()).select_from(parked_interactions)).scalar()
        top = (
            select(func.count())
            .select_from(parked_interactions)
            .group_by(pc.item_id)
            .order_by(func.count().desc())
            .limit(1)
        )
        one = conn.execute(top).scalar() or 0
    return {
        "t": round(t, 1),
        "parked": parked,
        "max_one_item": one,
        "lag": _lag(watcher, parts),
        "rss_mib": rss_mib(pid),
    }


class _Counts(dict):
    reasons: set


def _read_dlq(bootstrap: str) -> _Counts:
    """event_id -> copies on the DLQ (and the reasons seen), read to its end offsets."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "soak-reader", "enable.auto.commit": False})
    meta = c.list_topics(TOPIC_DLQ, timeout=10).topics[TOPIC_DLQ]
    ends = {p: c.get_watermark_offsets(TopicPartition(TOPIC_DLQ, p), timeout=10)[1] for p in meta.partitions}
    c.assign([TopicPartition(TOPIC_DLQ, p, OFFSET_BEGINNING) for p in ends])
    out, done = _Counts(), {p for p, end in ends.items() if end == 0}
    out.reasons = set()
    deadline = time.monotonic() + 120
    while len(done) < len(ends) and time.monotonic() < deadline:
        for m in c.consume(5000, 0.5):
            if m.error() is not None:
                continue
            e = json.loads(m.value())["event_id"]
            out[e] = out.get(e, 0) + 1
            out.reasons.add(dict(m.headers())["said-error"].decode())
            if m.offset() + 1 >= ends[m.partition()]:
                done.add(m.partition())
    c.close()
    return out


if __name__ == "__main__":
    main()
