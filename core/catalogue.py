"""Catalogue writes and reads used by the consumers and the updater.

Every write is idempotent: replaying a batch (at-least-once delivery) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
from sqlalchemy import Integer, bindparam, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from core.events import SERVING_STATES, InteractionEvent, ItemEvent, ServingEvent, content_hash
from core.tables import alignment_jobs, interactions, item_embeddings, items, sequences

_CHUNK = 1000  # keeps IN-lists and multi-row VALUES under every driver's parameter limit
_ITEMS_LOCK_KEY = 0x5A1D  # PostgreSQL advisory lock guarding dense-index assignment


E = TypeVar("E", ItemEvent, ServingEvent)


def utc(ts: datetime) -> datetime:
    """SQLite returns naive datetimes: read them back as the UTC they were stored in."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def dialect_insert(conn: Connection, table):
    """``INSERT`` with ``ON CONFLICT`` support for the connection's dialect."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect: {name}")


def _chunks(seq: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def lock_item_index(conn: Connection) -> None:
    """Serialise transactions that add items (or must see every committed one) until commit.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: ``BEGIN IMMEDIATE`` already
    holds the database's one write lock (``core.db``)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ITEMS_LOCK_KEY})


def _latest(events: Sequence[E]) -> dict[str, E]:
    """item_id -> the winning event of each item in a batch, by the events' version rule."""
    latest: dict[str, E] = {}
    for ev in events:
        kept = latest.get(ev.item_id)
        if kept is None or ev.version > kept.version:
            latest[ev.item_id] = ev
    return latest


def upsert_items(conn: Connection, events: Sequence[ItemEvent], now: datetime) -> dict[str, int]:
    """Insert new items and apply changed ones; returns item_id -> idx of those that changed.

    New items get the next dense indexes under a lock, so indexes have no gaps even with
    several consumers. An event older than the stored one is ignored (out-of-order
    delivery); a text change sends the item back to ``pending`` with a fresh alignment job
    and a new ``change_seq`` (the scorers take the old text's vector out of serving).
    The winner of two events is decided by ``ItemEvent.version`` (time, then content), so
    any delivery order of the same events gives the same row.
    """
    latest = _latest(events)
    if not latest:
        return {}
    lock_item_index(conn)

    existing = {}
    for chunk in _chunks(list(latest)):
        rows = conn.execute(
            select(
                items.c.item_id,
                items.c.idx,
                items.c.text_hash,
                items.c.event_time,
                items.c.title,
                items.c.description,
                items.c.advertiser_id,
            ).where(items.c.item_id.in_(chunk))
        )
        existing.update({r.item_id: r for r in rows})

    changed: dict[str, int] = {}
    next_idx = (conn.execute(select(func.max(items.c.idx))).scalar() or 0) + 1
    new_rows, jobs, updates = [], [], []
    for item_id, ev in latest.items():
        row = existing.get(item_id)
        fields = {
            "title": ev.title,
            "description": ev.description,
            "advertiser_id": ev.advertiser_id,
            "event_time": ev.event_time,
            "text_hash": ev.text_hash,
            "updated_at": now,
        }
        if row is None:
            new_rows.append(
                {"idx": next_idx, "item_id": item_id, "status": "pending", "received_at": now} | fields
            )
            changed[item_id] = next_idx
            next_idx += 1
        elif ev.version > (utc(row.event_time), content_hash(row.title, row.description, row.advertiser_id)):
            text_changed = ev.text_hash != row.text_hash
            updates.append((row.idx, fields, text_changed))
            if text_changed:
                changed[item_id] = row.idx
    # Scorers learn of text changes by this commit-ordered value, as of new vectors by
    # item_embeddings.seq. Lock order: item index (above), this counter, job rows (below).
    seq = next_seq(conn, "items", 1) if any(t for _, _, t in updates) else None
    for idx, fields, text_changed in updates:
        if text_changed:
            fields = fields | {"status": "pending", "received_at": now, "change_seq": seq}
        conn.execute(update(items).where(items.c.idx == idx).values(**fields))
    for chunk in _chunks(new_rows):
        conn.execute(items.insert(), list(chunk))
    for item_id, idx in changed.items():
        jobs.append({"item_idx": idx, "text_hash": latest[item_id].text_hash, "attempts": 0})
    for chunk in _chunks(jobs):
        conn.execute(_queue_jobs(dialect_insert(conn, alignment_jobs).values(list(chunk))))
    return changed


