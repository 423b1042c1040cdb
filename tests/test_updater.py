"""The streaming worker on a real catalogue with a tiny real-tokenizer LLM.

Old rows, the projector and old embeddings must stay bit-identical while fresh items are
estimated, refined and completed; a SIGKILLed worker's lease expires and another
worker finishes its items.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from sqlalchemy import delete, select

from core.catalogue import content_version, load_embeddings, upsert_items
from core.events import ItemEvent, item_text
from core.tables import alignment_jobs, item_embeddings, items
from core.versions import active_version
from models.bundle import AlignerBundle
from models.llm import pooled_text_features
from tests.support.catalogue import CPU, SAID_ROWS, add_items
from updater.leases import pending_count
from updater.worker import UpdateWorker


def test_full_alignment_activates_a_version_and_embeds_every_item(aligned):
    engine, bundle, lm, *_ = aligned
    assert active_version(engine, "aligner")[1].exists()
    with engine.connect() as conn:
        ids, vecs = load_embeddings(conn, bundle.version)
        assert pending_count(conn) == 0
        assert set(conn.execute(select(items.c.status)).scalars()) == {"aligned"}
    assert ids.tolist() == list(range(1, 25)) and vecs.shape == (24, 64)
    assert_text_rows(engine, bundle, lm, range(1, 25))


def assert_text_rows(engine, bundle, lm, idx) -> None:
    """These items' ``text`` content rows: their pooled text features, of their current text."""
    with engine.connect() as conn:
        ids, feats = load_embeddings(conn, content_version(bundle.version, "text"))
        rows = conn.execute(
            select(items.c.idx, items.c.title, items.c.description, items.c.text_hash).order_by(items.c.idx)
        ).all()
        kinds = conn.execute(
            select(item_embeddings.c.kind, item_embeddings.c.text_hash).where(
                item_embeddings.c.model_version == content_version(bundle.version, "text")
            )
        ).all()
    by_idx = {r.idx: r for r in rows}
    assert set(idx) <= set(ids.tolist())
    assert {k for k, _ in kinds} == {"text"}
    assert {h for _, h in kinds} <= {r.text_hash for r in rows}, "of each item's current text"
    mine = [n for n, i in enumerate(ids.tolist()) if i in set(idx)]
    texts = [item_text(by_idx[i].title, by_idx[i].description) for i in ids[mine].tolist()]
    expected = pooled_text_features(lm.model, lm.tok, texts, CPU).numpy()
    np.testing.assert_allclose(feats[mine], expected, atol=1e-4)


def test_worker_aligns_fresh_items_without_touching_old_ones(aligned, monkeypatch):
    engine, bundle, lm, settings, data = aligned
    # text rows come with each first estimate, not from the idle walk for missing ones
    monkeypatch.setattr(UpdateWorker, "_backfill_text", lambda self: None)
    table = bundle.aligner.items.weight.detach().clone()
    proj = {k: v.clone() for k, v in bundle.aligner.projector.state_dict().items()}
    with engine.connect() as conn:
        _, old_vecs = load_embeddings(conn, bundle.version)
    add_items(engine, 24, 10)
    worker = UpdateWorker(engine, bundle, lm, settings.override(worker_batch=4, refine_epochs=3))
    assert worker.run(idle_exit=0.3) == 10
    with engine.connect() as conn:
        ids, vecs = load_embeddings(conn, bundle.version)
        kinds = dict(
            conn.execute(
                select(item_embeddings.c.item_idx, item_embeddings.c.kind).where(
                    item_embeddings.c.model_version == bundle.version
                )
            ).all()
        )
        assert pending_count(conn) == 0
    assert ids.tolist() == list(range(1, 35))
    assert all(kinds[i] == "refined" for i in range(25, 35))
    assert_text_rows(engine, bundle, lm, range(1, 35))  # the fresh ones' written with their estimate
    np.testing.assert_array_equal(vecs[:24], old_vecs)  # old embeddings bit-identical
    assert torch.equal(bundle.aligner.items.weight, table)
    for k, v in bundle.aligner.projector.state_dict().items():
        assert torch.equal(v, proj[k])


