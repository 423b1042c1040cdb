"""A look inside an item: ``said inspect`` and ``GET /items/{id}`` show what its vector
decodes to (stored by ``said align`` and by the worker's refinement, so neither the CLI nor
the scorer loads the LLM), and ``GET /items/{id}/similar`` its neighbours, on SQLite and
PostgreSQL."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from sqlalchemy import select

from core.settings import ApiSettings
from core.tables import item_embeddings
from said.cli import main
from scorer.app import create_app
from tests.support.catalogue import SAID_ROWS, add_items
from updater.worker import UpdateWorker


def _inspect(cli_env, capsys, db_url: str, *argv: str) -> str:
    cli_env(SAID_DATABASE_URL=db_url)
    capsys.readouterr()
    assert main(["inspect", *argv]) == 0
    return capsys.readouterr().out


def test_inspect_shows_the_reconstruction_and_the_nearest_items(aligned, db_url, cli_env, capsys):
    engine, bundle, *_ = aligned
    e = item_embeddings.c
    with engine.connect() as conn:
        stored = conn.execute(
            select(e.decoded, e.token_accuracy, e.exact).where(e.item_idx == 4, SAID_ROWS)
        ).one()
    assert isinstance(stored.decoded, str) and stored.token_accuracy is not None, "said align stored it"
    found = json.loads(_inspect(cli_env, capsys, db_url, "i3", "--json", "--k", "3"))
    assert found["item_id"] == "i3" and found["aligner_version"] == bundle.version
    assert found["reconstruction"] == stored.decoded and found["exact"] == stored.exact
    assert found["embedding"] == "full" and found["text"].startswith(found["title"])
    assert len(found["nearest"]) == 3 and "i3" not in [n["item_id"] for n in found["nearest"]]
    cosines = [n["cosine"] for n in found["nearest"]]
    assert cosines == sorted(cosines, reverse=True)
    text = _inspect(cli_env, capsys, db_url, "i3")
    assert f"decodes to    {stored.decoded!r}" in text and "nearest items" in text
    cli_env(SAID_DATABASE_URL=db_url)
    assert main(["inspect", "no-such-item"]) == 1


def test_a_fresh_item_is_decoded_by_its_refinement(aligned, db_url, cli_env, capsys):
    engine, bundle, lm, settings, _ = aligned
    add_items(engine, 24, 1)  # i24, refined for 2 passes
    UpdateWorker(engine, bundle, lm, settings.override(refine_epochs=2, worker_batch=1)).run(idle_exit=0.5)
    refined = json.loads(_inspect(cli_env, capsys, db_url, "i24", "--json"))
    assert refined["embedding"] == "refined"
    assert isinstance(refined["reconstruction"], str) and refined["token_accuracy"] is not None
    assert refined["exact"] == (refined["reconstruction"] == refined["text"])


def test_the_api_shows_the_reconstruction_and_the_similar_items(served, db_url, cli_env, capsys):
    engine, _bundle, _data, state = served
    found = json.loads(_inspect(cli_env, capsys, db_url, "i5", "--json"))
    with TestClient(create_app(engine, state, ApiSettings())) as client:
        info = client.get("/items/i5").json()
        assert info["reconstruction"] == found["reconstruction"] is not None
        assert info["token_accuracy"] == found["token_accuracy"]
        r = client.get("/items/i5/similar", params={"k": 4})
        assert r.status_code == 200, r.text
        similar = [x["item_id"] for x in r.json()["items"]]
        assert len(similar) == 4 and "i5" not in similar
        assert r.json()["model_version"] == state.version
        assert client.get("/items/nope/similar").status_code == 404
        assert client.get("/items/i5/similar", params={"k": 0}).status_code == 422
