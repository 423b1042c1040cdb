"""Build the frozen item tables the scorer variants use, with on-disk caching.

- ``text``: mean-pooled LLM hidden states of each item text;
- ``said``: SAID-aligned soft tokens; with held-out (cold) items, the aligner never sees
  them and they enter through the incremental path: ridge estimate, then refinement of
  their rows alone against the frozen projector;
- ``prompt``: the LLM's last hidden state at the end of the prompt that follows an item's
  soft tokens, i.e. the state that decodes the item's first text token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from core.files import load_torch, save_torch
from core.settings import AlignSettings
from models.aligner import AlignerConfig, FreshRows, FrozenLM, ItemAligner, estimate_rows, tokenize_texts
from training.align import refine_fresh
from training.fit_aligner import FittedAligner, cohort_fidelity, fidelity_summary, fit_aligner

log = logging.getLogger(__name__)


def with_padding_row(table: torch.Tensor) -> torch.Tensor:
    """Prepend a zero row so that row i is item index i (0 = padding)."""
    return torch.cat([torch.zeros(1, table.shape[1], dtype=table.dtype), table])


def text_table(lm: FrozenLM, texts: list[str], cache: Path, progress: bool = True) -> torch.Tensor:
    """(N+1, H) pooled text features, cached as fp16 (they are inputs, not trained)."""
    from models.llm import pooled_text_features

    if cache.exists():
        return load_torch(cache).float()
    feats = with_padding_row(pooled_text_features(lm.model, lm.tok, texts, lm.device, progress=progress))
    save_torch(feats.half(), cache)
    return feats


def said_table(
    lm: FrozenLM,
    texts: list[str],
    text_features: torch.Tensor,
    held_out: set[int],
    cfg: AlignSettings,
    out: Path,
    progress: bool = True,
) -> dict:
    """Align all items except ``held_out`` (1-based indexes), then add those incrementally.

    ``text_features`` is (N+1, H), row i = item i. Returns {"vectors": (N+1, k*H),
    "aligner": state, "report": {...}}; the file caches all but the vectors, which the
    projector recomputes in milliseconds. The alignment checkpoints next to ``out`` and
    resumes after a kill; the checkpoint is removed once the table is written.
    """
    if out.exists():
        saved = load_torch(out)
        return saved | {"vectors": _vectors(saved["aligner"], saved["aligner_config"])}
    n = len(texts)
    warm = [i for i in range(1, n + 1) if i not in held_out]
    fit = fit_aligner(lm, [texts[i - 1] for i in warm], warm, n, cfg, out.with_suffix(".ckpt"), progress)
    trained = sum(h["trained"] for h in fit.history)
    report = {
        "config": cfg.model_dump(),
        "history": fit.history,
        "passes": len(fit.history),
        "align_seconds": fit.seconds,
        "items_aligned": len(warm),
        "items_per_second": trained / max(fit.seconds, 1e-9),
        "fidelity": fidelity_summary(fit.fidelity),
        "reference": fit.reference,
    }
    if held_out:
        cold = sorted(held_out)
        report["fresh"] = add_fresh(
            fit, lm.with_prompt(cfg.prompt), [texts[i - 1] for i in cold], cold, text_features, cfg, progress
        )
    state = {key: v.cpu() for key, v in fit.aligner.state_dict().items()}
    result = {"aligner": state, "aligner_config": asdict(fit.aligner.cfg), "report": report}
    save_torch(result, out)
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    return result | {"vectors": _vectors(state, asdict(fit.aligner.cfg))}


def _vectors(state: dict, config: dict) -> torch.Tensor:
    return load_aligner(state, config).item_vectors().float()


def load_aligner(state: dict, config: dict) -> ItemAligner:
    aligner = ItemAligner(AlignerConfig(**config))
    aligner.load_state_dict(state)
    return aligner.requires_grad_(False)


@torch.no_grad()
def prompt_table(built: dict, lm: FrozenLM, cache: Path, batch_size: int = 64) -> torch.Tensor:
    """(N+1, H) final hidden state at the last prompt position of each item, cached as fp16.

    This is what the LLM decodes the text from, so it is a candidate item vector of its own
    (one H-wide vector instead of the k*H concatenated soft tokens)."""
    from models.aligner import build_inputs
    from models.llm import autocast, backbone

    if cache.exists():
        return load_torch(cache).float()
    device = lm.device
    aligner = load_aligner(built["aligner"], built["aligner_config"]).to(device)
    n = aligner.cfg.n_items
    out = []
    for s in range(1, n + 1, batch_size):
        idx = torch.arange(s, min(s + batch_size, n + 1), device=device)
        with autocast(device):
            inputs, attn = build_inputs(lm.model, lm.prefix, aligner.soft_tokens(idx), None)  # (B, P, H)
            h = backbone(lm.model)(inputs_embeds=inputs, attention_mask=attn).last_hidden_state
        out.append(h[:, -1].float().cpu())  # (B, H)
    table = with_padding_row(torch.cat(out))
    save_torch(table.half(), cache)
    return table


def add_fresh(
    fit: FittedAligner,
    lm: FrozenLM,
    cold_texts: list[str],
    cold: list[int],
    text_features: torch.Tensor,
    cfg: AlignSettings,
    progress: bool = True,
) -> dict:
    """The incremental path on the held-out items (indexes ``cold``), as the worker runs
    it: the ridge estimate, then refinement of their rows alone to the catalogue's token
    accuracy. ``lm`` reads through the aligner's prompt."""
    cold_tokens = tokenize_texts(lm.tok, cold_texts)
    local = list(range(len(cold)))
    fresh = FreshRows(fit.aligner.projector, estimate_rows(text_features[cold], fit.ridge).to(lm.device))

    def check() -> dict:
        f = cohort_fidelity(fresh.soft_tokens, lm, cold_tokens, local, len(cold))
        return {key: v for key, v in f.items() if key != "token_accuracy"}

    report = {"items": len(cold), "target_accuracy": fit.target_accuracy, "estimate": check()}
    t0 = time.perf_counter()
    report["refine_history"] = refine_fresh(
        fresh, lm, cold_tokens, cfg, target_accuracy=fit.target_accuracy, progress=progress
    )
    report["refine_seconds_per_item"] = (time.perf_counter() - t0) / len(cold)
    report["refined"] = check()
    with torch.no_grad():
        fit.aligner.items.weight[cold] = fresh.rows.detach()
    return report
