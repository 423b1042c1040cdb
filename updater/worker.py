"""``said update``: the streaming worker that makes fresh items servable.

Per leased micro-batch of pending items (new ones are leased between refinement passes too):
  1. **estimate**: pooled LLM text features -> ridge map -> item rows -> frozen projector;
     the vectors are written (kind ``estimate``) at once; every scorer replica picks them
     up from the catalogue within its poll period, so the item is recommendable in seconds;
  2. **refine**: the rows alone are trained against the frozen LLM and projector (no old row
     or projector weight changes) until each reaches the catalogue's token accuracy (or
     ``refine_epochs`` passes), written again (kind ``refined``) with their loss;
  3. the jobs are completed, and loss, drift and freshness metrics are exported.
Every write and completion is fenced by the lease (``updater.leases.held``): a worker that
was paused past its lease, or whose item's text changed, writes nothing. The worker follows
the active aligner version: when ``said align`` (or an operator) activates another, it
switches bundles and drops its backlog (the activation re-queued those items).
The worker reads the catalogue, never Kafka, so long CPU/GPU steps cannot get a consumer
evicted from its group; it owns no index (scorer replicas derive theirs from the catalogue).
A crash leaves the lease to expire; another worker redoes the batch.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime

import numpy as np
import torch
from sqlalchemy.engine import Engine

from core import metrics
from core.catalogue import lock_sequence, write_embeddings
from core.db import db_now, is_outage, retry_on_outage, should_wait
from core.files import CorruptFile
from core.settings import Settings
from core.versions import active_version, roll_back_corrupt
from models.aligner import FreshRows, FrozenLM, estimate_rows, item_vector, tokenize_texts
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
BETWEEN_PASSES_POLL_S = 0.5  # a new item waits at most this (plus one pass) for its estimate
MAX_BACKLOG = 4  # estimated batches (of up to `batch` items) waiting for refinement


HOSTNAME_PLACEHOLDER = "{hostname}"  # in SAID_WORKER_ID: replaced by this host's name


def worker_owner(configured: str | None, hostname: str, pid: int) -> str:
    """The lease owner id of this worker process.

    SAID_WORKER_ID should be unique per worker and stable across its restarts, so that a
    restarted worker releases its old leases at once. Replicas of one compose service all
    get the same environment, so a fixed id would be shared (each start would release its
    peer's live leases); ``{hostname}`` in it is replaced by the host's name, which Docker
    makes distinct per container and keeps across its restarts. Without SAID_WORKER_ID:
    host and pid (unique, but a restart gets a new id and waits for the lease TTL)."""
    if configured is None:
        return f"{hostname}-{pid}"
    return configured.replace(HOSTNAME_PLACEHOLDER, hostname)


class Stopping(Exception):
    """Raised between refinement passes once ``stop()`` was called; the batch stays leased
    to this worker and is redone on its next start (or by another after the lease expires)."""


class UpdateWorker:
    def __init__(self, engine: Engine, bundle: AlignerBundle, lm: FrozenLM, settings: Settings) -> None:
        """``settings.worker`` leases; fresh rows refine as ``settings.align`` says (its
        ``refine`` part, and the catalogue's row optimiser)."""
        self.engine, self.bundle, self.lm, self.device = engine, bundle, lm, lm.device
        self.cfg, self.align, self.retry_max_s = settings.worker, settings.align, settings.db_retry_max_s
        self.owner = worker_owner(self.cfg.id, socket.gethostname(), os.getpid())
        self._use(bundle)
        self._released = False  # the previous process's leases, released on the first step
        self._version_checked = time.monotonic()
        self._looked_at = 0.0  # last lease attempt (monotonic seconds)
        self._renewed_at = time.monotonic()  # last lease renewal
        self.stopping = False
        self.done = 0
        self.fresh_losses: list[float] = []  # recent refined losses (the drift numerator)
        self.fresh_accuracy: list[float] = []  # recent refined token accuracies
        self.fresh_exact = [0, 0]  # refined items rebuilt exactly by greedy decoding, of all
        # estimated, leased, not yet refined: (leases, rows), oldest first
        self.backlog: list[tuple[list[Lease], torch.Tensor]] = []

    def _use(self, bundle: AlignerBundle) -> None:
        self.bundle = bundle
        self.lm = self.lm.with_prompt(bundle.prompt)
        self.target_accuracy = self.align.refine.target_accuracy or bundle.target_accuracy
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
        try:
            bundle = AlignerBundle.load(active[1], self.device)
        except (CorruptFile, OSError, ValueError) as exc:  # tried again at the next check
            log.error("aligner %s cannot be loaded (%s): staying on %s", active[0], exc, self.bundle.version)
            if isinstance(exc, CorruptFile) and roll_back_corrupt(
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
            load_adapter_state(self.lm.model, bundle.adapters)
        log.info(
            "aligner %s is active (was %s): switching, backlog dropped", bundle.version, self.bundle.version
        )
        self.backlog.clear()
        self._use(bundle)
        return True

    def run(self, idle_exit: float | None = None) -> int:
        """Process micro-batches until stopped or idle; returns items completed.

        A database outage pauses the loop with backoff (the half-done batch is re-leased by
        this worker afterwards); any other error fails that batch's jobs with the reason.
        """
        idle_since = time.monotonic()
        while not self.stopping:
            try:
                leased = retry_on_outage(
                    self.step,
                    max_backoff_s=self.retry_max_s,
                    should_stop=lambda: self.stopping,
                    # the backlog is still leased to us: re-leased and redone after the outage
                    on_retry=lambda _exc: self.backlog.clear(),
                )
            except Exception as exc:
                if self.stopping and should_wait(exc):
                    break  # stopped during an outage (or a schema wait): the leases expire or are released
                raise
            if leased:
                idle_since = time.monotonic()
            elif idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                break
            else:
                time.sleep(0.2)
        self._give_back()
        return self.done

    def _backlog_leases(self) -> list[Lease]:
        """Every lease this worker holds: the estimated batches, the one refining first."""
        return [x for batch, _ in self.backlog for x in batch]

    def _give_back(self) -> None:
        """On a stop, hand the backlog's leases back (no failure counted) for others to take."""
        leases = self._backlog_leases()
        self.backlog.clear()
        if leases:
            try:
                with self.engine.begin() as conn:
                    release_jobs(conn, self.owner, leases)
            except Exception as exc:  # the leases expire on their own; say why they were kept
                log.warning("could not release %d leases on stop (%s); they expire", len(leases), exc)

    def step(self) -> int:
        """Estimate what is new, then refine and complete the oldest estimated micro-batch.

        New items get their estimate between refinement passes too (``_estimate_new``), so
        a fresh item never waits behind a long refinement to become servable.
        Returns items estimated or refined.
        """
        if not self._released:
            with self.engine.begin() as conn:
                if n := release_own(conn, self.owner):
                    log.warning("released %d leases a previous %s process held", n, self.owner)
            self._released = True
        if time.monotonic() - self._version_checked > self.cfg.version_check_s:
            self.follow_active()
        estimated = self._estimate_new()
        if not self.backlog:
            return estimated
        leases, rows = self.backlog[0]  # kept there while refining: never re-leased by us
        try:
            self._refine(leases, rows)
        except Stopping:
            return estimated
        except Exception as exc:
            self.backlog.pop(0)
            self._fail(leases, exc, "refinement")
            return estimated + len(leases)
        self.backlog.pop(0)
        with self.engine.begin() as conn:
            done = complete_jobs(conn, self.owner, leases)
        self.done += done
        if done < len(leases):  # lost leases: maybe another aligner version is active now
            self._version_checked = 0.0
        return estimated + len(leases)

    def _between_passes(self) -> None:
        """Between refinement passes: stop if asked, and look for new items at most every
        ``BETWEEN_PASSES_POLL_S`` (a pass can take milliseconds; each look is a write
        transaction, which on SQLite holds the one write lock)."""
        if self.stopping:
            raise Stopping
        if time.monotonic() - self._renewed_at >= self.cfg.lease_ttl_s / 3:
            self._renewed_at = time.monotonic()
            mine = self._backlog_leases()
            with self.engine.begin() as conn:
                renew_jobs(conn, self.owner, mine, self.cfg.lease_ttl_s)
        if len(self.backlog) < MAX_BACKLOG and time.monotonic() - self._looked_at >= BETWEEN_PASSES_POLL_S:
            self._estimate_new()

    def _estimate_new(self) -> int:
        """Lease pending items (not those we hold) and publish their first estimate."""
        self._looked_at = time.monotonic()
        mine = [x.item_idx for x in self._backlog_leases()]
        with self.engine.begin() as conn:
            leases = lease_jobs(
                conn, self.owner, self.cfg.batch, self.cfg.lease_ttl_s, mine, self.bundle.version
            )
            metrics.PENDING_ITEMS.set(pending_count(conn))
            metrics.FAILED_ITEMS.set(failed_count(conn))
        if not leases:
            return 0
        try:
            rows = self._estimate(leases)
        except Exception as exc:
            self._fail(leases, exc, "estimate")
            return len(leases)
        # Items that arrive one by one join the newest waiting batch (not the head, which
        # may be refining) up to a full batch: one refinement of 16 costs little more than
        # one of 1, and the backlog's cap then counts items, so a steady trickle of new ads
        # is never held out of its first estimate behind refinements of singletons.
        if len(self.backlog) > 1 and len(self.backlog[-1][0]) + len(leases) <= self.cfg.batch:
            waiting, waiting_rows = self.backlog[-1]
            self.backlog[-1] = (waiting + leases, torch.cat([waiting_rows, rows]))
        else:
            self.backlog.append((leases, rows))
        return len(leases)

    def _fail(self, leases: list[Lease], exc: Exception, stage: str) -> None:
        """An outage propagates (``run`` backs off); anything else fails these jobs, with why."""
        if is_outage(exc):
            raise exc
        log.exception("%s of items %s failed", stage, [x.item_idx for x in leases])
        with self.engine.begin() as conn:
            fail_jobs(conn, self.owner, leases, f"{type(exc).__name__}: {exc}")

    def _publish(self, leases: list[Lease], vectors: np.ndarray, kind: str, losses) -> None:
        """Write the vectors of the leases still held (locked until commit); a lost lease's
        vector is dropped: another worker owns that item now, or its text changed."""
        with self.engine.begin() as conn:
            lock_sequence(conn)  # first, as every embedding writer does: no lock-order cycle
            keep = {x.item_idx for x in held(conn, self.owner, leases)}
            rows = [n for n, x in enumerate(leases) if x.item_idx in keep]
            write_embeddings(
                conn,
                self.bundle.version,
                kind,
                [leases[n].item_idx for n in rows],
                [leases[n].text_hash for n in rows],
                vectors[rows],
                [losses[n] for n in rows],
                db_now(conn),
            )
        if len(rows) < len(leases):
            lost = sorted({x.item_idx for x in leases} - keep)
            metrics.FENCED_WRITES.inc(len(lost))
            self._version_checked = 0.0  # check for a new active version at the next step
            log.warning("lost the leases of items %s: their %s vectors were not written", lost, kind)

    def _estimate(self, leases: list[Lease]) -> torch.Tensor:
        feats = pooled_text_features(self.lm.model, self.lm.tok, [x.text for x in leases], self.device)
        rows = estimate_rows(feats, self.bundle.ridge).to(self.device)  # (B, d)
        with torch.no_grad():
            vectors = item_vector(self.bundle.aligner.projector(rows)).float().cpu().numpy()
        self._publish(leases, vectors, "estimate", [None] * len(leases))
        now = datetime.now(UTC)
        for x in leases:
            metrics.FRESH_ITEM_SECONDS.observe((now - x.received_at).total_seconds())
        return rows

    def _refine(self, leases: list[Lease], rows: torch.Tensor) -> None:
        tokens = tokenize_texts(self.lm.tok, [x.text for x in leases])
        fresh = FreshRows(self.bundle.aligner.projector, rows)
        refine_fresh(
            fresh, self.lm, tokens, self.align, self.target_accuracy, after_epoch=self._between_passes
        )
        local = list(range(len(leases)))
        fid = fidelity(fresh.soft_tokens, self.lm, tokens, local)
        with torch.no_grad():
            vectors = item_vector(fresh.soft_tokens(torch.tensor(local, device=self.device)))
        self._publish(leases, vectors.float().cpu().numpy(), "refined", fid["loss"])
        for loss, acc in zip(fid["loss"], fid["token_accuracy"], strict=True):
            metrics.ALIGNMENT_LOSS.labels("fresh").observe(loss)
            metrics.TOKEN_ACCURACY.labels("fresh").observe(acc)
        self.fresh_losses = (self.fresh_losses + fid["loss"])[-1000:]
        self.fresh_accuracy = (self.fresh_accuracy + fid["token_accuracy"])[-1000:]
        exact = round(fid["exact_match"] * len(leases))
        self.fresh_exact = [self.fresh_exact[0] + exact, self.fresh_exact[1] + len(leases)]
        # like with like: the reference cohort went through this same path to the same bar
        ratio = float(np.mean(self.fresh_losses)) / max(self.bundle.reference_loss, 1e-9)
        metrics.DRIFT_RATIO.set(ratio)
        metrics.RECONSTRUCTED.labels("fresh", "exact").inc(exact)
        metrics.RECONSTRUCTED.labels("fresh", "inexact").inc(len(leases) - exact)
        log.info(
            "refined %d items: token accuracy %.3f (bar %.3f), exact %.2f, loss %.3f, drift ratio %.2f",
            len(leases),
            fid["mean_token_accuracy"],
            self.target_accuracy,
            fid["exact_match"],
            fid["mean_loss"],
            ratio,
        )
