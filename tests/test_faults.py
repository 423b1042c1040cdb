"""Fault injection: after each fault the system recovers on its own and the counts in the
catalogue, the index and the DLQ add up exactly. Each test adds a row (fault, times
injected, lost, duplicated, recovery seconds) to the table printed at the end of the run."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from consumers.interactions import InteractionsHandler
from consumers.runner import ConsumeLoop
from core.catalogue import count_rows, write_embeddings
from core.db import make_engine
from core.events import TOPIC_INTERACTIONS
from core.settings import IndexSettings, KafkaSettings
from core.tables import interactions, item_embeddings, items
from said.broker import ensure_topics
from scorer.index import ItemIndex, latest_snapshot
from tests.support import faultlog
from tests.support.catalogue import POSITIVES, SAID_ROWS, add_items, text_hashes
from tests.support.kafka_util import click_event, committed_offsets, load_items, produce_json
from updater.leases import pending_count
from updater.worker import UpdateWorker

pytestmark = pytest.mark.faults


def _env(settings, **extra) -> dict:
    return (
        os.environ
        | {
            "SAID_DATABASE_URL": settings.database_url,
            "SAID_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
            "SAID_GROUP_ID": settings.consume.group_id,
            "SAID_SESSION_TIMEOUT_MS": "2000",
            "SAID_LOG_LEVEL": "WARNING",
        }
        | extra
    )


def _rows(engine) -> int:
    """Interactions stored now; -1 while the database is down. On SQLite a plain WAL reader,
    not the engine (whose transactions take the write lock and would queue behind the
    consumer, so a kill meant for mid-stream could land after the end)."""
    import sqlite3

    try:
        if engine.dialect.name == "sqlite":
            with closing(sqlite3.connect(engine.url.database, timeout=1)) as db:
                return db.execute("SELECT count(*) FROM interactions").fetchone()[0]
        with engine.connect() as conn:
            return count_rows(conn, interactions)
    except Exception:  # noqa: BLE001 - SQLite busy or PostgreSQL down for a moment; poll again
        return -1


def _wait(cond, timeout: float, what: str) -> float:
    """Seconds until ``cond()`` holds; fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not recovered in {timeout}s: {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


def _deliveries(audit, topic: str = TOPIC_INTERACTIONS) -> tuple[int, set]:
    """(messages of ``topic`` processed, their distinct offsets) from the consumers' audit log."""
    lines = audit.read_text().split("\n")[:-1] if audit.exists() else []
    lines = [x for x in lines if x.startswith(f"{topic} ")]
    return len(lines), set(lines)


@pytest.mark.slow
def test_sigkill_three_times_loses_and_duplicates_nothing(settings, tmp_path):
    load_items(settings, 100)
    distinct = [click_event(e, e % 100, user=f"u{e % 97}") for e in range(18_000)]
    events = distinct + distinct[:2000]  # 2k replays by the producer
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, events, "user_id")
    engine = make_engine(settings.database_url)
    cmd = [sys.executable, "-m", "said.cli", "consume", "interactions", "--idle-exit", "3"]
    audit = tmp_path / "processed.log"
    env = _env(settings, SAID_CONSUME_BATCH="100", SAID_CONSUMER_AUDIT_LOG=str(audit))
    recoveries, at_kill = [], 0
    for threshold in (3000, 8000, 13000, None):
        proc = subprocess.Popen(cmd, env=env)
        if at_kill:  # a restarted consumer makes progress on its own
            recoveries.append(_wait(lambda: _rows(engine) > at_kill, 60, "consumer progress"))  # noqa: B023
        if threshold is None:
            assert proc.wait(120) == 0
            break
        _wait(lambda: proc.poll() is None and _rows(engine) >= threshold, 60, "consumer progress")  # noqa: B023
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill = _rows(engine)
        assert at_kill < len(distinct), "the kill must land mid-stream"
    rows = _rows(engine)
    processed, offsets = _deliveries(audit)
    replayed = processed - len(offsets)
    faultlog.record(
        f"consumer SIGKILL mid-stream ({engine.dialect.name})",
        3,
        len(distinct) - rows,
        replayed,
        max(recoveries),
    )
    assert rows == len(distinct)
    assert len(offsets) == len(events), "every offset was processed"
    assert replayed <= 3 * 100, "a kill replays at most the batch in flight"
    ends: dict[int, int] = {}  # one past the last processed offset per partition
    for line in offsets:
        _topic, part, off = line.split()
        ends[int(part)] = max(ends.get(int(part), 0), int(off) + 1)
    assert sum(ends.values()) == len(events), "offsets 0..end-1 of every partition were processed"
    assert (
        committed_offsets(settings, f"{settings.consume.group_id}.interactions", TOPIC_INTERACTIONS) == ends
    )


