"""interactions: the item check once per statement, not once per row (PostgreSQL)

Revision ID: 0012
Revises: 0011

Every interaction names an existing item. The foreign key checked that with one trigger
call per inserted row, each a lookup and a KEY SHARE lock on the item's row: 15 of the
51 ms a 5,000-row ingest batch spent in PostgreSQL (benchmarks/results, stop 52). Here
the same rule is kept by statement-level triggers:

- after an INSERT into ``interactions``, or any UPDATE of it (PostgreSQL allows no column
  list beside transition tables), one anti-join of the statement's new rows against
  ``items`` refuses the whole statement if any row names an item that does not exist (the
  foreign key's SQLSTATE, 23503);
- ``items`` rows can no longer be deleted or truncated, nor their ``idx`` changed. The
  catalogue never does either (a withdrawn item is a serving state, and histories keep
  pointing at it), and this is what lets the check skip the row lock: the foreign key
  locked the item so that a concurrent DELETE could not orphan the new rows; with no
  DELETE possible there is nothing to race.

Like a foreign key, the check holds under READ COMMITTED, where each trigger query sees
what is committed. Unlike one, ``ALTER TABLE ... DISABLE TRIGGER USER`` turns it off.
SQLite keeps its foreign key (it is not the fast path, and has no transition tables);
``core.tables`` still declares the key, for SQLite and as the schema's documentation.
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

CHECK_ITEMS = """
CREATE FUNCTION said_interactions_name_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM said_new_rows n
               WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.idx = n.item_idx)) THEN
        RAISE foreign_key_violation USING MESSAGE = 'interaction of an item not in the catalogue';
    END IF;
    RETURN NULL;
END $$
"""
KEEP_ITEMS = """
CREATE FUNCTION said_items_are_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE restrict_violation USING MESSAGE = 'items are never deleted nor renumbered: '
        'interactions refer to them (withdraw an item instead)';
END $$
"""
# whole statements, no SQL built from strings (tests/test_security.py)
CREATE_TRIGGERS = (
    "CREATE TRIGGER interactions_inserted_name_items AFTER INSERT ON interactions "
    "REFERENCING NEW TABLE AS said_new_rows FOR EACH STATEMENT EXECUTE FUNCTION said_interactions_name_items()",
    "CREATE TRIGGER interactions_updated_name_items AFTER UPDATE ON interactions "
    "REFERENCING NEW TABLE AS said_new_rows FOR EACH STATEMENT EXECUTE FUNCTION said_interactions_name_items()",
    "CREATE TRIGGER items_not_deleted BEFORE DELETE ON items "
    "FOR EACH STATEMENT EXECUTE FUNCTION said_items_are_kept()",
    "CREATE TRIGGER items_not_truncated BEFORE TRUNCATE ON items "
    "FOR EACH STATEMENT EXECUTE FUNCTION said_items_are_kept()",
    "CREATE TRIGGER items_not_renumbered BEFORE UPDATE OF idx ON items FOR EACH ROW "
    "WHEN (OLD.idx IS DISTINCT FROM NEW.idx) EXECUTE FUNCTION said_items_are_kept()",
)
DROP_TRIGGERS = (
    "DROP TRIGGER interactions_inserted_name_items ON interactions",
    "DROP TRIGGER interactions_updated_name_items ON interactions",
    "DROP TRIGGER items_not_deleted ON items",
    "DROP TRIGGER items_not_truncated ON items",
    "DROP TRIGGER items_not_renumbered ON items",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(CHECK_ITEMS)
    op.execute(KEEP_ITEMS)
    for statement in CREATE_TRIGGERS:
        op.execute(statement)
    op.drop_constraint("interactions_item_idx_fkey", "interactions", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_foreign_key("interactions_item_idx_fkey", "interactions", "items", ["item_idx"], ["idx"])
    for statement in DROP_TRIGGERS:
        op.execute(statement)
    op.execute("DROP FUNCTION said_items_are_kept()")
    op.execute("DROP FUNCTION said_interactions_name_items()")
