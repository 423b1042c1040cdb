"""park interactions that arrive before their item

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "parked_interactions",
        sa.Column("event_id", sa.String(256), primary_key=True),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("item_id", sa.String(256), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.JSON, nullable=False),
    )
    op.create_index("ix_parked_interactions_item", "parked_interactions", ["item_id"])
    op.create_index("ix_parked_interactions_parked_at", "parked_interactions", ["parked_at"])


def downgrade() -> None:
    op.drop_table("parked_interactions")