@pytest.mark.slow
def test_database_outage_mid_stream_counts_exact(broker, pg, tmp_path):
    from core.settings import Settings
    from said.migrate import upgrade

    url = pg.create_database()
    upgrade(url)
    settings = Settings(
        database_url=url,
        kafka_bootstrap=broker.bootstrap,
        group_id="outage",
        session_timeout_ms=2000,
        consume_batch=200,
        db_retry_max_s=0.5,
        consumer_audit_log=tmp_path / "processed.log",
    )
    load_items(settings, 50)
    events = [click_event(e, e % 50, user=f"u{e % 31}") for e in range(10_000)]
    produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, events, "user_id")
    engine = make_engine(url)
    loop = ConsumeLoop(InteractionsHandler(settings), make_engine(url), settings)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("stats", loop.run(idle_exit=4)))
    worker.start()
    recoveries = []
    for threshold in (1000, 5000):
        _wait(lambda: _rows(engine) >= threshold, 60, "consumer progress")  # noqa: B023
        pg.stop("immediate")  # the consumer retries with backoff meanwhile
        time.sleep(3.0)
        before = _rows_when_up(pg, engine)
        recoveries.append(_wait(lambda: _rows(engine) > before, 60, "progress after restart"))  # noqa: B023
    worker.join(120)
    assert not worker.is_alive()
    stats = result["stats"]
    rows = _rows(engine)
    processed, offsets = _deliveries(settings.consume.audit_log)
    replayed = processed - len(offsets)
    faultlog.record("PostgreSQL restarted mid-stream (consumer)", 2, 10_000 - rows, replayed, max(recoveries))
    assert stats.stored == 10_000 and stats.dead_lettered == 0 and rows == 10_000
    assert len(offsets) == 10_000 and replayed == 0, "an outage is retried in place, never replayed"


def _rows_when_up(pg, engine) -> int:
    pg.start()
    return _wait_value(lambda: _rows(engine))


def _wait_value(read) -> int:
    deadline = time.monotonic() + 30
    while (value := read()) < 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return value


@pytest.mark.slow
def test_broker_restarted_mid_stream(settings, broker):
    """The consumer outlives broker restarts: it reconnects, re-joins and takes up the new
    log with no operator action. Tansu keeps data in memory only, so each phase is consumed
    before its restart; with Apache Kafka the log itself would also survive."""
    load_items(settings, 50)
    engine = make_engine(settings.database_url)
    loop = ConsumeLoop(InteractionsHandler(settings), engine, settings)
    thread = threading.Thread(target=loop.run)
    thread.start()
    expected, recoveries = 0, []
    try:
        for phase in range(4):
            events = [click_event(phase * 10_000 + e, e % 50, user=f"u{e % 13}") for e in range(2000)]
            produce_json(settings.kafka.bootstrap, TOPIC_INTERACTIONS, events, "user_id")
            expected += len(events)
            took = _wait(lambda: _rows(engine) == expected, 90, f"phase {phase}")  # noqa: B023
            if phase:  # seconds from the first event after a restart to all of them stored
                recoveries.append(took)
            if phase < 3:
                broker.proc.send_signal(signal.SIGKILL)
                broker.proc.wait()
                broker.start()
                ensure_topics(KafkaSettings(bootstrap=broker.bootstrap))
        assert thread.is_alive(), "the consumer survived three broker restarts"
    finally:
        loop.stop()
        thread.join(30)
    rows = _rows(engine)
    faultlog.record(
        f"broker SIGKILLed and restarted, consumer running ({engine.dialect.name})",
        3,
        expected - rows,
        0,
        max(recoveries),
    )
    assert rows == expected


