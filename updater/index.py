"""The FAISS index of item vectors served by the scorer.

An ``IndexIDMap2`` over an exact inner-product index: ids are the catalogue's dense item
indexes, and a fresh or changed item is added or replaced in place (remove + add, ~4 ms)
without a rebuild. Snapshots are versioned files written atomically (temp file, fsync,
rename) with a SHA-256 sidecar, so a torn or corrupt snapshot is detected at load and the
index is rebuilt from the catalogue, which is the source of truth.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)


class CorruptSnapshot(RuntimeError):
    """A snapshot whose bytes do not match its recorded checksum, or that FAISS rejects."""


class ItemIndex:
    """Inner-product search over item vectors keyed by item index."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return self.index.ntotal

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add new items and replace existing ones: (n,) int64 ids, (n, dim) float32."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors must be ({len(ids)}, {self.dim}), got {vectors.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one upsert")
        self.index.remove_ids(faiss.IDSelectorArray(ids))
        self.index.add_with_ids(vectors, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ids of -1 pad when fewer items exist."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        return self.index.search(queries, k)

    def vector(self, item_id: int) -> np.ndarray:
        return self.index.reconstruct(int(item_id))

    # --- snapshots ---------------------------------------------------------------------
    def save(self, folder: Path, version: str) -> Path:
        """Write ``index-<version>.faiss`` atomically, with its checksum; returns the path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"index-{version}.faiss"
        data = faiss.serialize_index(self.index).tobytes()
        _write_atomic(path, data)
        _write_atomic(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
        return path

    @classmethod
    def load(cls, path: Path) -> ItemIndex:
        """Load a snapshot, verifying its checksum; raises :class:`CorruptSnapshot`."""
        try:
            data = path.read_bytes()
            expected = path.with_suffix(".sha256").read_text().strip()
        except FileNotFoundError as exc:
            raise CorruptSnapshot(f"{path}: missing file {exc.filename}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptSnapshot(f"{path}: checksum mismatch")
        try:
            raw = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise CorruptSnapshot(f"{path}: {exc}") from exc
        if not isinstance(raw, faiss.IndexIDMap2):
            raise CorruptSnapshot(f"{path}: not an ID-mapped index ({type(raw).__name__})")
        out = cls(raw.d)
        out.index = raw  # keep this object: a downcast proxy would outlive its owner
        return out


def latest_snapshot(folder: Path) -> Path | None:
    snaps = sorted(folder.glob("index-*.faiss"), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
