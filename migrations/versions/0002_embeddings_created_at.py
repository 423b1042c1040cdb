"""index item_embeddings.created_at for the scorer's incremental reads

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_item_embeddings_created_at", "item_embeddings", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_item_embeddings_created_at", table_name="item_embeddings")
