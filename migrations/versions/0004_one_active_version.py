"""one active version per kind, enforced by a partial unique index

Revision ID: 0004
Revises: 0003

"Retire, then insert active" under READ COMMITTED let two promotions both succeed (two
active scorers were reproduced). Existing duplicates are resolved first: the newest active
row of each kind stays active, the others are retired.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT version, kind FROM model_versions WHERE status = 'active' ORDER BY created_at DESC")
    ).all()
    seen = set()
    for version, kind in rows:
        if kind in seen:
            conn.execute(
                sa.text("UPDATE model_versions SET status = 'retired' WHERE version = :v"), {"v": version}
            )
        seen.add(kind)
    op.create_index(
        "ux_model_versions_one_active",
        "model_versions",
        ["kind"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    op.drop_index("ux_model_versions_one_active", table_name="model_versions")
