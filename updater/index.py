"""The FAISS index of item vectors served by the scorer.

Two tiers, both keyed by the catalogue's dense item index:
- ``main``: built in bulk; exact inner product (``IndexFlatIP``) below ``hnsw_min_items``,
  HNSW above it, where a linear scan per query is too slow (HNSW cannot delete, so it is
  never modified after the build);
- ``delta``: an exact ``IndexIDMap2`` that takes every add and replacement at once
  (remove + add, no rebuild). An id present in ``delta`` is masked out of ``main`` with a
  FAISS ID selector, so a replaced vector never scores twice.
``compact()`` folds ``delta`` into a new ``main`` when it grows past a fraction of the index.

Snapshots are versioned files written atomically (temp file, fsync, rename) with a SHA-256
sidecar, so a torn or corrupt snapshot is detected at load and the index is rebuilt from the
catalogue, which is the source of truth.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)
HNSW_MIN_ITEMS = 50_000  # exact search below this many items (~2 ms per query at 64-d)
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # measured recall@10 vs exact: see benchmarks/scorer_latency.py


class CorruptSnapshot(RuntimeError):
    """A snapshot whose bytes do not match its recorded checksum, or that FAISS rejects."""


class ItemIndex:
    """Inner-product search over item vectors keyed by item index."""

    def __init__(self, dim: int, hnsw_min_items: int = HNSW_MIN_ITEMS) -> None:
        self.dim, self.hnsw_min_items = dim, hnsw_min_items
        self.main = self._flat()
        self.delta = self._flat()
        self._reset_masks()

    def _flat(self) -> faiss.IndexIDMap2:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @property
    def approximate(self) -> bool:
        return not isinstance(faiss.downcast_index(self.main.index), faiss.IndexFlat)

    def __len__(self) -> int:
        return self.main.ntotal - len(self._masked) + self.delta.ntotal

    def _reset_masks(self) -> None:
        """Recompute what ``upsert`` keeps incrementally: main's ids, masked ids, selector."""
        main_ids = faiss.vector_to_array(self.main.id_map)
        self._in_main = np.zeros(int(main_ids.max(initial=0)) + 1, dtype=bool)
        self._in_main[main_ids] = True
        delta_ids = faiss.vector_to_array(self.delta.id_map)
        self._masked = set(delta_ids[self._contains_main(delta_ids)].tolist())
        self._delta_sel = faiss.IDSelectorBatch(delta_ids) if len(delta_ids) else None

    def _contains_main(self, ids: np.ndarray) -> np.ndarray:
        inside = ids < len(self._in_main)
        out = np.zeros(len(ids), dtype=bool)
        out[inside] = self._in_main[ids[inside]]
        return out

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace everything with these items: HNSW when there are many, exact otherwise."""
        ids, vectors = self._check(ids, vectors)
        if len(ids) >= self.hnsw_min_items:
            hnsw = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            main = faiss.IndexIDMap2(hnsw)
        else:
            main = self._flat()
        main.add_with_ids(vectors, ids)
        self.main, self.delta = main, self._flat()
        self._reset_masks()

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add new items and replace existing ones: (n,) int64 ids, (n, dim) float32."""
        ids, vectors = self._check(ids, vectors)
        self.delta.remove_ids(faiss.IDSelectorArray(ids))
        self.delta.add_with_ids(vectors, ids)
        self._masked.update(ids[self._contains_main(ids)].tolist())
        self._delta_sel = faiss.IDSelectorBatch(faiss.vector_to_array(self.delta.id_map))

    def needs_compaction(self) -> bool:
        """Past this the delta's exact scan costs more than a compaction saves."""
        return self.delta.ntotal > max(1000, min(self.main.ntotal // 20, 20_000))

    def compact(self) -> None:
        """Fold the delta tier into a freshly built main tier (minutes for 1M HNSW items)."""
        ids, vectors = self.items()
        self.build(ids, vectors)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every current (ids, vectors): main's unmasked entries, then the delta tier."""
        main_ids, main_vecs = _contents(self.main)
        delta_ids, delta_vecs = _contents(self.delta)
        keep = ~np.isin(main_ids, delta_ids)
        return (np.concatenate([main_ids[keep], delta_ids]),
                np.concatenate([main_vecs[keep], delta_vecs]))  # fmt: skip

    def search(self, queries: np.ndarray, k: int, exclude: set[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top-k (scores, ids) per query row, never an id in ``exclude``; -1 pads the ids."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        exclude_ids = np.fromiter(exclude or (), dtype=np.int64)
        excl = faiss.IDSelectorBatch(exclude_ids) if len(exclude_ids) else None
        hide_main = [s for s in (excl, self._delta_sel) if s is not None]
        main_sel = (faiss.IDSelectorOr(*hide_main) if len(hide_main) == 2
                    else hide_main[0] if hide_main else None)  # fmt: skip
        results = [self._search_tier(self.main, queries, k, main_sel)]
        if self.delta.ntotal:
            results.append(self._search_tier(self.delta, queries, k, excl))
        scores = np.concatenate([s for s, _ in results], axis=1)
        ids = np.concatenate([i for _, i in results], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _search_tier(self, tier, queries, k, hide):
        """Search one tier for ids not selected by ``hide`` (an ID selector or None)."""
        if tier.ntotal == 0:
            return (np.full((len(queries), k), -np.inf, dtype=np.float32),
                    np.full((len(queries), k), -1, dtype=np.int64))  # fmt: skip
        sel = faiss.IDSelectorNot(hide) if hide is not None else None
        if isinstance(faiss.downcast_index(tier.index), faiss.IndexFlat):
            params = faiss.SearchParameters(sel=sel)
        else:
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(HNSW_EF_SEARCH, k))
        scores, ids = tier.search(queries, k, params=params)
        scores[ids < 0] = -np.inf
        return scores, ids

    def vector(self, item_id: int) -> np.ndarray:
        """The item's current vector; RuntimeError when it is not indexed."""
        for tier in (self.delta, self.main):
            try:
                return tier.reconstruct(int(item_id))
            except RuntimeError:
                continue
        raise RuntimeError(f"item {item_id} is not indexed")

    def _check(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors must be ({len(ids)}, {self.dim}), got {vectors.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one upsert")
        return ids, vectors

    # --- snapshots ---------------------------------------------------------------------
    def save(self, folder: Path, name: str) -> Path:
        """Write ``index-<name>.faiss`` (both tiers) atomically with its checksum."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"index-{name}.faiss"
        main = faiss.serialize_index(self.main).tobytes()
        data = len(main).to_bytes(8, "little") + main + faiss.serialize_index(self.delta).tobytes()
        _write_atomic(path, data)
        _write_atomic(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
        return path

    @classmethod
    def load(cls, path: Path, hnsw_min_items: int = HNSW_MIN_ITEMS) -> ItemIndex:
        """Load a snapshot, verifying its checksum; raises :class:`CorruptSnapshot`."""
        try:
            data = path.read_bytes()
            expected = path.with_suffix(".sha256").read_text().strip()
        except FileNotFoundError as exc:
            raise CorruptSnapshot(f"{path}: missing file {exc.filename}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptSnapshot(f"{path}: checksum mismatch")
        cut = 8 + int.from_bytes(data[:8], "little")
        try:
            tiers = [faiss.deserialize_index(np.frombuffer(b, dtype=np.uint8))
                     for b in (data[8:cut], data[cut:])]  # fmt: skip
        except RuntimeError as exc:
            raise CorruptSnapshot(f"{path}: {exc}") from exc
        if not all(isinstance(t, faiss.IndexIDMap2) for t in tiers):
            raise CorruptSnapshot(f"{path}: not an ID-mapped index")
        out = cls(tiers[0].d, hnsw_min_items)
        out.main, out.delta = tiers  # keep these objects: a downcast proxy would outlive its owner
        out._reset_masks()
        return out


def _contents(tier: faiss.IndexIDMap2) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) stored in a tier, read from its flat storage without a search."""
    inner = faiss.downcast_index(tier.index)
    storage = inner if isinstance(inner, faiss.IndexFlat) else faiss.downcast_index(inner.storage)
    vecs = faiss.rev_swig_ptr(storage.get_xb(), tier.ntotal * tier.d).reshape(tier.ntotal, tier.d)
    return faiss.vector_to_array(tier.id_map), vecs.copy()


def latest_snapshot(folder: Path, prefix: str = "") -> Path | None:
    """The newest ``index-<prefix>*.faiss`` in ``folder``, by modification time."""
    snaps = sorted(folder.glob(f"index-{prefix}*.faiss"), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: readers see the old file or the new one, never half of one.
    A failed write (disk full) removes its temp file and raises; the old file stays."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
