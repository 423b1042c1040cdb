"""``said retrain``: event-driven retraining and guarded promotion of the SASRec scorer.

A retrain is due when ``min_new_interactions`` interactions or ``min_new_items`` items have
arrived since the last scorer attempt. It trains a candidate on the catalogue's sequences
(warm-started from the active version, the SAID table frozen), early-stops it on one slice
of users (each user's last item), scores candidate and active version on a second,
disjoint slice, and promotes the candidate only if it is not worse there. The slices are
fixed by a hash of the user id, so no scorer is ever compared on users it early-stopped on
(a candidate picked for its best score on a slice would be favoured there). Promotion is
one transaction on ``model_versions``; every scorer
replica notices it and swaps model and index together (``scorer/state.py``).

A candidate trains as ``settings.scorer`` says (rate, batch, patience, validation period,
seed), for at most ``settings.retrain.epochs`` epochs; the watching retrainer trains on
whichever aligner version is active when a retrain starts.
"""

from __future__ import annotations

import hashlib
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
from core.files import CorruptFile
from core.settings import RetrainSettings, ScorerSettings, Settings
from core.tables import interactions, items
from core.versions import active_version, newest_metrics, record_version, require_active, versions_in
from core.versions import promote as promote_if_current
from models.sasrec import SASRec, SASRecConfig, load_sasrec, save_scorer
from training.recommender import evaluate, train_scorer, validator

log = logging.getLogger(__name__)


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            "interactions": conn.execute(select(func.count()).select_from(interactions)).scalar(),
            "items": conn.execute(select(func.count()).select_from(items)).scalar(),
        }


def is_due(engine: Engine, cfg: RetrainSettings) -> bool:
    """Enough new interactions or items since the last attempt, or a newly activated aligner
    that no scorer was trained on yet (replicas serve cosine until one is)."""
    last, now = newest_metrics(engine, "scorer"), counts(engine)
    if last is None:
        return now["interactions"] > 0
    aligner = active_version(engine, "aligner")
    if aligner is not None and last.get("aligner_version") != aligner[0]:
        return True
    return (
        now["interactions"] - last["interactions"] >= cfg.min_interactions
        or now["items"] - last["items"] >= cfg.min_items
    )


@dataclass
class TrainingData:
    """What a retrain trains and judges on, read from the catalogue in one go."""

    table: torch.Tensor  # (max item index + 1, D) aligner vectors, 0 where none yet
    train: list[list[int]]  # every user's history without its last item
    stopping: tuple[list[list[int]], list[int]]  # early-stopping slice (histories, targets)
    promotion: tuple[list[list[int]], list[int]]  # promotion slice, disjoint from stopping


def training_data(engine: Engine, aligner_version: str, settings: Settings) -> TrainingData:
    """The catalogue's sequences over the items embedded in ``aligner_version``, and the two
    validation slices (``settings.retrain.valid_users`` each, drawn by ``settings.scorer.seed``)."""
    with engine.connect() as conn:
        by_user = user_sequences(conn)
        ids, vectors = load_embeddings(conn, aligner_version)
    if vectors is None:
        raise RuntimeError(f"no embeddings of aligner {aligner_version}: run `said align` first")
    table = torch.zeros(int(ids.max()) + 1, vectors.shape[1])
    table[torch.from_numpy(ids)] = torch.from_numpy(vectors)
    embedded = set(ids.tolist())
    by_user = {u: [i for i in s if i in embedded] for u, s in by_user.items()}  # pending: no input yet
    stopping, promotion = validation_slices(by_user, settings.retrain.valid_users, settings.scorer.seed)
    if not stopping[0] or not promotion[0]:
        raise RuntimeError("too few users with 3 interactions to early-stop and compare a scorer")
    return TrainingData(table, [s[:-1] for s in by_user.values()], stopping, promotion)


def train_config(settings: Settings) -> ScorerSettings:
    """How a retrain trains: the scorer section, capped at the retrain's epochs."""
    return settings.scorer.model_copy(update={"epochs": settings.retrain.epochs})


