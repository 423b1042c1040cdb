"""A 30-second check of every torch code path on the device (tiny random LLM).

Run first on a lent GPU so that an API or dtype problem shows before the long run.
"""

from __future__ import annotations

import time

import torch

from models.llm import pick_device
from models.said import AlignerConfig, FreshRows, ItemAligner, Prefix, tokenize_texts
from models.sasrec import SASRec, SASRecConfig
from tests.tiny import CharTokenizer, tiny_llm
from training.align import AlignConfig, fidelity, refine_fresh, train_full
from training.scorer import ScorerTrainConfig, evaluate, train_scorer

t0 = time.time()
dev = pick_device("auto")
tok, llm = CharTokenizer(), tiny_llm().to(dev)
if dev.type == "cuda":
    llm = llm.to(torch.bfloat16)
titles = ["rose lip balm", "argan oil shampoo", "matte lipstick", "nail file"] * 4
tokens = tokenize_texts(tok, titles)
al = ItemAligner(AlignerConfig(n_items=len(titles), hidden=32, item_dim=16, k=1)).to(dev)
idx = list(range(1, len(titles) + 1))
h = train_full(al, llm, Prefix(tok), tokens, idx, AlignConfig(epochs=3, batch_size=4), dev, 2,
               None, progress=False)  # fmt: skip
print("align history", h)
print("fidelity", {k: v for k, v in fidelity(al.soft_tokens, llm, Prefix(tok), tokens, idx, dev,
                   2, 2).items() if k.startswith(("mean", "exact"))})  # fmt: skip
fresh = FreshRows(al.projector, torch.randn(4, 16, device=dev))
print("refine", refine_fresh(fresh, llm, Prefix(tok), tokens[:4], dev, 2, epochs=2, batch_size=2))
seqs = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [7, 8, 9, 10, 11]] * 10
m = SASRec(SASRecConfig(n_items=16, max_len=8), al.item_vectors().float())
m, info = train_scorer(m, seqs, ([[1, 2, 3]], [4]), ScorerTrainConfig(epochs=2, eval_every=1),
                       dev, progress=False)  # fmt: skip
print("scorer", info, evaluate(m, [[1, 2, 3]], [4], dev))
print(f"smoke ok on {dev} in {time.time() - t0:.1f}s")
