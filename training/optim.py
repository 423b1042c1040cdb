"""Optimisers for item rows, and the learning-rate schedule of an alignment.

Why not ``torch.optim.SparseAdam`` for the rows: its bias correction counts *global* steps,
while each row is updated once per pass. After the first few batches the correction is ~1,
so a row's first update is ``lr * 0.1 g / sqrt(0.001 g^2) = 3.2 lr`` per coordinate and its
steps never shrink: the rows random-walk instead of converging. Both optimisers here count
what each row has seen:
- ``RowAdam``: Adam with one step counter per row (a row's first step is ``lr * sign(g)``);
- ``RowAdagrad``: torch's Adagrad on sparse gradients, whose accumulator is per row by
  construction, so a row's step shrinks as ``1 / sqrt(its updates)``.
"""

from __future__ import annotations

import math

import torch

ROW_OPTIMIZERS = ("rowadam", "adagrad", "sparseadam")


class RowAdam(torch.optim.Optimizer):
    """Adam for a sparse embedding table with per-row step counts (bias correction per row)."""

    def __init__(
        self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                    state["t"] = torch.zeros(p.shape[0], device=p.device)
                g = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1).coalesce()
                rows, vals = g.indices()[0], g.values()  # (R,), (R, d)
                t = state["t"][rows] + 1
                state["t"][rows] = t
                m = state["m"][rows].mul_(b1).add_(vals, alpha=1 - b1)
                v = state["v"][rows].mul_(b2).addcmul_(vals, vals, value=1 - b2)
                state["m"][rows], state["v"][rows] = m, v
                m_hat = m / (1 - b1**t).unsqueeze(1)
                v_hat = v / (1 - b2**t).unsqueeze(1)
                p[rows] -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def row_optimizer(name: str, params, lr: float, sparse_grads: bool = True) -> torch.optim.Optimizer:
    """The optimiser of the item rows, by name (``ROW_OPTIMIZERS``). ``sparse_grads``: the
    rows are an ``nn.Embedding(sparse=True)``; fresh rows are a dense parameter, which
    SparseAdam refuses, so there it falls back to its per-row-step equivalent."""
    if name == "rowadam" or (name == "sparseadam" and not sparse_grads):
        return RowAdam(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "sparseadam":  # kept as the measured baseline; see the module docstring
        return torch.optim.SparseAdam(params, lr=lr)
    raise ValueError(f"unknown row optimizer {name!r}; choose one of {ROW_OPTIMIZERS}")


def lr_factor(progress: float, warmup: float, final: float) -> float:
    """Rate multiplier at ``progress`` (0..1 of the run): linear warm-up over the first
    ``warmup`` of it, then cosine decay from 1 to ``final``."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    rest = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * rest))


def batch_scaled_lr(lr: float, batch_size: int, reference_batch: int = 16) -> float:
    """Square-root scaling of a shared parameter's rate with the batch size: a rate tuned
    at batch 16 stays right at 512, where a pass has 32x fewer steps."""
    return lr * math.sqrt(batch_size / reference_batch)