def set_serving(conn: Connection, events: Sequence[ServingEvent]) -> tuple[dict[str, int], list[str]]:
    """Apply owners' serving changes (pause, withdraw, reactivate); returns item_id -> idx
    of the items whose state changed, and the ids of unknown items, which nothing here
    applies (the caller rejects them: a change of no item is never silently dropped).

    A change older than the item's last one is ignored (``ServingEvent.version``), so a
    late event never undoes a newer withdrawal. A changed state takes a new ``change_seq``
    (the scorers take the item out of, or back into, their index). Call it after
    ``upsert_items`` in the same transaction, so an item created in the same batch is found.
    """
    latest = _latest(events)
    if not latest:
        return {}, []
    lock_item_index(conn)  # the lock order of upsert_items: item index, then the counter
    existing = {}
    for chunk in _chunks(list(latest)):
        rows = conn.execute(
            select(items.c.item_id, items.c.idx, items.c.serving_state, items.c.serving_time).where(
                items.c.item_id.in_(chunk)
            )
        )
        existing.update({r.item_id: r for r in rows})
    unknown = [item_id for item_id in latest if item_id not in existing]
    updates: list[tuple[int, ServingEvent, bool]] = []
    for item_id, ev in latest.items():
        row = existing.get(item_id)
        if row is None:
            continue
        if row.serving_time is not None:
            stored = (utc(row.serving_time), SERVING_STATES.index(row.serving_state))
            if ev.version <= stored:
                continue
        updates.append((row.idx, ev, ev.state != row.serving_state))
    seq = next_seq(conn, "items", 1) if any(moved for *_, moved in updates) else None
    changed = {}
    for idx, ev, moved in updates:
        values = {"serving_state": ev.state, "serving_time": ev.event_time}
        if moved:
            values["change_seq"] = seq
            changed[ev.item_id] = idx
        conn.execute(update(items).where(items.c.idx == idx).values(**values))
    return changed, unknown


def _queue_jobs(stmt):
    """An alignment-job insert that, for an existing job, starts it over: new text, no lease
    (the epoch bump fences whoever held it), no failures."""
    return stmt.on_conflict_do_update(
        index_elements=["item_idx"],
        set_={
            "text_hash": stmt.excluded.text_hash,
            "lease_owner": None,
            "lease_expires_at": None,
            "attempts": 0,
            "failures": 0,
            "last_error": None,
            "lease_epoch": alignment_jobs.c.lease_epoch + 1,
        },
    )


def queue_missing(conn: Connection, model_version: str) -> int:
    """Queue an alignment job for every item without a vector of its current text in
    ``model_version``; returns how many. Called when an aligner version becomes active:
    items that workers completed in the previous version meanwhile (or whose text changed
    during a long ``said aligner train``) then get a vector in the active one."""
    has_vector = (
        select(item_embeddings.c.item_idx)
        .where(
            item_embeddings.c.item_idx == items.c.idx,
            item_embeddings.c.model_version == model_version,
            item_embeddings.c.text_hash == items.c.text_hash,
        )
        .exists()
    )
    missing = select(items.c.idx, items.c.text_hash).where(~has_vector)
    stmt = dialect_insert(conn, alignment_jobs).from_select(["item_idx", "text_hash"], missing)
    queued = conn.execute(_queue_jobs(stmt)).rowcount
    conn.execute(update(items).where(~has_vector).values(status="pending"))
    return queued


