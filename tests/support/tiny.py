"""A tiny random Llama and a character tokenizer, for fast unit tests of the SAID code."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


class CharTokenizer:
    """Characters -> ids; '<|im_start|>' and '<|im_end|>' are special tokens 1 and 2."""

    specials = {"<|im_start|>": 1, "<|im_end|>": 2}
    eos_token_id = pad_token_id = 2
    eos_token = pad_token = "<|im_end|>"

    def __call__(self, texts, add_special_tokens=False, **_):
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        ids = [[self.specials[t]] if t in self.specials else [3 + (ord(c) % 90) for c in t] for t in texts]
        return {"input_ids": ids[0] if single else ids}

    def decode(self, ids):
        return "".join(chr(i - 3 + 32) for i in ids if i > 2)


def tiny_llm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model
