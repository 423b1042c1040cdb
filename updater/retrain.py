"""``said scorer train``: event-driven retraining and guarded promotion of the warm/cold composite.

A retrain is due when ``min_new_interactions`` interactions or ``min_new_items`` items have
arrived since the last scorer attempt. It trains the composite the offline evaluation picked
(``models/composite.py``, ``docs/quality-mixed.md``): an ID SASRec teacher on the catalogue's
positive interactions (``settings.positives``: clicks and conversions, never impressions),
warm-started from the active teacher's rows, then the student that maps an item's SAID
vector into the teacher's space, with the gate set by each item's training interactions.

The items that arrived after the active version's catalogue (on a first retrain, a fixed
tenth of the items by a hash of their index) are its **cold-validation** items: out of the
teacher's training and of its softmax, as cold items are when the composite serves. They
are what the student stops on and the guard's cold-target users rank. A candidate that
passes the guard is served with its teacher refit on every positive (``graduate``), so they
graduate to their ID rows at this promotion.

Two user slices, fixed by a hash of the user id, judge it: early stopping (teacher on the
slice's warm-target users, student on its cold-target users, gate, boost and similarity on all) and
promotion. On the promotion slice the candidate and the active version are compared on
warm-target and cold-target users separately, per user and paired: the candidate is
promoted only if neither is worse beyond noise (the 95% bootstrap interval of the mean
difference lies wholly below 0). A rejected candidate keeps both scores. Promotion is one
transaction on ``model_versions``; every scorer replica notices it and swaps model and
index together (``scorer/state.py``).

A teacher trains as ``settings.scorer`` says, for at most ``settings.retrain.epochs``
epochs; the student as ``settings.composite`` says. The watching retrainer trains on
whichever aligner version is active when a retrain starts.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from core import metrics
from core.catalogue import content_version, load_embeddings, missing_text_rows, user_sequences
from core.files import CorruptFile
from core.settings import ScorerSettings, Settings
from core.tables import interactions, items
from core.users import prune
from core.versions import (
    active_version,
    newest_metrics,
    record_version,
    require_active,
    versions_in,
    wait_for_active,
)
from core.versions import promote as promote_if_current
from models.composite import Composite, load_composite, save_composite
from models.sasrec import SASRec, SASRecConfig, init_id_rows
from training.composite import judges_for, new_composite, train_student
from training.mixed import by_target, interaction_counts, interval, ndcg10, ranks_and_top, trained_items
from training.recommender import train_scorer, validator

log = logging.getLogger(__name__)
Slice = tuple[list[list[int]], list[int]]  # (histories, targets)


def counts(engine: Engine, positives: tuple[str, ...]) -> dict[str, int]:
    """Positive interactions and items in the catalogue, and the newest of each (its id,
    its index): a flood of impressions, which no retrain learns from, must not make one
    due, and neither must deletions (retention, a forgotten user) keep one from being due."""
    positive = interactions.c.type.in_(positives)
    with engine.connect() as conn:
        return {
            "interactions": conn.execute(
                select(func.count()).select_from(interactions).where(positive)
            ).scalar(),
            "items": conn.execute(select(func.count()).select_from(items)).scalar(),
            "last_interaction_id": conn.execute(select(func.max(interactions.c.id)).where(positive)).scalar()
            or 0,
            "last_item_idx": conn.execute(select(func.max(items.c.idx))).scalar() or 0,
        }


def new_since(engine: Engine, last: dict, positives: tuple[str, ...]) -> tuple[int, int]:
    """(positive interactions, items) that arrived after the retrain that made ``last``:
    counted by id and index, so events deleted meanwhile do not hide new ones (a record
    from before these keys: by the difference of the counts)."""
    now = counts(engine, positives)
    if "last_interaction_id" not in last:
        return now["interactions"] - last["interactions"], now["items"] - last["items"]
    newer = (interactions.c.id > last["last_interaction_id"]) & interactions.c.type.in_(positives)
    with engine.connect() as conn:
        fresh = conn.execute(select(func.count()).select_from(interactions).where(newer)).scalar()
    return fresh, now["last_item_idx"] - last["last_item_idx"]


def is_due(engine: Engine, settings: Settings) -> bool:
    """Enough new positive interactions or items since the last attempt
    (``settings.retrain``), a newly activated aligner that no scorer was trained on yet
    (replicas serve cosine until one is), or a content setting the last attempt did not
    train on (an operator's switch applies now, not at the next burst of clicks)."""
    cfg = settings.retrain
    last = newest_metrics(engine, "scorer")
    if last is None:
        return counts(engine, settings.positives)["interactions"] > 0
    aligner = active_version(engine, "aligner")
    if aligner is not None and last.get("aligner_version") != aligner[0]:
        return True
    if last.get("content", "said") != settings.composite.content:
        return True
    new_interactions, new_items = new_since(engine, last, settings.positives)
    return new_interactions >= cfg.min_interactions or new_items >= cfg.min_items


@dataclass
class TrainingData:
    """What a retrain trains and judges on, read from the catalogue in one go."""

    table: torch.Tensor  # (max item index + 1, D) content rows (aligner's SAID or text), 0 where none yet
    content: str  # which (``settings.composite.content``)
    cold: set[int]  # cold-validation items: not trained on, ranked by the student
    histories: list[list[int]]  # every user's history without its last item
    stopping: Slice  # early-stopping slice
    promotion: Slice  # promotion slice, disjoint from stopping

    @property
    def train(self) -> list[list[int]]:
        """The training histories: without the cold-validation items."""
        if not self.cold:
            return self.histories
        return [[i for i in s if i not in self.cold] for s in self.histories]

    @property
    def counts(self) -> torch.Tensor:
        """(N+1,) training interactions per item: the composite's gate."""
        return interaction_counts(self.train, self.table.shape[0] - 1)

    def split(self, users: Slice) -> tuple[Slice, Slice]:
        """(warm-target, cold-target) users of a slice."""
        return by_target(users, self.cold)


def cold_items(embedded: set[int], known_through: int | None, share: float) -> set[int]:
    """The items newer than the active version's catalogue (``known_through``, its largest
    index); with no active version, a fixed ``share`` of them by a hash of the index (the
    same at every retrain, so a first retrain's choice is not redrawn)."""
    if known_through is not None:
        return {i for i in embedded if i > known_through}
    return {i for i in embedded if hashlib.sha256(str(i).encode()).digest()[0] < 256 * share}


def training_data(
    engine: Engine, aligner_version: str, settings: Settings, known_through: int | None = None
) -> TrainingData:
    """The catalogue's positive interactions over the items with a row of
    ``aligner_version``'s content (``settings.composite.content``), the cold-validation items
    (``cold_items``) and the two validation slices (``settings.retrain.valid_users`` each,
    drawn by ``settings.scorer.seed``)."""
    content = settings.composite.content
    with engine.connect() as conn:
        lacking = missing_text_rows(conn, aligner_version, 1) if content == "text" else []
        by_user = user_sequences(conn, settings.positives)
        ids, table = content_table(conn, content_version(aligner_version, content))
    if lacking:  # trained on a part of the catalogue, it would serve only that part
        raise RuntimeError(
            f"items of aligner {aligner_version} still lack their text rows (item {lacking[0].idx} "
            "first): a worker stores them when nothing is pending; a text retrain waits for it"
        )
    if table is None:
        raise RuntimeError(f"no {content} rows of aligner {aligner_version}: run `said aligner train` first")
    embedded = set(ids.tolist())
    by_user = {u: [i for i in s if i in embedded] for u, s in by_user.items()}  # pending: no input yet
    cold = cold_items(embedded, known_through, settings.retrain.cold_share)
    stopping, promotion = validation_slices(by_user, settings.retrain.valid_users, settings.scorer.seed)
    if not stopping[0] or not promotion[0]:
        raise RuntimeError("too few users with 3 positive interactions to early-stop and compare a scorer")
    return TrainingData(table, content, cold, [s[:-1] for s in by_user.values()], stopping, promotion)


def content_table(conn: Connection, version: str, rows: int = 0) -> tuple[np.ndarray, torch.Tensor | None]:
    """(ids, (max(max id + 1, ``rows``), D) table) of every row of an embedding version, 0
    where an item has none (None: no row at all)."""
    ids, vectors = load_embeddings(conn, version)
    if vectors is None:
        return ids, None
    table = torch.zeros(max(int(ids.max()) + 1, rows), vectors.shape[1])
    table[torch.from_numpy(ids)] = torch.from_numpy(vectors)
    return ids, table


def train_config(settings: Settings) -> ScorerSettings:
    """How a retrain trains its teacher: the scorer section, capped at the retrain's epochs."""
    return settings.scorer.model_copy(update={"epochs": settings.retrain.epochs})


def train_composite(
    data: TrainingData, settings: Settings, device: torch.device, progress: bool, start: Composite | None
) -> tuple[Composite, dict]:
    """Teacher (warm-started from ``start``'s, when there is one), then student, gate, boost
    and similarity."""
    warm_stop, cold_stop = data.split(data.stopping)
    train = data.train
    torch.manual_seed(settings.scorer.seed)  # its initial rows too: a retrain is reproducible
    teacher = SASRec(SASRecConfig(n_items=data.table.shape[0] - 1))
    if not warm_stop[0]:
        raise RuntimeError("no early-stopping user has a warm target: too few items trained on")
    if settings.composite.teacher_init == "content":  # as training.evaluate's composites
        content_start(teacher, data)
    if start is not None:
        warm_start(teacher, start.teacher, trained_items(train))
    teacher, info = train_scorer(
        teacher,
        train,
        validator(warm_stop, device),
        train_config(settings),
        device,
        progress,
        blocked=sorted(data.cold),
    )
    torch.manual_seed(settings.scorer.seed)
    composite = new_composite(teacher, data.table, data.counts, settings.composite)
    composite, student = train_student(
        composite,
        train,
        judges_for(warm_stop, cold_stop, device, settings.retrain.min_group_users),
        settings.composite,
        device,
        progress,
    )
    kept = (
        "student_epochs",
        "student_kept_epochs",
        "kappa",
        "boost",
        "similarity",
        "val_warm_ndcg@10",
        "val_cold_ndcg@10",
    )
    kept += ("val_cold_share_top10",)  # fresh items' exposure, where no cold user could judge
    return composite, info | {k: student[k] for k in kept}


def graduate(
    judged: Composite, data: TrainingData, settings: Settings, device: torch.device, progress: bool
) -> Composite:
    """The composite to serve once ``judged`` passed the guard: its teacher fine-tuned on
    every positive, the cold-validation items' too, so they graduate to ID rows at this
    promotion rather than the next, with the gate counted on the same. The student, its
    input scaling, ``kappa``, ``boost`` and ``similarity`` are the judged ones: they were chosen on the
    cold-validation users, which the refit has no held-out stand-in for."""
    if not data.cold:
        return judged
    full = replace(data, cold=set())
    teacher = SASRec(judged.teacher.cfg)
    warm_start(teacher, judged.teacher)
    teacher, _ = train_scorer(
        teacher, full.train, validator(full.stopping, device), train_config(settings), device, progress
    )
    # the judged one's shape (its similarity axes and recency), whatever the settings say now
    p, recency = judged.student[2].p, float(judged.recency)
    shape = (p, judged.r, recency, judged.z_blocks, judged.content_started)
    served = Composite(teacher, data.table, full.counts, *shape)
    kept = {k: v for k, v in judged.state_dict().items() if not k.startswith("teacher.") and k != "counts"}
    served.load_state_dict(kept, strict=False)
    return served.use_content(data.table).to(device)


def content_start(teacher: SASRec, data: TrainingData) -> None:
    """The teacher's item rows at their content's place (``init_id_rows``, the axes fitted
    on the items it trains on), so a thin item keeps what its content says. Rows without
    content yet (no embedding: a zero row of ``data.table``) keep their random start, and
    with fewer than 2 items to fit on every row does."""
    fit = trained_items(data.train)
    if len(fit) < 2:
        return
    random_rows = teacher.id_emb.weight.detach().clone()
    init_id_rows(teacher, data.table, fit)
    empty = data.table.abs().sum(1) == 0  # (N+1,) row 0, the padding, among them
    with torch.no_grad():
        teacher.id_emb.weight[empty] = random_rows[empty]


def warm_start(teacher: SASRec, active: SASRec, trained: torch.Tensor | None = None) -> None:
    """The active teacher's weights, and its rows of the items it knew (of those among
    ``trained`` ids where given; every other item keeps its initial row): each retrain
    refines the last instead of starting over. An item without training interactions keeps
    its content start, which the composite reads it at (``models.composite``, history reads),
    rather than a row the active teacher started from an older fit and never trained."""
    if teacher.cfg.hidden != active.cfg.hidden or teacher.cfg.layers != active.cfg.layers:
        return
    state = active.state_dict()
    rows = teacher.id_emb.weight.detach().clone()
    old = state["id_emb.weight"]
    known = torch.arange(min(len(rows), len(old)))
    if trained is not None:
        known = known[torch.isin(known, trained)]
    rows[known] = old[known]
    rows[0] = old[0]  # padding
    state["id_emb.weight"] = rows
    teacher.load_state_dict(state)


def per_user_ndcg(model: Composite, users: Slice, device: torch.device) -> torch.Tensor:
    """(U,) each user's NDCG@10, ranking every catalogue item."""
    if not users[0]:
        return torch.zeros(0)
    return ndcg10(ranks_and_top(model.to(device), *users, device)[0])


def group_ndcg(model, data: TrainingData, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-user NDCG@10 of the promotion users by group: "warm" and "cold" targets, and
    "all" (the two together: a user's score depends on its own ranking only, so each user
    is ranked once)."""
    warm, cold = data.split(data.promotion)
    out = {"warm": per_user_ndcg(model, warm, device), "cold": per_user_ndcg(model, cold, device)}
    return out | {"all": torch.cat([out["warm"], out["cold"]])}


def mean_or_none(per_user: torch.Tensor) -> float | None:
    """A group's mean, None for a group with no users."""
    return per_user.mean().item() if len(per_user) else None


def guard(candidate: torch.Tensor, active: torch.Tensor | None, min_users: int) -> dict:
    """One group of promotion users: both scores, and whether the candidate is worse
    beyond noise (the 95% bootstrap interval of the paired per-user difference below 0).
    A group of fewer than ``min_users`` users decides nothing: with a handful of users the
    interval is as narrow as it is meaningless, and one unlucky user would refuse it."""
    out = {"users": len(candidate), "ndcg@10": candidate.mean().item() if len(candidate) else None}
    if active is None or not len(candidate):
        return out | {"active_ndcg@10": None, "diff_interval": None, "worse": False}
    low, high = interval(candidate - active)
    worse = high < 0 and len(candidate) >= min_users
    return out | {"active_ndcg@10": active.mean().item(), "diff_interval": [low, high], "worse": worse}


def retrain_once(
    engine: Engine, aligner_version: str, settings: Settings, device: torch.device, progress: bool = True
) -> dict:
    """Train, validate and maybe promote one candidate composite; returns its metrics. Its
    file goes under ``<data_dir>/scorer``."""
    seen = counts(engine, settings.positives)
    out_dir = settings.data_dir / "scorer"
    out_dir.mkdir(parents=True, exist_ok=True)
    active = active_version(engine, "scorer")
    current, theirs_meta = _readable(active)
    known = current.teacher.cfg.n_items if current is not None else None
    data = training_data(engine, aligner_version, settings, known)
    candidate, info = train_composite(data, settings, device, progress, current)
    # the active version is compared only on the rows it was trained on: after an aligner
    # activation its student reads another aligner's rows (replicas decline it anyway)
    theirs_table = None
    if current is not None and theirs_meta.get("aligner_version") == aligner_version:
        theirs_table = _content_of(engine, theirs_meta, data)
    if theirs_table is not None:
        current.use_content(theirs_table)  # today's catalogue: its newer items are cold to it
    else:
        current = None
    mine = group_ndcg(candidate, data, device)
    theirs = group_ndcg(current, data, device) if current is not None else None
    verdicts = {
        g: guard(mine[g], theirs[g] if theirs else None, settings.retrain.min_group_users)
        for g in ("warm", "cold")
    }
    better = not (verdicts["warm"]["worse"] or verdicts["cold"]["worse"])
    if better:  # judged with its cold items held out; served with them trained on
        candidate = graduate(candidate, data, settings, device, progress)
    version = datetime.now(UTC).strftime("composite-%Y%m%d%H%M%S%f")
    record = seen | {
        "val_ndcg@10": info["best_val_ndcg@10"],  # the teacher's, on the early-stopping slice
        # the promotion slice, which no scorer early-stopped on, as judged: cold items held out
        "ndcg@10": mean_or_none(mine["all"]),
        "active_ndcg@10": mean_or_none(theirs["all"]) if theirs else None,
        "warm": verdicts["warm"],
        "cold": verdicts["cold"],
        "cold_items": len(data.cold),  # held out to judge it; trained on if it is promoted
        "known_through": known,  # items above this index were its cold-validation set (None: hashed)
        "epochs": info["epochs"],
        "student_epochs": info["student_epochs"],
        "student_kept_epochs": info["student_kept_epochs"],  # the window whose mean weights it kept
        "kappa": info["kappa"],
        "boost": info["boost"],
        "similarity": info["similarity"],
        # the chosen (kappa, boost, similarity) on the early-stopping slice: what the choice spent on warm
        "student_val_ndcg@10": {"warm": info["val_warm_ndcg@10"], "cold": info["val_cold_ndcg@10"]},
        # with no cold signal, the choice's share of fresh items in warm users' top 10 (else None)
        "val_cold_share_top10": info["val_cold_share_top10"],
        "aligner_version": aligner_version,
        "content": settings.composite.content,  # which of the aligner's rows its student maps
        "warm_start": active[0] if known is not None else None,
    }
    path = save_composite(out_dir / f"scorer-{version}.pt", candidate.cpu(), record)
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
    metrics.SCORER_VAL_NDCG.set(record["ndcg@10"])
    log.info(
        "scorer %s: NDCG@10 warm %s vs active %s, cold %s vs active %s -> %s",
        version,
        _fmt(verdicts["warm"]["ndcg@10"]),
        _fmt(verdicts["warm"]["active_ndcg@10"]),
        _fmt(verdicts["cold"]["ndcg@10"]),
        _fmt(verdicts["cold"]["active_ndcg@10"]),
        "promoted" if promote else "rejected",
    )
    return record | {"version": version}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


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


def _readable(active: tuple[str, Path] | None) -> tuple[Composite | None, dict]:
    """The active composite, or None when there is none or its file cannot be read (or is
    of the frozen-table scorer before the composite): then the candidate trains from
    scratch, is compared with nothing, and replaces it (an unreadable model serves nobody).
    With it, its metadata: the aligner version and content it was trained on."""
    if active is None:
        return None, {}
    try:
        model, meta = load_composite(active[1])
        metrics.SERVING_PROBLEMS.labels("scorer").set(0)
        return model, meta
    except (CorruptFile, OSError, ValueError) as exc:
        log.error(
            "active scorer %s cannot be loaded (%s): training from scratch to replace it", active[0], exc
        )
        metrics.SERVING_PROBLEMS.labels("scorer").set(1)
        return None, {}


def _content_of(engine: Engine, meta: dict, data: TrainingData) -> torch.Tensor | None:
    """The table the active composite of ``meta`` reads: the candidate's when their content
    is the same (after an operator's switch, its own content's rows of the same aligner, 0
    where an item has none; None where there are none at all)."""
    content = meta.get("content", "said")  # a file from before the setting: SAID
    if content == data.content:
        return data.table
    with engine.connect() as conn:
        return content_table(conn, content_version(meta["aligner_version"], content), len(data.table))[1]


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


RETENTION_EVERY_S = 3600  # retention is in days: an hourly pass (a full scan of events) is enough


def apply_retention(engine: Engine, days: float) -> dict[str, int]:
    """Delete the events older than ``days`` (``settings.retention_days``) before a retrain
    can train on them; how many went."""
    with engine.begin() as conn:
        gone = prune(conn, datetime.now(UTC) - timedelta(days=days))
    if any(gone.values()):
        log.info("retention (%g days): deleted %d interactions, %d parked", days, *gone.values())
    return gone


def run_retrainer(
    engine: Engine, settings: Settings, device: torch.device, stop: threading.Event, progress: bool = False
) -> None:
    """Retrain whenever enough has arrived, until ``stop`` is set (thread or CLI). Each
    retrain trains on the aligner version active when it starts, so an activation by
    `said aligner train` is followed without a restart. Until there is one it waits (compose starts
    it beside the bootstrap alignment)."""
    if wait_for_active(engine, "aligner", stop) is None:
        return
    pruned_at = -float("inf")
    while True:
        if settings.retention_days is not None and time.monotonic() - pruned_at > RETENTION_EVERY_S:
            apply_retention(engine, settings.retention_days)
            pruned_at = time.monotonic()
        if is_due(engine, settings):
            try:
                retrain_once(engine, require_active(engine, "aligner")[0], settings, device, progress)
            except Exception:  # one failed attempt (no vectors yet, an outage) must not end the watch
                log.exception("retrain failed; trying again in %.0f s", settings.retrain.poll_s)
                metrics.SCORER_RETRAINS.labels("failed").inc()
        if stop.wait(settings.retrain.poll_s):
            return
