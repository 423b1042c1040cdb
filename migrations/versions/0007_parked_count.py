"""count parked interactions in a counter row, not with count(*)

Revision ID: 0007
Revises: 0006

The ``sequences`` row ``parked_interactions`` holds the number of parked rows: every
transaction that parks, applies or dead-letters some changes it by as many, so the
consumers check the total cap (``park_max_total``) and export the gauge without counting
the table. Existing rows are counted once here.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a consumer of this version started before the upgrade may have made the row already:
    # the count of the table is the truth either way
    op.execute(
        "INSERT INTO sequences (name, value) SELECT 'parked_interactions', count(*) FROM parked_interactions WHERE true "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
    )


def downgrade() -> None:
    op.execute("DELETE FROM sequences WHERE name = 'parked_interactions'")
