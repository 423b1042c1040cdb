"""Train the composite's student (models/composite.py) against a trained ID teacher.

The teacher is fixed. Its encoder's state at every step of every training history is a
user (a query); on warm items (those with training interactions) the student is trained so
that, for these queries, it scores as the teacher's ID rows score, with three terms after
ALDI (Huang et al., SIGIR 2023):

- **score distribution**: KL(softmax(u . e / tau) || softmax(u . s(c) / tau)) over the warm
  items, tau^2-scaled: the student's scores get the teacher's scale and shape, which is
  what calibrates cold items against warm ones in one ranking;
- **embedding**: the mean squared distance of each warm item's student vector to its ID row;
- **supervised**: the cross-entropy of the item that came next, over the warm items scored
  by the student's vectors under the teacher's query. Distillation alone copies the
  teacher's rows, which on a long-tail catalogue are mostly noise (items seen a few times);
  the users' own next items are the signal the text scorer learns from, and it ranked cold
  items above a distil-only student.

The student early-stops on the cold-validation users (what its vectors are for), on the mean
of a few epochs' figures, and keeps the mean of those epochs' weights (``WindowStop``); the
gate's ``kappa``, the boost ``beta`` and the similarity weight ``gamma`` are then chosen on
the validation users split by target (``choose``), never on test.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.settings import CompositeSettings
from models.composite import Composite
from models.recommender import Recommender
from models.sasrec import SASRec
from training.mixed import ranks_and_top
from training.recommender import Validate, left_pad, validator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judges:
    """A student's validation users, split by target: warm-target ones and cold-validation
    ones (``cold`` None where there are too few), with their counts, so the mixed figure is
    the users' weighted mean of the two; what its early stopping maximises (``stop``,
    default ``cold``, else ``warm``); and the warm users' top 10 (``warm_tops``: a model ->
    (U, 10) items), whose share of items without interactions calibrates a choice that no
    cold user can judge (``choose``)."""

    warm: Validate
    cold: Validate | None
    n_warm: int
    n_cold: int
    stop: Validate | None = None
    warm_tops: Callable[[Recommender], torch.Tensor] | None = None

    def mixed(self, warm: float, cold: float) -> float:
        """NDCG@10 over all the validation users, from the two groups' figures."""
        return (self.n_warm * warm + self.n_cold * cold) / max(1, self.n_warm + self.n_cold)

    def stopping(self) -> Validate:
        """What the student's early stopping maximises."""
        return self.stop or self.cold or self.warm


Users = tuple[list[list[int]], list[int]]  # (histories, targets)


def judges_for(warm: Users, cold: Users, device: torch.device, min_cold: int = 1) -> Judges:
    """Judges from warm-target and cold-target validation users. Fewer than ``min_cold``
    cold users decide nothing (their figure is noise; a retrain passes
    ``retrain.min_group_users``, as its promotion guard does). The student stops on the
    cold users' mean reciprocal rank: on a long-tail catalogue (tail3k) their NDCG@10 sat
    near 0 from the first epoch, and stopping on it kept the student of epoch 1 of 7."""

    def tops(model: Recommender) -> torch.Tensor:
        return ranks_and_top(model, *warm, device)[1]

    if len(cold[1]) < max(1, min_cold):
        return Judges(validator(warm, device), None, len(warm[1]), 0, warm_tops=tops)
    stop = validator(cold, device, metric="mrr")
    return Judges(validator(warm, device), validator(cold, device), len(warm[1]), len(cold[1]), stop, tops)


Choice = tuple[float, float, float]  # (kappa, boost, similarity)


Exposure = Callable[[list[Choice]], dict[Choice, float]]  # choices -> their cold share in warm tops


