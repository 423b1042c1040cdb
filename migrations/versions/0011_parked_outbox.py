"""parked interactions dead-lettered through an outbox

Revision ID: 0011
Revises: 0010

``parked_interactions.dead_at``: NULL while the row waits for its item; set, from the
database's clock, by the sweep that decided to dead-letter it. The decision commits before
the DLQ copy is produced, and the row is deleted only after that copy is flushed, so the
sweep holds no transaction across the flush, an arriving item never applies a row already
decided, and a crashed sweeper's rows are shipped by another (after ``RECLAIM_S``).
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("parked_interactions", sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_parked_interactions_dead_at", "parked_interactions", ["dead_at"])


def downgrade() -> None:
    op.drop_index("ix_parked_interactions_dead_at", "parked_interactions")
    with op.batch_alter_table("parked_interactions", recreate="never") as batch:
        batch.drop_column("dead_at")
