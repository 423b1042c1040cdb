"""an owner's serving state of an item, apart from its alignment status

Revision ID: 0009
Revises: 0008

- ``items.serving_state``: "active", "paused" or "withdrawn", set by item events with a
  ``status`` and by tombstones on ``said.items``. Scorers keep a paused or withdrawn item
  out of their index (still usable as history) and learn of a change by the item's
  ``change_seq``, as of a text change. Existing items are active.
- ``items.serving_time``: the event time of the change that set it (NULL: never changed),
  so a late older event never undoes a newer one.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "items", sa.Column("serving_state", sa.String(length=16), server_default="active", nullable=False)
    )
    op.add_column("items", sa.Column("serving_time", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35), as 0008 does
    with op.batch_alter_table("items", recreate="never") as batch:
        batch.drop_column("serving_time")
        batch.drop_column("serving_state")
