"""``said align``: full SAID alignment of every catalogue item, as a new aligner version.

Resumable: the training checkpoint is keyed by the set of item texts, so a killed run
continues at the batch where it stopped. At the end the bundle (projector, table, ridge map,
reference loss) is saved, every item gets its embedding, and the version becomes active.
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
from models.aligner import AlignerConfig, ItemAligner, Prefix, fit_text_to_rows, tokenize_texts
from models.bundle import AlignerBundle
from models.llm import pooled_text_features
from training.align import AlignConfig, fidelity, train_full
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
    tokens = tokenize_texts(tok, texts)
    prefix = Prefix(tok, prompt=prompt)
    torch.manual_seed(acfg.seed)
    cfg = AlignerConfig(n_items=max(idx), hidden=llm.config.hidden_size, item_dim=item_dim, k=k)
    aligner = ItemAligner(cfg).to(device)
    ckpt = data_dir / "align" / f"checkpoint-{key}-k{k}.pt"
    history = train_full(aligner, llm, prefix, tokens, idx, acfg, device, tok.pad_token_id, ckpt, progress)
    fid = fidelity(
        aligner.soft_tokens,
        llm,
        prefix,
        tokens,
        idx,
        device,
        tok.pad_token_id,
        tok.eos_token_id,
        reconstruct=False,
        progress=progress,
    )
    feats = pooled_text_features(llm, tok, texts, device, progress=progress)
    ridge = fit_text_to_rows(feats, aligner.items.weight.detach()[idx].cpu())
    version = datetime.now(UTC).strftime("said-%Y%m%d%H%M%S")
    bundle = AlignerBundle(
        version, aligner.requires_grad_(False), ridge, fid["mean_loss"], prompt, history, fid["loss"]
    )
    path = bundle.save(data_dir / "aligner")
    vectors = aligner.item_vectors()[idx].float().cpu().numpy()
    now = datetime.now(UTC)
    with engine.begin() as conn:
        write_embeddings(conn, version, "full", idx, [r.text_hash for r in rows], vectors, fid["loss"], now)
        complete_jobs(conn, owner, leases)
        record_version(
            conn,
            "aligner",
            version,
            path,
            {"mean_loss": fid["mean_loss"], "token_accuracy": fid["mean_token_accuracy"], "items": len(idx)},
            "active",
        )
    ckpt.unlink(missing_ok=True)
    log.info(
        "aligner %s active: %d items, mean loss %.3f, token accuracy %.3f",
        version,
        len(idx),
        fid["mean_loss"],
        fid["mean_token_accuracy"],
    )
    return bundle
