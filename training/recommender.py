"""Train and evaluate the SASRec scorer under the leave-one-out, full-ranking protocol."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from core.settings import setting
from models.ranking import recall_ndcg, target_ranks
from models.sasrec import SASRec

log = logging.getLogger(__name__)


@dataclass
class ScorerTrainConfig:
    epochs: int = setting("scorer_epochs")  # upper bound; early stopping usually ends sooner
    batch_size: int = setting("scorer_batch")  # users per step
    lr: float = setting("scorer_lr")  # Adam
    weight_decay: float = 0.0
    patience: int = setting("scorer_patience")  # validations without NDCG@10 gain, then stop
    eval_every: int = setting("scorer_eval_every")  # epochs between validation passes
    seed: int = 0


def left_pad(seqs: list[list[int]], max_len: int) -> torch.Tensor:
    """Keep the last ``max_len`` items of each sequence, left-padded with 0: (B, max_len)."""
    out = torch.zeros(len(seqs), max_len, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        if s:
            out[i, -len(s) :] = torch.tensor(s)
    return out


@torch.no_grad()
def evaluate(
    model: SASRec,
    histories: list[list[int]],
    targets: list[int],
    device: torch.device,
    batch_size: int = 512,
    blocked: list[int] | None = None,
) -> dict[str, float]:
    """Recall/NDCG@5/10/20 ranking each target against all items but ``blocked``."""
    block = torch.tensor(sorted(blocked), dtype=torch.long, device=device) if blocked else None
    model.eval()
    ranks = []
    for s in range(0, len(histories), batch_size):
        seqs = left_pad(histories[s : s + batch_size], model.cfg.max_len).to(device)
        tgt = torch.tensor(targets[s : s + batch_size], device=device)
        ranks.append(target_ranks(model.predict(seqs, block).float(), tgt).cpu())
    if not ranks:
        return {}
    out = recall_ndcg(torch.cat(ranks))
    out["users"] = len(targets)
    return out


def train_scorer(
    model: SASRec,
    train_seqs: list[list[int]],
    valid: tuple[list[list[int]], list[int]],
    cfg: ScorerTrainConfig,
    device: torch.device,
    progress: bool = True,
    blocked: list[int] | None = None,
) -> tuple[SASRec, dict]:
    """Train with full-softmax CE; keep the weights with the best validation NDCG@10.

    ``blocked`` items (held out of a cold-start split) are out of every softmax, in training
    and in validation, as if they did not exist yet."""
    block = torch.tensor(sorted(blocked), dtype=torch.long, device=device) if blocked else None
    torch.manual_seed(cfg.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    L = model.cfg.max_len
    seqs = [s for s in train_seqs if len(s) >= 2]
    inputs = left_pad([s[:-1] for s in seqs], L)
    targets = left_pad([s[1:] for s in seqs], L)
    lengths = (targets > 0).sum(1)
    best, best_state, bad, epoch = -1.0, None, 0, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.epochs), desc="train scorer", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(seqs), generator=gen)
        total = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            width = int(lengths[b].max())  # drop columns that are padding for the whole batch
            loss = model(inputs[b, -width:].to(device), targets[b, -width:].to(device), block)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        if (epoch + 1) % cfg.eval_every:
            continue
        ndcg = evaluate(model, *valid, device, blocked=blocked)["ndcg@10"]
        bar.set_postfix(loss=f"{total / len(perm):.3f}", val_ndcg10=f"{ndcg:.4f}")
        if ndcg > best:
            best, best_state, bad = ndcg, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"best_val_ndcg@10": best, "epochs": epoch + 1}
