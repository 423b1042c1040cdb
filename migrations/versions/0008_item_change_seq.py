"""a commit-ordered sequence of item text changes

Revision ID: 0008
Revises: 0007

- ``items.change_seq``: the value of the ``items`` counter (``sequences``) taken by the
  transaction that last changed the item's text; 0 for an item whose text never changed
  since it was inserted. Writers hold the counter row until commit (``catalogue.next_seq``),
  so a scorer replica that read ``change_seq = n`` has seen every text change below it:
  it reads only the items changed after its item watermark and takes the vectors of an old
  text out of serving. Existing items start at 0: a replica reconciles its index against
  the catalogue's current text hashes whenever it loads one.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("change_seq", sa.BigInteger(), server_default="0", nullable=False))
    op.create_index("ix_items_change_seq", "items", ["change_seq"])
    op.execute("INSERT INTO sequences (name, value) VALUES ('items', 0)")


def downgrade() -> None:
    op.execute("DELETE FROM sequences WHERE name = 'items'")
    op.drop_index("ix_items_change_seq", table_name="items")
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): recreating ``items`` would trip the
    # foreign keys of the tables that reference it
    with op.batch_alter_table("items", recreate="never") as batch:
        batch.drop_column("change_seq")
