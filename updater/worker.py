"""``said update``: the streaming worker that makes fresh items servable.

Per leased micro-batch of pending items (new ones are leased between refinement passes too):
  1. **estimate**: pooled LLM text features -> ridge map -> item rows -> frozen projector;
     the vectors are written (kind ``estimate``) at once; every scorer replica picks them
     up from the catalogue within its poll period, so the item is recommendable in seconds;
  2. **refine**: the rows alone are trained against the frozen LLM and projector (no old row
     or projector weight changes) until each reaches the catalogue's token accuracy (or
     ``refine_epochs`` passes), written again (kind ``refined``) with their loss;
  3. the jobs are completed, and loss, drift and freshness metrics are exported.
The worker reads the catalogue, never Kafka, so long CPU/GPU steps cannot get a consumer
evicted from its group; it owns no index (scorer replicas derive theirs from the catalogue).
A crash leaves the lease to expire; another worker redoes the batch.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from sqlalchemy.engine import Engine

from core import metrics
from core.catalogue import write_embeddings
from core.db import is_outage
from core.settings import setting
from models.aligner import FreshRows, Prefix, estimate_rows, item_vector, tokenize_texts
from models.bundle import AlignerBundle
from models.llm import pooled_text_features
from training.align import fidelity, refine_fresh
from updater.leases import Lease, complete_jobs, fail_jobs, lease_jobs, pending_count

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """Worker knobs; each default and its meaning live in ``core.settings``."""

    batch: int = setting("worker_batch")
    lease_ttl_s: float = setting("worker_lease_ttl_s")
    refine_epochs: int = setting("refine_epochs")
    refine_lr: float = setting("refine_lr")
    target_accuracy: float | None = setting("refine_target_accuracy")  # None: the catalogue's
    row_optimizer: str = setting("align_row_optimizer")  # fresh rows train as catalogue rows did
    retry_max_s: float = setting("db_retry_max_s")  # cap of the database-outage backoff


class Stopping(Exception):
    """Raised between refinement passes once ``stop()`` was called; the batch stays leased
    to this worker and is redone on its next start (or by another after the lease expires)."""


class UpdateWorker:
    def __init__(
        self,
        engine: Engine,
        bundle: AlignerBundle,
        llm,
        tok,
        device: torch.device,
        cfg: WorkerConfig | None = None,
    ) -> None:
        self.engine, self.bundle, self.llm, self.tok, self.device = engine, bundle, llm, tok, device
        self.cfg = cfg or WorkerConfig()
        self.owner = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.prefix = Prefix(tok, prompt=bundle.prompt)
        self.target_accuracy = self.cfg.target_accuracy or bundle.target_accuracy
        metrics.REFERENCE_TOKEN_ACCURACY.set(bundle.reference["mean_token_accuracy"])
        self.stopping = False
        self.done = 0
        self.fresh_losses: list[float] = []  # recent refined losses (the drift numerator)
        self.fresh_accuracy: list[float] = []  # recent refined token accuracies
        self.fresh_exact = [0, 0]  # refined items rebuilt exactly by greedy decoding, of all
        # estimated, leased, not yet refined: (leases, rows), oldest first
        self.backlog: list[tuple[list[Lease], torch.Tensor]] = []

    def stop(self) -> None:
        self.stopping = True

    def run(self, idle_exit: float | None = None) -> int:
        """Process micro-batches until stopped or idle; returns items completed.

        A database outage pauses the loop with backoff (the half-done batch is re-leased by
        this worker afterwards); any other error fails that batch's jobs with the reason.
        """
        idle_since, backoff = time.monotonic(), 0.2
        while not self.stopping:
            try:
                leased = self.step()
                backoff = 0.2
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.backlog.clear()  # still leased to us: re-leased and redone after the outage
                log.warning("database unavailable (%s); retrying in %.1fs", type(exc).__name__, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.cfg.retry_max_s)
                continue
            if leased:
                idle_since = time.monotonic()
            elif idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                break
            else:
                time.sleep(0.2)
        return self.done

    def step(self) -> int:
        """Estimate what is new, then refine and complete the oldest estimated micro-batch.

        New items get their estimate between refinement passes too (``_estimate_new``), so
        a fresh item never waits behind a long refinement to become servable.
        Returns items estimated or refined.
        """
        estimated = self._estimate_new()
        if not self.backlog:
            return estimated
        leases, rows = self.backlog.pop(0)
        try:
            self._refine(leases, rows)
        except Stopping:
            return estimated
        except Exception as exc:
            self._fail(leases, exc, "refinement")
            return estimated + len(leases)
        with self.engine.begin() as conn:
            self.done += complete_jobs(conn, self.owner, leases)
        return estimated + len(leases)

    def _between_passes(self) -> None:
        if self.stopping:
            raise Stopping
        self._estimate_new()

    def _estimate_new(self) -> int:
        """Lease pending items (not those we hold) and publish their first estimate."""
        held = [x.item_idx for leases, _ in self.backlog for x in leases]
        with self.engine.begin() as conn:
            leases = lease_jobs(conn, self.owner, self.cfg.batch, self.cfg.lease_ttl_s, held)
            metrics.PENDING_ITEMS.set(pending_count(conn))
        if not leases:
            return 0
        try:
            self.backlog.append((leases, self._estimate(leases)))
        except Exception as exc:
            self._fail(leases, exc, "estimate")
        return len(leases)

    def _fail(self, leases: list[Lease], exc: Exception, stage: str) -> None:
        """An outage propagates (``run`` backs off); anything else fails these jobs, with why."""
        if is_outage(exc):
            raise exc
        log.exception("%s of items %s failed", stage, [x.item_idx for x in leases])
        with self.engine.begin() as conn:
            fail_jobs(conn, self.owner, leases, f"{type(exc).__name__}: {exc}")

    def _publish(self, leases: list[Lease], vectors: np.ndarray, kind: str, losses) -> None:
        with self.engine.begin() as conn:
            write_embeddings(
                conn,
                self.bundle.version,
                kind,
                [x.item_idx for x in leases],
                [x.text_hash for x in leases],
                vectors,
                losses,
                datetime.now(UTC),
            )

    def _estimate(self, leases: list[Lease]) -> torch.Tensor:
        feats = pooled_text_features(self.llm, self.tok, [x.text for x in leases], self.device)
        rows = estimate_rows(feats, self.bundle.ridge).to(self.device)  # (B, d)
        with torch.no_grad():
            vectors = item_vector(self.bundle.aligner.projector(rows)).float().cpu().numpy()
        self._publish(leases, vectors, "estimate", [None] * len(leases))
        now = datetime.now(UTC)
        for x in leases:
            metrics.FRESH_ITEM_SECONDS.observe((now - x.received_at).total_seconds())
        return rows

    def _refine(self, leases: list[Lease], rows: torch.Tensor) -> None:
        tokens = tokenize_texts(self.tok, [x.text for x in leases])
        fresh = FreshRows(self.bundle.aligner.projector, rows)
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        refine_fresh(
            fresh,
            self.llm,
            self.prefix,
            tokens,
            self.device,
            pad,
            self.cfg.refine_epochs,
            lr=self.cfg.refine_lr,
            optimizer=self.cfg.row_optimizer,
            target_accuracy=self.target_accuracy,
            after_epoch=self._between_passes,
        )
        local = list(range(len(leases)))
        fid = fidelity(fresh.soft_tokens, self.llm, self.prefix, tokens, local, self.device, pad, eos)
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
