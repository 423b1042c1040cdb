"""The scorer's query cache, through the HTTP API over a real catalogue: a known user's
repeated request reuses its query vector, and nothing that changes the user's history or
the history's vectors is ever answered from a stale one."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from fastapi.testclient import TestClient

from core import metrics
from core.catalogue import insert_interactions, write_embeddings
from core.events import InteractionEvent
from core.settings import ApiSettings
from scorer.app import create_app
from tests.support.catalogue import text_hashes


def _hits() -> float:
    return metrics.QUERY_CACHE.labels("hit")._value.get()


def _ranking(client: TestClient, user: str) -> list[tuple[str, float]]:
    r = client.post("/recommend", json={"user_id": user, "k": 8})
    assert r.status_code == 200, r.text
    assert not r.json()["fallback"]
    return [(x["item_id"], x["score"]) for x in r.json()["items"]]


def _uncached(client: TestClient, state, user: str) -> list[tuple[str, float]]:
    """What a replica with an empty cache answers now."""
    state.served.queries.clear()
    return _ranking(client, user)


def test_a_cached_query_is_reused_and_never_stale(served):
    engine, bundle, _data, state = served
    client = TestClient(create_app(engine, state, ApiSettings()))  # no refresher: refreshes are explicit
    first = _ranking(client, "u1")  # u1 clicked i1, i9, i17
    before = _hits()
    assert _ranking(client, "u1") == first and _hits() == before + 1, "a repeated history is a hit"

    # an interaction arrives between two requests: the next answer is the new history's
    now = datetime.now(UTC)
    with engine.begin() as conn:
        insert_interactions(conn, [InteractionEvent("u1-new", "u1", "i4", "click", now)], {"i4": 5})
    after_click = _ranking(client, "u1")
    assert after_click != first, "the new click changes the ranking"
    assert after_click == _uncached(client, state, "u1"), "never the cached query of the old history"

    # an item of the history is re-estimated (same text, a new vector): the same history,
    # other vectors, so another query
    vec = np.random.default_rng(7).standard_normal((1, bundle.aligner.cfg.vector_dim)).astype("float32")
    hashes = text_hashes(engine, [10])  # i9's current text
    with engine.begin() as conn:
        write_embeddings(conn, bundle.version, "estimate", [10], hashes, vec, [None], now)
    state.refresh()
    after_vector = _ranking(client, "u1")
    assert after_vector != after_click, "the history's new vector changes the ranking"
    assert after_vector == _uncached(client, state, "u1"), "never the cached query of the old vectors"


def test_the_cache_is_bounded(served):
    engine, _bundle, _data, state = served
    state.cfg = state.cfg.model_copy(update={"query_cache_size": 3})
    client = TestClient(create_app(engine, state, ApiSettings()))
    for user in range(8):
        _ranking(client, f"u{user}")
    assert len(state.served.queries) == 3
