"""lease epochs and failure counts on alignment jobs; a commit-ordered embedding sequence

Revision ID: 0005
Revises: 0004

- ``alignment_jobs.lease_epoch``: bumped by every lease, so a worker whose lease expired
  (paused, partitioned) cannot write or complete the item after another worker took it.
- ``alignment_jobs.failures``: counts failures (errors, expired leases, restarts while
  holding), not leases, so outages never exhaust a job.
- ``item_embeddings.seq`` and the ``sequences`` counter: the scorer's watermark. Writers
  take the counter row's lock until commit, so ``seq`` order is commit order and a reader
  that has seen ``seq = n`` has seen every row below it, whatever the writers' clocks say.
  Existing rows are numbered in ``created_at`` order.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "alignment_jobs", sa.Column("lease_epoch", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column("alignment_jobs", sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "sequences",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.add_column("item_embeddings", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE item_embeddings SET seq = r.n FROM (SELECT item_idx, model_version, "
        "row_number() OVER (ORDER BY created_at, item_idx, model_version) AS n FROM item_embeddings) AS r "
        "WHERE item_embeddings.item_idx = r.item_idx AND item_embeddings.model_version = r.model_version"
    )
    op.execute("INSERT INTO sequences (name, value) SELECT 'embeddings', count(*) FROM item_embeddings")
    with op.batch_alter_table("item_embeddings") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
    op.create_index("ix_item_embeddings_version_seq", "item_embeddings", ["model_version", "seq"])


def downgrade() -> None:
    op.drop_index("ix_item_embeddings_version_seq", table_name="item_embeddings")
    with op.batch_alter_table("item_embeddings") as batch:
        batch.drop_column("seq")
    op.drop_table("sequences")
    with op.batch_alter_table("alignment_jobs") as batch:
        batch.drop_column("failures")
        batch.drop_column("lease_epoch")
