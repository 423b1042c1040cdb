"""What the scorer serves from: one (scorer, index) pair, kept current and swapped whole.

Start-up takes the active scorer version (``CosineScorer`` until one is promoted), loads the
newest index snapshot of that version (rebuilding from the catalogue when it is missing or
corrupt) and applies catalogue embeddings newer than the snapshot. A background thread then
every ``poll_s`` seconds: applies new embeddings, so a fresh item is servable as soon as the
worker writes its first estimate; swaps to a newly activated aligner or promoted scorer
version, whose index is built off the request path first, so no request ever sees a model
with the wrong index; compacts the index's delta tier; and writes a snapshot now and then.
Searches and index updates share one lock, because a FAISS index must not be searched while
it is modified.

The rows read are the served scorer's content of the active aligner
(``core.catalogue.content_version``: SAID vectors, or the text features stored beside
them), so a swap to a scorer of another content builds its index from those rows.

"New" means a greater ``item_embeddings.seq``: handed out in commit order by the database,
so a row is applied whatever the writer's clock said, and the watermark (kept in the
snapshot name) survives restarts. Each embedding is read with its item's external id in one
statement, so an indexed item can always be named.

A vector is served only while it is of its item's current text (issue 23, item 9). The
state keeps, per served item, the text hash of its vector; each refresh reads the items
whose text changed after its item watermark (``items.change_seq``, from a counter also
handed out in commit order) and takes out every one whose served vector is of another
text, and a new embedding is applied only if it is of its item's text as of the same read.
A loaded snapshot is reconciled against the catalogue's current text hashes first, so a
replica restarted from a snapshot older than a change never serves the old vector.

An item its owner paused or withdrew (``items.serving_state``; issue 25) is never in the
index: a change of serving state takes a new ``change_seq`` like a text change, so the next
refresh moves the item's vector from the index to ``Served.held``, where a history that
holds the item still finds it; reactivation moves it back, with no realignment. Every read
of embeddings carries the serving state of the same instant, and a reconciled snapshot
drops what is not active, so neither a stale snapshot nor a restart serves a withdrawn item.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, zip_longest
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.engine import Engine

from core import metrics
from core.catalogue import (
    EmbeddingRows,
    TextChanges,
    content_version,
    embeddings_of,
    embeddings_since,
    item_change_watermark,
    item_ids_after,
    popular_items,
    text_changes_since,
)
from core.db import read_only
from core.files import CorruptFile, FailedLoad
from core.settings import IndexSettings, Settings
from core.versions import active_version, versions_in
from models.bundle import AlignerBundle
from scorer.index import CorruptSnapshot, ItemIndex, snapshots
from scorer.scorers import CosineScorer, SASRecScorer, load_scorer

log = logging.getLogger(__name__)
Scorer = CosineScorer | SASRecScorer
COMPACTION_RETRY_S = 300  # after a failed compaction (minutes of CPU each at 1M items)


@dataclass
class Served:
    """A scorer and the index of its item vectors; replaced as one object on a swap."""

    scorer: Scorer
    index: ItemIndex
    watermark: int  # every embedding with seq <= this is in the index
    hashes: dict[int, str]  # item idx -> the text hash of its served vector (every indexed item)
    item_watermark: int  # every text change with change_seq <= this is applied
    newest: deque[int]  # the largest indexed item indexes, newest last: a fallback's fresh items
    # idx -> index vector of an item out of serving (paused, withdrawn): never searched,
    # still a history item; its vector is of its current text
    held: dict[int, np.ndarray] = field(default_factory=dict)
    # digest of a history's stacked vectors -> its query, least recently used first
    queries: OrderedDict[bytes, np.ndarray] = field(default_factory=OrderedDict)

    def snapshot_name(self) -> str:
        return f"{self.scorer.version}-q{self.watermark}"


@dataclass
class Compaction:
    """An index compaction building on its own thread: ``fresh`` or ``error`` once it ends."""

    served: Served  # whose index it compacts: dropped if another is served by then
    source: ItemIndex  # the index it copied, which recorded what changed since
    thread: threading.Thread
    fresh: ItemIndex | None = None
    error: BaseException | None = None


def snapshot_watermark(snapshot: Path) -> int:
    """The watermark in a snapshot's name; ValueError for a name of another format."""
    tail = snapshot.stem.rsplit("-", 1)[1]
    if not tail.startswith("q"):
        raise ValueError(f"{snapshot.name}: no sequence watermark in the name")
    return int(tail[1:])


