"""Session fixtures with real LLM parts: the SmolLM2 tokenizer (converted once from the
GGUF) and a tiny random-weight model folder around it, fast enough for worker tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.llm import default_gguf, resolve_llm_folder


@pytest.fixture(scope="session")
def llm_cache(tmp_path_factory) -> Path:
    return Path(tmp_path_factory.getbasetemp()) / "llm"


@pytest.fixture(scope="session")
def smollm_folder(llm_cache) -> Path:
    try:
        default_gguf()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return resolve_llm_folder(None, llm_cache)


@pytest.fixture(scope="session")
def tiny_hf_folder(smollm_folder, tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer with a 2-layer, 64-wide random model: an HF folder."""
    out = Path(tmp_path_factory.mktemp("tiny-hf"))
    write_tiny_llama(AutoTokenizer.from_pretrained(smollm_folder), out)
    return out


def write_tiny_llama(tok, out: Path) -> None:
    """A 2-layer, 64-wide random Llama around ``tok`` (seeded), saved with it into ``out``:
    real tokenization at a fraction of the real model's cost (tests and benchmark smokes)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
