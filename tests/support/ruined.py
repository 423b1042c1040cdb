"""A retrain whose training went wrong: what the promotion guard must refuse.

The composite's candidate is its teacher and its student together, and on the tests' small
catalogues a student alone, mixed in by the gate, can rank as well as the active scorer. So
a ruined candidate has both replaced by noise, after the student's choice is made."""

from __future__ import annotations

import pytest
import torch

from updater import retrain


def _noise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 5)


def ruin_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every later retrain's teacher and student come out as noise."""
    train_student = retrain.train_student

    def ruined_teacher(model, *_a, **_k):
        _noise(model)
        return model, {"epochs": 1, "best_val_ndcg@10": 0.0}

    def ruined_student(composite, *a, **k):
        composite, info = train_student(composite, *a, **k)
        _noise(composite.student)
        return composite, info

    monkeypatch.setattr(retrain, "train_scorer", ruined_teacher)
    monkeypatch.setattr(retrain, "train_student", ruined_student)