def _eligible(
    figures: dict[Choice, tuple[float, float]],
    warm_tolerance: float,
    cold_tolerance: float,
    reference: float | None = None,
) -> list[Choice]:
    """``choose``'s two guards: the choices it picks among."""
    best_warm = max(w for w, _ in figures.values())
    bar = best_warm if reference is None else min(best_warm, reference)
    kept = [c for c, (w, _) in figures.items() if w >= bar - warm_tolerance * abs(bar)]
    best_cold = max(figures[c][1] for c in kept)
    return [c for c in kept if figures[c][1] >= best_cold - cold_tolerance * abs(best_cold)]


def choose(
    figures: dict[Choice, tuple[float, float]],
    warm_tolerance: float,
    cold_tolerance: float,
    reference: float | None = None,
    mixed: Callable[[float, float], float] | None = None,
    exposure: Exposure | None = None,
    share: float = 0.0,
) -> Choice:
    """The (kappa, boost, similarity) to serve, from each choice's (warm, cold) validation
    NDCG@10, in two guards and a goal:

    1. warm users: choices whose warm figure is within ``warm_tolerance`` of ``reference``
       (the ID teacher's warm figure), or of the best choice's where that is lower (no
       choice then fails the rule);
    2. cold users: of those, the ones whose cold figure is within ``cold_tolerance`` of the
       best cold figure among them;
    3. of those, the best ``mixed`` figure (all validation users, as a platform meets them).

    Why the teacher's figure: the target is warm users at 0.98 x the ID scorer. The gate
    often lifts the composite's warm figure above the teacher's (kappa > 0 mixes the student
    into thin items); measured against its own best, that gain could never be spent on
    cold users, whose share of validation (5%) is too small for the mixed figure to buy
    them anything.

    Why not the best mixed figure alone: mixed validation is 95% warm targets, and on two of
    three item draws it chose boost -2, which sinks every student-scored item (1% of warm
    users' top 10, against 10% of the catalogue) and the thin warm items with them. Why not
    the best cold figure alone (stop 38's rule; ``cold_tolerance`` 0 is nearly it): it spent the whole
    warm allowance on a few cold users however little they gained. On tail3k it put 20%
    cold items into warm users' top 10 for a cold validation figure 4.6x `text`'s, and the all-users
    figure fell to 1.06 x id on validation where a choice 16% below that cold best gave 1.11 x.

    With no cold judge (``mixed`` None), or where no choice lifts a cold user at all, no
    validation user can say what fresh items are worth, so step 3 calibrates instead: the
    choice whose exposure (``exposure`` of the choices left: the share of items without
    interactions in warm users' top 10, measured only here, where it decides) is nearest
    their ``share`` of the catalogue, neither buried nor flooding. Warm users' targets are
    warm, so every exposure costs them a little, and the most negative boost wins on them
    by a hair: picking by their figure would bury every fresh item served later, and the
    warm guard is what bounds the exposure's price. Ties (and no ``exposure``) go to the
    boost nearest 0, then no similarity, then the best warm figure, then the harder
    switch."""
    kept = _eligible(figures, warm_tolerance, cold_tolerance, reference)
    serves_cold = mixed is not None and max(figures[c][1] for c in kept) > 0  # else: calibrate
    shares = exposure(kept) if exposure is not None and not serves_cold else None

    def rank(c: Choice) -> tuple[float, ...]:
        if serves_cold:
            worth = mixed(*figures[c])
        else:
            worth = -abs(shares[c] - share) if shares is not None else 0.0
        return worth, -abs(c[1]), -c[2], figures[c][0], -c[0]

    return max(kept, key=rank)


def new_composite(
    teacher: SASRec, content: torch.Tensor, counts: torch.Tensor, cfg: CompositeSettings
) -> Composite:
    """A composite on ``teacher`` with its student untrained, shaped by ``cfg`` (its
    ``teacher_init`` says whether ``teacher``'s rows started from ``content``)."""
    shape = (cfg.dropout, cfg.similarity_dims, cfg.similarity_recency)
    return Composite(teacher, content, counts, *shape, content_started=cfg.teacher_init == "content")


