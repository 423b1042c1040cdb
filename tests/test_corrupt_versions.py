"""An active version whose file cannot be read: every process keeps serving the last good
model, keeps applying fresh items, and says loudly what is wrong; none exits in a loop.

Through the public parts: versions are activated in ``model_versions`` as an operator's
``activate`` or a promotion would, items arrive as catalogue rows, and the replica is asked
through its HTTP API (``/recommend``, ``/readyz``, ``/metrics``).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from core.catalogue import write_embeddings
from core.metrics import SERVING_PROBLEMS
from core.settings import ApiSettings
from core.versions import active_version, record_version
from models.bundle import AlignerBundle
from said import wiring
from scorer.app import create_app
from tests.support import faultlog
from tests.support.catalogue import add_items, add_users, text_hashes
from updater.retrain import retrain_once

CPU = torch.device("cpu")


def _activate_garbage(engine, folder, kind: str, version: str, meta: dict):
    path = folder / f"{version}.pt"
    path.write_bytes(b"not a model: a torn copy, a bad disk, a wrong file")
    with engine.begin() as conn:
        record_version(conn, kind, version, path, meta, "active")
    return path


def _new_item_with_vector(engine, bundle, n: int) -> str:
    """A fresh item as the worker leaves it: the catalogue row and its first estimate."""
    add_items(engine, n, 1)
    vec = np.random.default_rng(n).standard_normal((1, bundle.aligner.cfg.vector_dim)).astype("float32")
    hashes = text_hashes(engine, [n + 1])
    with engine.begin() as conn:
        write_embeddings(conn, bundle.version, "estimate", [n + 1], hashes, vec, [None], datetime.now(UTC))
    return f"i{n}"


def _wait_servable(client, item_id: str, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = client.post("/recommend", json={"history": [item_id], "k": 1})
        if r.status_code == 200 and not r.json()["unknown_items"]:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{item_id} not servable in {timeout}s")


def test_a_corrupt_active_scorer_or_aligner_keeps_serving_the_last_good_one(aligned):
    engine, bundle, lm, settings, data = aligned
    add_users(engine)
    settings = settings.override(index_refresh_s=0.05, retrain_epochs=1)
    good = retrain_once(engine, bundle.version, settings, CPU, progress=False)
    state = wiring.serving_state(settings, engine)
    assert state.version == good["version"]
    with TestClient(create_app(engine, state, ApiSettings())) as client:
        _activate_garbage(engine, data, "scorer", "sasrec-torn", {"aligner_version": bundle.version})
        seconds = [_wait_servable(client, _new_item_with_vector(engine, bundle, 24))]
        assert seconds[0] < 5, "fresh items still apply"
        ready = client.get("/readyz").json()
        assert ready["model_version"] == good["version"], "the last good scorer is served"
        assert "sasrec-torn cannot be loaded" in ready["problems"]["scorer"]
        assert 'said_serving_problems{kind="scorer"} 1.0' in client.get("/metrics/").text

        _activate_garbage(engine, data, "aligner", "said-torn", {})
        seconds.append(_wait_servable(client, _new_item_with_vector(engine, bundle, 25)))
        assert seconds[1] < 5
        ready = client.get("/readyz").json()
        assert ready["aligner_version"] == bundle.version and "said-torn" in ready["problems"]["aligner"]

    again = wiring.serving_state(settings, engine)  # a replica (re)started in this state
    assert again.aligner_version == bundle.version, "it serves the aligner that was active before"
    assert again.version == good["version"], "and the last good scorer of that aligner"
    assert len(again.served.index) == 26 and again.recommend([26], 3, {26})[0]
    worker = wiring.update_worker(settings, engine, lm)  # the worker starts, and stays put
    assert worker.bundle.version == bundle.version and worker.follow_active() is False
    name = f"corrupt active scorer, then aligner file; replica restarted ({engine.dialect.name})"
    faultlog.record(name, 2, 26 - len(again.served.index), 0, max(seconds))


def test_the_retrainer_replaces_an_unreadable_active_scorer(aligned):
    engine, bundle, _lm, settings, data = aligned
    add_users(engine)
    settings = settings.override(retrain_epochs=1)
    _activate_garbage(engine, data, "scorer", "sasrec-torn", {"aligner_version": bundle.version})
    record = retrain_once(engine, bundle.version, settings, CPU, progress=False)
    assert record["promoted"] and record["warm_start"] is None, "trained from scratch"
    assert active_version(engine, "scorer")[0] == record["version"]


def test_a_whole_file_of_another_kind_is_refused_like_a_torn_one(aligned):
    """A checksum-valid file that is not a scorer (an aligner bundle activated as one)."""
    engine, bundle, _lm, settings, _data = aligned
    bundle_path = active_version(engine, "aligner")[1]
    with engine.begin() as conn:
        record_version(
            conn, "scorer", "sasrec-wrong", bundle_path, {"aligner_version": bundle.version}, "active"
        )
    state = wiring.serving_state(settings, engine)  # starts, instead of exiting in a loop
    assert "not a scorer file" in state.problems["scorer"] and state.version.startswith("cosine")
    assert len(state.served.index) == 24


def test_a_corrupt_active_aligner_is_rolled_back_so_fresh_items_keep_flowing(aligned):
    """A worker running on v1 sees a newly activated aligner whose file fails its checksum:
    it marks that version corrupt, makes v1 active again (once, by compare-and-set), and
    its next fresh item is stored instead of fenced."""
    from sqlalchemy import select

    from core.catalogue import load_embeddings
    from core.metrics import ROLLBACKS
    from core.tables import model_versions
    from core.versions import roll_back_corrupt

    engine, bundle, lm, settings, data = aligned
    worker = wiring.update_worker(settings.override(worker_batch=4, refine_epochs=1), engine, lm)
    before = ROLLBACKS.labels("aligner")._value.get()
    _activate_garbage(engine, data, "aligner", "said-torn", {})
    assert worker.follow_active() is False, "it stays on the version it can read"
    assert active_version(engine, "aligner")[0] == bundle.version, "rolled back to the good one"
    with engine.connect() as conn:
        status = dict(conn.execute(select(model_versions.c.version, model_versions.c.status)).all())
    assert status["said-torn"] == "corrupt" and status[bundle.version] == "active"
    assert ROLLBACKS.labels("aligner")._value.get() == before + 1
    assert roll_back_corrupt(engine, "aligner", "said-torn", bundle.version) is False, "only once"
    add_items(engine, 24, 2)
    assert worker.run(idle_exit=0.3) == 2, "not fenced: the fresh items are stored"
    with engine.connect() as conn:
        ids, _ = load_embeddings(conn, bundle.version)
    assert {25, 26} <= set(ids.tolist())


def test_an_unloadable_active_aligner_is_read_once_per_change_of_its_file(aligned, monkeypatch, caplog):
    """A scorer refresh (a few times a second) and a worker's version check do not re-read
    and checksum a bundle that failed, until its file changes; the failure stays reported
    (``problems``, metric) and is logged once. A repaired file is read again and served."""
    engine, bundle, lm, settings, data = aligned
    state = wiring.serving_state(settings, engine)
    worker = wiring.update_worker(settings, engine, lm)
    reads: list[str] = []
    load = AlignerBundle.load.__func__

    def counted(cls, path, device):
        reads.append(Path(path).name)
        return load(cls, path, device)

    monkeypatch.setattr(AlignerBundle, "load", classmethod(counted))

    torn = _activate_garbage(engine, data, "aligner", "said-v2", {})  # fails its checksum
    for _ in range(5):
        state.refresh()
    assert reads == [torn.name], "read once, not at every refresh"
    assert "said-v2 cannot be loaded" in state.problems["aligner"], "still reported"
    assert SERVING_PROBLEMS.labels("aligner")._value.get() == 1
    said = [r for r in caplog.records if "said-v2 cannot be loaded" in r.getMessage()]
    assert len(said) == 1, "logged once"
    os.replace(replace(bundle, version="said-v2").save(data / "good"), torn)  # the operator restores it
    state.refresh()
    state.refresh()
    assert reads == [torn.name] * 2, "the restored file is read again, once"
    assert state.aligner_version == "said-v2" and "aligner" not in state.problems, "and served"

    reads.clear()  # the worker, on an unreadable file (OSError: not rolled back)
    unreadable = data / "said-v3.pt"
    unreadable.mkdir()
    with engine.begin() as conn:
        record_version(conn, "aligner", "said-v3", unreadable, {}, "active")
    for _ in range(4):
        assert worker.follow_active() is False
    assert reads == [unreadable.name] and SERVING_PROBLEMS.labels("aligner")._value.get() == 1
    unreadable.rmdir()
    os.replace(replace(bundle, version="said-v3").save(data / "good"), unreadable)
    assert worker.follow_active() is True and worker.bundle.version == "said-v3"
    assert reads == [unreadable.name] * 2 and SERVING_PROBLEMS.labels("aligner")._value.get() == 0
