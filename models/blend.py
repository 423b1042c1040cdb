"""An evaluation diagnostic: the composite's ID side for items with clicks, and for items
without, the text scorer's own two towers (its query over the history, its item vector from
pooled text) instead of the composite's student.

Why: on a third beauty-2k draw the plain text scorer found cold targets 16x better than the
composite (0.142 against 0.0087 NDCG@10): half its hits were one brand's held-out line,
bought after the same brand's items. Pooled text carries the brand; a student that maps
text into the ID teacher's space loses it. This asks whether scoring cold items with the
text scorer itself, on the composite's gate and a boost, keeps the warm side and reaches
text on the cold one. Each item's score is

    g_i * (u_id . e_i) + (1 - g_i) * (u_text . t_i + boost)

which is still one inner product of concatenated vectors ([g e ; (1 - g) t ; 1 - g] and
[u_id ; u_text ; boost]), so it could be served from one FAISS index; it is not served yet.
"""

from __future__ import annotations

import torch
from torch import nn

from models.composite import Composite
from models.sasrec import SASRec


class Blend(nn.Module):
    def __init__(self, composite: Composite, text: SASRec) -> None:
        """``composite``: a trained composite (its teacher, gate and student, which still
        reads cold items in a history). ``text``: a trained text SASRec on the same items."""
        super().__init__()
        self.composite, self.text = composite, text
        self.cfg = composite.cfg  # the history length a query reads
        self.register_buffer("boost", torch.tensor(0.0, device=composite.counts.device))

    def predict(self, seqs: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) left-padded ids -> (B, N+1) scores; padding and ``blocked``: -inf."""
        c = self.composite
        g = c.gate().squeeze(1)  # (N+1,) weight of the ID side
        u = c.user_vector(seqs)[:, :-1]  # (B, h) the teacher's query (cold history items: student)
        rows = torch.zeros(len(g), u.shape[1], device=u.device)
        n = min(len(g) - 1, c.teacher.cfg.n_items)
        rows[1 : n + 1] = c.teacher.item_vectors()[1 : n + 1]  # (N+1, h) ID rows, 0 where none
        warm = u @ rows.T  # (B, N+1)
        text = self.text.predict(seqs, blocked)  # (B, N+1), -inf where masked
        cold = self.on_scale_of(text, warm, g > 0) + self.boost
        blend = g * warm + (1 - g) * cold
        return torch.where(g == 1, warm.masked_fill(torch.isinf(cold), float("-inf")), blend)

    @staticmethod
    def on_scale_of(text: torch.Tensor, warm: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
        """(B, N+1) text scores moved, per user, to the mean and spread of that user's ID
        scores over the ``trained`` items: the two scorers' logits have their own scales,
        and a boost alone (an offset) chose the grid's edge. Per user it is one scale and
        one offset, so the score stays one inner product (a scaled text query, and the
        offset in the boost slot)."""
        real = ~torch.isinf(text)  # (B, N+1)
        t = text.masked_fill(~real, 0.0)
        n_t = real.sum(1, keepdim=True).clamp(min=1)
        mean_t = t.sum(1, keepdim=True) / n_t
        std_t = ((t - mean_t).pow(2) * real).sum(1, keepdim=True).div(n_t).sqrt().clamp(min=1e-6)
        w = warm[:, trained]  # (B, W)
        mean_w, std_w = w.mean(1, keepdim=True), w.std(1, keepdim=True)
        return (text - mean_t) / std_t * std_w + mean_w  # -inf stays -inf