class ServingState:
    def __init__(
        self,
        engine: Engine,
        aligner_version: str,
        said_dim: int,
        index_dir: Path,
        cfg: IndexSettings,
        positives: tuple[str, ...],
    ) -> None:
        """``positives``: the interaction types a user's history is made of (as in training)."""
        # One query at a time gains nothing from OpenMP threads, and their spin-waiting under
        # concurrent requests costs tens of milliseconds (measured: p50 45 ms -> see docs/results.md).
        faiss.omp_set_num_threads(1)
        self.engine, self.aligner_version, self.said_dim = engine, aligner_version, said_dim
        self.reads = read_only(engine)  # a replica only reads the catalogue
        self.index_dir, self.cfg, self.positives = index_dir, cfg, positives
        self._popular: list[int] = []
        self._popular_at = -float("inf")
        self.lock = threading.RLock()
        self.item_id: dict[int, str] = {}
        self.idx_of: dict[str, int] = {}
        self._named_through = 0  # every item up to this idx is named (item_ids_after)
        self.refreshed_at: datetime | None = None
        self._declined: str | None = None  # an active scorer of another aligner: not served
        self.problems: dict[str, str] = {}  # kind -> why its active version is not served
        self._failed_aligner = FailedLoad()  # see ``_follow_aligner``
        self._compaction: Compaction | None = None
        self._compact_after = 0.0  # monotonic time before which no compaction starts (after a failure)
        first = self._scorer_for(active_version(engine, "scorer")) or self._last_good_scorer()
        self.served = self._load(first or CosineScorer(aligner_version, said_dim))
        self._snapshot_at = time.monotonic()
        self.refresh()

    @classmethod
    def for_bundle(cls, engine: Engine, bundle: AlignerBundle, settings: Settings) -> ServingState:
        """The state serving ``bundle``'s vectors, its index under ``<data_dir>/index``."""
        return cls(
            engine,
            bundle.version,
            bundle.aligner.cfg.vector_dim,
            settings.data_dir / "index",
            settings.index,
            settings.positives,
        )

    @property
    def version(self) -> str:
        return self.served.scorer.version

    # --- versions ----------------------------------------------------------------------
    def _scorer_for(self, active: tuple[str, Path] | None) -> Scorer | None:
        """The scorer to serve for the active version (cosine when none was ever promoted);
        None when the active version's file cannot be read: the caller keeps what it
        serves (cosine at start-up), says so (``problems``, metric, log), and this version
        is not tried again (a version's file never changes)."""
        if active is not None:
            try:
                scorer, meta = load_scorer(active[1], active[0])
            except (CorruptFile, OSError, ValueError) as exc:
                self._declined = active[0]
                self._problem("scorer", f"active scorer {active[0]} cannot be loaded ({exc})")
                return None
            self._problem("scorer", None)
            if meta.get("aligner_version") == self.aligner_version:
                return scorer
            self._declined = active[0]  # not loaded again on every refresh
            log.warning(
                "scorer %s was trained on aligner %s, not %s: serving cosine similarity",
                active[0],
                meta.get("aligner_version"),
                self.aligner_version,
            )
        return CosineScorer(self.aligner_version, self.said_dim)

    def _load(self, scorer: Scorer) -> Served:
        """The newest good snapshot of this scorer's index (a torn or corrupt newer one is
        skipped, and the embeddings after the older one's watermark are applied by the next
        refresh), or a build from the catalogue when there is none."""
        for snap in snapshots(self.index_dir, f"{scorer.version}-"):
            try:
                index = ItemIndex.load(snap, self.cfg)
                if index.dim != scorer.dim:
                    raise ValueError(f"{snap.name}: {index.dim}-d vectors, the scorer's are {scorer.dim}-d")
                index = index.relaid(scorer.silent)
                watermark = snapshot_watermark(snap)
            except (CorruptSnapshot, ValueError) as exc:
                log.warning("skipping snapshot: %s", exc)
                continue
            newest = self._newest(np.sort(index.ids()))
            return self._reconciled(Served(scorer, index, watermark, {}, 0, newest))
        return self._build(scorer)

    def _reconciled(self, served: Served) -> Served:
        """A loaded snapshot made to agree with the catalogue's current texts (it may be
        older than any number of changes). An indexed item keeps its vector only if its
        catalogue vector is of its current text and not newer than the snapshot (seq <=
        the watermark: then the snapshot holds that vector, as a snapshot keeps removals);
        a newer one is read by the next refresh, which follows at once. An item whose
        current vector the snapshot lacks (its text changed back) gets it."""
        with self.reads.connect() as conn:
            state = text_changes_since(conn, self._rows(served.scorer), -1)  # every item, one read
        indexed = set(served.index.ids().tolist())
        for idx, text, vec_text, vec_seq, live in zip(
            state.ids, state.text_hashes, state.vector_hashes, state.vector_seqs, state.live, strict=True
        ):
            if live and idx in indexed and vec_text == text and vec_seq <= served.watermark:
                served.hashes[idx] = text
        gone = np.array(sorted(indexed - served.hashes.keys()), dtype=np.int64)
        served.index.remove(gone)
        self._apply_changes(served, state)  # re-adds what the snapshot lacks, holds; item watermark
        if len(gone):
            log.info(
                "snapshot reconciled with the catalogue: %d items of an old text or out of serving removed",
                len(gone),
            )
        return served

    def _build(self, scorer: Scorer) -> Served:
        with self.reads.connect() as conn:
            changed_through = item_change_watermark(conn)  # first: a later change is re-read
            every = embeddings_since(conn, self._rows(scorer)).fresh()
        self._name(every)
        found = every.where(every.live)
        index = ItemIndex(scorer.dim, self.cfg, scorer.silent)
        if len(found.ids):
            index.build(found.ids, scorer.item_vectors(found.ids, found.vectors))
        hashes = dict(zip(found.ids.tolist(), found.text_hashes, strict=True))
        served = Served(scorer, index, found.newest, hashes, changed_through, self._newest(found.ids))
        served.held.update(self._mapped(scorer, every.where(~every.live)))
        return served

    def _rows(self, scorer: Scorer) -> str:
        """The embedding version ``scorer`` maps: the served aligner's rows of its content
        (SAID vectors, or the text features stored beside them)."""
        return content_version(self.aligner_version, scorer.content)

    @staticmethod
    def _mapped(scorer: Scorer, rows: EmbeddingRows) -> dict[int, np.ndarray]:
        """idx -> index vector of these rows."""
        if not len(rows.ids):
            return {}
        return dict(zip(rows.ids.tolist(), scorer.item_vectors(rows.ids, rows.vectors), strict=True))

    def _newest(self, ascending: np.ndarray) -> deque[int]:
        """The fallback's fresh items of ascending indexes: the last ``fallback_fresh``."""
        n = self.cfg.fallback_fresh
        return deque(ascending[-n:].tolist(), n)

    def _name(self, found: EmbeddingRows | dict[int, str]) -> None:
        """Learn external ids (of embedding rows, or idx -> id); only ever added to."""
        named = (
            dict(zip(found.ids.tolist(), found.item_ids, strict=True))
            if isinstance(found, EmbeddingRows)
            else found
        )
        with self.lock:
            self.item_id.update(named)
            self.idx_of.update({v: k for k, v in named.items()})

    def _last_good_scorer(self) -> Scorer | None:
        """At start-up with an unreadable active scorer: the newest one served before that
        was trained on this aligner and still loads (None: cosine until one is promoted)."""
        for version, path in versions_in(self.reads, "scorer", "retired"):
            try:
                scorer, meta = load_scorer(path, version)
            except (CorruptFile, OSError, ValueError):
                continue
            if meta.get("aligner_version") == self.aligner_version:
                log.warning("serving scorer %s, the last good one, until a readable one is active", version)
                return scorer
        return None

    def _problem(self, kind: str, why: str | None) -> None:
        """Record (or clear, with None) why the active ``kind`` version is not served."""
        if why is None:
            self.problems.pop(kind, None)
        elif self.problems.get(kind) != why:
            self.problems[kind] = why
            log.error(
                "%s; still serving %s and applying new items",
                why,
                getattr(self, "served", None) and self.version,
            )
        metrics.SERVING_PROBLEMS.labels(kind).set(int(kind in self.problems))

    def _follow_aligner(self) -> None:
        """Serve the active aligner's vectors: on a change, build its index (cosine until a
        scorer of that aligner is promoted) off the request path, then swap. A bundle that
        cannot be read leaves the current aligner served and is reported (``problems``).

        It is not read again until its file changes (``core.files.FailedLoad``): a refresh
        runs a few times a second, per replica. The failure is remembered with its reason,
        so the report stays until the file (or the active version) changes."""
        active = active_version(self.reads, "aligner")
        if active is None or active[0] == self.aligner_version:
            self._problem("aligner", None)
            return
        error = self._failed_aligner.known(*active)
        if error is None:
            import torch

            try:
                bundle = AlignerBundle.load(active[1], torch.device("cpu"))
            except (CorruptFile, OSError, ValueError) as exc:
                self._failed_aligner.failed(*active, exc)
                error = exc
        if error is not None:  # still reported; logged once
            self._problem("aligner", f"active aligner {active[0]} cannot be loaded ({error})")
            return
        self._problem("aligner", None)
        before = self.aligner_version, self.said_dim, self._declined
        self.aligner_version, self.said_dim = bundle.version, bundle.aligner.cfg.vector_dim
        self._declined = None
        try:
            scorer = self._scorer_for(active_version(self.reads, "scorer"))
            served = self._load(scorer or CosineScorer(self.aligner_version, self.said_dim))
        except Exception:  # keep serving the old version whole; the next refresh tries again
            self.aligner_version, self.said_dim, self._declined = before
            raise
        self._swap(served)
        log.info(
            "aligner %s is active: now serving %s (%d items)", bundle.version, self.version, len(served.index)
        )

    def rebuild(self) -> Path:
        """``said index rebuild``: a new index from the catalogue, swapped in and saved."""
        served = self._build(self.served.scorer)
        self._swap(served)
        return served.index.save(self.index_dir, served.snapshot_name())

    def _swap(self, served: Served) -> None:
        """Serve ``served`` from the next request on, then freeze the new heap."""
        with self.lock:
            self.served = served
        refreeze_heap()

    # --- refresh -----------------------------------------------------------------------
    def refresh(self) -> int:
        """Follow the active aligner and scorer versions, then apply new embeddings. A
        version that cannot be followed never stops fresh items from being applied."""
        try:
            self._follow_versions()
        except Exception:  # the next refresh tries again; meanwhile keep serving and applying
            log.exception("following the active versions failed; still serving %s", self.version)
        if time.monotonic() - self._popular_at > self.cfg.popular_refresh_s:
            with self.reads.connect() as conn:
                self._popular = popular_items(conn, self.positives, self.cfg.fallback_popular)
            self._popular_at = time.monotonic()
        return self._apply_new()

    def _follow_versions(self) -> None:
        self._follow_aligner()
        wanted = active_version(self.reads, "scorer")
        if wanted is not None and wanted[0] not in (self.version, self._declined):
            scorer = self._scorer_for(wanted)
            if scorer is not None and scorer.version != self.version:
                served = self._load(scorer)  # slow part first, off the lock
                self._swap(served)
                log.info("now serving scorer %s (%d items)", scorer.version, len(served.index))

    def _apply_new(self) -> int:
        """Text changes, then new catalogue embeddings, into the served index (and names of
        new items); returns how many embeddings were applied."""
        served = self.served
        with self.reads.connect() as conn:
            new_ids = item_ids_after(conn, self._named_through)  # history ids, vector or not
            changes = text_changes_since(conn, self._rows(served.scorer), served.item_watermark)
        self._apply_changes(served, changes)  # before the embeddings: they are read later
        with self.reads.connect() as conn:
            found = embeddings_since(conn, self._rows(served.scorer), served.watermark)
        every = found.fresh()
        fresh, held = every.where(every.live), every.where(~every.live)
        mapped = served.scorer.item_vectors(fresh.ids, fresh.vectors) if len(fresh.ids) else None
        held_vectors = self._mapped(served.scorer, held)
        self._name(new_ids)
        self._named_through = max(new_ids, default=self._named_through)
        self._name(every)  # before the upsert: every indexed item has a name
        with self.lock:
            # changed since, or out of serving as of this read (its state change is read next)
            gone = np.concatenate([found.ids[found.stale], held.ids])
            served.index.remove(self._unserve(served, gone))
            for idx in found.ids[found.stale].tolist():
                served.held.pop(idx, None)
            served.held.update(held_vectors)
            if mapped is not None:
                served.index.upsert(fresh.ids, mapped)
                served.hashes.update(zip(fresh.ids.tolist(), fresh.text_hashes, strict=True))
                for idx in fresh.ids.tolist():  # reactivated: indexed now, no longer held
                    served.held.pop(idx, None)
                newer = served.newest[-1] if served.newest else 0  # re-embedded items are not new
                served.newest.extend(i for i in fresh.ids.tolist() if i > newer)
            served.watermark = max(served.watermark, found.newest)
            self.refreshed_at = datetime.now(UTC)
            metrics.INDEX_ITEMS.set(len(served.index))
        self._maintain(served)
        return len(fresh.ids)

    def _apply_changes(self, served: Served, changes: TextChanges) -> None:
        """Items whose text or serving state changed. An active one is out of serving
        unless its served vector is of the new text; a catalogue vector of the current text
        that the embeddings watermark has passed (the text changed back, the item was
        reactivated, or the vector was written between two reads) is (re)applied here; a
        newer one is left to the embeddings read that follows. A paused or withdrawn one
        leaves the index for ``held``, with its vector of the current text."""
        out, back, hold, unhold = [], [], {}, []
        for idx, text, vec_text, vec_seq, live in zip(
            changes.ids,
            changes.text_hashes,
            changes.vector_hashes,
            changes.vector_seqs,
            changes.live,
            strict=True,
        ):
            current = vec_text == text and vec_seq <= served.watermark
            if not live:
                if served.hashes.get(idx) == text:
                    hold[idx] = served.index.vector(idx)  # only this thread writes the index
                    out.append(idx)
                elif current:
                    back.append(idx)  # read below, into held
                else:
                    out.append(idx)
                    served.held.pop(idx, None)
            elif served.hashes.get(idx) == text:
                continue
            elif current:
                back.append(idx)
            else:  # active, of a text with no vector here yet: in neither the index nor held
                unhold.append(idx)
                if idx in served.hashes:
                    out.append(idx)
        found = None
        if back:
            with self.reads.connect() as conn:
                found = embeddings_of(conn, self._rows(served.scorer), back)
            out += found.ids[found.stale].tolist()
            found = found.fresh()
            self._name(found)
            hold.update(self._mapped(served.scorer, found.where(~found.live)))
            found = found.where(found.live)
        mapped = None
        if found is not None and len(found.ids):
            mapped = served.scorer.item_vectors(found.ids, found.vectors)
        with self.lock:
            served.index.remove(self._unserve(served, out))
            for idx in unhold:
                served.held.pop(idx, None)
            served.held.update(hold)
            if mapped is not None:
                served.index.upsert(found.ids, mapped)
                served.hashes.update(zip(found.ids.tolist(), found.text_hashes, strict=True))
                for idx in found.ids.tolist():
                    served.held.pop(idx, None)
            served.item_watermark = max(served.item_watermark, changes.newest)

    @staticmethod
    def _unserve(served: Served, ids) -> np.ndarray:
        """Forget the served text of these items; returns them, to remove from the index."""
        ids = np.asarray(ids, dtype=np.int64)
        for idx in ids.tolist():
            served.hashes.pop(idx, None)
        return ids

    def served_text_hash(self, idx: int) -> str | None:
        """The text hash of the vector this replica serves for the item (None: not served)."""
        return self.served.hashes.get(idx)

    def _maintain(self, served: Served) -> None:
        """Compaction and snapshots; only this thread writes the index, so reads are safe.
        A compaction builds on a thread of its own (minutes at 1M items, longer with a
        larger efConstruction), so fresh items keep being applied meanwhile; what changed
        since its copy is replayed onto it before it is swapped in."""
        job = self._compaction
        if job is not None and not job.thread.is_alive():
            self._compaction = None
            if job.fresh is None:  # the uncompacted index serves on; tried again after a pause
                self._compact_after = time.monotonic() + COMPACTION_RETRY_S
                log.error("index compaction failed; next try in %d s", COMPACTION_RETRY_S, exc_info=job.error)
            elif job.served is served and served.index is job.source:
                fresh = served.index.caught_up(job.fresh)
                with self.lock:
                    served.index = fresh
            else:
                log.info("dropped a compaction of an index no longer served")
        elif job is None and time.monotonic() > self._compact_after and served.index.needs_compaction():
            try:
                self._compaction = self._compact(served)
            except Exception:  # e.g. no memory for the copy: serve on, snapshot below, retry later
                self._compact_after = time.monotonic() + COMPACTION_RETRY_S
                log.exception("could not start an index compaction; next try in %d s", COMPACTION_RETRY_S)
        if time.monotonic() - self._snapshot_at > self.cfg.snapshot_every_s:
            self._snapshot_at = time.monotonic()  # first: a failed write (disk full) waits a period
            served.index.save(self.index_dir, served.snapshot_name())

    @staticmethod
    def _compact(served: Served) -> Compaction:
        """Start building ``served``'s compacted index on a thread of its own, with one
        OpenMP thread (a per-thread setting in libgomp), so a core stays with requests."""
        build = served.index.start_compaction()

        def run() -> None:
            faiss.omp_set_num_threads(1)
            try:
                job.fresh = build()
            except BaseException as exc:  # reported by ``_maintain`` on the refresher's thread
                job.error = exc

        job = Compaction(
            served, served.index, threading.Thread(target=run, name="index-compaction", daemon=True)
        )
        job.thread.start()
        return job

    def run_refresher(self, poll_s: float, stop: threading.Event) -> None:
        while not stop.wait(poll_s):
            try:
                self.refresh()
            except Exception:  # keep serving the last good state; the log says why
                log.exception("index refresh failed; serving the previous state")

    # --- requests ----------------------------------------------------------------------
    def recommend(
        self, history: list[int], k: int, exclude: set[int]
    ) -> tuple[list[tuple[int, float]], str, int, bool]:
        """Top-k (item, score) for a history, with the scorer version and index size used,
        and whether it is the fallback ranking (no item of the history is indexed). The
        encoder runs off the lock, which guards only the index's reads against its writes."""
        served = self.served  # one consistent pair, even if a swap happens meanwhile
        with self.lock:
            vecs = [v for v in map(self._vector(served), history) if v is not None]
            if not vecs:
                return self._fallback(served, k, exclude), served.scorer.version, len(served.index), True
            stacked = np.stack(vecs)  # (T, h)
            key = hashlib.blake2b(stacked.tobytes(), digest_size=16).digest()
            query = served.queries.get(key)
            if query is not None:
                served.queries.move_to_end(key)
        metrics.QUERY_CACHE.labels("miss" if query is None else "hit").inc()
        if query is None:
            query = served.scorer.query(stacked)  # (1, h)
        with self.lock:
            self._remember(served, key, query)
            scores, ids = served.index.search(query, k, exclude)
            size = len(served.index)
        out = [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        return out, served.scorer.version, size, False

    def _remember(self, served: Served, key: bytes, query: np.ndarray) -> None:
        """Keep a history's query, keyed by a digest of the vectors it was computed from:
        the query is a function of those bytes alone (one scorer per ``Served``), so an
        entry can never be stale. A known user's next request between two of its
        interactions skips the encoder; a new interaction, or any vector of the history
        re-estimated, changed or graduated, is another key. At most ``query_cache_size``."""
        if self.cfg.query_cache_size == 0:
            return
        served.queries[key] = query
        if len(served.queries) > self.cfg.query_cache_size:
            served.queries.popitem(last=False)

    def _fallback(self, served: Served, k: int, exclude: set[int]) -> list[tuple[int, float]]:
        """A user with no usable history: popular items and the newest ones in turn (so new
        ads get exposure), served ones only; scores are 1 / (rank + 1), a ranking only."""
        picked: list[int] = []
        taken = set(exclude)
        for idx in chain.from_iterable(zip_longest(self._popular, reversed(served.newest))):
            if idx is not None and idx not in taken and idx in served.hashes:
                picked.append(idx)
                taken.add(idx)
                if len(picked) == k:
                    break
        return [(idx, 1.0 / (rank + 1)) for rank, idx in enumerate(picked)]

    @staticmethod
    def _vector(served: Served):
        """A history item's vector: indexed, or held (out of serving, still history)."""

        def get(idx: int) -> np.ndarray | None:
            found = served.index.lookup(idx)
            return served.held.get(idx) if found is None else found  # held, or none yet (skipped)

        return get


def freeze_heap() -> None:
    """Collect once, then move every live object out of the cyclic collector's sight
    (``gc.freeze``). A loaded serving state is hundreds of thousands of long-lived objects
    (item ids, the model, the index's wrappers), and each full collection scanned them all
    while every request waited: a 121 ms pause at 100k items, which set the p99 of a whole
    run (benchmarks/scorer_latency.py). Frozen objects are still freed by reference
    counting. Only a serving process calls this (``said.wiring.serving_app``): in a process
    that also trains (the demo) or builds many states (tests), frozen cyclic garbage would
    pile up."""
    gc.collect()
    gc.freeze()


def refreeze_heap() -> None:
    """After a swap, where the serving process froze its heap: unfreeze, then collect what
    the swap left behind and freeze the new state in turn (a one-off pause per model or
    index version). A process that never froze (tests, the demo) is left alone."""
    if gc.get_freeze_count() == 0:
        return
    gc.unfreeze()
    freeze_heap()
