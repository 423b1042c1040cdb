"""LoRA as an option: ``SAID_LORA_RANK`` adapts the LLM during ``said align``, the bundle
carries the adapters, and the worker loads them frozen (fresh items never change the LLM)."""

from __future__ import annotations

import torch

from core.catalogue import load_embeddings
from core.db import make_engine
from core.settings import Settings
from models.llm import adapter_state, load_adapter_state, lora_rank_of
from said.migrate import upgrade
from tests.support.catalogue import add_items, tiny_lm, tiny_settings
from updater.full_align import align_catalogue
from updater.worker import UpdateWorker


def test_lora_adapters_are_trained_saved_and_loaded_frozen(tmp_path, tiny_hf_folder):
    url = f"sqlite:///{tmp_path}/said.db"
    upgrade(url)
    engine = make_engine(url)
    add_items(engine, 0, 12)
    rank = Settings(lora_rank=4).align.lora_rank
    lm = tiny_lm(tiny_hf_folder, tmp_path, lora_rank=rank)
    llm = lm.model
    assert lora_rank_of(llm) == 4
    untouched = adapter_state(llm)
    settings = tiny_settings(tmp_path, url, lora_rank=rank, align_epochs=2, align_batch=6, soft_tokens=2)
    bundle = align_catalogue(engine, lm, settings, progress=False)
    assert bundle.lora_rank == 4 and bundle.adapters.keys() == untouched.keys()
    assert any(not torch.equal(bundle.adapters[n], untouched[n]) for n in untouched), "LoRA was trained"
    assert not any(p.requires_grad for p in llm.parameters()), "frozen once aligned"

    # the worker's LLM: a fresh load with the bundle's rank and adapters gives the same model
    worker_lm = tiny_lm(tiny_hf_folder, tmp_path, lora_rank=bundle.lora_rank)
    worker_llm = worker_lm.model
    load_adapter_state(worker_llm, bundle.adapters)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(worker_llm(ids).logits, llm(ids).logits, atol=1e-5)
    add_items(engine, 12, 3)
    UpdateWorker(engine, bundle, worker_lm, settings.override(worker_batch=3, refine_epochs=2)).run(
        idle_exit=0.3
    )
    assert all(torch.equal(v, bundle.adapters[n]) for n, v in adapter_state(worker_llm).items())
    with engine.connect() as conn:
        ids_, vecs = load_embeddings(conn, bundle.version)
    assert len(ids_) == 15 and vecs.shape[1] == 2 * 64  # k=2 soft tokens of the 64-wide LLM
