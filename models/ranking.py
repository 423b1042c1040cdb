"""Ranking metrics for leave-one-out evaluation with one target per user."""

from __future__ import annotations

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items: (B, N) scores, (B,) targets -> (B,).

    Ties count against the target (pessimistic), so a constant scorer ranks every target
    last instead of first.
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
    return (scores >= target_scores).sum(1) - 1


def recall_ndcg(ranks: torch.Tensor, ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    """Recall@k (= HR@k with one target), NDCG@k = 1/log2(rank+2) when rank < k, and the
    mean reciprocal rank over the whole ranking (``mrr``: every rank counts, so it moves
    where few targets reach the top 10)."""
    ranks = ranks.float()
    out = {"mrr": (1 / (ranks + 1)).mean().item()}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = hit.float().mean().item()
        out[f"ndcg@{k}"] = (hit.float() / torch.log2(ranks + 2)).mean().item()
    return out


def masked_scores(users: torch.Tensor, items: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """(B, h) queries x (N+1, h) item vectors -> (B, N+1) inner products, with padding
    (row 0) and ``blocked`` ids at -inf so that they never rank."""
    scores = users @ items.T
    scores[:, 0] = float("-inf")
    if blocked is not None:
        scores[:, blocked] = float("-inf")
    return scores
