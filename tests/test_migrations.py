"""Alembic migrations run on both backends, twice (idempotent), and down again."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from core.db import make_engine
from said.migrate import alembic_config, upgrade


def test_upgrade_is_idempotent_and_downgrade_drops_everything(db_url):
    upgrade(db_url)  # the fixture already upgraded once
    engine = make_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    assert {"items", "interactions", "item_embeddings", "alignment_jobs", "model_versions"} <= tables
    engine.dispose()
    command.downgrade(alembic_config(db_url), "base")
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}


def test_settings_redact_secrets():
    from core.settings import Settings

    s = Settings(database_url="postgresql+psycopg://u:hunter2@h/db", kafka_sasl_password="s3cret")
    shown = str(s.redacted())
    assert "hunter2" not in shown and "s3cret" not in shown
    assert s.kafka.client_config()["sasl.password"] == "s3cret"


def test_sqlite_commits_survive_a_power_cut(tmp_path):
    """synchronous=FULL: in WAL mode NORMAL may roll back a committed transaction on power
    loss, after the consumer has committed its Kafka offsets for it."""
    from core.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path}/said.db")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_0005_numbers_existing_embeddings_in_commit_order(db_url):
    """Rows written before the sequence existed get seq in created_at order, and the counter
    continues after them."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select, text

    from core.catalogue import write_embeddings
    from core.tables import item_embeddings

    command.downgrade(alembic_config(db_url), "0004")
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    item = (
        "INSERT INTO items (idx, item_id, title, event_time, text_hash, status, received_at, updated_at) "
        "VALUES (:i, :i, 't', :t, 'h', 'aligned', :t, :t)"
    )
    vector = (
        "INSERT INTO item_embeddings (item_idx, model_version, text_hash, vector, kind, created_at) "
        "VALUES (:i, 'v', 'h', :vec, 'full', :t)"
    )
    with engine.begin() as conn:
        for idx, minutes in ((1, 5), (2, 1), (3, 3)):  # created_at order: 2, 3, 1
            conn.execute(text(item), {"i": idx, "t": now})
            conn.execute(text(vector), {"i": idx, "vec": b"\0\0\0\0", "t": now + timedelta(minutes=minutes)})
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        seq = dict(conn.execute(select(item_embeddings.c.item_idx, item_embeddings.c.seq)).all())
        assert seq == {2: 1, 3: 2, 1: 3}
        write_embeddings(conn, "v", "full", [1], ["h"], [[0.0]], [None], now)
        again = select(item_embeddings.c.seq).where(item_embeddings.c.item_idx == 1)
        assert conn.execute(again).scalar() == 4