def test_the_worker_stores_the_text_content_of_items_aligned_before_it_was_stored(aligned):
    """An upgrade: an aligner whose items have vectors and no text rows. Once nothing is
    pending, the worker writes them (of each item's current text), so a switch to
    SAID_COMPOSITE_CONTENT=text needs no realignment."""
    engine, bundle, lm, settings, _ = aligned
    text_rows = item_embeddings.c.model_version == content_version(bundle.version, "text")
    with engine.begin() as conn:
        conn.execute(delete(item_embeddings).where(text_rows, item_embeddings.c.item_idx > 14))
    now = datetime.now(UTC)
    with engine.begin() as conn:  # and one text changed since: its new text is aligned first
        upsert_items(conn, [ItemEvent("i20", "a new title", None, None, now)], now)
    worker = UpdateWorker(engine, bundle, lm, settings.override(worker_batch=4, refine_epochs=1))
    assert worker.run(idle_exit=0.3) == 1
    assert_text_rows(engine, bundle, lm, range(1, 25))


@pytest.mark.slow
def test_killed_worker_lease_expires_and_another_finishes(aligned, tiny_hf_folder):
    engine, bundle, lm, settings, data = aligned
    add_items(engine, 24, 6)
    url = engine.url.render_as_string(hide_password=False)
    env = os.environ | {
        "SAID_DATABASE_URL": url,
        "SAID_DATA_DIR": str(data),
        "SAID_LLM": str(tiny_hf_folder),
        "SAID_DEVICE": "cpu",
        "SAID_LOG_LEVEL": "WARNING",
        "SAID_REFINE_TARGET_ACCURACY": "1.01",  # refining until killed, whatever the tiny LLM reaches
    }
    cmd = [sys.executable, "-m", "said.cli", "update", "--batch", "6", "--lease-ttl", "3"]
    victim = subprocess.Popen([*cmd, "--refine-epochs", "100000"], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is inside refinement
        with engine.connect() as conn:
            kinds = (
                conn.execute(select(item_embeddings.c.kind).where(item_embeddings.c.item_idx > 24, SAID_ROWS))
                .scalars()
                .all()
            )
        if len(kinds) == 6:
            break
        assert victim.poll() is None
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with engine.connect() as conn:
        assert pending_count(conn) == 6, "killed mid-refinement: nothing completed"
    subprocess.run([*cmd, "--refine-epochs", "2", "--idle-exit", "5"], env=env, check=True, timeout=180)
    with engine.connect() as conn:
        assert pending_count(conn) == 0
        refined = (
            conn.execute(select(item_embeddings.c.kind).where(item_embeddings.c.item_idx > 24, SAID_ROWS))
            .scalars()
            .all()
        )
    assert refined == ["refined"] * 6
    assert AlignerBundle.load(active_version(engine, "aligner")[1], CPU).version == bundle.version


def _slow_refiner(aligned, monkeypatch, batch: int) -> tuple[UpdateWorker, threading.Thread]:
    """A running worker whose refinement passes each take 3 s (a real LLM's pass on CPU
    takes about 1.5 s) and never reach their bar: it refines its first batch until stopped."""
    engine, bundle, lm, settings, _ = aligned
    worker = UpdateWorker(
        engine,
        bundle,
        lm,
        settings.override(worker_batch=batch, refine_epochs=100_000, refine_target_accuracy=1.01),
    )
    real = worker._between_passes

    def slow_pass(*args):
        time.sleep(3.0)
        real(*args)

    monkeypatch.setattr(worker, "_between_passes", slow_pass)
    thread = threading.Thread(target=worker.run)
    thread.start()
    return worker, thread


def test_a_new_item_is_estimated_while_another_batch_refines(aligned, monkeypatch):
    """The first estimate never waits behind refinement: here each refinement pass takes
    3 s (a real LLM's pass on CPU takes about 1.5 s), and a new item is still servable
    within a second."""
    engine = aligned[0]
    add_items(engine, 24, 4)
    worker, thread = _slow_refiner(aligned, monkeypatch, batch=4)
    try:
        deadline = time.monotonic() + 60
        while _kind(engine, 25) != "estimate":  # the first batch is in refinement now
            assert time.monotonic() < deadline
            time.sleep(0.05)
        add_items(engine, 28, 1)
        t0 = time.monotonic()
        while _kind(engine, 29) != "estimate":
            assert time.monotonic() - t0 < 1.0, "the new item waited behind the refinement"
            time.sleep(0.05)
        assert _kind(engine, 25) == "estimate", "the first batch is still refining"
    finally:
        worker.stop()
        thread.join(60)
    with engine.connect() as conn:  # stopped mid-refinement: every lease handed back, none failed
        jobs = conn.execute(select(alignment_jobs.c.lease_owner, alignment_jobs.c.failures)).all()
    assert len(jobs) == 5 and all(j.lease_owner is None and j.failures == 0 for j in jobs), jobs


def test_a_new_item_is_estimated_even_when_the_backlog_is_full(aligned, monkeypatch):
    """Past a full backlog a new item still gets its first estimate at once, and its lease
    is handed back (another worker may refine it) instead of being held or left unleased."""
    from updater import worker as worker_module

    engine = aligned[0]
    monkeypatch.setattr(worker_module, "MAX_BACKLOG", 1)
    add_items(engine, 24, 2)  # i24, i25 (index 25, 26): the batch that refines
    worker, thread = _slow_refiner(aligned, monkeypatch, batch=2)
    try:
        _wait_kind(engine, 26, 60, "the first batch estimated")
        add_items(engine, 26, 2)  # i26, i27: they fill the one place in the backlog
        _wait_kind(engine, 28, 5, "the backlog filled")
        add_items(engine, 28, 1)  # i28 (index 29): past the full backlog
        _wait_kind(engine, 29, 1.0, "the item past the full backlog waited for room")
        # handed back in the transaction after the estimate's: wait for it, not for room
        # (the refiner never finishes its batch, so the worker cannot lease it again)
        owner, t0 = "", time.monotonic()
        while owner is not None and time.monotonic() - t0 < 5:
            with engine.connect() as conn:
                owner = conn.execute(
                    select(alignment_jobs.c.lease_owner).where(alignment_jobs.c.item_idx == 29)
                ).scalar_one()
            time.sleep(0.02)
        assert owner is None, "its lease was handed back, for any worker to refine it"
    finally:
        worker.stop()
        thread.join(60)


def _wait_kind(engine, idx: int, seconds: float, what: str) -> None:
    t0 = time.monotonic()
    while _kind(engine, idx) != "estimate":
        assert time.monotonic() - t0 < seconds, what
        time.sleep(0.02)


def _kind(engine, idx: int) -> str | None:
    with engine.connect() as conn:
        kind = select(item_embeddings.c.kind).where(item_embeddings.c.item_idx == idx, SAID_ROWS)
        return conn.execute(kind).scalar()


def test_a_poison_item_is_failed_with_its_reason_and_does_not_block_others(aligned, monkeypatch):
    from updater.leases import MAX_FAILURES

    engine, bundle, lm, settings, _ = aligned
    now = datetime.now(UTC)
    with engine.begin() as conn:
        upsert_items(conn, [ItemEvent("poison", "\u2028 breaks the tokenizer", None, None, now)], now)
    add_items(engine, 25, 3)
    worker = UpdateWorker(engine, bundle, lm, settings.override(worker_batch=1, refine_epochs=1))
    real = worker._refine

    def refine(batch):
        if batch.leases[0].text.startswith("\u2028"):
            raise ValueError("cannot tokenize")
        real(batch)

    monkeypatch.setattr(worker, "_refine", refine)
    worker.run(idle_exit=0.5)
    with engine.connect() as conn:
        status = dict(conn.execute(select(items.c.item_id, items.c.status)).all())
        job = conn.execute(select(alignment_jobs.c.failures, alignment_jobs.c.last_error)).one()
        assert pending_count(conn) == 0
    assert status["poison"] == "failed" and job.failures == MAX_FAILURES
    assert "ValueError: cannot tokenize" in job.last_error
    assert {status[f"i{i}"] for i in range(25, 28)} == {"aligned"}
