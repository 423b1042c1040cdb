"""Sustained load: interactions at a fixed rate while the updater aligns and the scorer serves.

Method: the production processes, started through the CLI as in docker-compose: ``said
consume items``, ``said consumer run interactions``, ``said worker run`` and ``said scorer serve``, on an
embedded broker and a throwaway PostgreSQL. Set-up (the CLI's commands in one process)
replays a Beauty slice (``--items``) and runs ``said aligner train --epochs 1`` (quality is not the
point). Then, for ``--seconds``, this
process produces interactions at ``--rate`` events/s (10 ms ticks) over the slice's items,
publishes a brand-new item every 10 s (real Beauty titles outside the slice) and asks the
scorer for recommendations ~20 times a second. Every 5 s it samples the interaction
consumer's lag (its ``said_consumer_lag`` metric) and every process's RSS (reported at the
start, 60 s in, once the worker's first refinement has allocated its buffers, and at the end). At the end it
waits for the consumer to drain and checks that the catalogue holds every produced event.

    python benchmarks/load.py [--rate 34692] [--seconds 300] [--items 100] [--smoke]

``--smoke``: 20 items, 300 events/s for 5 s, shorter idle exits and group joins, and a
tiny random LLM with SmolLM2's tokenizer: checks that the benchmark runs, not a result.
"""

# ruff: noqa: E402 (imports follow the sys.path set-up below)
from __future__ import annotations

import sys
from pathlib import Path

# The throwaway PostgreSQL cluster comes from tests/support, which is not an installed
# package: put the repository root on the path, so `python benchmarks/load.py` needs no
# PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import re
import subprocess
import tempfile
import threading
import time

import httpx
from _bench import DATA, SMOKE_NOTE, tiny_llm_folder, wait_http  # a sibling module of the benchmarks
from confluent_kafka import Producer
from sqlalchemy import func, select

from core.dataset import load_dataset
from core.db import make_engine
from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from core.kafka import produce
from core.settings import KafkaSettings
from core.tables import interactions, item_embeddings
from said.broker import EmbeddedBroker, ensure_topics, free_port
from tests.support.pgcluster import ThrowawayPostgres, find_pg_bin