def test_0008_starts_existing_items_at_zero_and_counts_text_changes(db_url):
    """Items from before 0008 get change_seq 0 (a replica reconciles against current texts
    on load); a text change then takes the next value of the ``items`` counter, an
    unchanged text (a newer event of the same text) does not."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select, text

    from core.catalogue import upsert_items
    from core.events import ItemEvent
    from core.tables import items, sequences

    command.downgrade(alembic_config(db_url), "0007")
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    item = (
        "INSERT INTO items (idx, item_id, title, event_time, text_hash, status, received_at, updated_at) "
        "VALUES (:i, :id, :title, :t, :h, 'aligned', :t, :t)"
    )
    with engine.begin() as conn:
        for idx in (1, 2):
            ev = ItemEvent(f"i{idx}", f"title {idx}", None, None, now)
            conn.execute(
                text(item), {"i": idx, "id": ev.item_id, "title": ev.title, "t": now, "h": ev.text_hash}
            )
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        assert dict(conn.execute(select(items.c.idx, items.c.change_seq)).all()) == {1: 0, 2: 0}
        counter = select(sequences.c.value).where(sequences.c.name == "items")
        assert conn.execute(counter).scalar_one() == 0
        later = now + timedelta(minutes=1)
        upsert_items(conn, [ItemEvent("i1", "title 1", None, "adv", later)], later)  # same text
        assert conn.execute(select(items.c.change_seq).where(items.c.idx == 1)).scalar_one() == 0
        upsert_items(conn, [ItemEvent("i2", "a new title", None, None, later)], later)
        changed = dict(conn.execute(select(items.c.idx, items.c.change_seq)).all())
        assert changed == {1: 0, 2: 1} and conn.execute(counter).scalar_one() == 1
    engine.dispose()
    command.downgrade(alembic_config(db_url), "0007")
    engine = make_engine(db_url)
    assert "change_seq" not in {c["name"] for c in inspect(engine).get_columns("items")}


def test_every_interaction_names_an_item_and_no_named_item_can_go(db_url):
    """Whatever writes them (the consumer's COPY path, a plain INSERT, an UPDATE), the
    database refuses interactions of an item it does not hold, and an item that
    interactions name cannot be deleted: on PostgreSQL by the per-statement checks of
    0012 (SQLSTATE 23503, and 23001 for items), on SQLite by its foreign key. A refused
    statement stores none of its rows."""
    from datetime import UTC, datetime

    import psycopg
    import pytest
    from sqlalchemy import delete, func, insert, select, text, update
    from sqlalchemy.exc import DBAPIError

    from core.catalogue import insert_interactions, upsert_items
    from core.events import InteractionEvent, ItemEvent
    from core.tables import alignment_jobs, interactions, items

    engine = make_engine(db_url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        idx_of = upsert_items(conn, [ItemEvent("i1", "a title", None, None, now)], now)
        conn.execute(delete(alignment_jobs))  # its key to the item would refuse a DELETE too
    click = InteractionEvent("e1", "u1", "i1", "click", now)
    with engine.begin() as conn:
        insert_interactions(conn, [click], idx_of)
    ghost = {"i1": idx_of["i1"], "ghost": idx_of["i1"] + 1}
    clicks = [InteractionEvent(f"e{n}", "u1", item, "click", now) for n, item in [(2, "i1"), (3, "ghost")]]
    orphan = {"event_id": "e4", "user_id": "u1", "item_idx": ghost["ghost"], "type": "click"}
    refused = [  # (statement, PostgreSQL's SQLSTATE)
        (lambda c: insert_interactions(c, clicks, ghost), "23503"),
        (lambda c: c.execute(insert(interactions).values(**orphan, event_time=now)), "23503"),
        (lambda c: c.execute(update(interactions).values(item_idx=ghost["ghost"])), "23503"),
        (lambda c: c.execute(delete(items)), "23001"),
    ]
    if engine.dialect.name == "postgresql":
        refused.append((lambda c: c.execute(text("TRUNCATE items CASCADE")), "23001"))
        refused.append((lambda c: c.execute(update(items).values(idx=ghost["ghost"])), "23001"))
    for statement, sqlstate in refused:  # the COPY path raises the driver's own error
        with pytest.raises((DBAPIError, psycopg.Error)) as caught, engine.begin() as conn:
            statement(conn)
        error = caught.value.orig if isinstance(caught.value, DBAPIError) else caught.value
        if engine.dialect.name == "postgresql":
            assert error.sqlstate == sqlstate, error
        else:
            assert "FOREIGN KEY constraint failed" in str(error)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(interactions)).scalar() == 1
        assert conn.execute(select(interactions.c.item_idx)).scalar() == idx_of["i1"]
        assert conn.execute(select(items.c.idx)).all() == [(idx_of["i1"],)]
    engine.dispose()


def test_0012_keeps_the_foreign_key_on_sqlite_and_its_downgrade_restores_it_on_postgresql(db_url):
    def item_keys() -> list[str]:
        engine = make_engine(db_url)
        keys = [fk["referred_table"] for fk in inspect(engine).get_foreign_keys("interactions")]
        engine.dispose()
        return keys

    assert item_keys() == ([] if db_url.startswith("postgresql") else ["items"])
    command.downgrade(alembic_config(db_url), "0011")
    assert item_keys() == ["items"]
    upgrade(db_url)
    assert item_keys() == ([] if db_url.startswith("postgresql") else ["items"])
