"""Catalogue tables (SQLAlchemy Core), shared by PostgreSQL and SQLite.

The catalogue is the source of truth: the FAISS index and the scorer are derived from it and
can always be rebuilt. Migrations in ``migrations/versions`` create exactly these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

ITEM_STATUSES = ("pending", "aligned", "failed")
INTERACTION_TYPES = ("impression", "click", "conversion")

items = Table(
    "items",
    metadata,
    # Dense index: the row of the item in every embedding table. Assigned as max+1 under a
    # lock (see catalogue.upsert_items), append-only and never reused.
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("item_id", String(256), nullable=False, unique=True),
    Column("title", Text, nullable=False),
    Column("description", Text),
    Column("advertiser_id", String(256)),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("text_hash", String(64), nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # the ``items`` counter value (commit order, see catalogue.next_seq) of the transaction
    # that last changed the text; 0 until it changes: scorers read what changed by it
    Column("change_seq", BigInteger, nullable=False, server_default="0"),
    # Whether its owner lets it be recommended: "active", "paused" or "withdrawn"
    # (``core.events.SERVING_STATES``), apart from ``status``, its alignment state. Set by
    # the event time of the change that set it (None: never changed), which orders changes;
    # a change also takes a new ``change_seq``, by which scorers learn of it.
    Column("serving_state", String(16), nullable=False, server_default="active"),
    Column("serving_time", DateTime(timezone=True)),
    Index("ix_items_status", "status"),
    Index("ix_items_change_seq", "change_seq"),
)

interactions = Table(
    "interactions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", String(256), nullable=False, unique=True),
    Column("user_id", String(256), nullable=False),
    # SQLite enforces this key; PostgreSQL checks it once per statement instead (0012)
    Column("item_idx", Integer, ForeignKey("items.idx"), nullable=False),
    Column("type", String(16), nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Index("ix_interactions_user_time", "user_id", "event_time"),
)


def _parked_columns() -> list[Column]:
    """A parked interaction's columns, for the parked table and its outbox (new objects on
    every call: a column belongs to one table)."""
    return [
        Column("event_id", String(256), primary_key=True),
        Column("user_id", String(256), nullable=False),
        Column("item_id", String(256), nullable=False),
        Column("type", String(16), nullable=False),
        Column("event_time", DateTime(timezone=True), nullable=False),
        Column("parked_at", DateTime(timezone=True), nullable=False),
        Column("message", JSON, nullable=False),  # topic, partition, offset, timestamp, key, value, headers
    ]


# Interactions that arrived before their item: applied when the item arrives (same
# transaction as the item's insert), dead-lettered with their original bytes once older
# than ``park_max_age_s`` (through ``parked_outbox``). The message itself is kept so its DLQ
# copy loses nothing.
parked_interactions = Table(
    "parked_interactions",
    metadata,
    *_parked_columns(),
    Index("ix_parked_interactions_item", "item_id"),
    Index("ix_parked_interactions_parked_at", "parked_at"),
)

# Parked interactions a sweep decided to dead-letter, from that decision (committed) until
# their DLQ copies are flushed: a crashed sweeper's rows are shipped by another after
# ``core.parking.RECLAIM_S``. Only the pages in flight are here.
parked_outbox = Table(
    "parked_outbox",
    metadata,
    *_parked_columns(),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)

# DLQ messages that ``said dlq replay`` re-published, by their place on ``said.dlq``, so a
# later replay (of any reason) publishes each at most once. The fingerprint (key, value,
# headers, timestamp) tells a message from another at the same place on a re-created topic.
dlq_replays = Table(
    "dlq_replays",
    metadata,
    Column("dlq_partition", Integer, primary_key=True, autoincrement=False),
    Column("dlq_offset", BigInteger, primary_key=True, autoincrement=False),
    Column("fingerprint", String(64), nullable=False),
    Column("replayed_at", DateTime(timezone=True), nullable=False),  # informational
)

item_embeddings = Table(
    "item_embeddings",
    metadata,
    Column("item_idx", Integer, ForeignKey("items.idx"), primary_key=True),
    Column("model_version", String(64), primary_key=True),
    Column("text_hash", String(64), nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32 little-endian
    Column("loss", Float),
    Column("kind", String(16), nullable=False),  # estimate | refined | full; text (``<aligner>/text`` rows)
    # what the LLM decodes from the vector (NULL: not decoded, e.g. a first estimate), its
    # teacher-forced token accuracy on the item's text, and whether it rebuilt it exactly
    Column("decoded", Text),
    Column("token_accuracy", Float),
    Column("exact", Boolean),
    Column("created_at", DateTime(timezone=True), nullable=False),  # the writer's clock: informational
    # commit order (``sequences`` row lock, see catalogue.next_seq): the scorer's watermark
    Column("seq", BigInteger, nullable=False),
    Index("ix_item_embeddings_created_at", "created_at"),
    Index("ix_item_embeddings_version_seq", "model_version", "seq"),
)

# Named counters whose row lock is held until the writer commits, so values are handed out
# in commit order (a database sequence is not: a later nextval can commit first).
sequences = Table(
    "sequences",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

alignment_jobs = Table(
    "alignment_jobs",
    metadata,
    Column("item_idx", Integer, ForeignKey("items.idx"), primary_key=True),
    Column("text_hash", String(64), nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default="0"),  # leases taken
    Column("last_error", Text),
    # bumped by every lease: a write or completion must name the epoch it leased
    Column("lease_epoch", BigInteger, nullable=False, server_default="0"),
    # errors, expired leases and restarts while holding it; outages do not count
    Column("failures", Integer, nullable=False, server_default="0"),
    Index("ix_alignment_jobs_lease", "lease_expires_at"),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # aligner | scorer | index
    Column("path", Text, nullable=False),
    Column("status", String(16), nullable=False),  # candidate | active | retired | rejected | corrupt
    Column("metrics", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_model_versions_kind_status", "kind", "status"),
    # one active version per kind, enforced by the database, not only by the code
    Index(
        "ux_model_versions_one_active",
        "kind",
        unique=True,
        postgresql_where=text("status = 'active'"),
        sqlite_where=text("status = 'active'"),
    ),
)
