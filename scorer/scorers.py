"""How the scorer turns SAID vectors into index vectors and a history into a query.

Two scorers share one small interface (``version``, ``dim``, ``item_vectors``, ``query``):
- ``SASRecScorer``: a trained SASRec over the frozen SAID table. An item's index vector is
  the adapter applied to its SAID vector, so a fresh item gets one the moment the worker
  writes its first estimate, with no retraining; a query is the sequence encoder's last
  state. Scores are the model's own logits.
- ``CosineScorer``: until a scorer version is promoted (a new platform with no clicks yet),
  items rank by cosine similarity between their SAID vectors and the history's mean.
"""

from __future__ import annotations

import numpy as np
import torch

from models.sasrec import SASRec


def normalise(v: np.ndarray) -> np.ndarray:
    """Unit-length rows (cosine similarity as an inner product)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class CosineScorer:
    def __init__(self, aligner_version: str, dim: int) -> None:
        self.version, self.dim = f"cosine-{aligner_version}", dim

    def item_vectors(self, said: np.ndarray) -> np.ndarray:
        return normalise(said.astype(np.float32))  # (n, D)

    def query(self, history: np.ndarray) -> np.ndarray:
        return normalise(history.mean(0, keepdims=True))  # (T, D) -> (1, D)


class SASRecScorer:
    """A trained scorer behind the ``Recommender`` seam (``SASRec`` today)."""

    def __init__(self, model: SASRec, version: str) -> None:
        self.model, self.version, self.dim = model.eval(), version, model.cfg.hidden

    @torch.inference_mode()
    def item_vectors(self, said: np.ndarray) -> np.ndarray:
        return self.model.content_vectors(torch.from_numpy(said.astype(np.float32))).numpy()  # (n, h)

    @torch.inference_mode()
    def query(self, history: np.ndarray) -> np.ndarray:
        return self.model.query(torch.from_numpy(history)[None]).numpy()  # (T, h) -> (1, h)
