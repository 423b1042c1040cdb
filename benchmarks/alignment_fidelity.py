"""Full SAID alignment of a data set with the default configuration, and its fidelity.

What it does, in the product's own code path (``training.variants.said_table``, which
``said dataset evaluate`` uses too): every item but a seeded 1% (at least 5, the "fresh" items) is
aligned from scratch; fidelity is measured (teacher-forced token accuracy of every item,
greedy exact reconstruction of up to 512); then the fresh items enter through the worker's
path (ridge estimate, refinement of their rows alone to the catalogue's token accuracy).

It prints one table: passes, minutes, token accuracy, exact reconstruction, fresh items
(estimate -> refined, CPU seconds per item), and alignment throughput in items/s against a
FLOP bound: the forward and backward matmul FLOPs of one item (2 x params x tokens forward,
the same again backward for the input gradients, the LLM being frozen) divided into the
matmul rate this machine reaches (measured here, 2048^3 matmuls under autocast).

    python benchmarks/alignment_fidelity.py --dataset ../shared/data/amazon-beauty-2k --out DIR

``--smoke``: the first 30 items of amazon-beauty-2k, one pass, k=1, 3 refinement passes, and
a tiny random LLM with SmolLM2's tokenizer, into a temporary OUT: checks that the benchmark
runs, not a result.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

from _bench import DATA, SMOKE_NOTE, smoke_settings  # a sibling module of the benchmarks
from _flops import flops_per_item, matmul_gflops

from core.dataset import load_dataset
from core.events import item_text
from core.settings import AlignSettings, get_settings
from models.aligner import AlignerConfig, FrozenLM, ItemAligner, fit_text_to_rows, tokenize_texts
from models.llm import load_llm, pick_device
from training.fit_aligner import FittedAligner
from training.variants import add_fresh, said_table, text_table


def redo_fresh(built: dict, rep: dict, lm: FrozenLM, texts, feats, cold, cfg: AlignSettings) -> dict:
    """The fresh items' path again, from the cached aligner (its ridge map refitted on the
    warm rows exactly as ``fit_aligner`` fits it)."""
    aligner = ItemAligner(AlignerConfig(**built["aligner_config"]))
    aligner.load_state_dict(built["aligner"])
    aligner.to(lm.device).requires_grad_(False)
    warm = sorted(set(range(1, len(texts) + 1)) - set(cold))
    ridge = fit_text_to_rows(feats[warm], aligner.items.weight.detach()[warm].cpu())
    fit = FittedAligner(
        aligner, ridge, rep["history"], rep["fidelity"], rep["reference"], rep["align_seconds"], {}
    )
    return add_fresh(fit, lm.with_prompt(cfg.prompt), [texts[i - 1] for i in cold], cold, feats, cfg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=False, help="a data-set folder (required but with --smoke)")
    p.add_argument("--out", type=Path, help="folder for the cached tables and fidelity.json (required)")
    p.add_argument("--items", type=int, default=None, help="the first N items only")
    p.add_argument("--epochs", type=int, default=None, help="most passes (default: SAID_ALIGN_EPOCHS)")
    p.add_argument("--batch", type=int, default=None, help="default: SAID_ALIGN_BATCH")
    p.add_argument("--fresh-fraction", type=float, default=0.01)
    p.add_argument(
        "--fresh-only",
        action="store_true",
        help="keep the cached alignment in OUT and redo only the fresh items' path (new refine settings)",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = p.parse_args()
    settings = get_settings()
    if args.smoke:
        args.dataset = args.dataset or str(DATA / "amazon-beauty-2k")
        args.items, args.epochs = args.items or 30, args.epochs or 1
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="said-smoke-"))
            atexit.register(shutil.rmtree, args.out, ignore_errors=True)
        settings = smoke_settings(settings)
        print(SMOKE_NOTE)
    if not args.dataset or not args.out:
        p.error("--dataset and --out are required (but with --smoke)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = pick_device(settings.device)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch)) if v}
    acfg = settings.align.model_copy(update=overrides)
    model, tok = load_llm(settings.llm, settings.data_dir / "llm", device, acfg.lora_rank, settings.attention)
    lm = FrozenLM.around(model, tok, device, acfg.prompt)
    ds = load_dataset(args.dataset, args.items)
    texts = [item_text(t, d) for t, d in zip(ds.titles, ds.descriptions, strict=True)]
    n = len(texts)
    fresh = set(random.Random(7).sample(range(1, n + 1), max(5, round(n * args.fresh_fraction))))
    args.out.mkdir(parents=True, exist_ok=True)
    feats = text_table(lm, texts, args.out / "text.pt")
    t0 = time.perf_counter()
    built = said_table(lm, texts, feats, fresh, acfg, args.out / "said.pt")
    rep = built["report"]
    if args.fresh_only:
        rep["fresh"] = redo_fresh(built, rep, lm, texts, feats, sorted(fresh), acfg)
    tokens = tokenize_texts(tok, texts)
    text_len = sum(map(len, tokens)) / n
    per_item = flops_per_item(model, lm.prefix.length(acfg.k) + text_len, text_len)
    gflops = matmul_gflops(device, 512 if args.smoke else 2048)
    fid, fr = rep["fidelity"], rep["fresh"]
    result = {
        "dataset": args.dataset,
        "items": n,
        "device": str(device),
        "k": acfg.k,
        "lora_rank": acfg.lora_rank,
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
    print(f"SAID alignment of {args.dataset} ({n} items, k={acfg.k}, LoRA rank {acfg.lora_rank}, {device})")
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
