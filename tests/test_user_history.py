"""A user's history as the scorer reads it (``core.catalogue.user_history``): the last
``limit`` positives, oldest first, ties on time broken by arrival. Both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.catalogue import user_history
from core.db import make_engine, read_only
from core.tables import interactions, items


def test_the_last_positives_oldest_first_with_ties_by_arrival(db_url):
    engine = make_engine(db_url)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    item = {"title": "item", "event_time": t0, "text_hash": "x", "status": "aligned"}
    # (item, type, seconds after t0): items 5 and 6 share a time, 6 arrived later
    clicks = [(1, "click", 0), (2, "view", 1), (3, "click", 2), (4, "purchase", 3)]
    clicks += [(5, "click", 4), (6, "click", 4), (7, "view", 5), (8, "click", 6)]
    with engine.begin() as conn:
        conn.execute(
            items.insert(),
            [item | {"idx": i, "item_id": f"i{i}", "received_at": t0, "updated_at": t0} for i in range(1, 9)],
        )
        for n, (idx, kind, s) in enumerate(clicks):  # one at a time: ids in arrival order
            row = {"event_id": f"e{n}", "user_id": "u", "item_idx": idx, "type": kind}
            conn.execute(interactions.insert().values(row | {"event_time": t0 + timedelta(seconds=s)}))
        other = {"event_id": "x", "user_id": "v", "item_idx": 2, "type": "click", "event_time": t0}
        conn.execute(interactions.insert().values(other))
    with read_only(engine).connect() as conn:
        assert user_history(conn, "u", 3, ("click", "purchase")) == [5, 6, 8]
        assert user_history(conn, "u", 50, ("click", "purchase")) == [1, 3, 4, 5, 6, 8]
        assert user_history(conn, "u", 2, ("view",)) == [2, 7]
        assert user_history(conn, "v", 50, ("click",)) == [2]
        assert user_history(conn, "nobody", 50, ("click",)) == []
