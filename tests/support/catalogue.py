"""A small real catalogue for the updater, scorer and fault tests: items, users, and the
``aligned`` and ``served`` fixtures (a tiny real-tokenizer LLM aligned over it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from core.catalogue import insert_interactions, upsert_items
from core.db import make_engine
from core.events import InteractionEvent, ItemEvent
from core.settings import Settings
from core.tables import item_embeddings, items
from models.aligner import FrozenLM
from models.llm import load_llm
from scorer.state import ServingState
from updater.full_align import align_catalogue

POSITIVES = ("click", "conversion")  # the default training positives, for a ServingState
# an aligner's SAID vectors, not the text content its writers store beside them (kind "text")
SAID_ROWS = item_embeddings.c.kind != "text"

CPU = torch.device("cpu")
NAMES = [
    "rose lip balm",
    "argan oil shampoo",
    "matte red lipstick",
    "nail file set",
    "vitamin c face serum",
    "nude eye shadow palette",
    "hair clips",
    "sun cream spf 50",
]


def write_dataset(folder: Path) -> Path:
    """A data-set folder: 60 items of 8 kinds; 120 users who click 3-5 items of one kind, in order."""
    folder.mkdir()
    rows = [f"{i}\t{NAMES[i % 8]} model {i}" for i in range(1, 61)]
    (folder / "items.tsv").write_text("item_id\ttitle\n" + "\n".join(rows) + "\n")
    seqs = [f"{u} " + " ".join(str(i) for i in range(u % 8 + 1, 61, 8)[: 3 + u % 3]) for u in range(120)]
    (folder / "sequences.txt").write_text("\n".join(seqs) + "\n")
    return folder


def add_items(engine, start: int, n: int) -> None:
    now = datetime.now(UTC)
    evs = [ItemEvent(f"i{i}", f"{NAMES[i % 8]} no. {i}", None, None, now) for i in range(start, start + n)]
    with engine.begin() as conn:
        upsert_items(conn, evs, now)


def text_hashes(engine, idx: list[int]) -> list[str]:
    """The current text hashes of these items (what the worker writes with their vectors)."""
    with engine.connect() as conn:
        found = dict(conn.execute(select(items.c.idx, items.c.text_hash).where(items.c.idx.in_(idx))).all())
    return [found[i] for i in idx]


def tiny_settings(data_dir: Path, database_url: str = "sqlite://", **flat) -> Settings:
    """Settings of a tiny alignment (k=1, 16-wide rows, 2 passes of batch 8) under
    ``data_dir``; ``flat`` overrides by environment name (``worker_batch=2``)."""
    base = {"align_epochs": 2, "align_batch": 8, "soft_tokens": 1, "item_dim": 16, "device": "cpu"}
    return Settings(database_url=database_url, data_dir=data_dir, **(base | flat))


def tiny_lm(folder: Path, cache: Path, lora_rank: int = 0, prompt: str = " Item text:") -> FrozenLM:
    """The tiny real-tokenizer LLM of ``folder`` on the CPU."""
    model, tok = load_llm(str(folder), cache, CPU, lora_rank)
    return FrozenLM.around(model, tok, CPU, prompt)


@pytest.fixture
def aligned(db_url, tiny_hf_folder, tmp_path):
    """(engine, bundle, lm, settings, data dir) of 24 items aligned by the tiny LLM."""
    engine = make_engine(db_url)
    add_items(engine, 0, 24)
    settings = tiny_settings(tmp_path, db_url)
    lm = tiny_lm(tiny_hf_folder, tmp_path)
    bundle = align_catalogue(engine, lm, settings, progress=False)
    return engine, bundle, lm, settings, tmp_path


def add_users(engine, n_users: int = 30) -> None:
    """Users who click items of one product kind (item i has kind i % 8) in a row."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    evs, ids = [], {f"i{i}": i + 1 for i in range(24)}
    for u in range(n_users):
        for step, i in enumerate(range(u % 8, 24, 8)):
            evs.append(
                InteractionEvent(f"u{u}-{step}", f"u{u}", f"i{i}", "click", t0 + timedelta(minutes=step))
            )
    with engine.begin() as conn:
        insert_interactions(conn, evs, ids)


@pytest.fixture
def served(aligned):
    engine, bundle, _lm, settings, data = aligned
    add_users(engine)
    return engine, bundle, data, ServingState.for_bundle(engine, bundle, settings)
