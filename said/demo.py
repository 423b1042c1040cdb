"""``said demo``: the real pipeline on the embedded defaults, end to end.

Embedded broker -> topics -> replay a slice of the data set through Kafka -> consume into
the catalogue (SQLite by default) -> full SAID alignment of the slice (SmolLM2, CPU) ->
the warm/cold composite is trained on the slice (its NDCG@10 on test users, all, warm-target
and cold-target, is reported beside id and text SASRecs trained on the same data) -> the
streaming worker, the event-driven retrainer, the item consumer and the HTTP
scorer start -> brand-new items are published; the demo measures the seconds until each is
servable and until it enters a real user's top-10.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from consumers.runner import ConsumeLoop
from core.catalogue import count_rows
from core.dataset import load_dataset
from core.db import make_engine
from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from core.settings import Settings
from core.tables import interactions, items
from core.versions import active_version
from models.composite import load_composite
from said import wiring
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.inspect import inspect_item
from said.migrate import upgrade
from said.plots import alignment_curve, fresh_vs_reference, freshness
from said.produce import BASE_TIME, produce_events, replay_dataset
from said.same_slice import baselines, figures

log = logging.getLogger(__name__)
DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/data/amazon-beauty"


def run_demo(settings: Settings, dataset: Path, keep_serving: bool = False) -> dict[str, object]:
    """Run the pipeline once (``settings.demo``: slice, passes, fresh items; the API on
    ``settings.api.port``) and return the summary it prints."""
    demo, port = settings.demo, settings.api.port
    ds = load_dataset(dataset, demo.items)
    summary: dict[str, object] = {
        "dataset": str(dataset),
        "items in slice": len(ds.item_ids),
        "interactions in slice": ds.n_interactions,
    }
    t_start = time.perf_counter()
    with EmbeddedBroker(free_port()) as broker:
        settings = settings.override(
            kafka_bootstrap=broker.bootstrap,
            session_timeout_ms=2000,
            align_epochs=demo.align_epochs,
            align_batch=demo.align_batch,
            fidelity_exact_items=demo.decoded,
            reference_items=demo.reference_items,
            retrain_poll_s=5.0,
            worker_batch=8,
            index_refresh_s=0.2,
        )
        ensure_topics(settings.kafka)
        upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        replay_dataset(settings.kafka.client_config(), ds)
        for topic in wiring.TOPIC_HANDLERS:  # items first: interactions then find theirs
            loop = wiring.consume_loop(settings, topic, engine)
            stats = loop.run(idle_exit=DRAINED_S)
            summary[f"{loop.handler.name}: stored / dead-lettered"] = (
                f"{stats.stored} / {stats.dead_lettered}"
            )
        with engine.connect() as conn:
            summary["catalogue items / interactions"] = (
                f"{count_rows(conn, items)} / {count_rows(conn, interactions)}"
            )

        lm = wiring.frozen_lm(settings, settings.align.lora_rank, settings.align.prompt)
        t0 = time.perf_counter()
        log.info("demo: aligning %d items (then fidelity and the fresh-path reference)", len(ds.item_ids))
        bundle = wiring.align(settings, engine, lm)
        summary["alignment seconds"] = round(time.perf_counter() - t0, 1)
        fid, ref = bundle.fidelity, bundle.reference
        summary["alignment passes, token accuracy, exact rebuild"] = (
            f"{len(bundle.history)}, {fid['mean_token_accuracy']:.3f}, {fid['exact_match']:.2f}"
            f" ({fid['items']} items, {fid['exact_items']} decoded)"
        )
        summary["fresh-path reference: token accuracy, exact, s/item"] = (
            f"{ref['mean_token_accuracy']:.3f}, {ref['exact_match']:.2f}, {ref['seconds_per_item']:.1f}"
            f" ({ref['items']} catalogue items as if new)"
        )

        t0 = time.perf_counter()
        log.info("demo: training the said scorer")
        scorer = wiring.retrain(settings, engine, bundle.version)
        summary["scorer training seconds"] = round(time.perf_counter() - t0, 1)
        summary["served composite NDCG@10: all / warm / cold test users"] = figures(
            {"all": scorer["ndcg@10"], "warm": scorer["warm"]["ndcg@10"], "cold": scorer["cold"]["ndcg@10"]}
        )
        log.info("demo: id and text SASRecs on the same data (for the summary)")
        for name, ndcg in baselines(engine, scorer, settings, lm).items():
            summary[f"{name} SASRec NDCG@10, same users: all / warm / cold"] = figures(ndcg)
        summary["test users: warm / cold targets"] = f"{scorer['warm']['users']} / {scorer['cold']['users']}"
        summary["random ranking NDCG@10 (same items)"] = f"{_random_ndcg(len(ds.item_ids)):.4f}"

        state = wiring.serving_state(settings, engine)
        server = uvicorn.Server(
            uvicorn.Config(wiring.api_app(settings, state), port=port, log_level="warning")
        )
        worker = wiring.update_worker(settings, engine, lm)
        item_loop = wiring.consume_loop(settings, "items", engine)
        stop_retrainer = threading.Event()
        threads = [threading.Thread(target=f, daemon=True) for f in (server.run, worker.run, item_loop.run)]
        threads.append(
            threading.Thread(
                target=wiring.watch_retrain, daemon=True, args=(settings, stop_retrainer, engine)
            )
        )
        for t in threads:
            t.start()
        url = f"http://127.0.0.1:{port}"
        token = settings.api.token.get_secret_value() if settings.api.token else None
        # the demo is a client like any other: with SAID_API_TOKEN set, it sends the token
        api = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=10
        )
        try:
            _wait_ready(api)
            log.info("demo: serving on %s; publishing %d fresh items", url, demo.fresh)
            _wait_assigned(item_loop, threads[2])  # fresh items are timed from their event, not a join
            fresh = _publish_fresh_items(settings, ds, demo.fresh, api)
            secs = [f["servable_s"] for f in fresh if f["servable_s"] is not None]
            if secs:
                summary["event -> servable seconds (median, max)"] = f"{np.median(secs):.2f}, {max(secs):.2f}"
            refined = [f["refined_s"] for f in fresh if f.get("refined_s") is not None]
            summary[f"fresh items refined within {WAIT_S:.0f} s"] = f"{len(refined)} of {len(fresh)}"
            if len(refined) < len(fresh):  # a slow CPU: the "refined" ranks below are partly estimates
                log.warning("%d fresh items still refining after %.0f s", len(fresh) - len(refined), WAIT_S)
            if refined:
                summary["event -> refined seconds (median, max)"] = (
                    f"{np.median(refined):.2f}, {max(refined):.2f}"
                )
            log.info("demo: clicks on the fresh items, then a retrain that may graduate them")
            retrained = _retrain_after_clicks(settings, engine, state, ds, fresh, api)
            summary["retrain after the fresh items' clicks"] = _verdict(retrained)
            for key, label in STAGES:
                hits = sum(1 for f in fresh if f[key] is not None and f[key] <= 10)
                summary[f"fresh items in their user's top-10 ({label})"] = f"{hits} of {len(fresh)}"
            for f in fresh:
                ranks = " -> ".join(str(f[k] or ">100") for k, _ in STAGES)
                summary[f"  user {f['user']}"] = f"{f['title'][:44]!r}: rank {ranks}"
            worker_losses = list(worker.fresh_losses)
            if worker.fresh_accuracy:
                exact, refined_n = worker.fresh_exact
                summary["fresh items refined: token accuracy, exact rebuild"] = (
                    f"{np.mean(worker.fresh_accuracy):.3f}, {exact} of {refined_n}"
                )
            looked = [("catalogue item", ds.item_ids[0])] + [("fresh item", f["item_id"]) for f in fresh[:1]]
            for label, item_id in looked:
                summary[f"said items inspect {item_id} ({label})"] = _decodes(engine, item_id)
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
            api.close()
            server.should_exit = True
            stop_retrainer.set()
            worker.stop()
            item_loop.stop()
            deadline = time.monotonic() + 20  # one budget for all: a stuck thread (daemon)
            for t in threads:  # must not hold Ctrl-C up for minutes
                t.join(max(0.1, deadline - time.monotonic()))
                if t.is_alive():
                    log.warning("thread %s did not stop in time; exiting anyway", t.name)
    summary["database"] = settings.redacted()["database_url"]
    return summary


def _random_ndcg(n_items: int) -> float:
    """Expected NDCG@10 of a uniformly random ranking of n items (the floor to beat)."""
    return sum(1 / np.log2(r + 2) for r in range(min(10, n_items))) / n_items


DRAINED_S = 2.0  # a loop started after its events were written has drained them once idle this long


def _wait_assigned(loop: ConsumeLoop, thread: threading.Thread, timeout: float = 30.0) -> None:
    """Until ``loop``'s consumer (run by ``thread``) owns a partition (its group join),
    polled: a fixed sleep was 3 s where the join takes under one, and too short where it
    takes more. A loop whose thread died never joins: that is said at once."""
    deadline = time.monotonic() + timeout
    while not loop.assigned:
        if not thread.is_alive():
            raise RuntimeError(f"the {loop.handler.name} consumer stopped before joining its group")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {loop.handler.name} consumer was not assigned a partition in {timeout}s")
        time.sleep(0.05)


def _wait_ready(api: httpx.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if api.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"scorer at {api.base_url} not ready in {timeout}s")


def _publish_fresh_items(settings: Settings, ds, n: int, api: httpx.Client) -> list[dict]:
    """For n real users, an advertiser publishes a new edition of the item the scorer now
    ranks first for that user. Each is timed to servable, and its rank in that user's
    recommendations is read at its first estimate and again once refined."""
    titles = dict(zip(ds.item_ids, ds.titles, strict=True))
    users = [u for u, seq in ds.sequences if len(seq) >= 3]
    now = datetime.now(UTC).isoformat()
    fresh, used = [], set()
    for user in users:
        top = api.post("/recommend", json={"user_id": user, "k": 1}).json()["items"][0]
        if top["item_id"] in used:  # one new edition per item: no duplicate titles
            continue
        used.add(top["item_id"])
        fresh.append(
            {
                "user": user,
                "like": top["item_id"],
                "item_id": f"fresh-{len(fresh)}",
                "servable_s": None,
                "title": f"{titles[top['item_id']]} - new edition",
            }
        )
        if len(fresh) == n:
            break
    events = [
        (
            f["item_id"],
            {
                "item_id": f["item_id"],
                "title": f["title"],
                "description": None,
                "advertiser_id": "demo",
                "event_time": now,
            },
        )
        for f in fresh
    ]
    t0 = time.monotonic()
    produce_events(settings.kafka.client_config(), TOPIC_ITEMS, iter(events), len(events))
    _wait_for(api, fresh, t0, lambda item: item["servable"], "servable_s")
    time.sleep(0.5)  # one scorer poll period: the index has the vectors now
    _rank(api, fresh, "rank_estimate")
    _wait_for(api, fresh, t0, lambda item: item["embedding"] == "refined", "refined_s")
    time.sleep(0.5)
    _rank(api, fresh, "rank_refined")
    return fresh


WAIT_S = 180.0  # how long the demo waits for its fresh items to be servable, then refined
STAGES = (("rank_estimate", "first estimate"), ("rank_refined", "refined"), ("rank_retrained", "retrained"))
CLICKERS = 3  # users who click each fresh item before the retrain (never the one it is ranked for)


def _retrain_after_clicks(
    settings: Settings, engine, state, ds, fresh: list[dict], api: httpx.Client
) -> dict:
    """Users who clicked a fresh item's original now click the fresh item (through Kafka,
    as any interaction), then one retrain runs. A promoted candidate has the fresh items in
    its teacher's training data, so each it trained on graduates from its student vector
    to its ID row, with no realignment (the summary counts them, from the model); a refused
    one leaves them on the student. Each fresh item's rank
    in its user's recommendations is read again once the scorer serves the outcome."""
    events = []
    for f in fresh:
        # each click sits in its clicker's history just before the original's, so never
        # last: a retrain trains on every history but its last item (that is the target),
        # so a last click would leave the fresh item with no training interaction
        clickers = [(u, seq.index(f["like"])) for u, seq in ds.sequences if f["like"] in seq]
        clickers = [(u, pos) for u, pos in clickers if u != f["user"]]
        for user, pos in clickers[:CLICKERS]:
            at = (BASE_TIME + timedelta(seconds=pos - 0.5)).isoformat()
            event = {"event_id": f"{f['item_id']}:{user}", "user_id": user, "item_id": f["item_id"]}
            events.append((user, event | {"type": "click", "event_time": at}))
    produce_events(settings.kafka.client_config(), TOPIC_INTERACTIONS, iter(events), len(events))
    wiring.consume_loop(settings, "interactions", engine).run(idle_exit=DRAINED_S)
    record = wiring.retrain(settings, engine, state.aligner_version)
    served = record["version"] if record["promoted"] else None
    deadline = time.monotonic() + 30
    while served is not None and api.get("/readyz").json().get("model_version") != served:
        if time.monotonic() > deadline:  # the ranks below are then the previous model's
            log.warning("the scorer does not serve %s after 30 s", served)
            break
        time.sleep(0.1)  # the replica follows within a refresh
    _rank(api, fresh, "rank_retrained")
    graduated = _graduated(engine, state, fresh) if record["promoted"] else None
    return record | {"clicks": len(events), "graduated": graduated}


