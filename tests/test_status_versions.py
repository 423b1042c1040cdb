"""``said status`` and ``said versions list|activate|rollback`` (issue 25), through the CLI,
on SQLite and PostgreSQL, with the real broker for the consumer lag."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from core.catalogue import set_serving
from core.events import TOPIC_ITEMS, ServingEvent
from core.versions import active_version, record_version
from said.cli import main
from tests.support.catalogue import add_users
from tests.support.kafka_util import item_event, produce_json


def _cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_status_shows_the_catalogue_the_lag_and_the_active_versions(aligned, settings, cli_env, capsys):
    engine, bundle, *_ = aligned
    add_users(engine, 10)  # 3 clicks each
    with engine.begin() as conn:
        set_serving(conn, [ServingEvent("i5", "paused", datetime.now(UTC))])
    # one message: Tansu reports a partition's high watermark one short once it holds two
    produce_json(settings.kafka.bootstrap, TOPIC_ITEMS, [item_event(100)], "item_id")
    cli_env(
        SAID_DATABASE_URL=settings.database_url,
        SAID_KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        SAID_GROUP_ID=settings.consume.group_id,
    )

    found = json.loads(_cli(capsys, "status", "--json"))
    assert found["items"] == 24
    assert found["items_by_serving_state"] == {"active": 23, "paused": 1}
    assert found["items_by_status"] == {"aligned": 24}
    assert found["interactions_by_type"] == {"click": 30}
    assert found["consumer_lag"] == {"said.items": 1, "said.interactions": 0}  # nothing consumed yet
    assert found["active"]["aligner"]["version"] == bundle.version and found["active"]["scorer"] is None
    ConsumeLoop(ItemsHandler(settings), engine, settings).run(idle_exit=1.5)
    after = json.loads(_cli(capsys, "status", "--json"))
    assert after["consumer_lag"]["said.items"] == 0 and after["items"] == 25
    text = _cli(capsys, "status")
    assert "serving: active 24, paused 1" in text and f"active aligner: version {bundle.version}" in text

    # a broker that does not answer is shown, and the catalogue's figures still are
    cli_env(SAID_KAFKA_BOOTSTRAP="127.0.0.1:1")
    down = json.loads(_cli(capsys, "status", "--json"))
    assert down["items"] == 25 and all(v.startswith("unavailable") for v in down["consumer_lag"].values())


def test_versions_list_activate_and_roll_back(aligned, db_url, cli_env, capsys):
    engine, bundle, _lm, _settings, data = aligned
    cli_env(SAID_DATABASE_URL=db_url)
    for n in (1, 2, 3):  # each active on arrival: the one before is retired
        with engine.begin() as conn:
            record_version(
                conn, "scorer", f"composite-{n}", Path(data / f"s{n}.pt"), {"ndcg@10": n / 10}, "active"
            )
    listed = json.loads(_cli(capsys, "versions", "list", "--json"))
    assert [(v["version"], v["status"]) for v in listed] == [
        ("composite-3", "active"),
        ("composite-2", "retired"),
        ("composite-1", "retired"),
        (bundle.version, "active"),
    ]
    assert "scorer   active    composite-3" in _cli(capsys, "versions", "list", "--kind", "scorer")

    # rollback goes one version back each time, and says so when there is none left
    assert json.loads(_cli(capsys, "versions", "rollback", "--json")) == {
        "kind": "scorer",
        "from": "composite-3",
        "active": "composite-2",
    }
    _cli(capsys, "versions", "rollback", "--kind", "scorer")
    assert active_version(engine, "scorer")[0] == "composite-1"
    with pytest.raises(SystemExit, match="no retired scorer older than the active composite-1"):
        main(["versions", "rollback"])
    with pytest.raises(SystemExit, match="no retired aligner older"):
        main(["versions", "rollback", "--kind", "aligner"])

    # activate goes anywhere; the kind comes from the version; the old spelling still works
    _cli(capsys, "versions", "activate", "composite-3")
    assert active_version(engine, "scorer")[0] == "composite-3"
    with pytest.raises(SystemExit, match="is a version of the scorer, not of the aligner"):
        main(["versions", "activate", "composite-2", "--kind", "aligner"])
    with pytest.raises(SystemExit, match="no version 'nope'"):
        main(["versions", "activate", "nope"])
    assert main(["retrain", "--activate", "composite-2"]) == 0
    assert active_version(engine, "scorer")[0] == "composite-2"
    assert active_version(engine, "aligner")[0] == bundle.version  # untouched throughout
