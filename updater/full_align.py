"""``said aligner train``: full SAID alignment of every catalogue item, as a new aligner version.

Resumable: the training checkpoint is keyed by the set of item texts, so a killed run
continues at the batch where it stopped. It leases nothing (a kill strands no job), so the
worker keeps serving fresh items in the active version meanwhile. At the end, in one
transaction that holds the item-index lock (no text changes meanwhile): every item whose
text is still the one aligned gets its embedding (and its pooled text features, the
``text`` content a composite may read) and its job finished, the version becomes
active, and every other item (new, or changed during the run) is queued for the workers,
which switch to the new version. See ``training.fit_aligner`` for the steps and metrics.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.catalogue import Decoded, lock_item_index, queue_missing, write_embeddings, write_text_rows
from core.db import db_now, retry_on_outage
from core.events import item_text
from core.files import remove_stale_temps
from core.settings import Settings
from core.tables import items
from core.versions import record_version
from models.aligner import FrozenLM
from models.bundle import AlignerBundle
from models.llm import lora_rank_of
from training.fit_aligner import fidelity_summary, fit_aligner
from updater.leases import complete_aligned

log = logging.getLogger(__name__)


def align_catalogue(engine: Engine, lm: FrozenLM, settings: Settings, progress: bool = True) -> AlignerBundle:
    """Align all catalogue items (``settings.align``) and activate the result; files go
    under ``settings.data_dir``. See the module docstring."""
    cfg, data_dir = settings.align, settings.data_dir
    started = time.time()
    with engine.connect() as conn:
        rows = conn.execute(
            select(items.c.idx, items.c.title, items.c.description, items.c.text_hash).order_by(items.c.idx)
        ).all()
    if not rows:
        raise RuntimeError("the catalogue has no items: consume said.items first")
    texts = [item_text(r.title, r.description) for r in rows]
    idx = [r.idx for r in rows]
    key = hashlib.sha256("\n".join(r.text_hash for r in rows).encode()).hexdigest()[:12]
    ckpt = data_dir / "align" / f"checkpoint-{key}-k{cfg.k}.pt"
    fit = fit_aligner(lm, texts, idx, max(idx), cfg, ckpt, progress)
    version = datetime.now(UTC).strftime("said-%Y%m%d%H%M%S%f")  # unique: two runs may share a second
    summary = fidelity_summary(fit.fidelity)
    bundle = AlignerBundle(
        version,
        fit.aligner,
        fit.ridge,
        cfg.prompt,
        fit.history,
        summary,
        fit.reference,
        fit.adapters,
        lora_rank_of(lm.model),
    )
    path = bundle.save(data_dir / "aligner")
    vectors = fit.aligner.item_vectors()[idx].float().cpu().numpy()
    queued = retry_on_outage(
        lambda: _publish(engine, version, path, rows, vectors, fit, summary),
        max_backoff_s=settings.db_retry_max_s,
    )
    ckpt.unlink(missing_ok=True)
    remove_checkpoints(ckpt.parent, older_than=started)
    if queued:
        log.info("%d items are new or changed since the run read them: queued for the workers", queued)
    ref = fit.reference
    log.info(
        "aligner %s active: %d items after %d passes (%.0f s): token accuracy %.3f, exact %.3f "
        "(%d items decoded), loss %.3f; fresh-path reference: token accuracy %.3f, exact %.3f, %.1f s/item",
        version,
        len(idx),
        len(fit.history),
        fit.seconds,
        summary["mean_token_accuracy"],
        summary["exact_match"],
        summary["exact_items"],
        summary["mean_loss"],
        ref["mean_token_accuracy"],
        ref["exact_match"],
        ref["seconds_per_item"],
    )
    return bundle


def remove_checkpoints(folder: Path, older_than: float) -> int:
    """After a run has published: delete the alignment checkpoints in ``folder`` last
    written before ``older_than`` (epoch seconds: this run's start), those of runs that were
    killed over an older catalogue (their key, the set of item texts, will not come back:
    the catalogue only moves on). A run still writing its own is left alone. Returns how
    many went."""
    gone = 0
    for path in folder.glob("checkpoint-*.pt"):
        try:
            if path.stat().st_mtime < older_than:
                path.unlink()
                gone += 1
        except FileNotFoundError:  # its own run finished meanwhile
            continue
    remove_stale_temps(folder)  # and what a writer killed mid-save left
    return gone


def _decoded(fid: dict, n: int) -> Decoded:
    """Item ``n``'s reconstruction as its fidelity check found it (decoded only if sampled)."""
    return Decoded(fid["decoded"][n], fid["token_accuracy"][n], fid["exact"][n])


def _publish(engine: Engine, version: str, path: Path, rows, vectors, fit, summary: dict) -> int:
    """One transaction (retried whole on an outage or a deadlock): the vectors of items
    whose text is still the one aligned, their jobs finished, the version activated, every
    other item queued for it. Returns how many were queued.

    Locks in the order every writer uses: item index, embedding counter, job rows."""
    if fit.features is None:
        raise ValueError(
            "a fit without its text features cannot be published: their text rows are stored with it"
        )
    with engine.begin() as conn:
        lock_item_index(conn)  # item texts cannot change until this commits
        current = dict(conn.execute(select(items.c.idx, items.c.text_hash)).all())
        same = [n for n, r in enumerate(rows) if current.get(r.idx) == r.text_hash]
        write_embeddings(
            conn,
            version,
            "full",
            [rows[n].idx for n in same],
            [rows[n].text_hash for n in same],
            vectors[same],
            [fit.fidelity["losses"][n] for n in same],
            db_now(conn),
            [_decoded(fit.fidelity, n) for n in same],
        )
        write_text_rows(  # the text content of the same items
            conn,
            version,
            [rows[n].idx for n in same],
            [rows[n].text_hash for n in same],
            fit.features[same].numpy(),
            db_now(conn),
        )
        complete_aligned(conn, {rows[n].idx: rows[n].text_hash for n in same})
        record_version(
            conn,
            "aligner",
            version,
            path,
            summary | {"passes": len(fit.history), "align_seconds": fit.seconds},
            "active",
        )
        return queue_missing(conn, version)