def _verdict(record: dict) -> str:
    """One line: the retrain's outcome and the scores that decided it."""

    def score(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    pairs = ", ".join(
        f"{g} {score(record[g]['ndcg@10'])} vs {score(record[g]['active_ndcg@10'])}" for g in ("warm", "cold")
    )
    outcome = f"promoted: {record['graduated']} graduated" if record["promoted"] else "refused"
    return f"{record['clicks']} clicks; {outcome} (NDCG@10 candidate vs active: {pairs})"


def _graduated(engine, state, fresh: list[dict]) -> str:
    """How many fresh items the active composite trained on (their gate is open): read
    from the model itself, not assumed from the promotion."""
    model, _ = load_composite(active_version(engine, "scorer")[1])
    known = [state.idx_of[f["item_id"]] for f in fresh]
    trained = sum(1 for idx in known if idx <= model.teacher.cfg.n_items and model.counts[idx] > 0)
    return f"{trained} of {len(fresh)}"


def _wait_for(api: httpx.Client, fresh: list[dict], t0: float, done, key: str) -> None:
    while time.monotonic() - t0 < WAIT_S and any(f.get(key) is None for f in fresh):
        for f in fresh:
            if f.get(key) is None:
                r = api.get(f"/items/{f['item_id']}")
                if r.status_code == 200 and done(r.json()):
                    f[key] = time.monotonic() - t0
        time.sleep(0.05)


def _rank(api: httpx.Client, fresh: list[dict], key: str) -> None:
    """The fresh item's 1-based rank in its user's top-100, or None when below."""
    for f in fresh:
        r = api.post("/recommend", json={"user_id": f["user"], "k": 100})
        ranked = [x["item_id"] for x in r.json()["items"]] if r.status_code == 200 else []
        f[key] = ranked.index(f["item_id"]) + 1 if f["item_id"] in ranked else None


def _decodes(engine, item_id: str) -> str:
    """One line of ``said items inspect``: the item's text and what its vector decodes to."""
    found = inspect_item(engine, item_id, k=0)
    decoded = found["reconstruction"]
    shown = repr(decoded[:40]) if decoded is not None else "(not decoded yet)"
    return f"{found['text'][:40]!r} decodes to {shown}"


def format_summary(summary: dict[str, object]) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in summary.items())
