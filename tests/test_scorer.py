"""The HTTP scorer over a real catalogue and index (tiny real-tokenizer LLM): the API, the
SASRec scorer's event-driven retraining and guarded promotion, and version swaps under load."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from core.settings import ApiSettings, IndexSettings, Settings, get_settings
from core.tables import model_versions
from core.versions import activate, active_version, record_version
from said.broker import free_port
from scorer.app import bearer_guard, create_app
from scorer.state import ServingState
from tests.support import faultlog
from tests.support.catalogue import POSITIVES, add_items, text_hashes
from tests.support.ruined import ruin_training
from updater import retrain
from updater.retrain import is_due, retrain_once, validation_slices

CPU = torch.device("cpu")


def retrain_settings(data, **flat) -> Settings:
    """A retrain of the tiny catalogue: short, early-stopping after 3 flat validations; its
    promotion groups of a handful of users decide."""
    return Settings(data_dir=data, scorer_patience=3, scorer_eval_every=1, retrain_min_group_users=3, **flat)


def refreshing(state: ServingState, every_s: float) -> ServingState:
    state.cfg = IndexSettings(refresh_s=every_s)
    return state


@pytest.fixture
def client(served):
    engine, _, _, state = served
    with TestClient(create_app(engine, refreshing(state, 0.1), ApiSettings())) as c:
        yield c


def test_recommend_by_history_and_by_user(client):
    r = client.post("/recommend", json={"history": ["i0", "nope"], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 5 and body["unknown_items"] == ["nope"]
    assert "i0" not in {x["item_id"] for x in body["items"]}, "seen items are excluded"
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    r = client.post("/recommend", json={"user_id": "u1", "k": 3, "exclude_seen": False})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert not r.json()["fallback"], "a known user gets a personal ranking"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"user_id": "u1", "history": ["i0"]},
        {"history": ["i0"], "k": 0},
        {"history": ["i0"], "k": 1000},
        {"history": ["x"] * 201},
        {"history": "i0"},
    ],
)
def test_invalid_bodies_get_4xx_with_a_reason(client, body):
    r = client.post("/recommend", json=body)
    assert r.status_code == 422 and r.json()["detail"]


def test_items_health_ready_metrics_openapi(client):
    item = client.get("/items/i3").json()
    assert item["servable"] and item["status"] == "aligned"
    assert client.get("/items/zzz").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["index_items"] == 24
    assert "said_index_items" in client.get("/metrics/").text
    assert "/recommend" in client.get("/openapi.json").json()["paths"]


def test_a_token_protects_every_data_endpoint_but_not_health(served):
    engine, _, _, state = served
    with TestClient(create_app(engine, state, ApiSettings(token="s3cret"))) as c:
        body = {"history": ["i0"]}
        for auth, status in [
            (None, 401),
            ("Bearer nope", 401),
            ("s3cret", 401),  # no scheme
            ("Basic s3cret", 401),
            ("Bearer s3cret", 200),
            ("bearer s3cret", 200),  # RFC 7235: the scheme is case-insensitive
            ("BEARER   s3cret ", 200),
        ]:
            headers = {"Authorization": auth} if auth else {}
            assert c.post("/recommend", json=body, headers=headers).status_code == status, auth
            assert c.get("/items/i0", headers=headers).status_code == status, auth
        assert c.get("/healthz").status_code == 200 and c.get("/metrics/").status_code == 200
    with pytest.raises(ValueError, match="empty"):
        ApiSettings(token=" ")
    with pytest.raises(ValueError, match="empty"):
        bearer_guard(" ")


def test_serve_refuses_an_open_api_off_loopback(monkeypatch):
    from said.cli import is_loopback, main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("scorer")
    monkeypatch.delenv("SAID_API_TOKEN", raising=False)
    get_settings.cache_clear()
    with pytest.raises(SystemExit, match="without SAID_API_TOKEN"):
        main(["serve", "--host", "0.0.0.0"])
    for token, error in (("", "empty"), (" s3cret ", "whitespace")):
        monkeypatch.setenv("SAID_API_TOKEN", token)
        get_settings.cache_clear()
        with pytest.raises(ValidationError, match=error):
            get_settings()
    get_settings.cache_clear()


def test_corrupt_snapshot_is_rebuilt_from_the_catalogue(served):
    engine, bundle, data, state = served
    snap = state.rebuild()
    snap.write_bytes(b"garbage")
    again = ServingState(
        engine, bundle.version, bundle.aligner.cfg.vector_dim, data / "index", IndexSettings(), POSITIVES
    )
    assert len(again.served.index) == 24 and again.recommend([1], 3, {1})[0]


def test_retraining_is_event_driven_and_promotes_only_if_not_worse(served, monkeypatch):
    engine, bundle, data, state = served
    cfg = retrain_settings(data, retrain_min_interactions=50, retrain_min_items=5, retrain_epochs=3)
    assert is_due(engine, cfg), "no scorer yet and interactions exist"
    first = retrain_once(engine, bundle.version, cfg, CPU, progress=False)
    assert first["promoted"] and active_version(engine, "scorer")[0] == first["version"]
    assert first["ndcg@10"] > 0 and first["val_ndcg@10"] > 0
    assert not is_due(engine, cfg), "nothing new since the last attempt"
    state.refresh()
    assert state.version == first["version"], "the replica swapped to the promoted scorer"
    ranked, version, _, _ = state.recommend([1, 9], 5, {1, 9})
    assert version == first["version"] and len(ranked) == 5

    ruin_training(monkeypatch)  # a candidate whose training went wrong: rejected
    second = retrain_once(engine, bundle.version, cfg, CPU, progress=False)
    assert not second["promoted"] and second["ndcg@10"] < first["ndcg@10"]
    assert second["warm_start"] == first["version"]
    assert active_version(engine, "scorer")[0] == first["version"], "a worse candidate is not promoted"


def test_an_activation_during_training_is_not_undone_and_two_actives_are_refused(served, monkeypatch):
    engine, bundle, data, _ = served
    cfg = retrain_settings(data, retrain_epochs=2)
    first = retrain_once(engine, bundle.version, cfg, CPU, progress=False)
    first_path = active_version(engine, "scorer")[1]
    with engine.begin() as conn:
        record_version(conn, "scorer", "operator-pick", first_path, {}, "retired")
    real = retrain.train_scorer

    def operator_rolls_back_meanwhile(*args, **kwargs):
        activate(engine, "scorer", "operator-pick")
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain, "train_scorer", operator_rolls_back_meanwhile)
    t0 = time.monotonic()
    second = retrain_once(engine, bundle.version, cfg, CPU, progress=False)
    settled = time.monotonic() - t0  # the retrain, from the operator's activate to its verdict
    with engine.connect() as conn:
        actives = conn.execute(
            select(model_versions.c.version).where(
                model_versions.c.kind == "scorer", model_versions.c.status == "active"
            )
        ).all()
    undone = int(active_version(engine, "scorer")[0] != "operator-pick")
    name = f"promotion racing an operator's activate ({engine.dialect.name})"
    faultlog.record(name, 1, undone, len(actives) - 1, settled)
    assert second["warm_start"] == first["version"] and not second["promoted"]
    assert not undone, "the operator's choice stands"
    with pytest.raises(IntegrityError), engine.begin() as conn:
        record_version(conn, "scorer", "x1", data / "x1.pt", {}, "retired")
        conn.execute(update(model_versions).where(model_versions.c.kind == "scorer").values(status="active"))


def test_promotion_slice_is_disjoint_from_early_stopping_and_stable_as_users_arrive():
    def slices(n_users: int) -> tuple[set[str], set[str]]:
        # each user's last item names it, so a slice's targets say which users it holds
        by_user = {f"u{i}": [1, 2, 3, 10_000 + i] for i in range(n_users)}
        name = {s[-1]: u for u, s in by_user.items()}
        stop, promote = validation_slices(by_user, 100_000, seed=0)
        return {name[t] for t in stop[1]}, {name[t] for t in promote[1]}

    stop, promote = slices(400)
    assert not stop & promote and len(stop | promote) == 400 and min(len(stop), len(promote)) > 150
    stop_later, promote_later = slices(700)
    assert stop <= stop_later and promote <= promote_later, "a user keeps its slice across retrains"


@pytest.mark.slow
def test_no_failed_request_while_versions_swap_under_load(served):
    engine, bundle, data, state = served
    cfg = retrain_settings(data, retrain_epochs=2)
    versions = [retrain_once(engine, bundle.version, cfg, CPU, progress=False)["version"] for _ in range(2)]
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, refreshing(state, 0.05), ApiSettings()), port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    statuses, seen_versions, stop = [], set(), threading.Event()

    def load() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/recommend", json={"user_id": f"u{len(statuses) % 30}", "k": 5})
                except httpx.TransportError:
                    continue  # not listening yet
                statuses.append(r.status_code)
                seen_versions.add(r.json().get("model_version"))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        for n in range(8):  # roll back and forth between the two versions
            activate(engine, "scorer", versions[n % 2])
            time.sleep(0.4)
    finally:
        stop.set()
        for c in clients:
            c.join(10)
        server.should_exit = True
        thread.join(10)
    assert len(statuses) > 50 and set(statuses) == {200}, set(statuses)
    assert set(versions) <= seen_versions, "both versions served"


def _write_vector(engine, bundle, idx: int, created_at: datetime) -> None:
    from core.catalogue import write_embeddings

    vec = np.random.default_rng(idx).standard_normal((1, bundle.aligner.cfg.vector_dim)).astype("float32")
    hashes = text_hashes(engine, [idx])  # as the worker writes it: the item's text
    with engine.begin() as conn:
        write_embeddings(conn, bundle.version, "estimate", [idx], hashes, vec, [None], created_at)


def test_writers_with_skewed_clocks_are_still_served_and_after_a_restart(served):
    """The watermark is the database's commit-ordered seq, not writers' clocks: a writer
    an hour ahead must not hide later rows, one an hour behind must not be skipped."""
    engine, bundle, data, state = served
    add_items(engine, 24, 3)  # idx 25, 26, 27
    now = datetime.now(UTC)
    t0 = time.monotonic()
    _write_vector(engine, bundle, 25, now + timedelta(hours=1))
    applied = [state.refresh()]
    _write_vector(engine, bundle, 26, now)
    _write_vector(engine, bundle, 27, now - timedelta(hours=1))
    applied.append(state.refresh())
    assert len(state.served.index) == 27
    state.rebuild()  # a snapshot carries the watermark; a restarted replica resumes from it
    again = ServingState(
        engine, bundle.version, bundle.aligner.cfg.vector_dim, data / "index", IndexSettings(), POSITIVES
    )
    add_items(engine, 27, 1)
    _write_vector(engine, bundle, 28, now - timedelta(hours=2))
    applied.append(again.refresh())
    name = f"writers' clocks 1-2 h ahead and behind, scorer restarted ({engine.dialect.name})"
    faultlog.record(name, 3, 28 - len(again.served.index), sum(applied) - 4, time.monotonic() - t0)
    assert len(again.served.index) == 28 and again.item_id[28] == "i27"
    assert applied == [1, 2, 1], "each row applied once: no overlap window re-reads"


def test_every_indexed_item_is_named_even_if_the_items_read_misses_it(served, monkeypatch):
    """Items and embeddings used to be read in two statements: an embedding committed
    between them was indexed without a name, and naming it in a response raised KeyError."""
    from scorer import state as state_module

    engine, bundle, _data, state = served
    add_items(engine, 24, 1)
    _write_vector(engine, bundle, 25, datetime.now(UTC))
    monkeypatch.setattr(state_module, "item_ids_after", lambda conn, after: {})
    state.refresh()
    ranked, _, _, _ = state.recommend([25], 30, set())
    assert 25 in {i for i, _ in ranked}
    assert all(i in state.item_id for i, _ in ranked)


def test_fresh_items_are_served_while_a_compaction_builds(served, monkeypatch):
    """A compaction builds on a thread of its own (minutes at 1M HNSW items): refreshes
    meanwhile still apply fresh items, and the compacted index swapped in after holds them."""
    from scorer.index import ItemIndex

    engine, bundle, _data, state = served
    building, release = threading.Event(), threading.Event()
    build = ItemIndex.build

    def held_build(index, ids, vectors):  # the build stays running until the test releases it
        building.set()
        release.wait(60)
        build(index, ids, vectors)

    def refreshed() -> bool:  # within 10 s, not held up by the build
        t = threading.Thread(target=state.refresh, daemon=True)
        t.start()
        t.join(10)
        return not t.is_alive()

    before = state.served.index
    monkeypatch.setattr(ItemIndex, "needs_compaction", lambda index: index is before)
    monkeypatch.setattr(ItemIndex, "build", held_build)
    try:
        assert refreshed(), "a refresh waited for the compaction's build"
        assert building.wait(10), "the compaction started"
        add_items(engine, 24, 1)
        _write_vector(engine, bundle, 25, datetime.now(UTC))
        assert refreshed(), "a refresh waited for the compaction's build"
        assert state.served.index is before and before.lookup(25) is not None, "served before it ends"
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while state.served.index is before and time.monotonic() < deadline:
        time.sleep(0.05)
        state.refresh()
    fresh = state.served.index
    assert fresh is not before and len(fresh) == 25 and fresh.lookup(25) is not None
    assert fresh.delta.ntotal == 1, "built from the copy; the item that came meanwhile replayed"
