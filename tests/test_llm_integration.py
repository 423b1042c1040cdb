"""The real SmolLM2-135M on a slice of Beauty: alignment lowers the loss and rebuilds text
better than a random table. Loads the GGUF once per session (converted copy cached)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.dataset import load_dataset
from core.settings import AlignSettings
from models.aligner import AlignerConfig, FrozenLM, ItemAligner, tokenize_texts
from models.llm import load_llm, resolve_llm_folder
from training.align import fidelity, train_full

BEAUTY = Path(__file__).resolve().parents[2] / "shared/data/amazon-beauty"
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def smollm(smollm_folder, llm_cache):
    return load_llm(None, llm_cache, CPU)


def test_gguf_conversion_is_cached_and_reloads_fast(smollm, llm_cache):
    import time

    t0 = time.perf_counter()
    folder = resolve_llm_folder(None, llm_cache)
    load_llm(str(folder), llm_cache, CPU)
    assert (folder / "config.json").exists()
    assert time.perf_counter() - t0 < 5.0, "the cached copy must load without re-converting"


@pytest.mark.slow
def test_alignment_on_real_titles_beats_random_table(smollm):
    if not (BEAUTY / "items.tsv").exists():
        pytest.skip(f"{BEAUTY} not present")
    llm, tok = smollm
    titles = load_dataset(BEAUTY, limit_items=48).titles
    tokens = [t[:16] for t in tokenize_texts(tok, titles)]  # short texts keep CI fast
    cfg = AlignSettings(k=2, epochs=10, batch_size=16)  # the default rates, schedule, rows, prompt
    lm = FrozenLM.around(llm, tok, CPU, cfg.prompt)
    idx = list(range(1, len(titles) + 1))
    torch.manual_seed(0)
    shape = AlignerConfig(n_items=len(titles), hidden=lm.hidden, item_dim=cfg.item_dim, k=cfg.k)
    aligner = ItemAligner(shape)
    random_table = fidelity(aligner.soft_tokens, lm, tokens, idx, reconstruct=False)
    history = train_full(aligner, lm, tokens, idx, cfg, progress=False)
    aligned = fidelity(aligner.soft_tokens, lm, tokens, idx, reconstruct=False)
    assert history[-1]["loss"] < history[0]["loss"] * 0.8, history
    assert aligned["mean_loss"] < random_table["mean_loss"] - 0.5
    assert aligned["mean_token_accuracy"] > random_table["mean_token_accuracy"]
