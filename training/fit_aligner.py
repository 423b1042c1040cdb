"""Fit a SAID aligner to a set of items, and measure how much of their text it keeps.

Shared by ``said aligner train`` (the catalogue) and ``said dataset evaluate`` (a data set), so both start
the same way and report the same fidelity:
1. rows start from the text: principal components of pooled LLM text features;
2. rows and projector train together (``train_full``: per-row optimiser, schedule,
   per-item convergence);
3. fidelity of the catalogue cohort: teacher-forced loss and token accuracy of every item,
   greedy exact reconstruction of a seeded sample;
4. the fresh-item estimator (ridge map from text features to rows) is fitted;
5. a reference cohort of catalogue items is put through the fresh-item path (estimate from
   a ridge map fitted without them, then refinement of their rows alone, stopping at the
   catalogue's token accuracy). Its losses are what fresh items are compared with in the
   drift ratio: like with like, the same path and the same bar.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.settings import AlignSettings
from models.aligner import (
    AlignerConfig,
    FreshRows,
    FrozenLM,
    ItemAligner,
    decoded_text,
    estimate_rows,
    fit_text_to_rows,
    text_init_rows,
    tokenize_texts,
)
from models.llm import adapter_state, pooled_text_features
from training.align import fidelity, refine_fresh, train_full


@dataclass
class FittedAligner:
    aligner: ItemAligner
    ridge: torch.Tensor  # (H+1, d): [pooled text feature, 1] -> row
    history: list[dict]  # one record per alignment pass
    fidelity: dict  # catalogue cohort (see ``cohort_fidelity``)
    reference: dict  # fresh-path cohort: the same keys, plus seconds per item
    seconds: float  # of step 2, the alignment proper
    adapters: dict  # LoRA weights trained with the rows (empty with a frozen LLM)
    # (N, H) pooled text features of the texts, in their order: the rows' start and the
    # ridge map's input, stored as the ``text`` content (None: a fit rebuilt from a cache)
    features: torch.Tensor | None = None

    @property
    def target_accuracy(self) -> float:
        """The bar a fresh item is refined to: the catalogue's mean token accuracy."""
        return self.fidelity["mean_token_accuracy"]


def fit_aligner(
    lm: FrozenLM,
    texts: list[str],
    keys: list[int],
    n_rows: int,
    cfg: AlignSettings,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> FittedAligner:
    """Align ``texts`` (item ``keys[i]`` has ``texts[i]``) in a table of ``n_rows`` rows,
    read through ``cfg.prompt`` whatever prompt ``lm`` came with."""
    lm = lm.with_prompt(cfg.prompt)
    tokens = tokenize_texts(lm.tok, texts)
    feats = pooled_text_features(lm.model, lm.tok, texts, lm.device, progress=progress)  # (N, H)
    torch.manual_seed(cfg.seed)
    aligner = ItemAligner(AlignerConfig(n_items=n_rows, hidden=lm.hidden, item_dim=cfg.item_dim, k=cfg.k))
    with torch.no_grad():
        aligner.items.weight[keys] = text_init_rows(feats, cfg.item_dim, aligner.cfg.init_std)
    aligner.to(lm.device)
    t0 = time.perf_counter()
    history = train_full(aligner, lm, tokens, keys, cfg, checkpoint, progress)
    seconds = time.perf_counter() - t0
    aligner.requires_grad_(False)
    lm.model.requires_grad_(False)  # LoRA (if any) is part of the aligner from here on
    fid = cohort_fidelity(aligner.soft_tokens, lm, tokens, keys, cfg.fidelity.exact_items, cfg.seed, progress)
    rows = aligner.items.weight.detach()[keys].cpu()
    ridge = fit_text_to_rows(feats, rows)

    n_ref = min(cfg.fidelity.reference_items, max(1, len(keys) // 2))
    pick = sorted(random.Random(cfg.seed).sample(range(len(keys)), n_ref))
    rest = sorted(set(range(len(keys))) - set(pick)) or pick  # a one-item catalogue: itself
    held_ridge = fit_text_to_rows(feats[rest], rows[rest])
    fresh = FreshRows(aligner.projector, estimate_rows(feats[pick], held_ridge).to(lm.device))
    ref_tokens = [tokens[i] for i in pick]
    t1 = time.perf_counter()
    refine_fresh(fresh, lm, ref_tokens, cfg, target_accuracy=fid["mean_token_accuracy"], progress=progress)
    per_item_s = (time.perf_counter() - t1) / max(1, len(pick))
    local = list(range(len(pick)))
    reference = cohort_fidelity(fresh.soft_tokens, lm, ref_tokens, local, len(pick), progress=progress)
    reference["seconds_per_item"] = per_item_s
    return FittedAligner(aligner, ridge, history, fid, reference, seconds, adapter_state(lm.model), feats)


PER_ITEM = ("losses", "token_accuracy", "decoded", "exact")  # cohort_fidelity's lists, by item


def fidelity_summary(fid: dict) -> dict:
    """A cohort's fidelity without its per-item lists: what a version's record keeps."""
    return {key: v for key, v in fid.items() if key not in PER_ITEM}


def cohort_fidelity(
    soft_fn,
    lm: FrozenLM,
    tokens: list[list[int]],
    keys: list[int],
    exact_sample: int,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Teacher-forced loss and token accuracy of every item, greedy exact reconstruction of
    a seeded sample of at most ``exact_sample`` items (each part shows a progress bar with
    ``progress``: the teacher-forced pass was the demo's one silent phase, 12 s): each
    sampled item's decoded text and whether it is exact (None for the others), stored
    beside its vector."""
    fid = fidelity(soft_fn, lm, tokens, keys, reconstruct=False, progress=progress)
    sample = sorted(random.Random(seed).sample(range(len(keys)), min(exact_sample, len(keys))))
    picked = [tokens[i] for i in sample], [keys[i] for i in sample]
    exact = fidelity(soft_fn, lm, *picked, progress=progress)
    decoded: list[str | None] = [None] * len(keys)
    rebuilt: list[bool | None] = [None] * len(keys)
    for j, i in enumerate(sample):
        decoded[i], rebuilt[i] = decoded_text(lm.tok, exact["decoded"][j]), exact["exact"][j]
    return {
        "items": len(keys),
        "mean_loss": fid["mean_loss"],
        "mean_token_accuracy": fid["mean_token_accuracy"],
        "exact_match": exact["exact_match"],
        "exact_items": len(sample),
        "losses": fid["loss"],
        "token_accuracy": fid["token_accuracy"],
        "decoded": decoded,
        "exact": rebuilt,
    }
