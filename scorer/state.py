"""What the scorer serves from: the item index and the id maps, kept current.

Start-up loads the newest index snapshot (rebuilding from the catalogue when it is missing
or corrupt); a background thread then applies new embeddings from the catalogue every
``poll_s`` seconds, so a fresh item is servable as soon as the worker writes its first
estimate, without waiting for a snapshot. Searches and updates share one lock, because a
FAISS index must not be searched while it is modified.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.engine import Engine

from said import metrics
from said.catalogue import embeddings_since, item_ids_after
from updater.worker import normalise, open_index

log = logging.getLogger(__name__)
# Re-read a short window before the watermark: a row committed late with an earlier
# timestamp is still picked up (re-applying a row is harmless: upsert).
OVERLAP = timedelta(seconds=5)


class ServingState:
    def __init__(self, engine: Engine, version: str, dim: int, index_dir: Path) -> None:
        # One query at a time gains nothing from OpenMP threads, and their spin-waiting under
        # concurrent requests costs tens of milliseconds (measured: p50 45 ms -> see README).
        faiss.omp_set_num_threads(1)
        self.engine, self.version = engine, version
        self.lock = threading.RLock()
        self.index = open_index(engine, index_dir, version, dim)
        self.item_id: dict[int, str] = {}
        self.idx_of: dict[str, int] = {}
        self.watermark = datetime(1970, 1, 1, tzinfo=UTC)
        self.refreshed_at: datetime | None = None
        self.refresh()

    def refresh(self) -> int:
        """Apply catalogue changes since the last call; returns vectors applied."""
        with self.engine.connect() as conn:
            new_ids = item_ids_after(conn, max(self.item_id, default=0))
            ids, vectors, newest = embeddings_since(conn, self.version, self.watermark - OVERLAP)
        with self.lock:
            self.item_id.update(new_ids)
            self.idx_of.update({v: k for k, v in new_ids.items()})
            if len(ids):
                self.index.upsert(ids, normalise(vectors))
            self.watermark = max(self.watermark, newest)
            self.refreshed_at = datetime.now(UTC)
            metrics.INDEX_ITEMS.set(len(self.index))
        return len(ids)

    def run_refresher(self, poll_s: float, stop: threading.Event) -> None:
        while not stop.wait(poll_s):
            try:
                self.refresh()
            except Exception:  # keep serving the last good state; the log says why
                log.exception("index refresh failed; serving the previous state")

    def recommend(self, history: list[int], k: int, exclude: set[int]) -> list[tuple[int, float]]:
        """Top-k items by cosine similarity to the mean of the history's vectors."""
        with self.lock:
            vecs = [v for v in map(self._vector, history) if v is not None]
            if not vecs:
                return []
            query = normalise(np.mean(vecs, axis=0, keepdims=True))
            scores, ids = self.index.search(query, min(k + len(exclude), len(self.index)))
        out = [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True)
               if i >= 0 and int(i) not in exclude]  # fmt: skip
        return out[:k]

    def _vector(self, idx: int) -> np.ndarray | None:
        """The item's vector, or None when it is not indexed yet (read once, not twice)."""
        try:
            return self.index.vector(idx)
        except RuntimeError:
            return None