@pytest.mark.slow
def test_postgres_restarted_while_the_worker_holds_a_lease(pg, tiny_hf_folder, tmp_path):
    from said.migrate import upgrade
    from tests.support.catalogue import tiny_lm, tiny_settings
    from updater.full_align import align_catalogue

    url = pg.create_database()
    upgrade(url)
    engine = make_engine(url)
    add_items(engine, 0, 16)
    settings, lm = tiny_settings(tmp_path, url, align_epochs=1), tiny_lm(tiny_hf_folder, tmp_path)
    bundle = align_catalogue(engine, lm, settings, progress=False)
    add_items(engine, 16, 8)
    worker = UpdateWorker(
        engine, bundle, lm, settings.override(worker_batch=8, refine_epochs=400, refine_target_accuracy=1.01)
    )
    thread = threading.Thread(target=worker.run, kwargs={"idle_exit": 2.0})
    thread.start()
    _wait(lambda: _kinds(engine) == ["estimate"] * 8, 60, "worker estimated and leased")
    pg.stop("immediate")  # mid-refinement: the lease is held, the refined write will fail
    time.sleep(2.0)
    pg.start()
    recovery = _wait(lambda: not thread.is_alive(), 300, "worker finished after the outage")
    with engine.connect() as conn:
        assert pending_count(conn) == 0
        said_rows = select(func.count()).select_from(item_embeddings).where(SAID_ROWS)
        embedded = conn.execute(said_rows).scalar_one()
    # completions, counted by the worker: a job completed twice would count twice
    faultlog.record(
        "PostgreSQL restarted while the worker holds a lease", 1, 24 - embedded, worker.done - 8, recovery
    )
    assert _kinds(engine) == ["refined"] * 8 and embedded == 24 and worker.done == 8


def _kinds(engine) -> list[str] | None:
    try:
        with engine.connect() as conn:
            return (
                conn.execute(
                    select(item_embeddings.c.kind)
                    .where(item_embeddings.c.item_idx > 16, SAID_ROWS)
                    .order_by(item_embeddings.c.item_idx)
                )
                .scalars()
                .all()
            )
    except Exception:  # noqa: BLE001 - the database is down on purpose; poll again
        return None


SNAPSHOT_WRITER = """
import os, sys, time, numpy as np
from pathlib import Path
from core.settings import IndexSettings
from scorer.index import ItemIndex
real_fsync = os.fsync
def slow_fsync(fd):  # a slow disk: most of the writer's time is inside a write
    time.sleep(0.3)
    real_fsync(fd)
os.fsync = slow_fsync
n = int(sys.argv[2])
index = ItemIndex(64, IndexSettings(hnsw_min_items=10**9))  # exact: the build is not what this tests
index.build(np.arange(1, n + 1), np.random.default_rng(0).standard_normal((n, 64)).astype("float32"))
print("ready", flush=True)
for k in range(10**6):
    index.save(Path(sys.argv[1]), f"v-{k:06d}")
"""


