"""what each stored vector decodes to: a look inside an item

Revision ID: 0010
Revises: 0009

- ``item_embeddings.decoded``: the text the frozen LLM greedily decodes from the vector's
  soft tokens (bounded by the item's own token count), written with the vector by the
  worker's refinement and by ``said align`` for the items its fidelity check decodes. NULL
  where it was not decoded (a first estimate: decoding would delay it).
- ``item_embeddings.token_accuracy``: teacher-forced token accuracy of the vector on the
  item's text, and ``exact``: whether the decoded text is the item's text, token for token.
So the scorer and ``said inspect`` show a reconstruction without loading the LLM.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("item_embeddings", sa.Column("decoded", sa.Text(), nullable=True))
    op.add_column("item_embeddings", sa.Column("token_accuracy", sa.Float(), nullable=True))
    op.add_column("item_embeddings", sa.Column("exact", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("item_embeddings", recreate="never") as batch:
        batch.drop_column("exact")
        batch.drop_column("token_accuracy")
        batch.drop_column("decoded")
