"""Every section reaches the component that uses it, from the environment.

A non-default value per section is set as a flat ``SAID_*`` variable; each component is
then built the way production builds it (``said.wiring``, ``retrain_once``, ``evaluate.run``)
from a fresh ``Settings()``, and must see its value. This is the bug that sections fixed:
``said retrain`` once trained with the default rate whatever ``SAID_SCORER_LR`` said.
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from core.db import make_engine
from core.settings import Settings, get_settings
from said import wiring
from said.migrate import upgrade
from tests.support.catalogue import add_items, add_users, write_dataset
from training import evaluate
from updater import retrain

ENV = {
    "SAID_SCORER_LR": "0.5",  # scorer
    "SAID_SCORER_PATIENCE": "2",
    "SAID_RETRAIN_EPOCHS": "3",  # retrain
    "SAID_RETRAIN_VALID_USERS": "7",
    "SAID_WORKER_BATCH": "3",  # worker
    "SAID_WORKER_VERSION_CHECK_S": "9",
    "SAID_ALIGN_EPOCHS": "1",  # align
    "SAID_ALIGN_BATCH": "5",
    "SAID_SOFT_TOKENS": "1",
    "SAID_ITEM_DIM": "16",
    "SAID_PROMPT": " Product:",
    "SAID_REFINE_LR": "0.05",  # align.refine
    "SAID_FIDELITY_EXACT_ITEMS": "3",  # align.fidelity
    "SAID_INDEX_REFRESH_S": "0.3",  # index
    "SAID_HNSW_MIN_ITEMS": "7777",
    "SAID_HNSW_EF_SEARCH": "333",
    "SAID_API_TOKEN": "s3cret",  # api
    "SAID_API_HISTORY_LEN": "2",
    "SAID_KAFKA_TOPIC_PARTITIONS": "3",  # kafka
    "SAID_CONSUME_BATCH": "11",  # consume
    "SAID_DEVICE": "cpu",
}


class Seen(Exception):
    """Raised by a spy once it has recorded the configuration a trainer was given."""


@pytest.fixture
def environment(monkeypatch, tmp_path, tiny_hf_folder):
    url = f"sqlite:///{tmp_path}/said.db"
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SAID_DATABASE_URL", url)
    monkeypatch.setenv("SAID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SAID_LLM", str(tiny_hf_folder))
    upgrade(url)
    engine = make_engine(url)
    add_items(engine, 0, 24)
    add_users(engine)
    get_settings.cache_clear()
    yield engine
    get_settings.cache_clear()


def spy(monkeypatch, module, seen: list) -> None:
    def train_scorer(model, train, valid, cfg, *args, **kwargs):
        seen.append(cfg)
        raise Seen

    monkeypatch.setattr(module, "train_scorer", train_scorer)


def test_every_section_reaches_its_component_from_the_environment(environment, monkeypatch, tmp_path):
    engine = environment
    settings = Settings()
    assert settings.kafka.topic_partitions == 3 and settings.consume.batch == 11

    bundle = wiring.align(Settings(), engine)  # align: shape, schedule, prompt, fidelity sample
    assert (bundle.aligner.cfg.k, bundle.aligner.cfg.item_dim) == (1, 16)
    assert len(bundle.history) == 1 and bundle.fidelity["exact_items"] == 3
    assert bundle.prompt == " Product:"
    assert bundle.history[0]["trained"] == 24

    worker = wiring.update_worker(Settings(), engine)  # worker, and the fresh rows' refinement
    assert (worker.cfg.batch, worker.cfg.version_check_s) == (3, 9.0)
    assert worker.align.refine.lr == 0.05

    seen: list = []
    spy(monkeypatch, retrain, seen)  # retrain: the scorer section, capped at the retrain's epochs
    with pytest.raises(Seen):
        retrain.retrain_once(engine, bundle.version, Settings(), torch.device("cpu"), progress=False)
    assert (seen[0].lr, seen[0].patience, seen[0].epochs) == (0.5, 2, 3)
    data = retrain.training_data(engine, bundle.version, Settings())
    assert len(data.stopping[1]) == len(data.promotion[1]) == 7

    spy(monkeypatch, evaluate, seen)  # evaluate: the same scorer section
    plan = evaluate.Plan(write_dataset(tmp_path / "ds"), ["id"], [0], [0], cold_fraction=0.0)
    with pytest.raises(Seen):
        evaluate.run(plan, Settings(), progress=False)
    assert (seen[1].lr, seen[1].patience, seen[1].epochs) == (0.5, 2, 200)

    state = wiring.serving_state(Settings(), engine)  # serve: the index and the API
    index = state.served.index
    assert (state.cfg.refresh_s, index.cfg.hnsw_min_items, index.cfg.hnsw_ef_search) == (0.3, 7777, 333)
    with TestClient(wiring.serving_app()) as client:
        assert client.post("/recommend", json={"history": ["i0"]}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        r = client.post("/recommend", json={"user_id": "u0", "k": 24, "exclude_seen": True}, headers=auth)
        assert r.status_code == 200
        seen_items = {"i0", "i8", "i16"}  # u0's history: the last 2 of them are read, and excluded
        assert len(seen_items - {x["item_id"] for x in r.json()["items"]}) == 2


def test_an_override_by_an_unknown_name_is_refused_not_dropped():
    with pytest.raises(KeyError, match="worker_lease_ttl"):
        Settings().override(worker_lease_ttl=5)  # the name is worker_lease_ttl_s
    assert Settings().override(worker_lease_ttl_s=5).worker.lease_ttl_s == 5


def test_said_consume_offers_exactly_the_wired_topics():
    from said.cli import build_parser

    consume = build_parser()._subparsers._group_actions[0].choices["consume"]
    (topic,) = [a for a in consume._actions if a.dest == "topic"]
    assert sorted(topic.choices) == sorted(wiring.TOPIC_HANDLERS)
