"""``said items inspect ITEM``: a look inside one item, from the catalogue alone.

Its text, alignment and serving state, the active aligner's vector of it (kind, loss, token
accuracy) and what the frozen LLM decodes from that vector, as its writer (the worker's
refinement, or ``said aligner train``'s fidelity check) stored it: the promise that an item's
vector holds its text, shown. Then its nearest items by cosine over the same aligner's
vectors. Nothing here loads the LLM: a first estimate has no reconstruction yet.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.catalogue import item_status, load_embeddings
from core.events import item_text
from core.tables import items
from core.versions import require_active


class UnknownItem(LookupError):
    """No item of that id in the catalogue."""


def inspect_item(engine: Engine, item_id: str, k: int = 5) -> dict:
    """The item's record and its ``k`` nearest items (JSON-able)."""
    version = require_active(engine, "aligner")[0]
    with engine.connect() as conn:
        found = item_status(conn, item_id, version)
        if found is None:
            raise UnknownItem(f"no item {item_id!r} in the catalogue")
        if k > 0:  # a full read of the version's vectors: only when neighbours are asked for
            ids, vectors = load_embeddings(conn, version)
            listed = conn.execute(select(items.c.idx, items.c.item_id, items.c.title))
            rows = {r.idx: (r.item_id, r.title) for r in listed}
    found["text"] = item_text(found["title"], found["description"])
    found["nearest"] = nearest(ids, vectors, found["idx"], k, rows) if k > 0 else []
    return found


def nearest(ids: np.ndarray, vectors: np.ndarray | None, idx: int, k: int, rows: dict) -> list[dict]:
    """The ``k`` items whose vectors are closest to item ``idx``'s (cosine), itself left out."""
    where = np.flatnonzero(ids == idx)
    if vectors is None or not len(where):
        return []
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # (N, D)
    scores = unit @ unit[where[0]]  # (N,)
    scores[where[0]] = -np.inf
    top = np.argsort(-scores)[:k]
    return [
        {"item_id": rows[int(ids[n])][0], "title": rows[int(ids[n])][1], "cosine": round(float(scores[n]), 4)}
        for n in top
        if np.isfinite(scores[n])
    ]


NOT_DECODED = "(not decoded yet: a first estimate, or an item its aligner's check did not sample)"


def render(found: dict) -> str:
    """The record as a person reads it."""
    acc, exact, loss = found["token_accuracy"], found["exact"], found["loss"]
    decoded = found["reconstruction"]
    vector = found["embedding"] or "none of its current text"
    return "\n".join(
        [
            f"item          {found['item_id']} (index {found['idx']})",
            f"text          {found['text']}",
            f"alignment     {found['status']}; serving: {found['serving_state']}",
            f"vector        {vector} in {found['aligner_version']}"
            + (f", loss {loss:.3f}" if loss is not None else ""),
            f"decodes to    {decoded!r}" if decoded is not None else f"decodes to    {NOT_DECODED}",
            "token acc.    "
            + (f"{acc:.3f}" if acc is not None else "-")
            + ("" if exact is None else f"; exact rebuild: {'yes' if exact else 'no'}"),
            "nearest items (cosine of the aligner's vectors):",
            *(f"  {n['cosine']:+.3f}  {n['item_id']}  {n['title'][:70]}" for n in found["nearest"]),
        ]
    )
