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
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from models.sasrec import SASRec, SASRecConfig
from said import metrics as metrics_
from said.catalogue import load_embeddings, user_sequences
from said.tables import interactions, items, model_versions
from scorer.model import load_sasrec, save_scorer
from training.scorer import ScorerTrainConfig, evaluate, train_scorer

log = logging.getLogger(__name__)


@dataclass
class RetrainConfig:
    min_new_interactions: int = 10_000  # interactions since the last attempt that trigger one
    min_new_items: int = 500  # items since the last attempt that trigger one
    epochs: int = 30  # upper bound per retrain (early stopping on validation)
    valid_users: int = 2000  # size of the validation slice
    poll_s: float = 30.0  # how often the watcher checks the counts
    seed: int = 0


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {"interactions": conn.execute(select(func.count()).select_from(interactions)).scalar(),
                "items": conn.execute(select(func.count()).select_from(items)).scalar()}  # fmt: skip


def last_attempt(engine: Engine) -> dict | None:
    """Metrics of the newest scorer version, promoted or not (rejections count as attempts)."""
    with engine.connect() as conn:
        return conn.execute(
            select(model_versions.c.metrics).where(model_versions.c.kind == "scorer")
            .order_by(model_versions.c.created_at.desc()).limit(1)
        ).scalar()  # fmt: skip


def active_scorer(engine: Engine) -> tuple[str, Path] | None:
    """(version, path) of the active scorer, if one was ever promoted."""
    with engine.connect() as conn:
        row = conn.execute(
            select(model_versions.c.version, model_versions.c.path)
            .where(model_versions.c.kind == "scorer", model_versions.c.status == "active")
        ).first()  # fmt: skip
    return (row.version, Path(row.path)) if row else None


def is_due(engine: Engine, cfg: RetrainConfig) -> bool:
    last, now = last_attempt(engine), counts(engine)
    if last is None:
        return now["interactions"] > 0
    return (now["interactions"] - last["interactions"] >= cfg.min_new_interactions
            or now["items"] - last["items"] >= cfg.min_new_items)  # fmt: skip


def retrain_once(engine: Engine, aligner_version: str, out_dir: Path, cfg: RetrainConfig,
                 device: torch.device, progress: bool = True) -> dict:  # fmt: skip
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
    valid_seqs = rng.sample([s for s in seqs if len(s) >= 3],
                            min(cfg.valid_users, sum(len(s) >= 3 for s in seqs)))  # fmt: skip
    valid = ([s[:-1] for s in valid_seqs], [s[-1] for s in valid_seqs])
    if not valid_seqs:
        raise RuntimeError("no user has 3 interactions yet: nothing to validate a scorer on")

    active = active_scorer(engine)
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
    metrics = seen | {"val_ndcg@10": ndcg, "active_val_ndcg@10": active_ndcg,
                      "epochs": info["epochs"], "aligner_version": aligner_version,
                      "warm_start": active[0] if active else None, "promoted": promote}  # fmt: skip
    path = save_scorer(out_dir / f"scorer-{version}.pt", candidate.cpu(), metrics)
    with engine.begin() as conn:
        if promote:
            conn.execute(update(model_versions).where(model_versions.c.kind == "scorer",
                                                      model_versions.c.status == "active")
                         .values(status="retired"))  # fmt: skip
        conn.execute(model_versions.insert().values(
            version=version, kind="scorer", path=str(path.resolve()),
            status="active" if promote else "rejected", metrics=metrics,
            created_at=datetime.now(UTC)))  # fmt: skip
    metrics_.SCORER_RETRAINS.labels("promoted" if promote else "rejected").inc()
    metrics_.SCORER_VAL_NDCG.set(ndcg)
    log.info("scorer %s: val NDCG@10 %.4f vs active %.4f -> %s", version, ndcg, active_ndcg,
             "promoted" if promote else "rejected")  # fmt: skip
    return metrics | {"version": version}


def run_retrainer(engine: Engine, aligner_version: str, out_dir: Path, cfg: RetrainConfig,
                  device: torch.device, stop: threading.Event, progress: bool = False) -> None:  # fmt: skip
    """Retrain whenever enough has arrived, until ``stop`` is set (thread or CLI)."""
    while True:
        if is_due(engine, cfg):
            retrain_once(engine, aligner_version, out_dir, cfg, device, progress)
        if stop.wait(cfg.poll_s):
            return


def activate(engine: Engine, version: str) -> None:
    """Make ``version`` the active scorer (operator rollback); replicas swap to it."""
    with engine.begin() as conn:
        found = conn.execute(select(model_versions.c.version).where(
            model_versions.c.kind == "scorer", model_versions.c.version == version)).first()  # fmt: skip
        if found is None:
            raise ValueError(f"no scorer version {version!r}")
        conn.execute(update(model_versions).where(model_versions.c.kind == "scorer",
                                                  model_versions.c.status == "active")
                     .values(status="retired"))  # fmt: skip
        conn.execute(update(model_versions).where(model_versions.c.version == version)
                     .values(status="active"))  # fmt: skip
