"""Train the composite's student (models/composite.py) against a trained ID teacher.

The teacher is fixed. Its encoder's state at every step of every training history is a
user (a query); on warm items (those with training interactions) the student is trained so
that, for these queries, it scores as the teacher's ID rows score, with two terms after
ALDI (Huang et al., SIGIR 2023):

- **score distribution**: KL(softmax(u . e / tau) || softmax(u . s(c) / tau)) over the warm
  items, tau^2-scaled: the student's scores get the teacher's scale and shape, which is
  what calibrates cold items against warm ones in one ranking;
- **embedding**: the mean squared distance of each warm item's student vector to its ID row.

Early stopping, and the gate's ``kappa``, maximise the composite's NDCG@10 on the mixed
validation users (warm and cold-validation targets together), never test.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.settings import CompositeSettings
from models.composite import Composite
from training.recommender import Validate, left_pad

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_states(composite: Composite, train_seqs: list[list[int]], batch_size: int = 512) -> torch.Tensor:
    """(M, h) the teacher's query at every step of every training history (its own ID rows,
    as it trained): the queries the student learns to answer as the teacher does."""
    teacher, states = composite.teacher.eval(), []
    seqs = [s[:-1] for s in train_seqs if len(s) >= 2]
    for s in range(0, len(seqs), batch_size):
        batch = left_pad(seqs[s : s + batch_size], teacher.cfg.max_len).to(composite.counts.device)  # (B, L)
        feats = teacher.log2feats(batch)  # (B, L, h)
        states.append(feats[batch > 0])  # (n, h), real steps only
    return torch.cat(states) if states else torch.zeros(0, teacher.cfg.hidden)


def train_student(
    composite: Composite,
    train_seqs: list[list[int]],
    validate: Validate,
    cfg: CompositeSettings,
    device: torch.device,
    progress: bool = True,
    stop: Validate | None = None,
) -> tuple[Composite, dict]:
    """Fit the student (seeded by the caller), keep its best state on ``stop`` (default
    ``validate``), then pick the gate's kappa (``cfg.gate_kappas``) and the cold boost
    (``cfg.boosts``) together on ``validate``.

    The mixed protocol stops on its cold-validation users (a part of the mixed validation):
    the student's vectors are what cold items are ranked by, and on the whole mixed set,
    95% warm targets, it stopped after a few epochs with cold items still buried.

    Returns the composite and {best_val_ndcg@10, student_epochs, kappa,
    boost, val_by_choice}."""
    composite.to(device)
    warm = (composite.counts > 0).nonzero().squeeze(1)
    warm = warm[warm > 0]  # (W,) item ids with interactions
    states = teacher_states(composite, train_seqs).to(device)  # (M, h)
    with torch.no_grad():
        rows = composite.teacher.item_vectors()[warm]  # (W, h) the ID rows to match
    opt = torch.optim.Adam(composite.student.parameters(), lr=cfg.lr)
    composite.kappa.fill_(0.0)  # trained and stopped with the hard switch and no boost; both
    composite.boost.fill_(0.0)  # are picked after, on validation
    best, best_state, bad, epochs = -1.0, None, 0, 0
    bar = tqdm(range(cfg.epochs), desc="train student", disable=not progress)
    for _ in bar:
        epochs += 1
        composite.train()
        total = 0.0
        for b in torch.randperm(len(states), device=device).split(cfg.batch_size):
            student = composite.student_vectors()[warm]  # (W, h)
            loss = cfg.align_weight * F.mse_loss(student, rows, reduction="none").sum(1).mean()
            if cfg.rank_weight:
                teacher_logp = F.log_softmax(states[b] @ rows.T / cfg.tau, 1)  # (B, W)
                student_logp = F.log_softmax(states[b] @ student.T / cfg.tau, 1)
                kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")
                loss = loss + cfg.rank_weight * cfg.tau**2 * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        ndcg = (stop or validate)(composite.eval())
        bar.set_postfix(loss=f"{total / max(1, len(states)):.4f}", val_ndcg10=f"{ndcg:.4f}")
        if ndcg > best:
            best, best_state, bad = ndcg, copy.deepcopy(composite.student.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        composite.student.load_state_dict(best_state)
    by_choice = {}
    for kappa in cfg.gate_kappas:
        for boost in cfg.boosts:
            composite.kappa.fill_(kappa)
            composite.boost.fill_(boost)
            by_choice[(kappa, boost)] = validate(composite.eval())
    # ties: the simpler choice (harder switch, the boost nearest 0: with no cold user every
    # boost ties, and the most negative would bury every fresh item served later)
    kappa, boost = max(by_choice, key=lambda c: (by_choice[c], -c[0], -abs(c[1])))
    composite.kappa.fill_(kappa)
    composite.boost.fill_(boost)
    log.info(
        "student: %d epochs, kappa %s, boost %s, validation NDCG@10 %.4f",
        epochs,
        kappa,
        boost,
        by_choice[(kappa, boost)],
    )
    info = {
        "best_val_ndcg@10": by_choice[(kappa, boost)],
        "student_epochs": epochs,
        "kappa": kappa,
        "boost": boost,
    }
    info["val_by_choice"] = {f"kappa={k},boost={b}": v for (k, b), v in by_choice.items()}
    return composite, info
