"""Fit a SAID aligner to a set of items, and measure how much of their text it keeps.

Shared by ``said align`` (the catalogue) and ``said evaluate`` (a data set), so both start
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

from core.settings import setting
from models.aligner import (
    AlignerConfig,
    FreshRows,
    ItemAligner,
    Prefix,
    estimate_rows,
    fit_text_to_rows,
    text_init_rows,
    tokenize_texts,
)
from models.llm import adapter_state, pooled_text_features
from training.align import AlignConfig, fidelity, refine_fresh, train_full


@dataclass
class RefineConfig:
    """How fresh rows are refined (the worker's path); defaults live in ``core.settings``."""

    max_passes: int = setting("refine_epochs")
    lr: float = setting("refine_lr")
    optimizer: str = setting("align_row_optimizer")  # as the catalogue's rows


@dataclass
class FidelityConfig:
    """How much fidelity is measured; defaults live in ``core.settings``."""

    exact_items: int = setting("fidelity_exact_items")  # greedily decoded (the slow part)
    reference_items: int = setting("reference_items")  # catalogue items put through the fresh path


@dataclass
class FittedAligner:
    aligner: ItemAligner
    ridge: torch.Tensor  # (H+1, d): [pooled text feature, 1] -> row
    history: list[dict]  # one record per alignment pass
    fidelity: dict  # catalogue cohort (see ``cohort_fidelity``)
    reference: dict  # fresh-path cohort: the same keys, plus seconds per item
    seconds: float  # of step 2, the alignment proper
    adapters: dict  # LoRA weights trained with the rows (empty with a frozen LLM)

    @property
    def target_accuracy(self) -> float:
        """The bar a fresh item is refined to: the catalogue's mean token accuracy."""
        return self.fidelity["mean_token_accuracy"]


def fit_aligner(
    llm,
    tok,
    texts: list[str],
    keys: list[int],
    n_rows: int,
    acfg: AlignConfig,
    k: int,
    item_dim: int,
    device: torch.device,
    prompt: str,
    checkpoint: Path | None = None,
    refine: RefineConfig | None = None,
    fidelity_cfg: FidelityConfig | None = None,
    progress: bool = True,
) -> FittedAligner:
    """Align ``texts`` (item ``keys[i]`` has ``texts[i]``) in a table of ``n_rows`` rows."""
    refine, fcfg = refine or RefineConfig(), fidelity_cfg or FidelityConfig()
    tokens = tokenize_texts(tok, texts)
    prefix = Prefix(tok, prompt=prompt)
    feats = pooled_text_features(llm, tok, texts, device, progress=progress)  # (N, H)
    torch.manual_seed(acfg.seed)
    aligner = ItemAligner(
        AlignerConfig(n_items=n_rows, hidden=llm.config.hidden_size, item_dim=item_dim, k=k)
    )
    with torch.no_grad():
        aligner.items.weight[keys] = text_init_rows(feats, item_dim, aligner.cfg.init_std)
    aligner.to(device)
    t0 = time.perf_counter()
    history = train_full(
        aligner, llm, prefix, tokens, keys, acfg, device, tok.pad_token_id, checkpoint, progress
    )
    seconds = time.perf_counter() - t0
    aligner.requires_grad_(False)
    llm.requires_grad_(False)  # LoRA (if any) is part of the aligner from here on
    fid = cohort_fidelity(
        aligner.soft_tokens, llm, tok, prefix, tokens, keys, device, fcfg.exact_items, acfg.seed
    )
    rows = aligner.items.weight.detach()[keys].cpu()
    ridge = fit_text_to_rows(feats, rows)

    pick = sorted(
        random.Random(acfg.seed).sample(range(len(keys)), min(fcfg.reference_items, max(1, len(keys) // 2)))
    )
    rest = sorted(set(range(len(keys))) - set(pick)) or pick  # a one-item catalogue: itself
    held_ridge = fit_text_to_rows(feats[rest], rows[rest])
    fresh = FreshRows(aligner.projector, estimate_rows(feats[pick], held_ridge).to(device))
    ref_tokens = [tokens[i] for i in pick]
    t1 = time.perf_counter()
    refine_fresh(
        fresh,
        llm,
        prefix,
        ref_tokens,
        device,
        tok.pad_token_id,
        refine.max_passes,
        lr=refine.lr,
        target_accuracy=fid["mean_token_accuracy"],
        optimizer=refine.optimizer,
    )
    per_item_s = (time.perf_counter() - t1) / max(1, len(pick))
    local = list(range(len(pick)))
    reference = cohort_fidelity(fresh.soft_tokens, llm, tok, prefix, ref_tokens, local, device, len(pick))
    reference["seconds_per_item"] = per_item_s
    return FittedAligner(aligner, ridge, history, fid, reference, seconds, adapter_state(llm))


def cohort_fidelity(
    soft_fn,
    llm,
    tok,
    prefix: Prefix,
    tokens: list[list[int]],
    keys: list[int],
    device,
    exact_sample: int,
    seed: int = 0,
) -> dict:
    """Teacher-forced loss and token accuracy of every item, greedy exact reconstruction of
    a seeded sample of at most ``exact_sample`` items (decoding is the slow part)."""
    pad, eos = tok.pad_token_id, tok.eos_token_id
    fid = fidelity(soft_fn, llm, prefix, tokens, keys, device, pad, eos, reconstruct=False)
    sample = sorted(random.Random(seed).sample(range(len(keys)), min(exact_sample, len(keys))))
    exact = fidelity(
        soft_fn, llm, prefix, [tokens[i] for i in sample], [keys[i] for i in sample], device, pad, eos
    )
    return {
        "items": len(keys),
        "mean_loss": fid["mean_loss"],
        "mean_token_accuracy": fid["mean_token_accuracy"],
        "exact_match": exact["exact_match"],
        "exact_items": len(sample),
        "losses": fid["loss"],
        "token_accuracy": fid["token_accuracy"],
    }
