"""How the scorer turns content rows (SAID vectors, or text features) into index vectors and
a history into a query.

Three scorers share one small interface (``version``, ``dim``, ``silent``, ``content``,
``item_vectors(ids, said)``, ``query``); ``silent`` is how many trailing index columns no
query meets, which the index stores beside its search structures (``scorer/index.py``);
``content`` is which of the aligner's rows it maps (``core.catalogue.content_version``):
its SAID vectors, or for a composite trained on them, the pooled text features stored beside them:
- ``CompositeScorer``: the warm/cold composite ``said scorer train`` trains and promotes. An item
  the teacher trained on is indexed with its gated vector (its ID row, mostly); any other
  item, a fresh one above all, with the student's vector of its content row (SAID, or
  text with ``SAID_COMPOSITE_CONTENT=text``), the moment the worker writes its first
  estimate, with no retraining. At the next promotion it graduates
  to its ID row, with no realignment. A query runs the teacher's encoder over the history's
  index vectors, so a fresh item in a history reads as its student vector.
- ``SASRecScorer``: the frozen-table SASRec that scorer versions before the composite are
  (served until a composite is promoted). An item's index vector is the adapter applied to
  its SAID vector; a query is the sequence encoder's last state.
- ``CosineScorer``: until a scorer version is promoted (a new platform with no clicks yet),
  items rank by cosine similarity between their SAID vectors and the history's mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.catalogue import CONTENTS
from core.files import load_torch
from models.composite import Composite, composite_from
from models.sasrec import SASRec, load_sasrec


def normalise(v: np.ndarray) -> np.ndarray:
    """Unit-length rows (cosine similarity as an inner product)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class CosineScorer:
    def __init__(self, aligner_version: str, dim: int) -> None:
        self.version, self.dim, self.silent = f"cosine-{aligner_version}", dim, 0
        self.content = "said"

    def item_vectors(self, ids: np.ndarray, said: np.ndarray) -> np.ndarray:
        return normalise(said.astype(np.float32))  # (n, D)

    def query(self, history: np.ndarray) -> np.ndarray:
        return normalise(history.mean(0, keepdims=True))  # (T, D) -> (1, D)


class SASRecScorer:
    """A trained frozen-table SASRec behind the ``Recommender`` seam."""

    def __init__(self, model: SASRec, version: str) -> None:
        self.model, self.version, self.dim = model.eval(), version, model.cfg.hidden
        self.silent, self.content = 0, "said"

    @torch.inference_mode()
    def item_vectors(self, ids: np.ndarray, said: np.ndarray) -> np.ndarray:
        return self.model.content_vectors(torch.from_numpy(said.astype(np.float32))).numpy()  # (n, h)

    @torch.inference_mode()
    def query(self, history: np.ndarray) -> np.ndarray:
        return self.model.query(torch.from_numpy(history)[None]).numpy()  # (T, h) -> (1, h)


class CompositeScorer(SASRecScorer):
    """The composite: an item's index vector depends on whether the teacher trained on it."""

    model: Composite

    def __init__(self, model: Composite, version: str, content: str = "said") -> None:
        super().__init__(model, version)
        self.silent = model.read_width()  # the history-read block: read back, never scored
        self.content = content  # what its student was trained on (a file from before: SAID)

    @torch.inference_mode()
    def item_vectors(self, ids: np.ndarray, said: np.ndarray) -> np.ndarray:
        rows = torch.from_numpy(said.astype(np.float32))
        return self.model.vectors_of(torch.from_numpy(np.asarray(ids, dtype=np.int64)), rows).numpy()


def load_scorer(path: Path, version: str) -> tuple[SASRecScorer, dict]:
    """The scorer of a saved version file, by its kind, and its metadata (``CorruptFile``,
    ``OSError`` or ``ValueError`` when it cannot be served)."""
    saved = load_torch(path)
    if isinstance(saved, dict) and saved.get("kind") == "composite":
        model, meta = composite_from(saved, str(path))
        content = meta.get("content", "said")
        if content not in CONTENTS:  # a file this code cannot serve: declined, reported
            raise ValueError(f"{path}: a student of unknown content {content!r}")
        return CompositeScorer(model, version, content), meta
    model, meta = load_sasrec(path)
    return SASRecScorer(model, version), meta
