"""The demo's yardsticks: `id` and `text` SASRecs trained on exactly the served composite's
data, measured on exactly its promotion users (all, warm-target, cold-target).

The served composite's own figures come from its retrain record (``updater/retrain.py``);
these two are trained here on the same training histories, with the same cold-validation
items held out of training and its softmax, and early-stopped on the same warm-target users
of the same stopping slice, so the three columns differ only in the model.
"""

from __future__ import annotations

import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.events import item_text
from core.settings import Settings
from core.tables import items
from models.aligner import FrozenLM
from models.sasrec import SASRec, SASRecConfig
from training.recommender import train_scorer, validator
from training.variants import text_table
from updater.retrain import TrainingData, group_ndcg, mean_or_none, train_config, training_data


def figures(ndcg: dict[str, float | None]) -> str:
    """ "all / warm / cold" NDCG@10 (``-`` where a group has no users)."""
    return " / ".join("-" if ndcg[k] is None else f"{ndcg[k]:.4f}" for k in ("all", "warm", "cold"))


def measure(model, data: TrainingData, device: torch.device) -> dict[str, float | None]:
    """NDCG@10 of a model on the promotion users: all, warm-target and cold-target."""
    return {g: mean_or_none(per_user) for g, per_user in group_ndcg(model, data, device).items()}


def baselines(
    engine: Engine, record: dict, settings: Settings, lm: FrozenLM
) -> dict[str, dict[str, float | None]]:
    """{"id": ..., "text": ...} each as ``measure`` gives it, trained on the data of the
    retrain that made ``record`` (its aligner version and cold-validation items)."""
    aligner_version = record["aligner_version"]
    settings = settings.override(composite_content=record.get("content", "said"))  # the rows it read
    data = training_data(engine, aligner_version, settings, record["known_through"])
    device = lm.device
    with engine.connect() as conn:
        rows = conn.execute(select(items.c.idx, items.c.title, items.c.description)).all()
    texts = [""] * data.table.shape[0]  # by index; 0 is padding
    for idx, title, description in rows:
        if idx < len(texts):
            texts[idx] = item_text(title, description)
    cache = settings.data_dir / f"demo-text-{aligner_version}.pt"
    table = text_table(lm, texts[1:], cache, progress=False)  # (N+1, H)
    warm_ids = torch.tensor(sorted(set(range(1, len(texts))) - data.cold))
    warm_stop = data.split(data.stopping)[0]
    out = {}
    for name in ("id", "text"):
        torch.manual_seed(settings.scorer.seed)  # as the composite's teacher: `id` is that model
        config = SASRecConfig(n_items=len(texts) - 1)
        model = SASRec(config) if name == "id" else SASRec(config, table, standardise_on=warm_ids)
        model, _ = train_scorer(
            model,
            data.train,
            validator(warm_stop, device),
            train_config(settings),
            device,
            progress=True,
            blocked=sorted(data.cold),
        )
        out[name] = measure(model, data, device)
    return out
