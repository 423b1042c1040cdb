"""A user's data (issue 25): ``DELETE /users/{id}`` and ``said users forget`` delete a user's
interactions and parked interactions, the next request is a new user's, and nothing comes
back; ``said users prune`` applies the retention. Real broker, both databases."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.catalogue import insert_interactions
from core.events import InteractionEvent
from core.parking import count_parked, waiting
from core.settings import ApiSettings, Settings
from core.tables import interactions
from core.users import forget
from core.versions import record_version
from said.cli import main
from scorer.app import create_app
from tests.support.kafka_util import click_event, item_event, produce_json
from updater.retrain import counts, is_due

AUTH = {"Authorization": "Bearer t0ken"}


def _count(engine, user: str | None = None) -> int:
    query = select(func.count()).select_from(interactions)
    if user is not None:
        query = query.where(interactions.c.user_id == user)
    with engine.connect() as conn:
        return conn.execute(query).scalar()


def test_a_forgotten_user_is_gone_for_good(served, settings, db_url, cli_env, capsys):
    engine, _bundle, _data, state = served  # u0..u29: 3 clicks each
    # u1 also clicked an item that has not arrived: parked
    produce_json(settings.kafka.bootstrap, "said.interactions", [click_event(900, 900, "u1")], "user_id")
    ConsumeLoop(InteractionsHandler(settings), engine, settings).run(idle_exit=1.5)
    with engine.connect() as conn:
        assert count_parked(conn) == 1

    with TestClient(create_app(engine, state, ApiSettings(token="t0ken"))) as client:
        assert not client.post("/recommend", json={"user_id": "u1"}, headers=AUTH).json()["fallback"]
        assert client.delete("/users/u1").status_code == 401  # behind the token
        gone = client.delete("/users/u1", headers=AUTH)
        assert gone.status_code == 200 and gone.json() == {"user_id": "u1", "interactions": 3, "parked": 1}
        with engine.connect() as conn:
            assert count_parked(conn) == waiting(conn) == 0  # the parked count agrees
        assert client.post("/recommend", json={"user_id": "u1"}, headers=AUTH).json()["fallback"]
        assert client.delete("/users/u1", headers=AUTH).json()["interactions"] == 0  # idempotent
        schema = client.get("/openapi.json").json()["paths"]["/users/{user_id}"]["delete"]
        assert schema["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "Forgotten"
        )

    # the parked click's item arrives: nothing of u1 comes back
    produce_json(settings.kafka.bootstrap, "said.items", [item_event(900)], "item_id")
    ConsumeLoop(ItemsHandler(settings), engine, settings).run(idle_exit=1.5)
    assert _count(engine, "u1") == 0 and _count(engine) == 29 * 3

    # the same through the CLI, and the retention (add_users' clicks are of January 2026)
    cli_env(SAID_DATABASE_URL=db_url)
    assert main(["users", "forget", "u2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"user_id": "u2", "interactions": 3, "parked": 0}
    with pytest.raises(SystemExit, match="give --days or set SAID_RETENTION_DAYS"):
        main(["users", "prune"])
    cli_env(SAID_RETENTION_DAYS="100000")  # nothing is that old
    assert main(["users", "prune", "--json"]) == 0 and _count(engine) == 28 * 3
    capsys.readouterr()
    assert main(["users", "prune", "--days", "30", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interactions"] == 28 * 3 and _count(engine) == 0


def test_deletions_never_keep_a_retrain_from_being_due(served):
    """Retention and forgotten users lower the totals: new clicks must still count."""
    engine, bundle, data, _state = served
    settings = Settings(database_url="sqlite://", retrain_min_interactions=3, retrain_min_items=1000)
    seen = counts(engine, settings.positives) | {"aligner_version": bundle.version}
    with engine.begin() as conn:
        record_version(conn, "scorer", "s1", data / "s1.pt", seen, "active")
    assert not is_due(engine, settings)
    with engine.begin() as conn:
        forget(conn, "u1")
        forget(conn, "u2")  # 6 clicks fewer than the record counted
    t = datetime(2026, 2, 1, tzinfo=UTC)
    new = [InteractionEvent(f"n{k}", "newbie", f"i{k}", "click", t) for k in range(3)]
    with engine.begin() as conn:
        insert_interactions(conn, new, {f"i{k}": k + 1 for k in range(3)})
    assert is_due(engine, settings), "3 new clicks arrived since the last retrain"
