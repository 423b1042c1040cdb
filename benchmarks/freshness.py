"""Freshness and withdrawal: seconds from publishing an item event to servable, to a
refined embedding, and from a tombstone to out of the index.

Method: the real pipeline in one process, on the embedded defaults (Tansu broker over TCP,
SQLite, SmolLM2 on this machine's device): a slice of Beauty (``--items``) is replayed
through Kafka (items and clicks), consumed, and aligned (``--align-epochs``; quality is not
the point here). With ``--scorer composite`` (the default, what production serves once
clicks exist) one retrain trains and promotes the warm/cold composite, so fresh items are
scored by its student. Then the item consumer, the update worker (default settings: batch
16, 20 refinement passes), the scorer's serving state (refreshed every
``SAID_INDEX_REFRESH_S``, the default unless ``--set`` says otherwise) and a client thread
asking for ``--load-rps`` recommendations a second (the load) run in threads. ``--fresh`` new items
(real Beauty titles outside the slice) are published one every ``--every`` seconds, and
meanwhile ``--withdraw`` catalogue items are withdrawn by tombstones, one every
``--withdraw-every`` seconds. For each: *servable* = its vector is in the scorer's index
(what /recommend ranks); *refined* = its refined embedding is in the catalogue; *withdrawn*
= out of the index (never ranked again). Each clock starts just before its event is sent (one
producer, as a publisher keeps one); a thread of its own observes every 20 ms, so a slow send
delays no reading. Reports median, p95, p99
and max.

    python benchmarks/freshness.py [--items 200] [--fresh 50] [--every 2] [--withdraw 60] [--smoke]

``--smoke``: 20 items, 1 pass, 3 fresh items one a second, 3 withdrawals, 3 refinement
passes, a 1-epoch retrain and a tiny random LLM with SmolLM2's tokenizer: checks that the
benchmark runs, not a result.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _bench import DATA, SMOKE_NOTE, tiny_llm_folder  # a sibling module of the benchmarks
from confluent_kafka import Producer
from sqlalchemy import select

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.dataset import load_dataset
from core.db import make_engine
from core.events import TOPIC_ITEMS
from core.kafka import produce
from core.settings import Settings
from core.tables import item_embeddings
from models.aligner import FrozenLM
from models.llm import load_llm, pick_device
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.migrate import upgrade
from said.produce import replay_dataset
from scorer.state import ServingState
from updater.full_align import align_catalogue
from updater.retrain import retrain_once
from updater.worker import UpdateWorker

DATASET = DATA / "amazon-beauty"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path, default=DATASET)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--align-epochs", type=int, default=2)
    ap.add_argument("--fresh", type=int, default=50)
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--withdraw", type=int, default=60, help="catalogue items withdrawn meanwhile")
    ap.add_argument("--withdraw-every", type=float, default=0.5)
    ap.add_argument("--scorer", choices=("composite", "cosine"), default="composite")
    ap.add_argument("--load-rps", type=float, default=100, help="recommendations a second meanwhile")
    ap.add_argument("--llm-cache", type=Path, default=Path("said-data/llm"))
    ap.add_argument("--llm", default=None, help="an HF folder or .gguf (default: SmolLM2)")
    ap.add_argument("--timeout", type=float, default=600, help="most seconds for every item to refine")
    ap.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a setting, by its flat name"
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.items, args.align_epochs, args.fresh, args.every, args.timeout = 20, 1, 3, 1.0, 60
        args.withdraw, args.withdraw_every = 3, 0.5
        args.llm = args.llm or str(tiny_llm_folder())
        # a random LLM never reaches the accuracy bar: few refinement passes, few decodes
        args.set += ["refine_epochs=3", "fidelity_exact_items=4", "reference_items=4", "retrain_epochs=1"]
        print(SMOKE_NOTE)
    full = load_dataset(args.dataset)
    ds = load_dataset(args.dataset, args.items)
    new_titles = [t for i, t in zip(full.item_ids, full.titles, strict=True) if i not in set(ds.item_ids)][
        : args.fresh
    ]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(free_port()) as broker:
        settings = Settings(
            database_url=f"sqlite:///{tmp}/said.db",
            data_dir=Path(tmp),
            kafka_bootstrap=broker.bootstrap,
            session_timeout_ms=2000,
            align_epochs=args.align_epochs,
            soft_tokens=1,
            item_dim=128,
            **dict(kv.split("=", 1) for kv in args.set),
        )
        ensure_topics(settings.kafka)
        upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        replay_dataset(settings.kafka.client_config(), ds)
        ConsumeLoop(ItemsHandler(settings), engine, settings).run(idle_exit=2.0)
        ConsumeLoop(InteractionsHandler(settings), engine, settings).run(idle_exit=2.0)
        device = pick_device("auto")
        model, tok = load_llm(args.llm, args.llm_cache, device)
        lm = FrozenLM.around(model, tok, device, settings.align.prompt)
        bundle = align_catalogue(engine, lm, settings, progress=not args.smoke)
        if args.scorer == "composite":
            record = retrain_once(engine, bundle.version, settings, device, progress=not args.smoke)
            print(f"retrain: composite {record['version']} promoted={record['promoted']}")
        state = ServingState.for_bundle(engine, bundle, settings)
        print(f"serving {state.version}, refreshed every {settings.index.refresh_s} s")
        worker = UpdateWorker(engine, bundle, lm, settings)
        loop, stop = ConsumeLoop(ItemsHandler(settings), engine, settings), threading.Event()
        requests = [0]
        threads = [
            threading.Thread(target=worker.run),
            threading.Thread(target=loop.run),
            threading.Thread(target=state.run_refresher, args=(settings.index.refresh_s, stop)),
            threading.Thread(target=_load, args=(state, len(ds.item_ids), args.load_rps, stop, requests)),
        ]
        for t in threads:
            t.start()
        time.sleep(3)  # the consumer joins its group
        published: dict[str, float] = {}
        servable: dict[str, float] = {}
        refined: dict[str, float] = {}
        tombstoned: dict[int, float] = {}
        withdrawn: dict[int, float] = {}
        doomed = random.Random(0).sample(range(1, len(ds.item_ids) + 1), min(args.withdraw, len(ds.item_ids)))
        # one producer for both kinds of event, as a publisher keeps one; every clock starts
        # before its send, and a thread of its own observes, so a slow send delays no reading
        producer = Producer(settings.kafka.client_config() | {"linger.ms": 0})
        watching = threading.Thread(
            target=_watch, args=(engine, state, published, servable, refined, tombstoned, withdrawn, stop)
        )
        watching.start()
        try:
            t_next = t_withdraw = t_start = time.monotonic()
            deadline = time.monotonic() + args.timeout + len(new_titles) * args.every
            fresh = len(new_titles)  # servable too: a refined row is seen in the catalogue first
            while (
                min(len(refined), len(servable)) < fresh or len(withdrawn) < len(doomed)
            ) and time.monotonic() < deadline:
                if len(tombstoned) < len(doomed) and time.monotonic() >= t_withdraw:
                    idx = doomed[len(tombstoned)]
                    tombstoned[idx] = time.monotonic()
                    produce(producer, TOPIC_ITEMS, key=state.item_id[idx].encode(), value=None)
                    producer.flush(10)
                    t_withdraw += args.withdraw_every
                if len(published) < len(new_titles) and time.monotonic() >= t_next:
                    k = len(published)
                    ev = {
                        "item_id": f"fresh-{k}",
                        "title": new_titles[k],
                        "description": None,
                        "advertiser_id": "bench",
                        "event_time": datetime.now(UTC).isoformat(),
                    }
                    published[ev["item_id"]] = time.monotonic()
                    produce(producer, TOPIC_ITEMS, key=ev["item_id"].encode(), value=json.dumps(ev).encode())
                    producer.flush(10)
                    t_next += args.every
                time.sleep(0.01)
        finally:
            worker.stop()
            loop.stop()
            stop.set()
            for t in [*threads, watching]:
                t.join(60)
        seconds = time.monotonic() - t_start
    print(
        f"{len(new_titles)} fresh items, one every {args.every} s; {len(doomed)} withdrawals, one every "
        f"{args.withdraw_every} s; {requests[0] / seconds:.0f} recommendations/s meanwhile; device {device}, "
        f"slice {args.items} items, scorer {state.version}, refresh every {settings.index.refresh_s} s"
    )
    print("| stage | n | median s | p95 s | p99 s | max s |\n|---|---|---|---|---|---|")
    for name, done, start in (
        ("event -> servable (first estimate)", servable, published),
        ("event -> refined", refined, published),
        ("tombstone -> out of the index", withdrawn, tombstoned),
    ):
        secs = np.array([done[i] - start[i] for i in done] or [np.nan])
        p50, p95, p99 = np.percentile(secs, [50, 95, 99])
        print(f"| {name} | {len(done)} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {secs.max():.2f} |")
    if len(refined) < len(new_titles):
        raise SystemExit(f"only {len(refined)} of {len(new_titles)} fresh items refined in time")
    if len(withdrawn) < len(doomed):
        raise SystemExit(f"only {len(withdrawn)} of {len(doomed)} withdrawn items left the index in time")


def _load(state: ServingState, n_items: int, rps: float, stop: threading.Event, done: list[int]) -> None:
    """Recommendations for random 5-item histories of the catalogue, ``rps`` a second."""
    rng, t_next = random.Random(1), time.monotonic()
    while not stop.wait(max(0.0, t_next - time.monotonic())):
        state.recommend([rng.randint(1, n_items) for _ in range(5)], 10, set())
        done[0] += 1
        t_next += 1 / rps


def _watch(engine, state: ServingState, published, servable, refined, tombstoned, withdrawn, stop) -> None:
    """Every 20 ms until ``stop``: which items are servable, refined, out of the index."""
    while not stop.wait(0.02):
        _observe(engine, state, published, servable, refined)
        now, hashes = time.monotonic(), state.served.hashes
        withdrawn.update({i: now for i in list(tombstoned) if i not in withdrawn and i not in hashes})


def _observe(engine, state: ServingState, published, servable, refined) -> None:
    now = time.monotonic()
    for item_id in list(published):
        idx = state.idx_of.get(item_id)
        if item_id not in servable and idx is not None:
            try:
                state.served.index.vector(idx)
                servable[item_id] = now
            except RuntimeError:  # known to the catalogue, not indexed yet: look again
                continue
    waiting = [state.idx_of[i] for i in list(published) if i not in refined and i in state.idx_of]
    if waiting:
        with engine.connect() as conn:
            done = set(
                conn.execute(
                    select(item_embeddings.c.item_idx).where(
                        item_embeddings.c.item_idx.in_(waiting), item_embeddings.c.kind == "refined"
                    )
                ).scalars()
            )
        for item_id in list(published):
            if state.idx_of.get(item_id) in done and item_id not in refined:
                refined[item_id] = now


if __name__ == "__main__":
    main()
