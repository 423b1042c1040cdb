"""The FAISS index of item vectors served by the scorer.

Two tiers, both keyed by the catalogue's dense item index:
- ``main``: built in bulk; exact inner product (``IndexFlatIP``) below ``SAID_HNSW_MIN_ITEMS``,
  HNSW above it, where a linear scan per query is too slow (HNSW cannot delete, so it is
  never modified after the build). Scorer logits are inner products of vectors whose norms
  vary widely, which an inner-product HNSW graph navigates poorly (recall@10 0.93 on SASRec
  queries). So items are split into ``NORM_BANDS`` bands by norm (each within 2x), and each band's HNSW
  searches the nearest L2 neighbour of ``[x, sqrt(M^2 - |x|^2)]`` for ``[q, 0]``, whose order
  is exactly the inner-product order (Bachrach et al., 2014); banding keeps the added
  coordinate small, which the transform alone does not (recall 0.44 -> 0.99 on log-normal
  norms; see tests/test_index.py and benchmarks/scorer_latency.py);
- ``delta``: an exact ``IndexIDMap2`` that takes every add and replacement at once
  (remove + add, no rebuild). An id present in ``delta`` is masked out of ``main`` with a
  FAISS ID selector, so a replaced vector never scores twice.
``remove()`` takes an item out (its text changed): out of ``delta``, and masked out of
``main`` by the same selector (HNSW cannot delete); snapshots keep these removals.
``compacted()`` (or ``start_compaction`` and ``caught_up``, built off the writer's thread)
folds ``delta`` into a new ``main`` (dropping removed items) when the two grow past a
fraction of the index.

Silent columns (``silent``): a scorer's trailing columns that no query meets (the
composite's history-read block, ``models/composite.py``) are kept beside the tiers, in a
dense array by item id, rather than in them: every search and every HNSW distance runs over
the searched columns alone, and ``vector`` returns the whole vector for histories.

Snapshots are versioned files written atomically (temp file, fsync, rename, folder fsync)
with their SHA-256 in the same file (``core.files.write_checked``), so a torn or corrupt
snapshot is detected at load; the reader then takes the previous good snapshot, or rebuilds
from the catalogue, which is the source of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from core.files import CorruptFile, read_checked, remove_stale_temps, write_checked
from core.settings import IndexSettings

log = logging.getLogger(__name__)
HNSW_M = 32  # graph degree
NORM_BANDS = 16  # HNSW graphs by norm: (M/2, M], (M/4, M/2], ..., and the rest below M/2^15
# Starts a snapshot's removed ids. Older snapshots start with a tier's 8-byte length, which
# these bytes, read as one, could never be (~3.5e18).
REMOVED_MAGIC = b"SAIDRM01"
SILENT_MAGIC = b"SAIDSC01"  # starts a snapshot's silent columns; older snapshots have none


class CorruptSnapshot(CorruptFile):
    """A snapshot whose bytes do not match its recorded checksum, or that FAISS rejects."""


class ItemIndex:
    """Inner-product search over item vectors keyed by item index."""

    def __init__(self, dim: int, cfg: IndexSettings, silent: int = 0) -> None:
        """Exact search below ``cfg.hnsw_min_items`` items, HNSW bands from there, each
        searched with ``cfg.hnsw_ef_search`` candidates; the last ``silent`` of ``dim``
        columns are stored, not searched (queries must hold 0 there)."""
        if not 0 <= silent < dim:
            raise ValueError(f"silent columns must be fewer than the {dim} columns, got {silent}")
        self.dim, self.cfg, self.searched = dim, cfg, dim - silent
        self._silent = np.zeros((0, silent), dtype=np.float32)  # (max id + 1, silent) by item id
        self.mains: list[faiss.IndexIDMap2] = [self._flat()]  # one exact tier, or HNSW bands
        self.delta = self._flat()
        self._touched: set[int] | None = None  # ids upserted or removed since a compaction's copy
        self._reset_masks()

    @property
    def silent(self) -> int:
        """How many trailing columns are kept beside the tiers, not searched."""
        return self.dim - self.searched

    def _flat(self) -> faiss.IndexIDMap2:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.searched))

    @property
    def approximate(self) -> bool:
        return any(m.d == self.searched + 1 for m in self.mains)  # augmented HNSW bands

    def __len__(self) -> int:
        return self._main_total() - len(self._masked) - len(self._removed) + self.delta.ntotal

    def _main_total(self) -> int:
        return sum(m.ntotal for m in self.mains)

    def _reset_masks(self, removed: np.ndarray | None = None) -> None:
        """Recompute what ``upsert`` and ``remove`` keep incrementally: main's ids (by tier), masked
        ids (replaced by ``delta``), removed ids (in ``main``, in no tier any more), selector."""
        band_ids = [faiss.vector_to_array(m.id_map) for m in self.mains]
        main_ids = np.concatenate(band_ids)
        self._band = np.full(int(main_ids.max(initial=0)) + 1, -1, dtype=np.int16)  # id -> its main tier
        for band, ids in enumerate(band_ids):
            self._band[ids] = band
        delta_ids = faiss.vector_to_array(self.delta.id_map)
        self._in_delta = set(delta_ids.tolist())
        self._masked = set(delta_ids[self._contains_main(delta_ids)].tolist())
        removed = np.zeros(0, dtype=np.int64) if removed is None else removed
        self._removed = set(removed[self._contains_main(removed)].tolist()) - set(delta_ids.tolist())
        self._reset_selector()
        # each main tier with M^2, the squared norm all its stored vectors have (augmented
        # bands), largest first: the order ``search`` prunes in
        m2 = [_first_norm2(m) for m in self.mains]
        self._by_norm = sorted(zip(self.mains, m2, strict=True), key=lambda band: -band[1])

    def _contains_main(self, ids: np.ndarray) -> np.ndarray:
        inside = ids < len(self._band)
        out = np.zeros(len(ids), dtype=bool)
        out[inside] = self._band[ids[inside]] >= 0
        return out

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace everything with these items: HNSW bands when many, exact otherwise."""
        ids, whole = self._check(ids, vectors)
        vectors = np.ascontiguousarray(whole[:, : self.searched])
        if len(ids) >= self.cfg.hnsw_min_items:
            mains = []
            for band in _norm_bands(vectors):
                hnsw = faiss.IndexHNSWFlat(self.searched + 1, HNSW_M)  # L2 on augmented vectors
                hnsw.hnsw.efConstruction = self.cfg.hnsw_ef_construction
                mains.append(faiss.IndexIDMap2(hnsw))
                mains[-1].add_with_ids(_augment(vectors[band]), ids[band])
        else:
            mains = [self._flat()]
            mains[0].add_with_ids(vectors, ids)
        self._silent = self._silent[:0]  # only once the tiers are built: a failed build changes nothing
        self._keep_silent(ids, whole)
        self.mains, self.delta = mains, self._flat()
        self._reset_masks()

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add new items and replace existing ones: (n,) int64 ids, (n, dim) float32."""
        ids, whole = self._check(ids, vectors)
        self.delta.remove_ids(faiss.IDSelectorArray(ids))
        self.delta.add_with_ids(np.ascontiguousarray(whole[:, : self.searched]), ids)
        self._keep_silent(ids, whole)
        self._in_delta.update(ids.tolist())
        self._masked.update(ids[self._contains_main(ids)].tolist())
        self._removed.difference_update(ids.tolist())
        self._reset_selector()
        if self._touched is not None:
            self._touched.update(ids.tolist())

    def _keep_silent(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store the silent columns of these (n, dim) vectors by id (rows grow by a quarter
        at a time: the array is as long as the largest id)."""
        if not self.silent:
            return
        top = int(ids.max(initial=-1)) + 1
        if top > len(self._silent):
            rows = max(top, len(self._silent) * 5 // 4)
            grown = np.zeros((rows, self.silent), dtype=np.float32)
            grown[: len(self._silent)] = self._silent
            self._silent = grown
        self._silent[ids] = vectors[:, self.searched :]

    def _with_silent(self, ids: np.ndarray, searched: np.ndarray) -> np.ndarray:
        """(n,) ids and their (n, searched) columns -> (n, dim) whole vectors."""
        if not self.silent:
            return searched
        return np.hstack([searched, self._silent[ids]])

    def remove(self, ids: np.ndarray) -> None:
        """Take these items out of serving (absent ones are ignored)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return
        self.delta.remove_ids(faiss.IDSelectorArray(ids))
        self._in_delta.difference_update(ids.tolist())
        in_main = ids[self._contains_main(ids)].tolist()
        self._masked.difference_update(in_main)
        self._removed.update(in_main)
        self._reset_selector()
        if self._touched is not None:
            self._touched.update(ids.tolist())

    def _reset_selector(self) -> None:
        """The ids hidden from ``main``: replaced (in ``delta``) or removed."""
        hidden = faiss.vector_to_array(self.delta.id_map)
        if self._removed:
            hidden = np.concatenate([hidden, np.fromiter(self._removed, dtype=np.int64)])
        self._main_hidden = faiss.IDSelectorBatch(hidden) if len(hidden) else None

    def needs_compaction(self) -> bool:
        """Past this the delta's exact scan (and the removed ids' mask) costs more than a
        compaction saves."""
        changed = self.delta.ntotal + len(self._removed)
        return changed > max(1000, min(self._main_total() // 20, 20_000))

    def compacted(self) -> ItemIndex:
        """A new index with the delta tier folded into a freshly built main tier (minutes
        for 1M HNSW items): built while this one keeps serving, then swapped in whole."""
        return self._rebuilt(self.silent)

    def start_compaction(self) -> Callable[[], ItemIndex]:
        """A compaction in two halves, so that its slow one (minutes at 1M HNSW items) runs
        off the thread that writes this index: returns a function that builds a new index
        from this one's items as they are now, safe to call on any thread, and records from
        here on every id ``upsert`` and ``remove`` touch, which ``caught_up`` replays."""
        ids, vectors = self.items()  # copies: this index may change while they are built
        self._touched = set()
        dim, cfg, silent = self.dim, self.cfg, self.silent

        def build() -> ItemIndex:
            fresh = ItemIndex(dim, cfg, silent)
            fresh.build(ids, vectors)
            return fresh

        return build

    def caught_up(self, fresh: ItemIndex) -> ItemIndex:
        """``fresh`` (from ``start_compaction``'s function) with every item touched since
        set as it stands here now: its current vector, or out; recording stops."""
        if self._touched is None:
            raise RuntimeError("caught_up without start_compaction: nothing was recorded")
        touched, self._touched = sorted(self._touched), None
        now = {i: self.lookup(i) for i in touched}
        fresh.remove(np.array([i for i, v in now.items() if v is None], dtype=np.int64))
        kept = [i for i, v in now.items() if v is not None]
        if kept:
            fresh.upsert(np.array(kept, dtype=np.int64), np.stack([now[i] for i in kept]))
        return fresh

    def relaid(self, silent: int) -> ItemIndex:
        """This index with ``silent`` trailing columns kept beside the tiers: itself where
        it has them already, else rebuilt (a snapshot written before its scorer's read block
        was kept beside the tiers searches every column)."""
        return self if silent == self.silent else self._rebuilt(silent)

    def _rebuilt(self, silent: int) -> ItemIndex:
        fresh = ItemIndex(self.dim, self.cfg, silent)
        fresh.build(*self.items())
        return fresh

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every current (ids, vectors): main's unmasked entries, then the delta tier."""
        parts = [_contents(m, self.searched) for m in self.mains]
        main_ids = np.concatenate([i for i, _ in parts])
        main_vecs = np.concatenate([v for _, v in parts])
        delta_ids, delta_vecs = _contents(self.delta, self.searched)
        keep = self._main_kept(main_ids, delta_ids)
        ids = np.concatenate([main_ids[keep], delta_ids])
        return ids, self._with_silent(ids, np.concatenate([main_vecs[keep], delta_vecs]))

    def ids(self) -> np.ndarray:
        """Every item served (int64), without reading vectors."""
        main_ids = np.concatenate([faiss.vector_to_array(m.id_map) for m in self.mains])
        delta_ids = faiss.vector_to_array(self.delta.id_map)
        return np.concatenate([main_ids[self._main_kept(main_ids, delta_ids)], delta_ids])

    def _main_kept(self, main_ids: np.ndarray, delta_ids: np.ndarray) -> np.ndarray:
        hidden = np.concatenate([delta_ids, np.fromiter(self._removed, dtype=np.int64)])
        return ~np.isin(main_ids, hidden)

    def search(
        self, queries: np.ndarray, k: int, exclude: set[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, never an id in ``exclude``; -1 pads the ids.

        Excluded ids (a history: tens) are dropped from each tier's top ``k + len(exclude)``
        rather than hidden inside FAISS by an ID selector, whose construction for every
        request cost more than the filter. An HNSW search with a selector walks the excluded
        nodes too and only keeps them out of its results, so the top k is the same while
        ``k + len(exclude)`` is within efSearch; past it (a history of over 118 items at k 10,
        efSearch 128) efSearch grows to it, which costs time and gains recall."""
        queries = np.ascontiguousarray(
            np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)[:, : self.searched]
        )
        excluded = exclude or set()
        wide = k + len(excluded)
        results = []
        if self.delta.ntotal:
            results.append(self._search_tier(self.delta, 0.0, queries, wide, None, excluded))
        norms = np.linalg.norm(queries, axis=1)  # (Q,)
        for tier, m2 in self._by_norm:  # HNSW bands, largest norms first (one exact tier: m2 unused)
            if tier.d != self.searched and _beaten(results, k, norms * np.sqrt(m2)):
                break  # no item of this band, nor of any band after it, can enter a top k
            results.append(self._search_tier(tier, m2, queries, wide, self._main_hidden, excluded))
        scores = np.concatenate([s for s, _ in results], axis=1)
        ids = np.concatenate([i for _, i in results], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _search_tier(self, tier, m2: float, queries, k, hide, excluded: set[int]):
        """Search one tier for ids not selected by ``hide`` (an ID selector or None); ids of
        ``excluded`` found are blanked (score -inf, id -1)."""
        if tier.ntotal == 0:
            return (
                np.full((len(queries), k), -np.inf, dtype=np.float32),
                np.full((len(queries), k), -1, dtype=np.int64),
            )
        sel = faiss.IDSelectorNot(hide) if hide is not None else None
        if tier.d == self.searched:
            params = None if sel is None else faiss.SearchParameters(sel=sel)
            scores, ids = tier.search(queries, k, params=params)
        else:  # augmented L2: |q|^2 + M^2 - 2 q.x = distance, so q.x follows from it
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.cfg.hnsw_ef_search, k))
            padded = np.hstack([queries, np.zeros((len(queries), 1), dtype=np.float32)])
            dist, ids = tier.search(padded, k, params=params)
            scores = (np.square(queries).sum(1, keepdims=True) + m2 - dist) / 2
        if excluded:  # a set lookup per id found: np.isin costs more on a few dozen ids
            ids[np.fromiter((i in excluded for i in ids.flat), bool, ids.size).reshape(ids.shape)] = -1
        scores[ids < 0] = -np.inf
        return scores, ids

    def vector(self, item_id: int) -> np.ndarray:
        """The item's current vector; RuntimeError when it is not indexed."""
        found = self.lookup(item_id)
        if found is None:
            raise RuntimeError(f"item {item_id} is not indexed")
        return found

    def lookup(self, item_id: int) -> np.ndarray | None:
        """The item's current vector, or None when it is not indexed: the tier is known
        from the masks, so a history read tries one tier, not every HNSW band in turn
        (a FAISS miss raises, and 17 raised misses cost more than the query's encoder)."""
        i = int(item_id)
        if i in self._in_delta:  # added or replaced since the build: delta has the current one
            found = self.delta.reconstruct(i)
        elif i < 0 or i in self._removed or i >= len(self._band) or self._band[i] < 0:
            return None
        else:
            found = self.mains[self._band[i]].reconstruct(i)[: self.searched]  # drops the augmentation
        return found if not self.silent else np.concatenate([found, self._silent[i]])

    def _check(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors must be ({len(ids)}, {self.dim}), got {vectors.shape}")
        if len(ids) and ids.min() < 0:
            raise ValueError("negative item ids")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one upsert")
        return ids, vectors

    # --- snapshots ---------------------------------------------------------------------
    def save(self, folder: Path, name: str, keep: int = 3) -> Path:
        """Write ``index-<name>.faiss`` (every tier and the removed ids, with its checksum)
        atomically, then delete all but the newest ``keep`` snapshots of its version (the
        one the caller serves: never pruned for others' being newer), other versions' but
        the two most recently written (``prune_snapshots``), and dead writers' temp files
        (a periodic writer must not fill the disk)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"index-{name}.faiss"
        parts = [faiss.serialize_index(t).tobytes() for t in (self.delta, *self.mains)]
        removed = np.array(sorted(self._removed), dtype="<i8")
        head = REMOVED_MAGIC + len(removed).to_bytes(8, "little") + removed.tobytes() if len(removed) else b""
        if self.silent:
            rows = int(self.ids().max(initial=-1)) + 1  # not the spare rows
            kept = self._silent[:rows].astype("<f4", copy=False)
            silent = SILENT_MAGIC + rows.to_bytes(8, "little") + kept.shape[1].to_bytes(8, "little")
            head = silent + kept.tobytes() + head
        write_checked(path, head + b"".join(len(b).to_bytes(8, "little") + b for b in parts))
        prune_snapshots(folder, name.rsplit("-", 1)[0], keep)
        remove_stale_temps(folder)
        return path

    @classmethod
    def load(cls, path: Path, cfg: IndexSettings) -> ItemIndex:
        """Load a snapshot, verifying its checksum; raises :class:`CorruptSnapshot`."""
        try:
            data = read_checked(path)
        except CorruptFile as exc:
            raise CorruptSnapshot(str(exc)) from exc
        tiers, at, removed = [], 0, np.zeros(0, dtype=np.int64)
        silent = np.zeros((0, 0), dtype=np.float32)
        if data.startswith(SILENT_MAGIC):  # older snapshots have no silent columns
            rows, cols = int.from_bytes(data[8:16], "little"), int.from_bytes(data[16:24], "little")
            at = 24 + 4 * rows * cols
            silent = np.frombuffer(data[24:at], dtype="<f4").reshape(rows, cols).astype(np.float32)
        if data[at:].startswith(REMOVED_MAGIC):  # older snapshots have no removed ids
            n, start = int.from_bytes(data[at + 8 : at + 16], "little"), at + 16
            removed = np.frombuffer(data[start : start + 8 * n], dtype="<i8").astype(np.int64)
            at = start + 8 * n
        try:
            while at < len(data):
                size = int.from_bytes(data[at : at + 8], "little")
                tiers.append(faiss.deserialize_index(np.frombuffer(data[at + 8 : at + 8 + size], np.uint8)))
                at += 8 + size
        except RuntimeError as exc:
            raise CorruptSnapshot(f"{path}: {exc}") from exc
        if len(tiers) < 2 or not all(isinstance(t, faiss.IndexIDMap2) for t in tiers):
            raise CorruptSnapshot(f"{path}: not an ID-mapped index")
        out = cls(tiers[0].d + silent.shape[1], cfg, silent.shape[1])  # the delta is never augmented
        out.delta, out.mains = tiers[0], tiers[1:]  # keep these objects: proxies outlive owners
        out._silent = silent
        out._reset_masks(removed)
        return out


def _norm_bands(vectors: np.ndarray) -> list[np.ndarray]:
    """Row indexes by norm band: (M/2, M], (M/4, M/2], ... and the rest, M the largest norm.
    Within a band norms differ at most 2x, so the augmented coordinate stays small."""
    norms = np.linalg.norm(vectors, axis=1)
    band = np.floor(np.log2(norms.max() / np.maximum(norms, 1e-30)))
    band = np.clip(band, 0, NORM_BANDS - 1).astype(int)
    return [np.flatnonzero(band == b) for b in range(NORM_BANDS) if (band == b).any()]


def _beaten(results: list[tuple[np.ndarray, np.ndarray]], k: int, bound: np.ndarray) -> bool:
    """True when every query's k-th best score so far is at least ``bound``, its largest
    possible score in the next band (q.x <= |q| M, Cauchy-Schwarz): the bands after it have
    smaller norms, so searching them cannot change any top k. The pruning is exact up to float
    rounding (the bound is compared with scores recovered from L2 distances); at 100k
    items with log-normal norms most queries stop after the top bands (see
    benchmarks/scorer_latency.py)."""
    if not results:
        return False
    scores = np.concatenate([s for s, _ in results], axis=1)  # (Q, found)
    if scores.shape[1] < k:
        return False
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]  # (Q,)
    return bool(np.all(kth >= bound))


def _first_norm2(tier: faiss.IndexIDMap2) -> float:
    ids = faiss.vector_to_array(tier.id_map)
    return float(np.square(tier.reconstruct(int(ids[0]))).sum()) if len(ids) else 0.0


def _augment(vectors: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, d+1) of equal norm M = max |x|: L2 order of [q, 0] = inner-product order."""
    norms2 = np.square(vectors).sum(1)
    return np.hstack([vectors, np.sqrt(norms2.max() - norms2)[:, None]]).astype(np.float32)


def _contents(tier: faiss.IndexIDMap2, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) stored in a tier, read from its flat storage without a search."""
    inner = faiss.downcast_index(tier.index)
    storage = inner if isinstance(inner, faiss.IndexFlat) else faiss.downcast_index(inner.storage)
    vecs = faiss.rev_swig_ptr(storage.get_xb(), tier.ntotal * tier.d).reshape(tier.ntotal, tier.d)
    return faiss.vector_to_array(tier.id_map), vecs[:, :dim].copy()


def snapshots(folder: Path, prefix: str = "") -> list[Path]:
    """``index-<prefix>*.faiss`` in ``folder``, newest first (by modification time)."""
    found = []
    for path in folder.glob(f"index-{prefix}*.faiss"):
        try:
            found.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # pruned by another writer meanwhile
            continue
    return [p for _, p in sorted(found, reverse=True)]


def prune_snapshots(folder: Path, version: str, keep: int = 3, versions: int = 3) -> None:
    """Keep the newest ``keep`` snapshots of ``version``, the one the caller serves, whatever
    other writers of the shared folder wrote since (files are ordered by modification time,
    and another host's clock or one clock tick can make theirs look newer), and snapshots of
    the ``versions - 1`` other versions most recently written (one replica's writes never
    prune another version's while it is recent: a replica mid-swap or a rollback still needs
    it); older versions' go (retired ones)."""
    for old in snapshots(folder, f"{version}-")[keep:]:
        old.unlink(missing_ok=True)
    kept = {version}
    for snap in snapshots(folder):
        owner = snap.stem.removeprefix("index-").rsplit("-", 1)[0]
        if owner in kept:
            continue
        if len(kept) < versions:
            kept.add(owner)
        else:
            snap.unlink(missing_ok=True)


def latest_snapshot(folder: Path, prefix: str = "") -> Path | None:
    """The newest ``index-<prefix>*.faiss`` in ``folder``."""
    found = snapshots(folder, prefix)
    return found[0] if found else None
