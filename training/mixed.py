"""The mixed protocol: old and new items in one ranking, as a platform's users meet them.

A seeded set of items is held out of alignment and of scorer training (they enter through
the fresh path, as new items do) and split in two: cold-validation and cold-test.

- Training: every history without the held-out items, minus its last two steps.
- Validation: users whose second-to-last item is warm or cold-validation.
- Test: users whose last item is warm or cold-test; a cold-validation target is left out.
- Histories keep their held-out items (they exist by then; validation histories drop the
  cold-test ones, so no model choice sees a cold-test interaction), and nothing is blocked
  at validation or test: every item competes in one ranking.

Each model is measured on all test users (the product metric), on warm-target and on
cold-target users, with 95% bootstrap intervals over users, by popularity bucket of the
target, and with the share of cold items in warm-target users' top 10 (calibration: new
items neither buried nor flooding). The same protocol is ColdRec's (YuanchenBei/ColdRec)
overall / warm / cold convention.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from models.ranking import recall_ndcg, target_ranks
from models.recommender import Recommender
from training.recommender import left_pad

BOOTSTRAP = 1000  # resamples of the test users for each interval


@dataclass
class MixedSplit:
    n_items: int
    train: list[list[int]]
    valid: tuple[list[list[int]], list[int]]
    test: tuple[list[list[int]], list[int]]
    cold_valid: set[int]
    cold_test: set[int]

    @property
    def held(self) -> set[int]:
        """Every item held out of training (both cold halves)."""
        return self.cold_valid | self.cold_test


def by_target(
    users: tuple[list[list[int]], list[int]], cold: set[int]
) -> tuple[tuple[list[list[int]], list[int]], tuple[list[list[int]], list[int]]]:
    """(warm-target, cold-target) users of (histories, targets): a composite's choices are
    judged on the two apart (training/composite.py, choose)."""
    warm: tuple[list[list[int]], list[int]] = ([], [])
    cold_users: tuple[list[list[int]], list[int]] = ([], [])
    for history, target in zip(*users, strict=True):
        part = cold_users if target in cold else warm
        part[0].append(history)
        part[1].append(target)
    return warm, cold_users


HALVES_SEED = 54321  # the cold-validation / cold-test halves of split seed 0


def halves(held: set[int], seed: int = HALVES_SEED) -> tuple[set[int], set[int]]:
    """The held-out items split, seeded, into (cold-validation, cold-test) halves."""
    items = sorted(held)
    random.Random(seed).shuffle(items)
    return set(items[: len(items) // 2]), set(items[len(items) // 2 :])


def mixed_split(seqs: list[list[int]], n_items: int, cold_valid: set[int], cold_test: set[int]) -> MixedSplit:
    """Leave-one-out over all users with held-out items treated as described above."""
    held = cold_valid | cold_test
    train, vh, vt, th, tt = [], [], [], [], []
    for s in seqs:
        train.append([i for i in (s if len(s) < 3 else s[:-2]) if i not in held])
        if len(s) < 3:
            continue
        if s[-2] not in cold_test:  # no cold-test item is seen by validation, not even in a history
            vh.append([i for i in s[:-2] if i not in cold_test])
            vt.append(s[-2])
        if s[-1] not in cold_valid:
            th.append(s[:-1])
            tt.append(s[-1])
    return MixedSplit(n_items, train, (vh, vt), (th, tt), cold_valid, cold_test)


def interaction_counts(train: list[list[int]], n_items: int) -> torch.Tensor:
    """(N+1,) training interactions per item: what the gate and the buckets read."""
    counts = torch.zeros(n_items + 1)
    for s in train:
        counts.index_add_(0, torch.tensor(s, dtype=torch.long), torch.ones(len(s)))
    return counts


def trained_items(train: list[list[int]]) -> torch.Tensor:
    """(n,) sorted ids of the items in the training histories (those with
    ``interaction_counts`` above 0): what a content start (``init_id_rows``) and the
    composite's student input are fitted on, so that the two agree."""
    return torch.tensor(sorted({i for s in train for i in s}), dtype=torch.long)


@torch.no_grad()
def ranks_and_top(
    model: Recommender, histories: list[list[int]], targets: list[int], device: torch.device, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U,) 0-based rank of each target among all items, and (U, 10) each user's top 10."""
    model.eval()
    ranks, tops = [], []
    for s in range(0, len(histories), batch):
        seqs = left_pad(histories[s : s + batch], model.cfg.max_len).to(device)
        scores = model.predict(seqs).float()  # (B, N+1)
        ranks.append(target_ranks(scores, torch.tensor(targets[s : s + batch], device=device)).cpu())
        tops.append(scores.topk(10, dim=1).indices.cpu())
    return torch.cat(ranks), torch.cat(tops)


def ndcg10(ranks: torch.Tensor) -> torch.Tensor:
    """(U,) per-user NDCG@10 from 0-based target ranks."""
    return (ranks < 10).float() / torch.log2(ranks.float() + 2)


