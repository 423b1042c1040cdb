"""DLQ messages already replayed, so every replay reads the whole DLQ without a group offset

Revision ID: 0006
Revises: 0005

``said dlq replay`` used one consumer group for every reason and committed past the messages
of other reasons, so they could never be replayed. Replays now read the DLQ from its start
and skip the messages recorded here.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dlq_replays",
        sa.Column("dlq_partition", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("dlq_offset", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dlq_replays")