DATASET = DATA / "amazon-beauty"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lag(port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return int(sum(float(v) for v in re.findall(r"^said_consumer_lag\{[^}]*\} (\S+)$", text, re.M)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path, default=DATASET)
    ap.add_argument("--rate", type=int, default=34_692, help="events/s (the ingestion benchmark's)")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--llm-cache", type=Path, default=None, help="a converted SmolLM2 folder")
    ap.add_argument("--llm", default=None, help="SAID_LLM of the processes (default: SmolLM2)")
    ap.add_argument("--idle-exit", type=float, default=3.0, help="set-up consumers stop after idle s")
    ap.add_argument("--join-s", type=float, default=8.0, help="seconds for the consumers to join")
    ap.add_argument(
        "--env", action="append", default=[], metavar="SAID_X=VALUE", help="more settings for every process"
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.items, args.rate, args.seconds, args.idle_exit, args.join_s = 20, 300, 5.0, 1.0, 1.0
        args.llm = args.llm or str(tiny_llm_folder())
        # a random LLM never reaches the accuracy bar: few refinement passes, few decodes
        args.env += ["SAID_REFINE_EPOCHS=3", "SAID_FIDELITY_EXACT_ITEMS=4", "SAID_REFERENCE_ITEMS=4"]
        args.env += ["SAID_SESSION_TIMEOUT_MS=2000"]
        print(SMOKE_NOTE)
    full = load_dataset(args.dataset)
    ds = load_dataset(args.dataset, args.items)
    fresh_titles = [t for i, t in zip(full.item_ids, full.titles, strict=True) if i not in set(ds.item_ids)]
    pg = ThrowawayPostgres(find_pg_bin()).start()
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(free_port()) as broker:
        if args.llm_cache:
            os.symlink(args.llm_cache.resolve(), Path(tmp) / "llm")
        ports = {name: free_port() for name in ("items", "interactions", "update", "serve")}
        env = (
            os.environ
            | {
                "SAID_DATABASE_URL": pg.create_database(),
                "SAID_DATA_DIR": tmp,
                "SAID_KAFKA_BOOTSTRAP": broker.bootstrap,
                "SAID_LOG_LEVEL": "WARNING",
                "SAID_SESSION_TIMEOUT_MS": "6000",
            }
            | ({"SAID_LLM": args.llm} if args.llm else {})
        )
        env |= dict(e.split("=", 1) for e in args.env)
        said = [sys.executable, "-m", "said.cli"]

        def setup(*cmds: list[str]) -> None:
            """The set-up commands in order, through the CLI's own entry point, in one
            process (each its own would pay torch's import again)."""
            steps = ";".join(f"main({cmd!r}) and sys.exit(1)" for cmd in cmds)
            subprocess.run(
                [sys.executable, "-c", f"import sys; from said.cli import main; {steps}"], env=env, check=True
            )

        def start(name: str, *cmd: str) -> None:
            procs[name] = subprocess.Popen([*said, *cmd], env=env | {"SAID_METRICS_PORT": str(ports[name])})

        try:
            ensure_topics(KafkaSettings(bootstrap=broker.bootstrap))
            setup(
                ["db", "upgrade"],
                ["produce", "--dataset", str(args.dataset), "--limit", str(args.items)],
                ["consume", "items", "--idle-exit", str(args.idle_exit)],
                ["consume", "interactions", "--idle-exit", str(args.idle_exit)],
                ["align", "--epochs", "1"],
            )
            engine = make_engine(env["SAID_DATABASE_URL"])
            base = _count(engine)
            start("items", "consume", "items")
            start("interactions", "consume", "interactions")
            start("update", "update")
            procs["serve"] = subprocess.Popen([*said, "serve", "--port", str(ports["serve"])], env=env)
            wait_http(f"http://127.0.0.1:{ports['serve']}/readyz", 120, procs["serve"])
            time.sleep(args.join_s)  # consumers join their groups
            report = _drive(args, broker.bootstrap, ds.item_ids, fresh_titles, ports, procs)
            t0 = time.monotonic()
            while _count(engine) < base + report["produced"] and time.monotonic() - t0 < 600:
                time.sleep(1)
            report["drain_s"] = time.monotonic() - t0
            report["stored"] = _count(engine) - base
            refined = (
                select(func.count()).select_from(item_embeddings).where(item_embeddings.c.kind == "refined")
            )
            with engine.connect() as conn:
                report["fresh_aligned"] = conn.execute(refined).scalar()
            report["rss"].append({n: rss_mib(p.pid) for n, p in procs.items()})
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(30)
            pg.close()
    _print(args, report)


def _drive(args, bootstrap, item_ids, fresh_titles, ports, procs) -> dict:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "queue.buffering.max.messages": 2_000_000}
    )
    stop, scorer = threading.Event(), {"ok": 0, "failed": 0}
    threading.Thread(target=_ask_scorer, args=(ports["serve"], stop, scorer), daemon=True).start()
    rss = [{n: rss_mib(p.pid) for n, p in procs.items()}]  # one sample per 5 s
    lags, produced, fresh = [], 0, 0
    t_start = time.monotonic()
    next_sample = next_item = t_start
    while (now := time.monotonic()) - t_start < args.seconds:
        due = int((now - t_start) * args.rate) - produced
        for e in range(produced, produced + due):
            item = item_ids[e % len(item_ids)]
            value = (
                f'{{"event_id":"L{e}","user_id":"u{e % 10000}","item_id":"{item}",'
                f'"type":"click","event_time":"2026-06-01T00:00:00Z"}}'
            )
            produce(producer, TOPIC_INTERACTIONS, key=f"u{e % 10000}", value=value)
        produced += due
        producer.poll(0)
        if now >= next_item:
            title = fresh_titles[fresh % len(fresh_titles)]
            producer.produce(
                TOPIC_ITEMS,
                key=f"load-{fresh}",
                value=(
                    f'{{"item_id":"load-{fresh}","title":{_json_str(title)},"description":null,'
                    f'"advertiser_id":"load","event_time":"2026-06-01T00:00:00Z"}}'
                ),
            )
            fresh += 1
            next_item += 10
        if now >= next_sample:
            lags.append((now - t_start, lag(ports["interactions"])))
            rss.append({n: rss_mib(p.pid) for n, p in procs.items()})
            next_sample += 5
        time.sleep(0.01)
    assert producer.flush(120) == 0
    stop.set()
    return {
        "produced": produced,
        "produce_s": time.monotonic() - t_start,
        "fresh": fresh,
        "lags": lags,
        "rss": rss,
        "scorer": scorer,
    }


def _json_str(s: str) -> str:
    import json

    return json.dumps(s)


def _ask_scorer(port: int, stop: threading.Event, counts: dict) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        n = 0
        while not stop.is_set():
            r = c.post("/recommend", json={"user_id": f"u{n % 10000}", "k": 10})
            counts["ok" if r.status_code in (200, 404) else "failed"] += 1  # 404: no clicks yet
            n += 1
            time.sleep(0.05)


def _count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(interactions)).scalar()


def _print(args, r: dict) -> None:
    rate = r["produced"] / r["produce_s"]
    print(
        f"target {args.rate:,} ev/s for {args.seconds:.0f} s; produced {r['produced']:,} "
        f"({rate:,.0f} ev/s), stored {r['stored']:,}, lost {r['produced'] - r['stored']:,}; "
        f"drained {r['drain_s']:.0f} s after the load stopped"
    )
    print(
        f"fresh items published {r['fresh']}, refined by the updater {r['fresh_aligned']}; "
        f"scorer requests ok {r['scorer']['ok']}, failed {r['scorer']['failed']}"
    )
    lags = r["lags"]
    print("consumer lag (messages) every 5 s: " + ", ".join(f"{v:,}" for _, v in lags))
    third = max(1, len(lags) // 3)
    print(
        f"lag max {max(v for _, v in lags):,}; mean of first third "
        f"{sum(v for _, v in lags[:third]) / third:,.0f}, of last third "
        f"{sum(v for _, v in lags[-third:]) / third:,.0f}"
    )
    # the worker's first refinement allocates its activations: "warm" is 60 s into the load
    warm = r["rss"][min(12, len(r["rss"]) - 1)]
    print("| process | RSS at start MiB | after 60 s | at the end |\n|---|---|---|---|")
    for name in r["rss"][0]:
        print(f"| {name} | {r['rss'][0][name]:.0f} | {warm[name]:.0f} | {r['rss'][-1][name]:.0f} |")


if __name__ == "__main__":
    main()