@torch.no_grad()
def teacher_states(
    composite: Composite, train_seqs: list[list[int]], batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, h) the teacher's query at every step of every training history (its own ID rows,
    as it trained), and (M,) the item that came next: the queries the student learns to
    answer as the teacher does, and as the user did."""
    teacher, states, nexts = composite.teacher.eval(), [], []
    seqs = [s for s in train_seqs if len(s) >= 2]
    device = composite.counts.device
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        batch = left_pad([q[:-1] for q in chunk], teacher.cfg.max_len).to(device)  # (B, L)
        after = left_pad([q[1:] for q in chunk], teacher.cfg.max_len).to(device)  # (B, L)
        feats = teacher.log2feats(batch)  # (B, L, h)
        states.append(feats[batch > 0])  # (n, h), real steps only
        nexts.append(after[batch > 0])  # (n,)
    if not states:
        return torch.zeros(0, teacher.cfg.hidden), torch.zeros(0, dtype=torch.long)
    return torch.cat(states), torch.cat(nexts)


class WindowStop:
    """Early stopping on the mean of the last ``window`` epochs' validation figures, keeping
    the mean of those epochs' weights.

    Why: the figure the student stops on comes from a few hundred cold users and jumps by
    +-0.002 from one epoch to the next. Kept by its single best epoch, a student kept its
    luckiest one: on beauty-2k split 2 an epoch-1 spike stopped both students at epoch 7,
    0.94x and 0.99x their teachers (docs/quality-mixed.md, stop 47). A window's mean is a
    steadier judge, and the mean of its weights (as stochastic weight averaging does) is a
    student that was good for ``window`` epochs, not for one draw of the noise. No window is
    judged before it is full, so the first epochs cannot win on their own. ``window`` 1 is
    the plain rule: the best epoch's weights. One spike still moves a window's mean by a
    fifth of its size, so a window holding it may still win; it can no longer win alone.
    A NaN figure makes every window holding it lose, as a NaN epoch lost before; states
    are float tensors (the student has no integer buffers)."""

    def __init__(self, window: int, patience: int) -> None:
        self.window, self.patience = window, patience
        self.figures: deque[float] = deque(maxlen=window)
        self.states: deque[dict[str, torch.Tensor]] = deque(maxlen=window)
        self.best, self.best_state, self.best_end = float("-inf"), None, 0
        self.epoch, self.bad = 0, 0

    def update(self, figure: float, state: dict[str, torch.Tensor]) -> bool:
        """Record one epoch's figure and weights (copied); True when training should stop:
        ``patience`` full windows in a row without a better mean."""
        self.epoch += 1
        self.figures.append(figure)
        self.states.append({k: v.detach().clone() for k, v in state.items()})
        if len(self.figures) < self.window:
            return False
        mean = sum(self.figures) / self.window
        if mean > self.best:
            self.best, self.best_end, self.bad = mean, self.epoch, 0
            self.best_state = {k: torch.stack([s[k] for s in self.states]).mean(0) for k in state}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def kept(self) -> list[int]:
        """The first and last epoch (from 1) of the kept window; [0, 0] if none was full."""
        return [self.best_end - self.window + 1, self.best_end] if self.best_end else [0, 0]


def train_student(
    composite: Composite,
    train_seqs: list[list[int]],
    judges: Judges,
    cfg: CompositeSettings,
    device: torch.device,
    progress: bool = True,
) -> tuple[Composite, dict]:
    """Fit the student (seeded by the caller), keep its best window of epochs on
    ``judges.stop`` (the cold-validation users; the warm ones where there are none;
    ``WindowStop``), then pick the gate's kappa
    (``cfg.gate_kappas``), the cold boost (``cfg.boosts``) and the similarity weight
    (``cfg.similarities``) together (``choose``, against the teacher's warm figure; with no
    cold signal, by the cold items' share of warm users' top 10).

    It stops on the cold users because the student's vectors are what cold items are ranked
    by; on the whole mixed set, 95% warm targets, it stopped after a few epochs with cold
    items still buried.

    Returns the composite and {best_val_ndcg@10 (mixed), val_warm_ndcg@10,
    val_cold_ndcg@10, student_epochs, student_kept_epochs (the first and last of the kept
    window), student_val_stop (the kept student's stopping figure), kappa, boost,
    similarity, val_cold_share_top10, val_by_choice}: ``pick_gate_and_boost``'s."""
    composite.to(device)
    warm = (composite.counts > 0).nonzero().squeeze(1)
    warm = warm[warm > 0]  # (W,) item ids with interactions
    states, nexts = teacher_states(composite, train_seqs)  # (M, h), (M,)
    states = states.to(device)
    where = torch.full((len(composite.counts),), -1, dtype=torch.long, device=device)
    where[warm] = torch.arange(len(warm), device=device)
    nexts = where[nexts.to(device)]  # (M,) each next item's column among the warm ones
    with torch.no_grad():
        rows = composite.teacher.item_vectors()[warm]  # (W, h) the ID rows to match
    opt = torch.optim.Adam(composite.student.parameters(), lr=cfg.lr)
    composite.kappa.fill_(0.0)  # trained and stopped with the hard switch, no boost and no
    composite.boost.fill_(0.0)  # similarity; all three are picked after, on validation
    composite.similarity.fill_(0.0)
    stop = WindowStop(min(cfg.window, cfg.epochs), cfg.patience)
    bar = tqdm(range(cfg.epochs), desc="train student", disable=not progress)
    for _ in bar:
        composite.train()
        total = 0.0
        for b in torch.randperm(len(states), device=device).split(cfg.batch_size):
            student = composite.student_vectors()[warm]  # (W, h)
            loss = cfg.align_weight * F.mse_loss(student, rows, reduction="none").sum(1).mean()
            scores = states[b] @ student.T  # (B, W) the student's scores under the teacher's queries
            if cfg.rank_weight:
                teacher_logp = F.log_softmax(states[b] @ rows.T / cfg.tau, 1)  # (B, W)
                student_logp = F.log_softmax(scores / cfg.tau, 1)
                kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")
                loss = loss + cfg.rank_weight * cfg.tau**2 * kl
            real = nexts[b] >= 0  # a next item the student has a column for (a warm one)
            if cfg.supervised_weight and real.any():
                loss = loss + cfg.supervised_weight * F.cross_entropy(scores[real], nexts[b][real])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        score = judges.stopping()(composite.eval())
        bar.set_postfix(loss=f"{total / max(1, len(states)):.4f}", val_stop=f"{score:.4f}")
        if stop.update(score, composite.student.state_dict()):
            break
    if stop.best_state is not None:
        composite.student.load_state_dict(stop.best_state)
    kept_figure = judges.stopping()(composite.eval())  # the averaged student's own figure
    # the ID scorer's own warm figure, which a choice may spend on cold users (``choose``)
    reference = judges.warm(composite.teacher.eval()) if judges.cold else None
    similarities = cfg.similarities if composite.r else (0.0,)
    info = pick_gate_and_boost(
        composite, composite, composite.boost, judges, cfg, similarities, reference, progress
    )
    kept = stop.kept()
    log.info(
        "student: %d epochs, kept the mean weights of epochs %s (their figures' mean %.4f; "
        "the kept student's %.4f)",
        stop.epoch,
        kept,
        stop.best,
        kept_figure,
    )
    return composite, info | {
        "student_epochs": stop.epoch,
        "student_kept_epochs": kept,
        "student_val_stop": kept_figure,
    }


def pick_gate_and_boost(
    model: Recommender,
    composite: Composite,
    boost: torch.Tensor,
    judges: Judges,
    cfg: CompositeSettings,
    similarities: tuple[float, ...] = (0.0,),
    reference: float | None = None,
    progress: bool = False,
) -> dict:
    """Judge ``model`` at every gate ``kappa`` of ``composite`` (its ID side), every value of
    its ``boost`` buffer and every ``similarities`` weight of ``composite``, leave it at the
    choice of ``choose`` (``reference``: the ID teacher's warm figure), and return
    {best_val_ndcg@10 (mixed), val_warm_ndcg@10, val_cold_ndcg@10, kappa, boost,
    similarity, val_cold_share_top10 (the chosen exposure, where no choice lifted a cold
    user or none judged; else None), val_by_choice (with each measured exposure)}.

    Without a cold judge the grid is ``similarities``-fold (275 choices by default, not 55;
    each a scoring of the warm users, the teacher's queries memoised), and the choices left
    by the warm guard are scored once more for their exposure."""
    figures: dict[Choice, tuple[float, float]] = {}
    grid = list(itertools.product(cfg.gate_kappas, cfg.boosts, similarities))
    with composite.fixed_queries():  # the queries depend on kappa alone, or on nothing here
        for choice in tqdm(grid, desc="choose gate, boost, similarity", disable=not progress):
            _set(composite, boost, choice)
            judged = model.eval()
            figures[choice] = (judges.warm(judged), judges.cold(judged) if judges.cold else 0.0)
    mixed = judges.mixed if judges.cold else None
    cold = composite.cold_items()
    share = cold[1:].float().mean().item()
    measured: dict[Choice, float] = {}

    def exposure(choices: list[Choice]) -> dict[Choice, float]:
        measured.update(_exposure(model, composite, boost, choices, judges.warm_tops, cold))
        return measured

    calibrate = exposure if judges.warm_tops is not None else None
    choice = choose(figures, cfg.warm_tolerance, cfg.cold_tolerance, reference, mixed, calibrate, share)
    _set(composite, boost, choice)
    warm_ndcg, cold_ndcg = figures[choice]
    chosen_share = measured.get(choice)
    log.info(
        "chose kappa %s, boost %s, similarity %s: validation NDCG@10 warm %.4f, cold %.4f%s",
        *choice,
        warm_ndcg,
        cold_ndcg,
        ""
        if chosen_share is None
        else f"; no cold signal: cold items {chosen_share:.1%} of warm users' top 10 (catalogue {share:.1%})",
    )
    return {
        "best_val_ndcg@10": judges.mixed(warm_ndcg, cold_ndcg),
        "val_warm_ndcg@10": warm_ndcg,
        "val_cold_ndcg@10": cold_ndcg,
        "kappa": choice[0],
        "boost": choice[1],
        "similarity": choice[2],
        "val_cold_share_top10": chosen_share,
        "val_by_choice": {
            f"kappa={k},boost={b},similarity={g}": dict(warm=w, cold=c)
            | ({"exposure": measured[(k, b, g)]} if (k, b, g) in measured else {})
            for (k, b, g), (w, c) in figures.items()
        },
    }


def _exposure(
    model: Recommender,
    composite: Composite,
    boost: torch.Tensor,
    choices: list[Choice],
    warm_tops: Callable[[Recommender], torch.Tensor],
    cold: torch.Tensor,
) -> dict[Choice, float]:
    """Each choice's share of ``cold`` items in the warm validation users' top 10."""
    out = {}
    with composite.fixed_queries():
        for choice in choices:
            _set(composite, boost, choice)
            tops = warm_tops(model.eval())  # (U, 10)
            out[choice] = cold.to(tops.device)[tops].float().mean().item()
    return out


def _set(composite: Composite, boost: torch.Tensor, choice: Choice) -> None:
    kappa, b, sim = choice
    composite.kappa.fill_(kappa)
    boost.fill_(b)
    composite.similarity.fill_(sim)
