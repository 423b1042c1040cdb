"""``said align``: full SAID alignment of every catalogue item, as a new aligner version.

Resumable: the training checkpoint is keyed by the set of item texts, so a killed run
continues at the batch where it stopped. At the end the bundle (projector, table, ridge map,
fidelity, fresh-path reference cohort) is saved, every item gets its embedding, and the
version becomes active. See ``training.fit_aligner`` for the steps and what is measured.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.catalogue import write_embeddings
from core.events import item_text
from core.settings import DEFAULTS
from core.tables import items
from core.versions import record_version
from models.bundle import AlignerBundle
from models.llm import lora_rank_of
from training.align import AlignConfig
from training.fit_aligner import FidelityConfig, RefineConfig, fit_aligner
from updater.leases import complete_jobs, lease_jobs

log = logging.getLogger(__name__)


def align_catalogue(
    engine: Engine,
    llm,
    tok,
    device: torch.device,
    data_dir: Path,
    acfg: AlignConfig,
    k: int,
    item_dim: int,
    progress: bool = True,
    prompt: str = DEFAULTS.prompt,
    refine: RefineConfig | None = None,
    fidelity_cfg: FidelityConfig | None = None,
) -> AlignerBundle:
    """Align all catalogue items and activate the result; see the module docstring."""
    owner = f"align-{int(time.time())}"
    with engine.begin() as conn:
        leases = lease_jobs(conn, owner, 10_000_000, ttl_s=7 * 24 * 3600)
        rows = conn.execute(
            select(items.c.idx, items.c.title, items.c.description, items.c.text_hash).order_by(items.c.idx)
        ).all()
    if not rows:
        raise RuntimeError("the catalogue has no items: consume said.items first")
    texts = [item_text(r.title, r.description) for r in rows]
    idx = [r.idx for r in rows]
    key = hashlib.sha256("\n".join(r.text_hash for r in rows).encode()).hexdigest()[:12]
    ckpt = data_dir / "align" / f"checkpoint-{key}-k{k}.pt"
    fit = fit_aligner(
        llm,
        tok,
        texts,
        idx,
        max(idx),
        acfg,
        k,
        item_dim,
        device,
        prompt,
        ckpt,
        refine,
        fidelity_cfg,
        progress,
    )
    version = datetime.now(UTC).strftime("said-%Y%m%d%H%M%S")
    summary = {key_: v for key_, v in fit.fidelity.items() if key_ not in ("losses", "token_accuracy")}
    bundle = AlignerBundle(
        version,
        fit.aligner,
        fit.ridge,
        prompt,
        fit.history,
        summary,
        fit.reference,
        fit.adapters,
        lora_rank_of(llm),
    )
    path = bundle.save(data_dir / "aligner")
    vectors = fit.aligner.item_vectors()[idx].float().cpu().numpy()
    now = datetime.now(UTC)
    with engine.begin() as conn:
        losses = fit.fidelity["losses"]
        write_embeddings(conn, version, "full", idx, [r.text_hash for r in rows], vectors, losses, now)
        complete_jobs(conn, owner, leases)
        record_version(
            conn,
            "aligner",
            version,
            path,
            summary | {"passes": len(fit.history), "align_seconds": fit.seconds},
            "active",
        )
    ckpt.unlink(missing_ok=True)
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
