"""``said worker run``: the streaming worker that makes fresh items servable.

Two threads share one loaded LLM:
  1. **estimate** (its own thread, every ``worker.poll_s``): lease pending items, then pooled
     LLM text features -> ridge map -> item rows -> frozen projector; the vectors are written
     (kind ``estimate``) at once, with the text features themselves (the ``text``
     content, kind ``text``: final at once), and every scorer replica picks them up from the catalogue
     within its poll period. It never waits behind a refinement, so a new ad is
     recommendable in about a second even while a long refinement runs. It also renews the
     leases and follows the active aligner version. When nothing is pending, it writes the
     text rows that items aligned before they were stored lack (``_backfill_text``);
  2. **refine** (the calling thread): the oldest estimated micro-batch's rows alone are
     trained against the frozen LLM and projector (no old row or projector weight changes)
     until each reaches the catalogue's token accuracy (or ``refine_epochs`` passes),
     written again (kind ``refined``) with their loss; the jobs are completed, and loss,
     drift and freshness metrics are exported.
Every write and completion is fenced by the lease (``updater.leases.held``): a worker that
was paused past its lease, or whose item's text changed, writes nothing. When ``said aligner train``
(or an operator) activates another aligner version, the worker switches bundles and drops its
backlog (the activation re-queued those items, which fences the batch being refined).
The worker reads the catalogue, never Kafka, so long CPU/GPU steps cannot get a consumer
evicted from its group; it owns no index (scorer replicas derive theirs from the catalogue).
A crash leaves the lease to expire; another worker redoes the batch.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core import metrics
from core.catalogue import (
    Decoded,
    lock_item_index,
    lock_sequence,
    missing_text_rows,
    write_embeddings,
    write_text_rows,
)
from core.db import db_now, retry_on_outage, should_wait
from core.events import item_text
from core.files import CorruptFile, FailedLoad
from core.settings import Settings
from core.tables import items
from core.versions import active_version, roll_back_corrupt
from models.aligner import FreshRows, FrozenLM, decoded_text, estimate_rows, item_vector, tokenize_texts
from models.bundle import AlignerBundle
from models.llm import load_adapter_state, lora_rank_of, pooled_text_features
from training.align import fidelity, refine_fresh
from updater.leases import (
    Lease,
    complete_jobs,
    fail_jobs,
    failed_count,
    held,
    lease_jobs,
    pending_count,
    release_jobs,
    release_own,
    renew_jobs,
)

log = logging.getLogger(__name__)
MAX_BACKLOG = 4  # estimated batches (of up to `batch` items) waiting for refinement
TEXT_RECHECK_S = 600.0  # after a walk found no text row missing, or a batch of them failed


HOSTNAME_PLACEHOLDER = "{hostname}"  # in SAID_WORKER_ID: replaced by this host's name


def worker_owner(configured: str | None, hostname: str, pid: int) -> str:
    """The lease owner id of this worker process.

    SAID_WORKER_ID should be unique per worker and stable across its restarts, so that a
    restarted worker releases its old leases at once. Replicas of one compose service all
    get the same environment, so a fixed id would be shared (each start would release its
    peer's live leases); ``{hostname}`` in it is replaced by the host's name ($HOSTNAME,
    which Docker sets to the container's own, distinct per container and kept across its
    restarts; else the system's host name). Without SAID_WORKER_ID:
    host and pid (unique, but a restart gets a new id and waits for the lease TTL)."""
    if configured is None:
        return f"{hostname}-{pid}"
    return configured.replace(HOSTNAME_PLACEHOLDER, hostname)


class Stopping(Exception):
    """Raised between refinement passes once the worker stops; the batch stays leased to
    this worker and is handed back (or redone by another after the lease expires)."""


class Superseded(Exception):
    """Raised between refinement passes once another aligner version is active: the batch's
    leases are fenced (the activation re-queued its items), so refining on is wasted."""


@dataclass
class Estimated:
    """A leased micro-batch whose first estimate is published, waiting for refinement.

    It keeps the bundle and prompt LLM that estimated it: a version switch while it refines
    must not mix one version's projector with another's name (its leases are fenced then)."""

    leases: list[Lease]
    rows: torch.Tensor  # (B, d) estimated rows: where refinement starts
    tokens: list[list[int]]  # text token ids, made by the estimate thread (tokenizers are not thread-safe)
    bundle: AlignerBundle
    lm: FrozenLM


class UpdateWorker:
    def __init__(self, engine: Engine, bundle: AlignerBundle, lm: FrozenLM, settings: Settings) -> None:
        """``settings.worker`` leases; fresh rows refine as ``settings.align`` says (its
        ``refine`` part, and the catalogue's row optimiser)."""
        self.engine, self.bundle, self.lm, self.device = engine, bundle, lm, lm.device
        self.cfg, self.align, self.retry_max_s = settings.worker, settings.align, settings.db_retry_max_s
        self.owner = worker_owner(
            self.cfg.id, os.environ.get("HOSTNAME") or socket.gethostname(), os.getpid()
        )
        self._use(bundle)
        self._version_checked = time.monotonic()
        self._failed_aligner = FailedLoad()  # see _load_active
        self._renewed_at = time.monotonic()  # last lease renewal
        self.stopping = False  # asked to stop (``stop()``, signal-handler safe)
        self._halt = threading.Event()  # the estimate thread ends when set
        self._failure: BaseException | None = None  # what ended the estimate thread
        self._found_nothing_since: float | None = None  # the estimate thread's last looks found none
        self._text_cursor = ("", 0)  # (aligner version, last item index) of the text rows' walk
        self._text_due = 0.0  # monotonic time of the next look for missing text rows
        self._text_written = 0  # text rows written by the walk under way
        self._refined_at = time.monotonic()  # last refinement's end (for ``idle_exit``)
        self._lm_lock = threading.Lock()  # with LoRA: estimating switches the adapters off
        self._tok_lock = threading.Lock()  # a fast tokenizer raises if two threads use it at once
        self.done = 0
        self.fresh_losses: list[float] = []  # recent refined losses (the drift numerator)
        self.fresh_accuracy: list[float] = []  # recent refined token accuracies
        self.fresh_exact = [0, 0]  # refined items rebuilt exactly by greedy decoding, of all
        # estimated, leased, not yet refined, oldest first; and the one refining now
        self._ready = threading.Condition()  # guards both; notified when a batch is added
        self.backlog: list[Estimated] = []
        self.refining: Estimated | None = None
        self._estimated_only: set[int] = set()  # estimated past a full backlog, handed back
        self._looking = False  # the estimate thread is between a lease and its queueing

    def _use(self, bundle: AlignerBundle) -> None:
        self.bundle = bundle
        self.lm = self.lm.with_prompt(bundle.prompt)
        metrics.REFERENCE_TOKEN_ACCURACY.set(bundle.reference["mean_token_accuracy"])

    def stop(self) -> None:
        self.stopping = True

    def follow_active(self) -> bool:
        """Switch to the active aligner version if it changed; True when it did.

        The activation re-queued every item without a vector in the new version, which
        also fenced the leases in our backlog, so the backlog is dropped, not finished.
        A version whose LoRA rank differs from the loaded LLM's needs a restart: raises."""
        self._version_checked = time.monotonic()
        active = active_version(self.engine, "aligner")
        if active is None or active[0] == self.bundle.version:
            metrics.SERVING_PROBLEMS.labels("aligner").set(0)
            return False
        bundle, corrupt = self._load_active(active)
        if bundle is None:
            if corrupt and roll_back_corrupt(
                self.engine, "aligner", active[0], self.bundle.version
            ):  # broken for everyone: the version we run on is active again, writes flow
                log.error("aligner %s marked corrupt, %s is active again", active[0], self.bundle.version)
                metrics.ROLLBACKS.labels("aligner").inc()
                metrics.SERVING_PROBLEMS.labels("aligner").set(0)
                return False
            metrics.SERVING_PROBLEMS.labels("aligner").set(1)
            return False
        metrics.SERVING_PROBLEMS.labels("aligner").set(0)
        if bundle.lora_rank != lora_rank_of(self.lm.model):
            raise RuntimeError(
                f"aligner {bundle.version} needs LoRA rank {bundle.lora_rank}, the loaded LLM has "
                f"{lora_rank_of(self.lm.model)}: restart the worker to load it"
            )
        if bundle.adapters:
            with self._lm_lock:
                load_adapter_state(self.lm.model, bundle.adapters)
        log.info(
            "aligner %s is active (was %s): switching, backlog dropped", bundle.version, self.bundle.version
        )
        with self._ready:
            self.backlog.clear()
        with self._tok_lock:  # the new prompt is tokenized
            self._use(bundle)
        return True

    def _load_active(self, active: tuple[str, Path]) -> tuple[AlignerBundle | None, bool]:
        """The active version's bundle, or (None, whether it failed its checksum).

        A bundle that cannot be loaded is not read again until its file changes
        (``core.files.FailedLoad``): each version check would otherwise re-read and
        checksum a large file for as long as it stays active. The failure is logged once; the caller
        still reports it (metric) and rolls a corrupt one back (a compare-and-set: once)."""
        error = self._failed_aligner.known(*active)
        if error is None:
            try:
                return AlignerBundle.load(active[1], self.device), False
            except (CorruptFile, OSError, ValueError) as exc:
                log.error(
                    "aligner %s cannot be loaded (%s): staying on %s", active[0], exc, self.bundle.version
                )
                self._failed_aligner.failed(*active, exc)
                error = exc
        return None, isinstance(error, CorruptFile)

    def run(self, idle_exit: float | None = None) -> int:
        """Estimate (in a thread) and refine (here) until stopped or idle; returns items
        completed.

        A database outage pauses either loop with backoff (a batch whose write failed is
        re-leased by this worker afterwards); any other error fails that batch's jobs with
        the reason. An error the estimate thread cannot handle ends the run, raised here."""
        retry_on_outage(
            self._release_previous, max_backoff_s=self.retry_max_s, should_stop=lambda: self.stopping
        )
        self._halt.clear()
        self._failure, self._found_nothing_since, self._refined_at = None, None, time.monotonic()
        log.info("worker %s: aligner %s, batches of %d", self.owner, self.bundle.version, self.cfg.batch)
        estimator = threading.Thread(target=self._estimate_loop, name="said-estimate", daemon=True)
        estimator.start()
        try:
            while not self.stopping and not self._halt.is_set():
                batch = self._next_batch()
                if batch is not None:
                    self._refine_batch(batch)
                elif idle_exit is not None and self._idle_for() > idle_exit:
                    break
        except Stopping:
            pass
        finally:
            self._halt.set()
            estimator.join()
            self._give_back()
        if self._failure is not None:
            raise self._failure
        return self.done

    def _release_previous(self) -> None:
        with self.engine.begin() as conn:
            if n := release_own(conn, self.owner):
                log.warning("released %d leases a previous %s process held", n, self.owner)

    def _idle_for(self) -> float:
        """Seconds with nothing leased and nothing refined (0 while the estimate thread
        still finds work)."""
        nothing = self._found_nothing_since
        if nothing is None or self._looking:
            return 0.0
        return time.monotonic() - max(nothing, self._refined_at)

    def _next_batch(self) -> Estimated | None:
        """The oldest estimated batch, now ``refining``; None after a short wait for one."""
        with self._ready:
            if not self.backlog:
                self._ready.wait(0.2)
            if not self.backlog:
                return None
            self.refining = self.backlog.pop(0)
            return self.refining

    def _refine_batch(self, batch: Estimated) -> None:
        """Refine, publish and complete one batch. After an outage it is dropped: its leases
        are still ours, so the estimate thread leases and redoes it once the database is
        back. Any other error fails its jobs, with the reason."""
        try:
            self._refine(batch)
            with self.engine.begin() as conn:
                done = complete_jobs(conn, self.owner, batch.leases)
            self.done += done
            if done < len(batch.leases):  # lost leases: maybe another aligner version is active now
                self._version_checked = 0.0
        except Stopping:
            raise  # still `refining`, so `_give_back` hands its leases back
        except Superseded:
            log.info("aligner switched: refinement of items %s dropped", [x.item_idx for x in batch.leases])
        except Exception as exc:
            try:
                self._fail(batch.leases, exc, "refinement")  # raises an outage again
            except Exception as down:
                if not should_wait(down):
                    raise
                if self.stopping:
                    raise Stopping from down  # the leases are released on the way out, or expire
                log.warning("database unavailable (%s): batch dropped, redone when it is back", down)
        with self._ready:
            self.refining = None
        self._refined_at = time.monotonic()

    def _held_leases(self) -> list[Lease]:
        """Every lease this worker holds: the estimated batches and the one refining."""
        with self._ready:
            batches = self.backlog + ([self.refining] if self.refining else [])
        return [x for batch in batches for x in batch.leases]

    def _give_back(self) -> None:
        """On a stop, hand the backlog's leases back (no failure counted) for others to take."""
        leases = self._held_leases()
        with self._ready:
            self.backlog.clear()
        if leases:
            try:
                with self.engine.begin() as conn:
                    release_jobs(conn, self.owner, leases)
            except Exception as exc:  # the leases expire on their own; say why they were kept
                log.warning("could not release %d leases on stop (%s); they expire", len(leases), exc)

    def _estimate_loop(self) -> None:
        """The estimate thread: every ``poll_s``, follow the active version, renew leases,
        and estimate what is new. It ends when the run does, or raises to it."""
        try:
            while not self._halt.is_set() and not self.stopping:
                retry_on_outage(
                    self._estimate_step,
                    max_backoff_s=self.retry_max_s,
                    should_stop=lambda: self.stopping or self._halt.is_set(),
                    # an outage is not idleness: what is pending waits for the database
                    on_retry=lambda _exc: setattr(self, "_found_nothing_since", None),
                )
                self._halt.wait(self.cfg.poll_s)
        except Exception as exc:
            if not ((self.stopping or self._halt.is_set()) and should_wait(exc)):
                log.exception("the estimate thread failed: the worker stops")
                self._failure = exc
        finally:
            self._halt.set()
            with self._ready:
                self._ready.notify_all()

    def _estimate_step(self) -> None:
        if time.monotonic() - self._version_checked > self.cfg.version_check_s:
            self.follow_active()
        if time.monotonic() - self._renewed_at >= self.cfg.lease_ttl_s / 3:
            mine = self._held_leases()
            with self.engine.begin() as conn:
                renew_jobs(conn, self.owner, mine, self.cfg.lease_ttl_s)
            self._renewed_at = time.monotonic()
        with self._ready:
            room = len(self.backlog) < MAX_BACKLOG
        if not self._estimate_new(keep=room) and time.monotonic() >= self._text_due:
            self._backfill_text()

    def _backfill_text(self) -> None:
        """When nothing is pending: write the text content of a batch of items that have a
        vector of the active aligner but no text row of their current text, those aligned
        before text rows were stored (an upgrade), so a switch to
        ``SAID_COMPOSITE_CONTENT=text`` needs no realignment. It walks the catalogue by
        index from a cursor; once a walk finds none missing it looks again only every
        ``TEXT_RECHECK_S`` (every writer stores both now; an old worker in a rolling
        upgrade may not), and a batch that fails waits as long, logged, never stopping the
        worker.

        A text row is a function of its text alone: no lease (two workers may write the
        same rows, identically). An item whose text changed since it was read is skipped at
        the write (the item-index lock holds texts still); its new text's estimate writes
        both."""
        bundle, lm = self.bundle, self.lm
        version, after = self._text_cursor if self._text_cursor[0] == bundle.version else (bundle.version, 0)
        with self.engine.connect() as conn:
            todo = missing_text_rows(conn, version, self.cfg.batch, after)
        if not todo:
            self._text_cursor = (version, 0)
            if after == 0:  # a whole walk found none missing
                self._text_due = time.monotonic() + TEXT_RECHECK_S
                if self._text_written:
                    log.info(
                        "stored the text content of %d items aligned before it was stored", self._text_written
                    )
                    self._text_written = 0
            return
        self._found_nothing_since = None  # not idle: there is work
        self._text_cursor = (version, todo[-1].idx)
        try:
            self._write_text(bundle, lm, todo)
        except Exception as exc:
            if should_wait(exc):
                raise
            log.exception(
                "storing the text content of items %s failed; again in %d s",
                [r.idx for r in todo],
                TEXT_RECHECK_S,
            )
            self._text_due = time.monotonic() + TEXT_RECHECK_S

    def _write_text(self, bundle: AlignerBundle, lm: FrozenLM, todo: list) -> None:
        texts = [item_text(r.title, r.description) for r in todo]
        with self._exclusive(bundle), self._tok_lock:
            feats = pooled_text_features(lm.model, lm.tok, texts, self.device).float().numpy()
        with self.engine.begin() as conn:
            lock_item_index(conn)  # first, as in every writer's lock order
            now_of = select(items.c.idx, items.c.text_hash).where(items.c.idx.in_([r.idx for r in todo]))
            current = dict(conn.execute(now_of).all())
            keep = [n for n, r in enumerate(todo) if current.get(r.idx) == r.text_hash]
            write_text_rows(
                conn,
                bundle.version,
                [todo[n].idx for n in keep],
                [todo[n].text_hash for n in keep],
                feats[keep],
                db_now(conn),
            )
        self._text_written += len(keep)

    def _exclusive(self, bundle: AlignerBundle):
        """The LLM to this thread alone while LoRA adapters are loaded: estimating turns
        them off for the base model's view of a text, which would change a refinement's
        forward pass midway. Without adapters (the default) both threads run at once."""
        return self._lm_lock if bundle.adapters else nullcontext()

    def _between_passes(self, bundle: AlignerBundle) -> None:
        """Between refinement passes: stop if asked; with adapters, let a waiting estimate
        in (so under LoRA a first estimate waits at most one pass)."""
        if self.stopping or self._halt.is_set():
            raise Stopping
        if bundle is not self.bundle:
            raise Superseded
        if bundle.adapters:
            self._lm_lock.release()
            time.sleep(0.001)  # a blocked estimate thread takes the lock now
            self._lm_lock.acquire()

    def _estimate_new(self, keep: bool = True) -> int:
        """Lease pending items (not those we hold) and publish their first estimate.

        With ``keep`` they wait in the backlog for refinement. Without (the backlog is full)
        they are handed back once estimated, so a first estimate never waits for room in
        the backlog and another worker may refine them; this worker skips them until it has
        room again (then it leases them like any pending item)."""
        self._looking = True
        try:
            return self._lease_and_estimate(keep)
        finally:
            self._looking = False

    def _lease_and_estimate(self, keep: bool) -> int:
        if keep:
            self._estimated_only.clear()
        mine = [x.item_idx for x in self._held_leases()] + sorted(self._estimated_only)
        with self.engine.begin() as conn:
            leases = lease_jobs(
                conn, self.owner, self.cfg.batch, self.cfg.lease_ttl_s, mine, self.bundle.version
            )
            metrics.PENDING_ITEMS.set(pending_count(conn))
            metrics.FAILED_ITEMS.set(failed_count(conn))
        if not leases:
            self._found_nothing_since = self._found_nothing_since or time.monotonic()
            return 0
        self._found_nothing_since = None
        try:
            batch = self._estimate(leases)
        except Exception as exc:
            self._fail(leases, exc, "estimate")
            return len(leases)
        if keep:
            self._queue(batch)
        else:
            with self.engine.begin() as conn:
                release_jobs(conn, self.owner, leases)
            self._estimated_only.update(x.item_idx for x in leases)
        return len(leases)

    def _queue(self, batch: Estimated) -> None:
        """Add an estimated batch for refinement. Items that arrive one by one join the
        newest waiting batch up to a full batch: one refinement of 16 costs little more
        than one of 1, and the backlog's cap then counts items, so a steady trickle of new
        ads is not refined as singletons, one after another."""
        with self._ready:
            last = self.backlog[-1] if self.backlog else None
            if (
                last
                and last.bundle is batch.bundle
                and len(last.leases) + len(batch.leases) <= self.cfg.batch
            ):
                last.leases, last.tokens = last.leases + batch.leases, last.tokens + batch.tokens
                last.rows = torch.cat([last.rows, batch.rows])
            else:
                self.backlog.append(batch)
            self._ready.notify_all()

    def _fail(self, leases: list[Lease], exc: Exception, stage: str) -> None:
        """An outage propagates (the caller backs off or drops the batch); anything else
        fails these jobs, with why."""
        if should_wait(exc):
            raise exc
        log.exception("%s of items %s failed", stage, [x.item_idx for x in leases])
        with self.engine.begin() as conn:
            fail_jobs(conn, self.owner, leases, f"{type(exc).__name__}: {exc}")

    def _publish(
        self,
        version: str,
        leases: list[Lease],
        vectors: np.ndarray,
        kind: str,
        losses: list[float | None],
        decoded: list[Decoded] | None = None,
        text: np.ndarray | None = None,
    ) -> None:
        """Write the vectors of the leases still held (locked until commit), and with
        ``text`` (B, H) their text content beside them in the same transaction; a lost
        lease's vectors are dropped: another worker owns that item now, or its text changed."""
        with self.engine.begin() as conn:
            lock_sequence(conn)  # first, as every embedding writer does: no lock-order cycle
            keep = {x.item_idx for x in held(conn, self.owner, leases)}
            rows = [n for n, x in enumerate(leases) if x.item_idx in keep]
            now = db_now(conn)
            write_embeddings(
                conn,
                version,
                kind,
                [leases[n].item_idx for n in rows],
                [leases[n].text_hash for n in rows],
                vectors[rows],
                [losses[n] for n in rows],
                now,
                None if decoded is None else [decoded[n] for n in rows],
            )
            if text is not None:
                write_text_rows(
                    conn,
                    version,
                    [leases[n].item_idx for n in rows],
                    [leases[n].text_hash for n in rows],
                    text[rows],
                    now,
                )
        if len(rows) < len(leases):
            lost = sorted({x.item_idx for x in leases} - keep)
            metrics.FENCED_WRITES.inc(len(lost))
            self._version_checked = 0.0  # check for a new active version at the next step
            log.warning("lost the leases of items %s: their %s vectors were not written", lost, kind)

    def _estimate(self, leases: list[Lease]) -> Estimated:
        """Publish the first estimate of these items; the batch that refines them next."""
        bundle, lm = self.bundle, self.lm
        texts = [x.text for x in leases]
        with self._exclusive(bundle), self._tok_lock:
            feats = pooled_text_features(lm.model, lm.tok, texts, self.device)
            tokens = tokenize_texts(lm.tok, texts)
        rows = estimate_rows(feats, bundle.ridge).to(self.device)  # (B, d)
        with torch.no_grad():
            vectors = item_vector(bundle.aligner.projector(rows)).float().cpu().numpy()
        text = feats.float().cpu().numpy()
        self._publish(bundle.version, leases, vectors, "estimate", [None] * len(leases), text=text)
        now = datetime.now(UTC)
        for x in leases:
            metrics.FRESH_ITEM_SECONDS.observe((now - x.received_at).total_seconds())
        return Estimated(leases, rows, tokens, bundle, lm)

    def _refine(self, batch: Estimated) -> None:
        leases, tokens, lm, bundle = batch.leases, batch.tokens, batch.lm, batch.bundle
        target = self.align.refine.target_accuracy or bundle.target_accuracy
        fresh = FreshRows(bundle.aligner.projector, batch.rows)
        local = list(range(len(leases)))
        with self._exclusive(bundle):
            refine_fresh(
                fresh, lm, tokens, self.align, target, after_epoch=partial(self._between_passes, bundle)
            )
            fid = fidelity(fresh.soft_tokens, lm, tokens, local)
        with torch.no_grad():
            vectors = item_vector(fresh.soft_tokens(torch.tensor(local, device=self.device)))
        with self._tok_lock:
            texts = [decoded_text(lm.tok, ids) for ids in fid["decoded"]]
        decoded = [Decoded(*x) for x in zip(texts, fid["token_accuracy"], fid["exact"], strict=True)]
        self._publish(bundle.version, leases, vectors.float().cpu().numpy(), "refined", fid["loss"], decoded)
        for loss, acc in zip(fid["loss"], fid["token_accuracy"], strict=True):
            metrics.ALIGNMENT_LOSS.labels("fresh").observe(loss)
            metrics.TOKEN_ACCURACY.labels("fresh").observe(acc)
        self.fresh_losses = (self.fresh_losses + fid["loss"])[-1000:]
        self.fresh_accuracy = (self.fresh_accuracy + fid["token_accuracy"])[-1000:]
        exact = round(fid["exact_match"] * len(leases))
        self.fresh_exact = [self.fresh_exact[0] + exact, self.fresh_exact[1] + len(leases)]
        # like with like: the reference cohort went through this same path to the same bar
        ratio = float(np.mean(self.fresh_losses)) / max(bundle.reference_loss, 1e-9)
        metrics.DRIFT_RATIO.set(ratio)
        metrics.RECONSTRUCTED.labels("fresh", "exact").inc(exact)
        metrics.RECONSTRUCTED.labels("fresh", "inexact").inc(len(leases) - exact)
        log.info(
            "refined %d items: token accuracy %.3f (bar %.3f), exact %.2f, loss %.3f, drift ratio %.2f",
            len(leases),
            fid["mean_token_accuracy"],
            target,
            fid["exact_match"],
            fid["mean_loss"],
            ratio,
        )
