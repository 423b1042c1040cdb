"""``said demo``: the real pipeline on the embedded defaults, end to end.

Embedded broker -> topics -> replay a slice of the data set through Kafka -> consume into
the catalogue (SQLite by default) -> full SAID alignment of the slice (SmolLM2, CPU) ->
the streaming worker, the item consumer and the HTTP scorer start -> brand-new items are
published and the demo measures the seconds until each enters a real user's top-10.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from models.data import load_dataset
from models.llm import load_llm, pick_device
from models.metrics import recall_ndcg
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.catalogue import count_rows
from said.db import make_engine
from said.events import TOPIC_ITEMS
from said.migrate import upgrade
from said.plots import alignment_curve, fresh_vs_reference, freshness
from said.produce import produce_events, replay_dataset
from said.settings import Settings
from said.tables import interactions, items
from scorer.app import create_app
from scorer.state import ServingState
from training.align import AlignConfig
from updater.full_align import align_catalogue
from updater.worker import UpdateWorker, WorkerConfig

log = logging.getLogger(__name__)
DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/data/amazon-beauty"


def run_demo(settings: Settings, dataset: Path, n_items: int, align_epochs: int,
             n_fresh: int = 5, port: int = 8000, keep_serving: bool = False
             ) -> dict[str, object]:  # fmt: skip
    """Run the pipeline once and return the summary it prints."""
    ds = load_dataset(dataset, n_items)
    summary: dict[str, object] = {"dataset": str(dataset), "items in slice": len(ds.item_ids),
                                  "interactions in slice": ds.n_interactions}  # fmt: skip
    t_start = time.perf_counter()
    with EmbeddedBroker(free_port()) as broker:
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap,
                                               "session_timeout_ms": 2000})  # fmt: skip
        ensure_topics(settings.kafka_config())
        upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        replay_dataset(settings.kafka_config(), ds)
        for handler in (ItemsHandler(settings), InteractionsHandler(settings)):
            stats = ConsumeLoop(handler, engine, settings).run(idle_exit=2.0)
            summary[f"{handler.name}: stored / dead-lettered"] = (
                f"{stats.stored} / {stats.dead_lettered}"
            )
        with engine.connect() as conn:
            summary["catalogue items / interactions"] = (
                f"{count_rows(conn, items)} / {count_rows(conn, interactions)}"
            )

        device = pick_device(settings.device)
        llm, tok = load_llm(settings.llm, settings.data_dir / "llm", device)
        t0 = time.perf_counter()
        bundle = align_catalogue(engine, llm, tok, device, settings.data_dir,
                                 AlignConfig(epochs=align_epochs), settings.soft_tokens,
                                 settings.item_dim)  # fmt: skip
        summary["alignment seconds"] = round(time.perf_counter() - t0, 1)
        summary["alignment mean loss (reference)"] = round(bundle.reference_loss, 3)

        state = ServingState(engine, bundle.version, bundle.aligner.cfg.hidden,
                             settings.data_dir / "index")  # fmt: skip
        summary.update(_offline_quality(state, ds))
        server = uvicorn.Server(uvicorn.Config(create_app(engine, state, poll_s=0.2), port=port,
                                               log_level="warning"))  # fmt: skip
        worker = UpdateWorker(engine, bundle, llm, tok, device, settings.data_dir / "index",
                              WorkerConfig(batch=8, refine_epochs=10))  # fmt: skip
        item_loop = ConsumeLoop(ItemsHandler(settings), engine, settings)
        threads = [threading.Thread(target=f, daemon=True)
                   for f in (server.run, worker.run, item_loop.run)]  # fmt: skip
        for t in threads:
            t.start()
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url)
            time.sleep(3)  # the item consumer joins its group
            fresh = _publish_fresh_items(settings, ds, n_fresh, url)
            secs = [s for _, _, s in fresh if s is not None]
            summary["fresh items in a user's top-10"] = f"{len(secs)} of {len(fresh)}"
            if secs:
                summary["event -> top-10 seconds (median, max)"] = (
                    f"{np.median(secs):.2f}, {max(secs):.2f}"
                )
            for user, title, s in fresh:
                summary[f"  user {user}"] = f"{title[:48]!r}: {'-' if s is None else f'{s:.2f}s'}"
            worker_losses = list(worker.fresh_losses)
            plots = settings.data_dir / "plots"
            alignment_curve(bundle.history, plots / "alignment_loss.png")
            fresh_vs_reference(bundle.reference_losses, worker_losses, plots / "fresh_vs_reference.png")
            freshness(secs, plots / "freshness.png")
            summary["plots"] = str(plots)
            summary["API"] = f"{url}/docs (POST /recommend)"
            summary["wall seconds"] = round(time.perf_counter() - t_start, 1)
            if keep_serving:
                print(format_summary(summary), flush=True)
                log.info("serving on %s; Ctrl-C stops", url)
                while True:
                    time.sleep(1)
        finally:
            server.should_exit = True
            worker.stop()
            item_loop.stop()
            for t in threads:
                t.join(30)
    summary["database"] = settings.redacted()["database_url"]
    return summary


def _offline_quality(state: ServingState, ds) -> dict[str, object]:
    """NDCG@10 of the served similarity scorer on the slice: last item of each user as the
    target, the rest as history, ranked against all items (no training involved)."""
    idx_of = state.idx_of
    ranks = []
    for _, seq in ds.sequences:
        if len(seq) < 2:
            continue
        hist = [idx_of[i] for i in seq[:-1]]
        top = [i for i, _ in state.recommend(hist, 50, set())]
        target = idx_of[seq[-1]]
        ranks.append(top.index(target) if target in top else 10_000)
    if not ranks:
        return {}
    import torch

    m = recall_ndcg(torch.tensor(ranks), (10,))
    return {"similarity scorer on slice: Recall@10 / NDCG@10":
            f"{m['recall@10']:.4f} / {m['ndcg@10']:.4f} ({len(ranks)} users)"}  # fmt: skip


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"scorer at {url} not ready in {timeout}s")


def _publish_fresh_items(settings: Settings, ds, n: int, url: str):
    """For n real users, publish a new variant of their last item; time each to top-10."""
    titles = dict(zip(ds.item_ids, ds.titles, strict=True))
    users = [(u, seq) for u, seq in ds.sequences if len(seq) >= 3][:n]
    now = datetime.now(UTC).isoformat()
    events = []
    for n_user, (_user, seq) in enumerate(users):
        title = f"{titles[seq[-1]]} - new edition"
        events.append((f"fresh-{n_user}", {"item_id": f"fresh-{n_user}", "title": title,
                       "description": None, "advertiser_id": "demo", "event_time": now}))  # fmt: skip
    t0 = time.monotonic()
    produce_events(settings.kafka_config(), TOPIC_ITEMS, iter(events), len(events))
    found: dict[str, float] = {}
    while time.monotonic() - t0 < 120 and len(found) < len(users):
        for n_user, (user, _) in enumerate(users):
            if user in found:
                continue
            r = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 10})
            if r.status_code == 200 and f"fresh-{n_user}" in [x["item_id"] for x in r.json()["items"]]:
                found[user] = time.monotonic() - t0
        time.sleep(0.1)
    return [(u, ev[1]["title"], found.get(u)) for (u, _), ev in zip(users, events, strict=True)]


def format_summary(summary: dict[str, object]) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in summary.items())
