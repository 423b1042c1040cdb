"""Full SAID alignment of a data set with the default configuration, and its fidelity.

What it does, in the product's own code path (``training.variants.said_table``, which
``said evaluate`` uses too): every item but a seeded 1% (at least 5, the "fresh" items) is
aligned from scratch; fidelity is measured (teacher-forced token accuracy of every item,
greedy exact reconstruction of up to 512); then the fresh items enter through the worker's
path (ridge estimate, refinement of their rows alone to the catalogue's token accuracy).

It prints one table: passes, minutes, token accuracy, exact reconstruction, fresh items
(estimate -> refined, CPU seconds per item), and alignment throughput in items/s against a
FLOP bound: the forward and backward matmul FLOPs of one item (2 x params x tokens forward,
the same again backward for the input gradients, the LLM being frozen) divided into the
bf16 matmul rate this machine reaches (measured here, 2048^3 matmuls under autocast).

    python benchmarks/alignment_fidelity.py --dataset ../shared/data/amazon-beauty-2k --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from core.dataset import load_dataset
from core.events import item_text
from core.settings import from_settings, get_settings
from models.aligner import AlignerConfig, ItemAligner, Prefix, fit_text_to_rows, tokenize_texts
from models.llm import autocast, load_llm, pick_device
from training.align import AlignConfig
from training.fit_aligner import FidelityConfig, FittedAligner, RefineConfig
from training.variants import add_fresh, said_table, text_table


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    with autocast(device):
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flops_per_item(llm, tokens_per_item: float, text_tokens: float) -> float:
    """Forward + backward (input gradients only) matmul FLOPs of one item's step."""
    emb = llm.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in llm.parameters()) - emb  # tied head counted once, below
    forward = 2 * body * tokens_per_item + 2 * emb * text_tokens  # the head runs on text only
    return 2 * forward


def redo_fresh(built: dict, rep: dict, llm, tok, texts, feats, cold, device, settings) -> dict:
    """The fresh items' path again, from the cached aligner (its ridge map refitted on the
    warm rows exactly as ``fit_aligner`` fits it)."""
    aligner = ItemAligner(AlignerConfig(**built["aligner_config"]))
    aligner.load_state_dict(built["aligner"])
    aligner.to(device).requires_grad_(False)
    warm = sorted(set(range(1, len(texts) + 1)) - set(cold))
    ridge = fit_text_to_rows(feats[warm], aligner.items.weight.detach()[warm].cpu())
    fit = FittedAligner(
        aligner, ridge, rep["history"], rep["fidelity"], rep["reference"], rep["align_seconds"], {}
    )
    refine = from_settings(RefineConfig, settings)
    return add_fresh(fit, llm, tok, texts, feats, cold, device, refine, settings.prompt)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=None, help="most passes (default: SAID_ALIGN_EPOCHS)")
    p.add_argument("--batch", type=int, default=None, help="default: SAID_ALIGN_BATCH")
    p.add_argument("--fresh-fraction", type=float, default=0.01)
    p.add_argument(
        "--fresh-only",
        action="store_true",
        help="keep the cached alignment in OUT and redo only the fresh items' path (new refine settings)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = get_settings()
    device = pick_device(settings.device)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch)) if v}
    acfg = from_settings(AlignConfig, settings, **overrides)
    llm, tok = load_llm(settings.llm, settings.data_dir / "llm", device, settings.lora_rank)
    ds = load_dataset(args.dataset)
    texts = [item_text(t, d) for t, d in zip(ds.titles, ds.descriptions, strict=True)]
    n = len(texts)
    fresh = set(random.Random(7).sample(range(1, n + 1), max(5, round(n * args.fresh_fraction))))
    args.out.mkdir(parents=True, exist_ok=True)
    feats = text_table(llm, tok, texts, device, args.out / "text.pt")
    t0 = time.perf_counter()
    built = said_table(
        llm,
        tok,
        texts,
        feats,
        fresh,
        acfg,
        settings.soft_tokens,
        settings.item_dim,
        device,
        args.out / "said.pt",
        from_settings(RefineConfig, settings),
        prompt=settings.prompt,
        fidelity_cfg=from_settings(FidelityConfig, settings),
    )
    rep = built["report"]
    if args.fresh_only:
        rep["fresh"] = redo_fresh(built, rep, llm, tok, texts, feats, sorted(fresh), device, settings)
    tokens = tokenize_texts(tok, texts)
    text_len = sum(map(len, tokens)) / n
    per_item = flops_per_item(
        llm, Prefix(tok, settings.prompt).length(settings.soft_tokens) + text_len, text_len
    )
    gflops = matmul_gflops(device)
    fid, fr = rep["fidelity"], rep["fresh"]
    result = {
        "dataset": args.dataset,
        "items": n,
        "device": str(device),
        "k": settings.soft_tokens,
        "lora_rank": settings.lora_rank,
        "config": rep["config"],
        "passes": rep["passes"],
        "align_minutes": rep["align_seconds"] / 60,
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "token_accuracy": fid["mean_token_accuracy"],
        "exact": fid["exact_match"],
        "exact_items": fid["exact_items"],
        "mean_loss": fid["mean_loss"],
        "fresh_items": fr["items"],
        "fresh_target_accuracy": fr["target_accuracy"],
        "fresh_estimate_accuracy": fr["estimate"]["mean_token_accuracy"],
        "fresh_refined_accuracy": fr["refined"]["mean_token_accuracy"],
        "fresh_refined_exact": fr["refined"]["exact_match"],
        "fresh_cpu_seconds_per_item": fr["refine_seconds_per_item"],
        "items_per_second": rep["items_per_second"],
        "matmul_gflops": gflops,
        "flop_bound_items_per_second": gflops * 1e9 / per_item,
        "history": [{k: round(v, 4) for k, v in h.items()} for h in rep["history"]],
    }
    (args.out / "fidelity.json").write_text(json.dumps(result, indent=1))
    print(
        f"SAID alignment of {args.dataset} ({n} items, k={settings.soft_tokens}, "
        f"LoRA rank {settings.lora_rank}, {device})"
    )
    for key in (
        "passes",
        "align_minutes",
        "token_accuracy",
        "exact",
        "exact_items",
        "mean_loss",
        "fresh_items",
        "fresh_target_accuracy",
        "fresh_estimate_accuracy",
        "fresh_refined_accuracy",
        "fresh_refined_exact",
        "fresh_cpu_seconds_per_item",
        "items_per_second",
        "flop_bound_items_per_second",
    ):
        value = result[key]
        print(f"  {key:32s} {value:.3f}" if isinstance(value, float) else f"  {key:32s} {value}")


if __name__ == "__main__":
    main()
