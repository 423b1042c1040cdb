"""Build the frozen item tables the scorer variants use, with on-disk caching.

- ``text``: mean-pooled LLM hidden states of each item text;
- ``said``: SAID-aligned soft tokens; with held-out (cold) items, the aligner never sees
  them and they enter through the incremental path: ridge estimate, then refinement of
  their rows alone against the frozen projector.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from core.files import save_torch
from models.aligner import (
    AlignerConfig,
    FreshRows,
    ItemAligner,
    Prefix,
    estimate_rows,
    fit_text_to_rows,
    tokenize_texts,
)
from training.align import AlignConfig, fidelity, refine_fresh, train_full

log = logging.getLogger(__name__)


def with_padding_row(table: torch.Tensor) -> torch.Tensor:
    """Prepend a zero row so that row i is item index i (0 = padding)."""
    return torch.cat([torch.zeros(1, table.shape[1], dtype=table.dtype), table])


def text_table(llm, tok, texts: list[str], device, cache: Path, progress: bool = True):
    """(N+1, H) pooled text features, cached as fp16 (they are inputs, not trained)."""
    from models.llm import pooled_text_features

    if cache.exists():
        return torch.load(cache).float()
    feats = with_padding_row(pooled_text_features(llm, tok, texts, device, progress=progress))
    save_torch(feats.half(), cache)
    return feats


def said_table(
    llm,
    tok,
    texts: list[str],
    text_features: torch.Tensor,
    held_out: set[int],
    acfg: AlignConfig,
    k: int,
    item_dim: int,
    device: torch.device,
    out: Path,
    fresh_epochs: int = 30,
    progress: bool = True,
) -> dict:
    """Align all items except ``held_out`` (1-based indexes), then add those incrementally.

    ``text_features`` is (N+1, H), row i = item i. Returns {"vectors": (N+1, H),
    "aligner": state, "report": {...}}; the file caches all but the vectors, which the
    projector recomputes in milliseconds. The alignment checkpoints next to ``out`` and
    resumes after a kill; the checkpoint is removed once the table is written.
    """
    if out.exists():
        saved = torch.load(out, weights_only=False)
        return saved | {"vectors": _vectors(saved["aligner"], saved["aligner_config"])}
    n = len(texts)
    tokens = tokenize_texts(tok, texts)
    prefix = Prefix(tok)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    cfg = AlignerConfig(n_items=n, hidden=llm.config.hidden_size, item_dim=item_dim, k=k)
    torch.manual_seed(acfg.seed)
    aligner = ItemAligner(cfg).to(device)
    warm = [i for i in range(1, n + 1) if i not in held_out]
    t0 = time.perf_counter()
    history = train_full(
        aligner,
        llm,
        prefix,
        [tokens[i - 1] for i in warm],
        warm,
        acfg,
        device,
        pad,
        out.with_suffix(".ckpt"),
        progress,
    )
    align_s = time.perf_counter() - t0
    report = {
        "config": asdict(acfg) | {"k": k, "item_dim": item_dim},
        "history": history,
        "align_seconds": align_s,
        "items_aligned": len(warm),
        "items_per_second": len(warm) * acfg.epochs / max(align_s, 1e-9),
    }
    fid = fidelity(
        aligner.soft_tokens,
        llm,
        prefix,
        [tokens[i - 1] for i in warm],
        warm,
        device,
        pad,
        eos,
        progress=progress,
    )
    report["fidelity"] = {k_: v for k_, v in fid.items() if k_ not in ("loss", "token_accuracy")}
    report["reference_losses"] = fid["loss"]
    if held_out:
        report["fresh"] = _add_fresh(
            aligner,
            llm,
            prefix,
            tokens,
            text_features,
            sorted(held_out),
            warm,
            device,
            pad,
            eos,
            fresh_epochs,
            acfg.lr_rows,
        )
    state = {k_: v.cpu() for k_, v in aligner.state_dict().items()}
    result = {"aligner": state, "aligner_config": asdict(cfg), "report": report}
    save_torch(result, out)
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    return result | {"vectors": _vectors(state, asdict(cfg))}


def _vectors(state: dict, config: dict) -> torch.Tensor:
    aligner = ItemAligner(AlignerConfig(**config))
    aligner.load_state_dict(state)
    return aligner.item_vectors().float()


def _add_fresh(aligner, llm, prefix, tokens, text_features, cold, warm, device, pad, eos, epochs, lr) -> dict:
    """The incremental path on the held-out items; compares the estimate with random init."""
    rows = aligner.items.weight.detach()
    w = fit_text_to_rows(text_features[warm], rows[warm].cpu())
    est = estimate_rows(text_features[cold], w).to(device)
    cold_tokens = [tokens[i - 1] for i in cold]
    local = list(range(len(cold)))
    report = {"items": len(cold)}

    def check(fresh: FreshRows) -> dict:
        f = fidelity(fresh.soft_tokens, llm, prefix, cold_tokens, local, device, pad, eos)
        return {k: v for k, v in f.items() if k not in ("loss", "token_accuracy")} | {"losses": f["loss"]}

    t0 = time.perf_counter()
    fresh = FreshRows(aligner.projector, est)
    report["estimate"] = check(fresh)
    report["estimate"]["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report["refine_history"] = refine_fresh(fresh, llm, prefix, cold_tokens, device, pad, epochs, lr=lr)
    report["refine_seconds"] = time.perf_counter() - t0
    report["refined"] = check(fresh)
    random_start = FreshRows(aligner.projector, torch.randn_like(est) * rows[warm].std())
    report["random_start_history"] = refine_fresh(
        random_start, llm, prefix, cold_tokens, device, pad, epochs, lr=lr
    )
    with torch.no_grad():
        aligner.items.weight[cold] = fresh.rows.detach()
    return report
