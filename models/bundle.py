"""The aligner bundle: what the streaming worker needs to align fresh items.

Written by ``said align`` (full alignment) and read by ``said update``. It holds the frozen
projector and table, the ridge map from pooled text features to rows (the fresh-item
estimator), and the reference loss of aligned items (the denominator of the drift ratio).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.files import save_torch
from models.aligner import AlignerConfig, ItemAligner


@dataclass
class AlignerBundle:
    version: str
    aligner: ItemAligner
    ridge: torch.Tensor  # (H+1, d): [pooled text feature, 1] -> item row
    reference_loss: float  # mean per-item loss of the fully aligned items
    prompt: str
    history: list[float] = field(default_factory=list)  # mean loss per alignment pass
    reference_losses: list[float] = field(default_factory=list)  # per aligned item

    def save(self, folder: Path) -> Path:
        path = folder / f"aligner-{self.version}.pt"
        save_torch(
            {
                "version": self.version,
                "config": asdict(self.aligner.cfg),
                "aligner": {k: v.cpu() for k, v in self.aligner.state_dict().items()},
                "ridge": self.ridge.cpu(),
                "reference_loss": self.reference_loss,
                "prompt": self.prompt,
                "history": self.history,
                "reference_losses": self.reference_losses,
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: Path, device: torch.device) -> AlignerBundle:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        aligner = ItemAligner(AlignerConfig(**saved["config"]))
        aligner.load_state_dict(saved["aligner"])
        aligner.requires_grad_(False)
        return cls(
            saved["version"],
            aligner.to(device),
            saved["ridge"],
            saved["reference_loss"],
            saved["prompt"],
            saved.get("history", []),
            saved.get("reference_losses", []),
        )
