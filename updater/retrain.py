"""``said retrain``: event-driven retraining and guarded promotion of the SASRec scorer.

A retrain is due when ``min_new_interactions`` interactions or ``min_new_items`` items have
arrived since the last scorer attempt. It trains a candidate on the catalogue's sequences
(warm-started from the active version, the SAID table frozen), scores candidate and active
version on the same validation slice (each user's last item), and promotes the candidate
only if it is not worse. Promotion is one transaction on ``model_versions``; every scorer
replica notices it and swaps model and index together (``scorer/state.py``).
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core import metrics
from core.catalogue import load_embeddings, user_sequences
from core.settings import setting
from core.tables import interactions, items
from core.versions import active_version, newest_metrics, record_version
from models.sasrec import SASRec, SASRecConfig, load_sasrec, save_scorer
from training.recommender import ScorerTrainConfig, evaluate, train_scorer

log = logging.getLogger(__name__)


@dataclass
class RetrainConfig:
    """Retraining knobs; each default and its meaning live in ``core.settings``."""

    min_new_interactions: int = setting("retrain_min_interactions")
    min_new_items: int = setting("retrain_min_items")
    epochs: int = setting("retrain_epochs")
    valid_users: int = setting("retrain_valid_users")
    poll_s: float = setting("retrain_poll_s")
    seed: int = 0


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            "interactions": conn.execute(select(func.count()).select_from(interactions)).scalar(),
            "items": conn.execute(select(func.count()).select_from(items)).scalar(),
        }


def is_due(engine: Engine, cfg: RetrainConfig) -> bool:
    last, now = newest_metrics(engine, "scorer"), counts(engine)
    if last is None:
        return now["interactions"] > 0
    return (
        now["interactions"] - last["interactions"] >= cfg.min_new_interactions
        or now["items"] - last["items"] >= cfg.min_new_items
    )


def retrain_once(
    engine: Engine,
    aligner_version: str,
    out_dir: Path,
    cfg: RetrainConfig,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Train, validate and maybe promote one candidate; returns its metrics."""
    seen = counts(engine)
    with engine.connect() as conn:
        seqs = user_sequences(conn)
        ids, vectors = load_embeddings(conn, aligner_version)
    if vectors is None:
        raise RuntimeError(f"no embeddings of aligner {aligner_version}: run `said align` first")
    table = torch.zeros(int(ids.max()) + 1, vectors.shape[1])
    table[torch.from_numpy(ids)] = torch.from_numpy(vectors)
    embedded = set(ids.tolist())
    seqs = [[i for i in s if i in embedded] for s in seqs]  # pending items cannot be inputs yet
    train = [s[:-1] for s in seqs]
    rng = random.Random(cfg.seed)
    valid_seqs = rng.sample(
        [s for s in seqs if len(s) >= 3], min(cfg.valid_users, sum(len(s) >= 3 for s in seqs))
    )
    valid = ([s[:-1] for s in valid_seqs], [s[-1] for s in valid_seqs])
    if not valid_seqs:
        raise RuntimeError("no user has 3 interactions yet: nothing to validate a scorer on")

    active = active_version(engine, "scorer")
    candidate = SASRec(SASRecConfig(n_items=table.shape[0] - 1), table)
    active_ndcg = -1.0
    if active is not None:
        current, _ = load_sasrec(active[1], table)
        active_ndcg = evaluate(current.to(device), *valid, device)["ndcg@10"]
        candidate.load_state_dict(current.state_dict())  # warm start, same standardisation
    tcfg = ScorerTrainConfig(epochs=cfg.epochs, eval_every=1, patience=3, seed=cfg.seed)
    candidate, info = train_scorer(candidate, train, valid, tcfg, device, progress)
    ndcg = evaluate(candidate, *valid, device)["ndcg@10"]  # what is promoted, measured again
    promote = ndcg >= active_ndcg
    version = datetime.now(UTC).strftime("sasrec-%Y%m%d%H%M%S%f")
    record = seen | {
        "val_ndcg@10": ndcg,
        "active_val_ndcg@10": active_ndcg,
        "epochs": info["epochs"],
        "aligner_version": aligner_version,
        "warm_start": active[0] if active else None,
        "promoted": promote,
    }
    path = save_scorer(out_dir / f"scorer-{version}.pt", candidate.cpu(), record)
    with engine.begin() as conn:
        record_version(conn, "scorer", version, path, record, "active" if promote else "rejected")
    metrics.SCORER_RETRAINS.labels("promoted" if promote else "rejected").inc()
    metrics.SCORER_VAL_NDCG.set(ndcg)
    log.info(
        "scorer %s: val NDCG@10 %.4f vs active %.4f -> %s",
        version,
        ndcg,
        active_ndcg,
        "promoted" if promote else "rejected",
    )
    return record | {"version": version}


def run_retrainer(
    engine: Engine,
    aligner_version: str,
    out_dir: Path,
    cfg: RetrainConfig,
    device: torch.device,
    stop: threading.Event,
    progress: bool = False,
) -> None:
    """Retrain whenever enough has arrived, until ``stop`` is set (thread or CLI)."""
    while True:
        if is_due(engine, cfg):
            retrain_once(engine, aligner_version, out_dir, cfg, device, progress)
        if stop.wait(cfg.poll_s):
            return
