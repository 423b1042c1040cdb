"""The aligner bundle: what the streaming worker needs to align fresh items.

Written by ``said aligner train`` (full alignment) and read by ``said worker run``. It holds the frozen
projector and table, the ridge map from pooled text features to rows (the fresh-item
estimator), the catalogue's fidelity (whose token accuracy is the bar fresh items are
refined to) and the reference cohort put through the fresh-item path (the denominator of
the drift ratio).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.files import CorruptFile, load_torch, save_torch
from models.aligner import AlignerConfig, ItemAligner


@dataclass
class AlignerBundle:
    version: str
    aligner: ItemAligner
    ridge: torch.Tensor  # (H+1, d): [pooled text feature, 1] -> item row
    prompt: str
    history: list[dict] = field(default_factory=list)  # one record per alignment pass
    fidelity: dict = field(default_factory=dict)  # catalogue cohort (no per-item lists)
    reference: dict = field(default_factory=dict)  # fresh-path cohort, with per-item "losses"
    adapters: dict = field(default_factory=dict)  # LoRA weights of the LLM (empty: frozen LLM)
    lora_rank: int = 0

    @property
    def reference_loss(self) -> float:
        """Mean loss of the reference cohort: the denominator of the drift ratio."""
        return self.reference["mean_loss"]

    @property
    def reference_losses(self) -> list[float]:
        return self.reference["losses"]

    @property
    def target_accuracy(self) -> float:
        """Token accuracy a fresh item is refined to: the catalogue's."""
        return self.fidelity["mean_token_accuracy"]

    def save(self, folder: Path) -> Path:
        path = folder / f"aligner-{self.version}.pt"
        save_torch(
            {
                "version": self.version,
                "config": asdict(self.aligner.cfg),
                "aligner": {k: v.cpu() for k, v in self.aligner.state_dict().items()},
                "ridge": self.ridge.cpu(),
                "prompt": self.prompt,
                "history": self.history,
                "fidelity": self.fidelity,
                "reference": self.reference,
                "adapters": self.adapters,
                "lora_rank": self.lora_rank,
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: Path, device: torch.device) -> AlignerBundle:
        saved = load_torch(path)
        if "fidelity" not in saved:
            raise ValueError(f"{path} is an aligner bundle of an older format: run `said aligner train` once")
        try:
            aligner = ItemAligner(AlignerConfig(**saved["config"]))
            aligner.load_state_dict(saved["aligner"])
        except (KeyError, TypeError, RuntimeError) as exc:  # a whole file of another kind
            raise CorruptFile(f"{path}: not an aligner bundle ({type(exc).__name__}: {exc})") from exc
        aligner.requires_grad_(False)
        return cls(
            saved["version"],
            aligner.to(device),
            saved["ridge"],
            saved["prompt"],
            saved["history"],
            saved["fidelity"],
            saved["reference"],
            saved["adapters"],
            saved["lora_rank"],
        )