def interval(values: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of ``values`` (per-user figures), seeded."""
    if len(values) == 0:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, 2_000_000 // len(values))  # resamples drawn at once: bounded memory
    means = torch.cat(
        [
            values[torch.randint(len(values), (min(chunk, BOOTSTRAP - s), len(values)), generator=gen)].mean(
                1
            )
            for s in range(0, BOOTSTRAP, chunk)
        ]
    )
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def measure(
    model: Recommender, split: MixedSplit, counts: torch.Tensor, device: torch.device
) -> dict[str, object]:
    """Every figure of the mixed protocol for one trained model (see the module doc)."""
    histories, targets = split.test
    ranks, tops = ranks_and_top(model, histories, targets, device)
    target = torch.tensor(targets)
    cold = torch.tensor([t in split.cold_test for t in targets])
    out: dict[str, object] = {}
    for name, sel in (("all", torch.ones_like(cold)), ("warm", ~cold), ("cold", cold)):
        if not sel.any():
            continue
        figures = recall_ndcg(ranks[sel])
        low, high = interval(ndcg10(ranks[sel]))
        out[name] = {"users": int(sel.sum()), **figures, "ndcg@10_ci": [low, high]}
    out["buckets"] = popularity_buckets(ranks, target, cold, counts)
    held = torch.zeros(len(counts), dtype=torch.bool)
    held[sorted(split.held)] = True
    warm_tops = tops[~cold]
    out["cold_share_top10_warm_users"] = held[warm_tops].float().mean().item() if len(warm_tops) else None
    out["cold_share_catalogue"] = len(split.held) / (len(counts) - 1)
    out["per_user_ndcg@10"] = [round(v, 4) for v in ndcg10(ranks).tolist()]
    return out


def popularity_buckets(
    ranks: torch.Tensor, target: torch.Tensor, cold: torch.Tensor, counts: torch.Tensor
) -> dict[str, dict]:
    """NDCG@10 by the target's training interactions: warm items in thirds (head, torso,
    tail) by count, and the cold targets apart."""
    warm_counts = counts[1:][counts[1:] > 0].sort(descending=True).values
    if len(warm_counts) == 0:
        return {}
    head_min = warm_counts[len(warm_counts) // 3].item()
    torso_min = warm_counts[2 * len(warm_counts) // 3].item()
    c = counts[target]
    groups = {
        "head": ~cold & (c > head_min),
        "torso": ~cold & (c <= head_min) & (c > torso_min),
        "tail": ~cold & (c <= torso_min),
        "cold": cold,
    }
    return {
        name: {"users": int(sel.sum()), "ndcg@10": ndcg10(ranks[sel]).mean().item() if sel.any() else None}
        for name, sel in groups.items()
    }


def per_user(runs: list[dict], variant: str) -> torch.Tensor | None:
    """(U,) a variant's per-user NDCG@10 averaged over its runs (seeds; same test users)."""
    rows = [r["per_user_ndcg@10"] for r in runs if r["variant"] == variant and "per_user_ndcg@10" in r]
    return torch.tensor(rows).mean(0) if rows else None


# the plain variants a model is compared with, where trained in the same run: ``text-init``
# is the composite-text's teacher, so its column says what the student and gate add
BASELINES = ("id", "text", "text-init")


def compare(runs: list[dict], cold: torch.Tensor, baselines: tuple[str, ...] = BASELINES) -> list[dict]:
    """Per variant and user group (all, warm, cold): mean NDCG@10 over its runs with a 95%
    bootstrap interval over users, and the paired difference to each baseline trained in the
    same run (mean per-user difference, its interval, and the ratio of means)."""
    variants = sorted({r["variant"] for r in runs if "per_user_ndcg@10" in r})
    vectors = {v: per_user(runs, v) for v in variants}
    out = []
    for v in variants:
        for group, sel in (("all", torch.ones_like(cold)), ("warm", ~cold), ("cold", cold)):
            x = vectors[v][sel]
            row = {"variant": v, "group": group, "users": int(sel.sum()), "ndcg@10": x.mean().item()}
            row["ci"] = list(interval(x))
            for base in baselines:
                if base in vectors and base != v:
                    b = vectors[base][sel]
                    mean_b = b.mean().item()
                    row[f"vs_{base}"] = {
                        "diff": (x - b).mean().item(),
                        "ci": list(interval(x - b)),
                        "ratio": x.mean().item() / mean_b if mean_b else None,
                    }
            out.append(row)
    return out


def format_compare(rows: list[dict]) -> str:
    """The comparison as a markdown table, a column per baseline some row was compared with."""
    found = {k[3:] for r in rows for k in r if k.startswith("vs_")}  # any compare's baselines
    bases = [b for b in BASELINES if b in found] + sorted(found - set(BASELINES))
    lines = [
        "| variant | users | NDCG@10 [95% CI] |" + "".join(f" vs {b}: ratio, diff [95% CI] |" for b in bases),
        "|---|---|---|" + "---|" * len(bases),
    ]

    def versus(r: dict, base: str) -> str:
        p = r.get(f"vs_{base}")
        if not p:
            return "-"
        ratio = f"{p['ratio']:.3f}" if p["ratio"] is not None else "-"
        return f"{ratio}, {p['diff']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"

    for r in rows:
        lines.append(
            f"| {r['variant']} ({r['group']}) | {r['users']} | {r['ndcg@10']:.4f} "
            f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] |" + "".join(f" {versus(r, b)} |" for b in bases)
        )
    return "\n".join(lines)
