"""The seam between a sequential scorer and what uses it: one small interface.

Serving (``scorer/scorers.py``), retraining (``updater/retrain.py``) and evaluation
(``training/recommender.py``) call only these methods, so a second item tower (a
warm/cold composite beside ``SASRec``) plugs in by implementing them. Every score is an
inner product of a query vector and an item vector, which is what a FAISS index searches.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Shape(Protocol):
    hidden: int  # width of item and query vectors
    max_len: int  # longest history a query reads


class Recommender(Protocol):
    cfg: Shape

    def eval(self) -> Recommender:
        """Inference mode (no dropout), as ``nn.Module.eval``."""
        ...

    def item_vectors(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of catalogue items ``idx`` (any shape), or of all: (N+1, h)."""
        ...

    def content_vectors(self, content: torch.Tensor) -> torch.Tensor:
        """(n, D) content vectors (SAID rows, also of items it never trained on) -> (n, h):
        what a fresh item is indexed with the moment its first estimate exists."""
        ...

    def query(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T, h) item vectors of histories, oldest first, no padding -> (B, h)."""
        ...

    def predict(self, seqs: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) left-padded item ids -> (B, N+1) scores of every item (padding, ``blocked``: -inf)."""
        ...