def retrain_once(
    engine: Engine, aligner_version: str, settings: Settings, device: torch.device, progress: bool = True
) -> dict:
    """Train, validate and maybe promote one candidate; returns its metrics. Its file goes
    under ``<data_dir>/scorer``."""
    seen = counts(engine)
    out_dir = settings.data_dir / "scorer"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = training_data(engine, aligner_version, settings)
    table, train, stopping, promotion = data.table, data.train, data.stopping, data.promotion
    active = active_version(engine, "scorer")
    candidate = SASRec(SASRecConfig(n_items=table.shape[0] - 1), table)
    active_ndcg = -1.0
    current = _readable(active, table)
    if current is not None:
        active_ndcg = evaluate(current.to(device), *promotion, device)["ndcg@10"]
        candidate.load_state_dict(current.state_dict())  # warm start, same standardisation
    candidate, info = train_scorer(
        candidate, train, validator(stopping, device), train_config(settings), device, progress
    )
    ndcg = evaluate(candidate, *promotion, device)["ndcg@10"]
    better = ndcg >= active_ndcg
    version = datetime.now(UTC).strftime("sasrec-%Y%m%d%H%M%S%f")
    record = seen | {
        "val_ndcg@10": info["best_val_ndcg@10"],  # the early-stopping slice
        "ndcg@10": ndcg,  # the promotion slice, which no scorer early-stopped on
        "active_ndcg@10": active_ndcg,
        "epochs": info["epochs"],
        "aligner_version": aligner_version,
        "warm_start": active[0] if current is not None else None,
    }
    path = save_scorer(out_dir / f"scorer-{version}.pt", candidate.cpu(), record)
    with engine.begin() as conn:  # promotes only if the active version is still the compared one
        if better:
            promote = promote_if_current(conn, "scorer", version, path, record, active[0] if active else None)
        else:
            record_version(conn, "scorer", version, path, record | {"promoted": False}, "rejected")
            promote = False
    if not promote:
        prune_rejected(engine)
    record["promoted"] = promote
    metrics.SCORER_RETRAINS.labels("promoted" if promote else "rejected").inc()
    metrics.SCORER_VAL_NDCG.set(ndcg)
    log.info(
        "scorer %s: NDCG@10 %.4f vs active %.4f on the promotion slice -> %s",
        version,
        ndcg,
        active_ndcg,
        "promoted" if promote else "rejected",
    )
    return record | {"version": version}


KEEP_REJECTED = 3  # rejected candidates' files kept for a look (their rows and scores stay)


def prune_rejected(engine: Engine, keep: int = KEEP_REJECTED) -> int:
    """Delete the files of all but the newest ``keep`` rejected candidates: a retrainer that
    keeps being rejected (a bad stretch of data) must not fill the disk. Their rows stay in
    ``model_versions`` with both scores; only an active or retired version is ever loaded.
    Returns how many files went."""
    gone = 0
    for _version, path in versions_in(engine, "scorer", "rejected")[keep:]:
        if path.exists():
            path.unlink()
            gone += 1
    return gone


def _readable(active: tuple[str, Path] | None, table: torch.Tensor) -> SASRec | None:
    """The active scorer, or None when there is none or its file cannot be read: then the
    candidate trains from scratch and replaces it (an unreadable model serves nobody)."""
    if active is None:
        return None
    try:
        model = load_sasrec(active[1], table)[0]
        metrics.SERVING_PROBLEMS.labels("scorer").set(0)
        return model
    except (CorruptFile, OSError, ValueError) as exc:
        log.error(
            "active scorer %s cannot be loaded (%s): training from scratch to replace it", active[0], exc
        )
        metrics.SERVING_PROBLEMS.labels("scorer").set(1)
        return None


def validation_slices(
    by_user: dict[str, list[int]], per_slice: int, seed: int
) -> tuple[tuple[list[list[int]], list[int]], tuple[list[list[int]], list[int]]]:
    """(histories, last items) of two disjoint user slices: early stopping and promotion.

    A user's slice is fixed by a hash of its id, not by a sample of today's population, so
    it stays the same across retrains: the active scorer never early-stopped on a user of
    the promotion slice either. Users with fewer than 3 interactions are in neither."""
    pools: tuple[list[list[int]], list[list[int]]] = ([], [])
    for user, seq in sorted(by_user.items()):
        if len(seq) >= 3:
            pools[hashlib.sha256(user.encode()).digest()[0] & 1].append(seq)
    slices = []
    for pool in pools:
        chosen = random.Random(seed).sample(pool, min(per_slice, len(pool)))
        slices.append(([s[:-1] for s in chosen], [s[-1] for s in chosen]))
    return slices[0], slices[1]


def run_retrainer(
    engine: Engine, settings: Settings, device: torch.device, stop: threading.Event, progress: bool = False
) -> None:
    """Retrain whenever enough has arrived, until ``stop`` is set (thread or CLI). Each
    retrain trains on the aligner version active when it starts, so an activation by
    `said align` is followed without a restart."""
    while True:
        if is_due(engine, settings.retrain):
            try:
                retrain_once(engine, require_active(engine, "aligner")[0], settings, device, progress)
            except Exception:  # one failed attempt (no vectors yet, an outage) must not end the watch
                log.exception("retrain failed; trying again in %.0f s", settings.retrain.poll_s)
                metrics.SCORER_RETRAINS.labels("failed").inc()
        if stop.wait(settings.retrain.poll_s):
            return