def test_snapshot_writer_killed_mid_write_never_yields_a_torn_index(tmp_path):
    n, kills, recoveries, mid_write = 100_000, 0, [], 0
    rng = np.random.default_rng(0)
    while mid_write < 3 and kills < 12:
        proc = subprocess.Popen(
            [sys.executable, "-c", SNAPSHOT_WRITER, str(tmp_path), str(n)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.2, 1.0)))  # writes of ~26 MB are in progress now
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_write += any(tmp_path.glob("*.tmp"))  # the kill cut a write short
        t0 = time.monotonic()
        exact = IndexSettings(hnsw_min_items=10**9)
        loaded = len(ItemIndex.load(latest_snapshot(tmp_path), exact))  # data and checksum: one rename
        recoveries.append(time.monotonic() - t0)
        assert loaded == n, "whatever loads is complete"
    assert mid_write, "at least one kill must land inside a write"
    assert len(list(tmp_path.glob("index-*.faiss"))) <= 4, "old snapshots are pruned"
    faultlog.record(
        f"snapshot writer SIGKILLed ({mid_write} of them mid-write)", kills, 0, 0, max(recoveries)
    )


def test_disk_full_snapshot_write_keeps_serving_and_the_old_snapshot(aligned, monkeypatch):
    from scorer.state import ServingState

    engine, bundle, _lm, settings, data = aligned
    state = ServingState.for_bundle(engine, bundle, settings.override(snapshot_every_s=1e-9))
    good = state.rebuild()
    real_fsync, failures = os.fsync, []

    def full_disk(fd: int) -> None:
        failures.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    add_items(engine, 24, 4)
    # the worker's embeddings arrive; refresh applies them, then its snapshot write fails
    vecs = np.random.default_rng(1).standard_normal((4, bundle.aligner.cfg.vector_dim)).astype("float32")
    hashes = text_hashes(engine, [25, 26, 27, 28])
    with engine.begin() as conn:
        write_embeddings(
            conn, bundle.version, "estimate", [25, 26, 27, 28], hashes, vecs, [None] * 4, datetime.now(UTC)
        )
    with pytest.raises(OSError, match="No space"):
        state.refresh()
    assert failures and len(state.served.index) == 28, "the new items are served anyway"
    assert state.recommend([25], 3, set())[0], "requests are answered"
    assert not list((data / "index").glob("*.tmp")), "no half-written temp file is left"
    assert latest_snapshot(data / "index") == good and len(ItemIndex.load(good, state.cfg)) == 24
    monkeypatch.setattr(os, "fsync", real_fsync)
    t0 = time.monotonic()
    state.refresh()
    recovery = time.monotonic() - t0
    newest = latest_snapshot(data / "index")
    assert newest != good and len(ItemIndex.load(newest, state.cfg)) == 28
    faultlog.record(
        f"snapshot write fails with ENOSPC ({engine.dialect.name})", len(failures), 0, 0, recovery
    )


def _embedding(engine, idx: int):
    with engine.connect() as conn:
        return conn.execute(
            select(item_embeddings.c.kind, item_embeddings.c.text_hash, item_embeddings.c.seq).where(
                item_embeddings.c.item_idx == idx, SAID_ROWS
            )
        ).first()


def _worker_env(engine, data, llm_folder, worker_id: str) -> dict:
    return os.environ | {
        "SAID_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "SAID_DATA_DIR": str(data),
        "SAID_LLM": str(llm_folder),
        "SAID_DEVICE": "cpu",
        "SAID_LOG_LEVEL": "WARNING",
        "SAID_WORKER_ID": worker_id,
        "SAID_REFINE_TARGET_ACCURACY": "1.01",  # refine every pass, whatever the tiny LLM reaches
    }


