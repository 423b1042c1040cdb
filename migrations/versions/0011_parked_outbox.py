"""parked interactions dead-lettered through an outbox table

Revision ID: 0011
Revises: 0010

``parked_outbox``: parked interactions a sweep decided to dead-letter, moved there (same
columns, plus ``claimed_at`` from the database's clock) in the transaction that decides it.
The decision commits before the DLQ copies are produced; the rows are deleted only after
the copies are flushed. So no transaction is held across the flush, an arriving item never
applies a click already decided, and a crashed sweeper's rows are shipped by another. The
table holds only the pages in flight: its churn stays out of the large parked table.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "parked_outbox",
        sa.Column("event_id", sa.String(256), primary_key=True),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("item_id", sa.String(256), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.JSON(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    # rows in flight go back to waiting, never lost; one whose DLQ copy was flushed already
    # may then be stored by its item as well: stop the consumers (drain the outbox) first
    op.execute(
        "INSERT INTO parked_interactions (event_id, user_id, item_id, type, event_time, parked_at, message) "
        "SELECT event_id, user_id, item_id, type, event_time, parked_at, message FROM parked_outbox"
    )
    op.execute(
        "UPDATE sequences SET value = value + (SELECT count(*) FROM parked_outbox) "
        "WHERE name = 'parked_interactions'"
    )
    op.drop_table("parked_outbox")
