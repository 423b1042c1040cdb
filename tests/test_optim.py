"""Row optimisers: a row updated once per pass must take shrinking steps to settle.

The toy: 256 rows start near their targets (as text-initialised rows do) and are pulled to
them by a quadratic loss, 16 rows a step, so each row is updated once per pass, as in an
alignment. A row is "accurate" when every coordinate is within 0.05 of its target.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.settings import AlignSettings
from training.optim import lr_factor, row_optimizer


def toy_accuracy(name: str, lr: float, final: float, passes: int = 20, n: int = 256, d: int = 8) -> float:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(n + 1, d, generator=g)
    rows = nn.Embedding(n + 1, d, sparse=True)
    with torch.no_grad():
        rows.weight.copy_(target + 0.3 * torch.randn(n + 1, d, generator=g))
    opt = row_optimizer(name, list(rows.parameters()), lr)
    for p in range(passes):
        order = torch.randperm(n, generator=g) + 1
        for s in range(0, n, 16):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor((p + s / n) / passes, 0.0, final)
            idx = order[s : s + 16]
            loss = 0.5 * ((rows(idx) - target[idx]) ** 2).sum() / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    err = (rows.weight[1:] - target[1:]).abs().max(1).values
    return (err < 0.05).float().mean().item()


def test_the_default_row_optimiser_settles_rows():
    defaults = AlignSettings()
    acc = toy_accuracy(defaults.row_optimizer, defaults.lr_rows, defaults.lr_final)
    assert acc >= 0.95


def test_sparse_adam_does_not_settle_rows():
    # main's optimiser before this change: bias correction by the global step, so a row's
    # first update is 3.2 x lr per coordinate and its steps never shrink
    assert toy_accuracy("sparseadam", 0.2, 1.0) < 0.1


def test_row_adam_counts_steps_per_row():
    w = nn.Embedding(5, 2, sparse=True)
    opt = row_optimizer("rowadam", list(w.parameters()), 0.1)
    before = w.weight.detach().clone()
    w(torch.tensor([1, 2])).sum().backward()
    opt.step()
    step = (w.weight - before).detach()
    assert torch.allclose(step[1:3], torch.full((2, 2), -0.1), atol=1e-6), "first step of a row: lr * sign"
    assert torch.equal(step[[0, 3, 4]], torch.zeros(3, 2)), "rows not in the batch do not move"
    assert opt.state[w.weight]["t"].tolist() == [0, 1, 1, 0, 0]


def test_unknown_row_optimiser_is_a_clear_error():
    with pytest.raises(ValueError, match="rowadam"):
        row_optimizer("sgd2", [nn.Parameter(torch.zeros(2))], 0.1)