def _pause_outside_a_write(proc, engine) -> None:
    """SIGSTOP ``proc``; on SQLite, again until it is not holding the database's one write
    lock (a paused SQLite writer stalls every writer: the embedded backend's known limit)."""
    import sqlite3

    while True:
        proc.send_signal(signal.SIGSTOP)
        if engine.dialect.name != "sqlite":
            return
        probe = sqlite3.connect(engine.url.database, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:  # locked by the paused process: let it finish
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        finally:
            probe.close()


@pytest.mark.slow
def test_a_paused_worker_writes_nothing_once_its_lease_is_gone(aligned, tiny_hf_folder):
    """Pause nemesis: a real worker process is SIGSTOPped mid-refinement while holding the
    lease; the item's text changes and another worker aligns the new text; on SIGCONT the
    paused worker must not write its old text's vector over the new one."""
    from core.catalogue import upsert_items
    from core.events import ItemEvent

    engine, bundle, lm, settings, data = aligned
    add_items(engine, 24, 1)  # idx 25
    cmd = [
        sys.executable,
        "-m",
        "said.cli",
        "update",
        "--batch",
        "1",
        "--refine-epochs",
        "400",
        "--idle-exit",
        "2",
    ]
    victim = subprocess.Popen(cmd, env=_worker_env(engine, data, tiny_hf_folder, "paused"))
    try:
        _wait(lambda: (_embedding(engine, 25) or [None])[0] == "estimate", 120, "victim is refining")
        _pause_outside_a_write(victim, engine)
        now = datetime.now(UTC)
        with engine.begin() as conn:
            upsert_items(conn, [ItemEvent("i24", "renamed item while paused", None, None, now)], now)
        t0 = time.monotonic()
        cfg = settings.override(worker_batch=1, refine_epochs=1, worker_id="other")
        assert UpdateWorker(engine, bundle, lm, cfg).run(idle_exit=0.5) == 1
        recovery = time.monotonic() - t0  # the new text is aligned while the victim sleeps
        aligned_row = _embedding(engine, 25)
        assert aligned_row.kind == "refined"
        victim.send_signal(signal.SIGCONT)
        assert victim.wait(timeout=300) == 0
    finally:
        victim.kill()
    final = _embedding(engine, 25)
    with engine.connect() as conn:
        current = conn.execute(select(items.c.text_hash).where(items.c.idx == 25)).scalar_one()
    stale = int(final.text_hash != current)
    rewritten = int(final.seq != aligned_row.seq)
    faultlog.record(
        f"worker SIGSTOPped holding a lease, text changed meanwhile ({engine.dialect.name})",
        1,
        stale,
        rewritten,
        recovery,
    )
    assert aligned_row.text_hash == current
    assert stale == 0 and rewritten == 0, "the paused worker wrote after losing its lease"


def _missing_in(engine, version: str) -> int:
    """Items without a vector of their current text in ``version``."""
    with engine.connect() as conn:
        have = {
            (r.item_idx, r.text_hash)
            for r in conn.execute(
                select(item_embeddings.c.item_idx, item_embeddings.c.text_hash).where(
                    item_embeddings.c.model_version == version
                )
            )
        }
        current = conn.execute(select(items.c.idx, items.c.text_hash)).all()
    return sum((r.idx, r.text_hash) not in have for r in current)


def _settled(engine, version: str) -> bool:
    """Nothing pending, and every item has a vector of its current text in ``version``."""
    with engine.connect() as conn:
        if pending_count(conn):
            return False
    return _missing_in(engine, version) == 0


@pytest.mark.slow
def test_a_new_aligner_version_activated_under_load_strands_no_item(aligned):
    """Items keep arriving while ``said align`` runs and activates v2 beside a running worker:
    every item ends with a v2 vector of its current text (none stays on v1 only)."""
    from updater.full_align import align_catalogue

    engine, _bundle, lm, settings, data = aligned
    worker = UpdateWorker(
        engine,
        _bundle,
        lm,
        settings.override(worker_batch=2, refine_epochs=1, worker_id="w", worker_version_check_s=0.2),
    )
    runner = threading.Thread(target=worker.run)
    runner.start()
    feeding, added = threading.Event(), [0]

    def feed() -> None:
        while not feeding.wait(0.3):
            add_items(engine, 24 + added[0], 1)
            added[0] += 1

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        time.sleep(1.0)
        v2 = align_catalogue(engine, lm, settings.override(align_epochs=1), progress=False)
        time.sleep(1.0)  # items keep arriving after the activation too
        feeding.set()
        feeder.join()
        recovery = _wait(lambda: _settled(engine, v2.version), 240, "every item has a v2 vector")
    finally:
        feeding.set()
        worker.stop()
        runner.join(120)
    assert worker.bundle.version == v2.version and added[0] >= 4
    with engine.connect() as conn:
        stale = conn.execute(  # v2 vectors of a text the item no longer has
            select(func.count())
            .select_from(item_embeddings.join(items, items.c.idx == item_embeddings.c.item_idx))
            .where(
                item_embeddings.c.model_version == v2.version,
                item_embeddings.c.text_hash != items.c.text_hash,
            )
        ).scalar_one()
    faultlog.record(
        f"aligner v2 activated while items arrive and a worker runs ({engine.dialect.name})",
        1,
        _missing_in(engine, v2.version),
        stale,
        recovery,
    )
    assert stale == 0


def _torn(kind: str, good: bytes, folder, newer: str) -> None:
    """Leave ``folder`` as a crash at one step of writing snapshot ``newer`` would."""
    target = folder / f"index-{newer}.faiss"
    if kind == "temp file half written":
        (folder / f".{target.name}.dead1.tmp").write_bytes(good[: len(good) // 2])
    elif kind == "temp file written, not renamed":
        (folder / f".{target.name}.dead2.tmp").write_bytes(good)
    elif kind == "renamed but truncated (power cut before the data reached the disk)":
        target.write_bytes(good[: len(good) // 3])
    elif kind == "checksum header missing":
        target.write_bytes(good[40:])
    elif kind == "one bit flipped":
        flipped = bytearray(good)
        flipped[-5] ^= 1
        target.write_bytes(bytes(flipped))


TORN = (
    "temp file half written",
    "temp file written, not renamed",
    "renamed but truncated (power cut before the data reached the disk)",
    "checksum header missing",
    "one bit flipped",
)


def test_torn_snapshots_fall_back_to_the_previous_good_one(served, monkeypatch):
    """At every step of a snapshot write a crash leaves a different mess; a restarted
    replica must load the previous good snapshot (not a torn one, and without rebuilding),
    then catch up from the catalogue; a later save removes dead writers' temp files."""
    from core import files
    from scorer.state import ServingState

    engine, bundle, data, state = served
    folder = data / "index"
    wrong, seconds = 0, []
    for n, kind in enumerate(TORN):
        good = state.rebuild()
        _torn(kind, good.read_bytes(), folder, f"{state.version}-q{10**6 + n}")
        monkeypatch.setattr(ServingState, "_build", lambda *_, k=kind: pytest.fail(f"rebuilt after: {k}"))
        t0 = time.monotonic()
        again = ServingState(
            engine, bundle.version, bundle.aligner.cfg.vector_dim, folder, IndexSettings(), POSITIVES
        )
        seconds.append(time.monotonic() - t0)
        monkeypatch.undo()
        wrong += again.served.watermark != state.served.watermark or len(again.served.index) != 24
    monkeypatch.setattr(files, "STALE_TEMP_S", -1.0)
    state.rebuild()
    left = len(list(folder.glob(".*.tmp")))
    name = f"torn snapshot files, one per write step ({engine.dialect.name})"
    faultlog.record(name, len(TORN), wrong, left, max(seconds))  # duplicated: temp files left
    assert wrong == 0 and left == 0, "dead writers' temp files are removed"


def test_a_torn_model_file_is_refused_with_a_reason(tmp_path):

    from core.files import CorruptFile, load_torch, save_torch

    path = tmp_path / "scorer.pt"
    save_torch({"w": torch.ones(3)}, path)
    assert torch.equal(load_torch(path)["w"], torch.ones(3))
    whole = path.read_bytes()
    for torn in (whole[: len(whole) // 2], whole[:30]):
        path.write_bytes(torn)
        with pytest.raises(CorruptFile):
            load_torch(path)