def missing_text_rows(conn: Connection, aligner_version: str, limit: int, after_idx: int = 0) -> list:
    """Up to ``limit`` items (idx, title, description, text_hash) above ``after_idx``, in
    index order, with a vector of their current text in ``aligner_version`` and no
    ``text`` content row of it: items aligned before text rows were stored beside vectors
    (``content_version``). A caller walks the catalogue by passing its last index."""
    said, text_row = item_embeddings.alias("said_row"), item_embeddings.alias("text_row")
    has_text = (
        select(text_row.c.item_idx)
        .where(
            text_row.c.item_idx == items.c.idx,
            text_row.c.model_version == content_version(aligner_version, "text"),
            text_row.c.text_hash == items.c.text_hash,
        )
        .exists()
    )
    aligned = (said.c.item_idx == items.c.idx) & (said.c.model_version == aligner_version)
    return conn.execute(
        select(items.c.idx, items.c.title, items.c.description, items.c.text_hash)
        .join(said, aligned & (said.c.text_hash == items.c.text_hash))
        .where(items.c.idx > after_idx, ~has_text)
        .order_by(items.c.idx)
        .limit(limit)
    ).all()


def resolve_item_ids(conn: Connection, item_ids: Iterable[str]) -> dict[str, int]:
    """Map external item ids to dense indexes; unknown ids are absent from the result."""
    wanted = sorted(set(item_ids))
    found: dict[str, int] = {}
    for chunk in _chunks(wanted):
        rows = conn.execute(select(items.c.item_id, items.c.idx).where(items.c.item_id.in_(chunk)))
        found.update({r.item_id: r.idx for r in rows})
    return found


def insert_interactions(
    conn: Connection,
    events: Sequence[InteractionEvent],
    idx_of: dict[str, int],
    texts: Sequence[tuple[str, str]] | None = None,
) -> None:
    """Insert interactions whose item is known; a replayed ``event_id`` is skipped.

    ``texts``: each event's :func:`copy_text`, made beforehand (the consumer makes them
    while the batch before is written; on PostgreSQL this call then only joins strings)."""
    if not events:
        return
    if conn.dialect.name == "postgresql":
        texts = texts if texts is not None else [copy_text(ev) for ev in events]
        _copy_interactions(
            conn,
            [f"{head}{idx_of[ev.item_id]}{tail}" for ev, (head, tail) in zip(events, texts, strict=True)],
        )
        return
    rows = [(ev.event_id, ev.user_id, idx_of[ev.item_id], ev.type, ev.event_time) for ev in events]
    cols = ("event_id", "user_id", "item_idx", "type", "event_time")
    stmt = dialect_insert(conn, interactions).on_conflict_do_nothing(index_elements=["event_id"])
    conn.execute(stmt, [dict(zip(cols, r, strict=True)) for r in rows])


# PostgreSQL's COPY text format: these four would end a field or a line, or start an escape
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(ev: InteractionEvent) -> tuple[str, str]:
    """An interaction's line of COPY text but for its item's index, which only the write
    knows: the text before it and the text after it. The ids are escaped (validation has
    refused NUL, which COPY cannot carry); the type is one of a closed set."""
    head = f"{ev.event_id.translate(_COPY_ESCAPES)}\t{ev.user_id.translate(_COPY_ESCAPES)}\t"
    return head, f"\t{ev.type}\t{ev.event_time.isoformat()}\n"


_STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS said_stage_interactions (event_id text, user_id text, "
    "item_idx integer, type text, event_time timestamptz) ON COMMIT DELETE ROWS"
)
_STAGE_COPY = "COPY said_stage_interactions (event_id, user_id, item_idx, type, event_time) FROM STDIN"
_STAGE_MERGE = (
    "INSERT INTO interactions (event_id, user_id, item_idx, type, event_time) "
    "SELECT event_id, user_id, item_idx, type, event_time FROM said_stage_interactions "
    "ON CONFLICT (event_id) DO NOTHING"
)


