"""An evaluation diagnostic: the composite's ID side for items with clicks, and for items
without, the text scorer's own two towers (its query over the history, its item vector from
pooled text) instead of the composite's student.

Why: on a third beauty-2k draw the plain text scorer found cold targets 16x better than the
composite (0.142 against 0.0087 NDCG@10): half its hits were one brand's held-out line,
bought after the same brand's items. Pooled text carries the brand; a student that maps
text into the ID teacher's space loses it. This asks whether scoring cold items with the
text scorer itself, on the composite's gate and a boost, keeps the warm side and reaches
text on the cold one. Each scorer's scores are first put on log-probabilities (its
log-softmax over the items it scores: ``log_probs``), then each item's score is

    g_i * (u_id . e_i - Z_id(u)) + (1 - g_i) * (u_text . t_i - Z_text(u) + boost)

with Z each side's log-normaliser for this user. Z_id(u) is the same for every item, so
a ranking needs only their difference, per user: the score is still one inner product of
concatenated vectors ([g e ; (1 - g) t ; 1 - g] and [u_id ; u_text ; Z_id - Z_text +
boost]), so it could be served from one FAISS index (each query then also needs its two
log-normalisers over the catalogue); it is not served yet.
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
        u = c.user_vector(seqs)[:, : c.teacher.cfg.hidden]  # (B, h) the teacher query
        rows = torch.zeros(len(g), u.shape[1], device=u.device)
        n = min(len(g) - 1, c.teacher.cfg.n_items)
        rows[1 : n + 1] = c.teacher.item_vectors()[1 : n + 1]  # (N+1, h) ID rows, 0 where none
        scored = g > 0  # (N+1,) items the ID side scores: trained ones, not blocked
        if blocked is not None:
            scored[blocked] = False  # both sides normalise over the items that can rank
        warm = log_probs(u @ rows.T, scored)  # (B, N+1) log P_id(i | history), 0 elsewhere
        cold = log_probs(self.text.predict(seqs, blocked)) + self.boost  # log P_text(i | history)
        blend = g * warm + (1 - g) * cold
        return torch.where(g == 1, warm.masked_fill(torch.isinf(cold), float("-inf")), blend)


def log_probs(scores: torch.Tensor, over: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N+1) scores -> each user's log-softmax over the items ``over`` (default: every
    item whose score is finite), 0 elsewhere outside ``over``; -inf stays -inf (a row
    with no finite score would be NaN: a history always leaves some item to rank).

    Why: both scorers are trained by full-softmax cross-entropy, so their log-softmax is
    each one's estimate of log P(next item | history), a scale they share. Moving text
    scores to the mean and spread of the ID scores (tried first) matched the bulk of the
    catalogue, not the top of a user's list, and its boost sat at the grid's edge. Per user
    it is one offset (the two log-normalisers' difference), so the score stays one inner
    product: the offset goes in the boost slot."""
    if over is None:
        return torch.log_softmax(scores, 1)
    out = torch.log_softmax(scores.masked_fill(~over, float("-inf")), 1)
    return out.masked_fill(~over, 0.0)
