"""The HTTP scorer over a real catalogue and index (tiny real-tokenizer LLM)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from said.catalogue import insert_interactions
from said.events import InteractionEvent
from scorer.app import create_app
from scorer.state import ServingState
from tests.test_updater import aligned  # noqa: F401 - fixture


@pytest.fixture
def client(aligned):  # noqa: F811
    engine, bundle, _llm, _tok, data = aligned
    now = datetime.now(UTC)
    with engine.begin() as conn:
        insert_interactions(conn, [InteractionEvent(f"e{i}", "u1", f"i{i}", "click", now)
                                   for i in (0, 8)], {"i0": 1, "i8": 9})  # fmt: skip
    state = ServingState(engine, bundle.version, bundle.aligner.cfg.hidden, data / "index")
    with TestClient(create_app(engine, state, poll_s=0.1)) as c:
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
    assert client.post("/recommend", json={"user_id": "ghost"}).status_code == 404


@pytest.mark.parametrize(
    "body",
    [{}, {"user_id": "u1", "history": ["i0"]}, {"history": ["i0"], "k": 0},
     {"history": ["i0"], "k": 1000}, {"history": ["x"] * 201}, {"history": "i0"}],
)  # fmt: skip
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
