"""``said demo``: the pipeline on the embedded defaults, end to end as far as it is built.

Today: embedded broker -> topics -> replay a slice of the data set -> consume items and
interactions into the catalogue (SQLite by default) -> summary. Alignment, the updater and
the scorer API join here as they land (issues 4 and 5).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop
from models.data import load_dataset
from said.broker import EmbeddedBroker, ensure_topics, free_port
from said.catalogue import count_rows
from said.db import make_engine
from said.migrate import upgrade
from said.produce import replay_dataset
from said.settings import Settings
from said.tables import interactions, items

log = logging.getLogger(__name__)
DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/data/amazon-beauty"


def run_demo(settings: Settings, dataset: Path, n_items: int) -> dict[str, object]:
    """Run the pipeline once and return the summary it prints."""
    ds = load_dataset(dataset, n_items)
    summary: dict[str, object] = {"dataset": str(dataset), "items in slice": len(ds.item_ids),
                                  "interactions in slice": ds.n_interactions}  # fmt: skip
    with EmbeddedBroker(free_port()) as broker:
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap,
                                               "session_timeout_ms": 2000})  # fmt: skip
        ensure_topics(settings.kafka_config())
        upgrade(settings.database_url)
        t0 = time.perf_counter()
        replay_dataset(settings.kafka_config(), ds)
        summary["produce seconds"] = round(time.perf_counter() - t0, 2)
        engine = make_engine(settings.database_url)
        for handler in (ItemsHandler(settings), InteractionsHandler(settings)):
            t0 = time.perf_counter()
            stats = ConsumeLoop(handler, engine, settings).run(idle_exit=2.0)
            summary[f"{handler.name}: stored / dead-lettered"] = (
                f"{stats.stored} / {stats.dead_lettered}"
            )
            summary[f"{handler.name}: consume seconds"] = round(time.perf_counter() - t0, 2)
        with engine.connect() as conn:
            summary["catalogue items"] = count_rows(conn, items)
            summary["catalogue interactions"] = count_rows(conn, interactions)
    summary["database"] = settings.redacted()["database_url"]
    return summary


def format_summary(summary: dict[str, object]) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in summary.items())