def _copy_interactions(conn: Connection, lines: list[str]) -> None:
    """PostgreSQL fast path: COPY into a transaction-scoped stage, then one idempotent merge.

    COPY streams rows without per-row statements (~3x the executemany rate), here as one
    block of text lines; the merge's ``ON CONFLICT DO NOTHING`` keeps replays harmless
    exactly as the portable path does. The statements are constants; all data travels
    through COPY, never through SQL text.
    """
    cur = conn.connection.driver_connection.cursor()
    cur.execute(_STAGE_DDL)
    with cur.copy(_STAGE_COPY) as copy:
        copy.write("".join(lines))
    cur.execute(_STAGE_MERGE)
    cur.close()


def count_rows(conn: Connection, table) -> int:
    return conn.execute(select(func.count()).select_from(table)).scalar_one()


def lock_sequence(conn: Connection, name: str = "embeddings") -> None:
    """Take the counter's row lock now (PostgreSQL; SQLite writers are serialised anyway).
    Embedding writers that also lock job rows take this first, like ``said aligner train`` does, so
    two writers never wait on each other in opposite orders.

    Lock order of every writer: item index (``lock_item_index``), the ``items`` counter
    (only ``upsert_items`` takes it, always under the item index lock), the ``embeddings``
    counter, job rows."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(sequences.c.value).where(sequences.c.name == name).with_for_update())


def next_seq(conn: Connection, name: str, n: int) -> int:
    """Reserve ``n`` values of the counter ``name``; returns the first.

    The ``UPDATE`` locks the counter's row until this transaction commits, so writers get
    values in commit order: a reader that saw value ``v`` committed has seen every value
    below it (a database sequence cannot promise that: a later ``nextval`` may commit first).
    The cost is that embedding writers queue on this row for the rest of their transaction;
    theirs are short (one upsert)."""
    conn.execute(update(sequences).where(sequences.c.name == name).values(value=sequences.c.value + n))
    return conn.execute(select(sequences.c.value).where(sequences.c.name == name)).scalar_one() - n + 1


@dataclass(frozen=True)
class Decoded:
    """What a vector decodes to, stored beside it so no reader needs the LLM."""

    text: str | None  # the greedy decoding; None: not decoded
    token_accuracy: float | None  # teacher forced, on the item's text
    exact: bool | None  # the decoding is the item's text, token for token


NOT_DECODED = Decoded(None, None, None)

# What a composite's student reads as an item's content (``SAID_COMPOSITE_CONTENT``).
CONTENTS = ("said", "text")


def content_version(aligner_version: str, content: str) -> str:
    """The ``item_embeddings.model_version`` of an aligner's rows of one content: its SAID
    vectors under its own version, the pooled LLM text features of the same items (the
    fresh estimate's input, which its writers compute anyway) under ``<version>/text``.

    Tied to the aligner version, so every writer that fills one fills the other in the same
    transaction, and a scorer of that aligner finds either with the rules it already has."""
    if content not in CONTENTS:
        raise ValueError(f"unknown content {content!r}: one of {', '.join(CONTENTS)}")
    return aligner_version if content == "said" else f"{aligner_version}/{content}"


# what a rewrite of an item's embedding in a version replaces (all but the key)
UPSERTED = ("text_hash", "vector", "loss", "kind", "created_at", "seq", "decoded", "token_accuracy", "exact")


def write_embeddings(
    conn: Connection,
    model_version: str,
    kind: str,
    item_idx: Sequence[int],
    text_hashes: Sequence[str],
    vectors,
    losses: Sequence[float | None],
    now: datetime,
    decoded: Sequence[Decoded] | None = None,
) -> None:
    """Upsert one embedding per item for ``model_version`` (float32 bytes, with its loss
    and, where given, what it decodes to), each with a fresh commit-ordered ``seq`` (the
    scorer reads what is new by it)."""
    if not len(item_idx):
        return
    decoded = decoded if decoded is not None else [NOT_DECODED] * len(item_idx)
    vectors = np.asarray(vectors, dtype="<f4")
    first = next_seq(conn, "embeddings", len(item_idx))
    rows = [
        {
            "item_idx": int(i),
            "model_version": model_version,
            "text_hash": h,
            "vector": vectors[n].tobytes(),
            "loss": None if loss is None else float(loss),
            "kind": kind,
            "created_at": now,
            "seq": first + n,
            "decoded": d.text,
            "token_accuracy": None if d.token_accuracy is None else float(d.token_accuracy),
            "exact": d.exact,
        }
        for n, (i, h, loss, d) in enumerate(zip(item_idx, text_hashes, losses, decoded, strict=True))
    ]
    for chunk in _chunks(rows):
        stmt = dialect_insert(conn, item_embeddings)
        stmt = stmt.on_conflict_do_update(
            index_elements=["item_idx", "model_version"],
            set_={c: stmt.excluded[c] for c in UPSERTED},
        )
        conn.execute(stmt, list(chunk))


def write_text_rows(
    conn: Connection,
    aligner_version: str,
    item_idx: Sequence[int],
    text_hashes: Sequence[str],
    features: np.ndarray,
    now: datetime,
) -> None:
    """Upsert the pooled text features of items as ``aligner_version``'s text content
    (``content_version``): one call for every writer, so the rows' kind, version and empty
    loss cannot drift apart between them."""
    n = len(item_idx)
    write_embeddings(
        conn,
        content_version(aligner_version, "text"),
        "text",
        item_idx,
        text_hashes,
        features,
        [None] * n,
        now,
    )


@dataclass(frozen=True)
class EmbeddingRows:
    """Embeddings read in one statement, with their items' external ids."""

    ids: np.ndarray  # (n,) int64 dense item indexes
    item_ids: list[str]  # (n,) external ids of the same items
    vectors: np.ndarray | None  # (n, dim) float32; None when n == 0
    newest: int  # the greatest seq read (the caller's next watermark)
    text_hashes: list[str] = field(default_factory=list)  # (n,) the text each vector is of
    stale: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (n,) text changed since
    live: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (n,) serving_state active

    def fresh(self) -> EmbeddingRows:
        """The rows whose vector is of their item's current text (``newest`` unchanged)."""
        return self.where(~self.stale)

    def where(self, keep: np.ndarray) -> EmbeddingRows:
        """The rows where ``keep`` (n,) is true (``newest`` unchanged)."""
        return EmbeddingRows(
            self.ids[keep],
            [x for x, k in zip(self.item_ids, keep, strict=True) if k],
            self.vectors[keep] if keep.any() else None,
            self.newest,
            [h for h, k in zip(self.text_hashes, keep, strict=True) if k],
            self.stale[keep],
            self.live[keep],
        )


_EMBEDDING_COLUMNS = (
    item_embeddings.c.item_idx,
    items.c.item_id,
    item_embeddings.c.vector,
    item_embeddings.c.seq,
    item_embeddings.c.text_hash,
    items.c.text_hash.label("current_hash"),
    items.c.serving_state,
)


def _embedding_rows(rows, after_seq: int) -> EmbeddingRows:
    if not rows:
        return EmbeddingRows(np.zeros(0, dtype=np.int64), [], None, after_seq)
    return EmbeddingRows(
        np.array([r.item_idx for r in rows], dtype=np.int64),
        [r.item_id for r in rows],
        np.stack([np.frombuffer(r.vector, dtype="<f4") for r in rows]),
        max(r.seq for r in rows),
        [r.text_hash for r in rows],
        np.array([r.text_hash != r.current_hash for r in rows], dtype=bool),
        np.array([r.serving_state == "active" for r in rows], dtype=bool),
    )


def embeddings_since(conn: Connection, model_version: str, after_seq: int = 0) -> EmbeddingRows:
    """Embeddings of ``model_version`` with ``seq > after_seq`` and their items' ids.

    One statement, so every returned index has its external id (reading items and
    embeddings separately let a reader index a vector it could not name), and ``stale``
    compares each vector's text with its item's text as of the same instant.
    ``after_seq=0`` reads the whole version."""
    rows = conn.execute(
        select(*_EMBEDDING_COLUMNS)
        .join(items, items.c.idx == item_embeddings.c.item_idx)
        .where(item_embeddings.c.model_version == model_version, item_embeddings.c.seq > after_seq)
        .order_by(item_embeddings.c.item_idx)
    ).all()
    return _embedding_rows(rows, after_seq)


def embeddings_of(conn: Connection, model_version: str, item_idx: Sequence[int]) -> EmbeddingRows:
    """The embeddings of ``model_version`` of these items (those that have one), like
    ``embeddings_since``; ``newest`` is the greatest seq read, 0 if none."""
    rows = []
    for chunk in _chunks(sorted(set(item_idx))):
        rows += conn.execute(
            select(*_EMBEDDING_COLUMNS)
            .join(items, items.c.idx == item_embeddings.c.item_idx)
            .where(item_embeddings.c.model_version == model_version, item_embeddings.c.item_idx.in_(chunk))
            .order_by(item_embeddings.c.item_idx)
        ).all()
    return _embedding_rows(rows, 0)


@dataclass(frozen=True)
class TextChanges:
    """Items whose text or serving state changed after an item watermark, with their
    vector's text and seq in one model version, read in one statement (so all are of the
    same instant)."""

    ids: list[int]  # dense item indexes
    text_hashes: list[str]  # each item's current text
    vector_hashes: list[str | None]  # the text of its stored vector; None: it has none
    vector_seqs: list[int | None]  # that vector's item_embeddings.seq
    newest: int  # the greatest change_seq read (the caller's next item watermark)
    live: list[bool] = field(default_factory=list)  # each item's serving_state is active


def text_changes_since(conn: Connection, model_version: str, after_seq: int) -> TextChanges:
    """Items with ``change_seq > after_seq`` (``after_seq=-1``: every item) and the text
    hash and seq of their vector in ``model_version``. ``change_seq`` comes from a counter
    held until commit, so a reader that saw ``n`` has seen every change below it."""
    rows = conn.execute(
        select(
            items.c.idx,
            items.c.text_hash,
            items.c.change_seq,
            item_embeddings.c.text_hash,
            item_embeddings.c.seq,
            items.c.serving_state,
        )
        .select_from(
            items.outerjoin(
                item_embeddings,
                (item_embeddings.c.item_idx == items.c.idx)
                & (item_embeddings.c.model_version == model_version),
            )
        )
        .where(items.c.change_seq > after_seq)
    ).all()
    return TextChanges(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
        max((r[2] for r in rows), default=max(after_seq, 0)),
        [r[5] == "active" for r in rows],
    )


def item_change_watermark(conn: Connection) -> int:
    """The greatest ``change_seq`` committed (0 before any text change)."""
    return conn.execute(select(func.max(items.c.change_seq))).scalar() or 0


def load_embeddings(conn: Connection, model_version: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids int64 (n,), vectors float32 (n, dim)) of every stored embedding of a version."""
    found = embeddings_since(conn, model_version)
    return found.ids, found.vectors


def item_ids_after(conn: Connection, after_idx: int) -> dict[int, str]:
    """idx -> external item_id for items with idx > ``after_idx`` (append-only, so a
    reader keeps its map current by asking only for what is new)."""
    rows = conn.execute(select(items.c.idx, items.c.item_id).where(items.c.idx > after_idx))
    return {r.idx: r.item_id for r in rows}


def item_status(conn: Connection, item_id: str, model_version: str) -> dict | None:
    """An item's catalogue row, and its embedding of its current text in ``model_version``:
    kind (None: not servable; a vector of an older text does not count), loss, and what it
    decodes to as stored by its writer (the reconstruction; None where it was not decoded,
    as for a first estimate). None for an unknown item."""
    row = conn.execute(select(items).where(items.c.item_id == item_id)).first()
    if row is None:
        return None
    e = item_embeddings.c
    vector = conn.execute(
        select(e.kind, e.text_hash, e.loss, e.decoded, e.token_accuracy, e.exact).where(
            e.item_idx == row.idx, e.model_version == model_version
        )
    ).first()
    current = vector is not None and vector.text_hash == row.text_hash
    return {
        "item_id": row.item_id,
        "idx": row.idx,
        "title": row.title,
        "description": row.description,
        "status": row.status,
        "serving_state": row.serving_state,
        "text_hash": row.text_hash,
        "embedding": vector.kind if current else None,
        "servable": current,
        "aligner_version": model_version,
        "loss": vector.loss if current else None,
        "reconstruction": vector.decoded if current else None,
        "token_accuracy": vector.token_accuracy if current else None,
        "exact": vector.exact if current else None,
    }


# Built once: a ``user_id`` request reads a history on every call, and building the statement
# cost more than running it (118 against 42 µs on SQLite; benchmarks/scorer_latency.py).
_USER_HISTORY = (
    select(interactions.c.item_idx)
    .where(
        interactions.c.user_id == bindparam("user_id"),
        interactions.c.type.in_(bindparam("types", expanding=True)),
    )
    .order_by(interactions.c.event_time.desc(), interactions.c.id.desc())
    .limit(bindparam("limit", type_=Integer))
)


def user_history(conn: Connection, user_id: str, limit: int, types: Sequence[str]) -> list[int]:
    """The user's last ``limit`` item indexes of interactions of ``types``, oldest first."""
    params = {"user_id": user_id, "types": list(types), "limit": limit}
    return list(reversed(conn.execute(_USER_HISTORY, params).scalars().all()))


def user_sequences(conn: Connection, types: Sequence[str]) -> dict[str, list[int]]:
    """Every user's item indexes of interactions of ``types`` (the positives) in event
    order: the scorer's training data, by user id."""
    rows = conn.execute(
        select(interactions.c.user_id, interactions.c.item_idx)
        .where(interactions.c.type.in_(types))
        .order_by(interactions.c.user_id, interactions.c.event_time, interactions.c.id)
    ).all()
    seqs: dict[str, list[int]] = {}
    for user, idx in rows:
        seqs.setdefault(user, []).append(idx)
    return seqs


def popular_items(conn: Connection, types: Sequence[str], limit: int) -> list[int]:
    """The ``limit`` item indexes with the most interactions of ``types``, most first (ties:
    the older item): half of what a user with no usable history is shown."""
    n = func.count()
    rows = conn.execute(
        select(interactions.c.item_idx)
        .where(interactions.c.type.in_(types))
        .group_by(interactions.c.item_idx)
        .order_by(n.desc(), interactions.c.item_idx)
        .limit(limit)
    )
    return list(rows.scalars())


def overview(conn: Connection) -> dict:
    """What the catalogue holds, for ``said status``: items by alignment status and by
    serving state, positive and other interactions by type, and the alignment backlog."""

    def by(column) -> dict[str, int]:
        return {k: n for k, n in conn.execute(select(column, func.count()).group_by(column)).all()}

    return {
        "items": conn.execute(select(func.count()).select_from(items)).scalar(),
        "items_by_status": by(items.c.status),
        "items_by_serving_state": by(items.c.serving_state),
        "interactions_by_type": by(interactions.c.type),
        "alignment_jobs": conn.execute(select(func.count()).select_from(alignment_jobs)).scalar(),
        "alignment_jobs_failing": conn.execute(
            select(func.count()).select_from(alignment_jobs).where(alignment_jobs.c.failures > 0)
        ).scalar(),
    }
