"""Sweep of alignment optimiser candidates on one slice, same LLM, same passes, same seed.

Each candidate aligns the same N items (a seeded sample of the data set) for P passes with
the real LLM, then the script reports the teacher-forced token accuracy after every pass and,
at the end, the fidelity check (token accuracy and greedy exact reconstruction). Per-item
stopping is off (``acc_bar`` 1.01) so every candidate trains on the same items every pass.

Throughput: items trained per second, beside the FLOP bound measured in the same run
(benchmarks/_flops.py: matmul FLOPs of a step over this machine's matmul rate under the steps' autocast).
``--attention sdpa,eager`` runs every candidate under each LLM attention kernel, so a
kernel's speed and its token accuracy are compared side by side; ``eager+compile`` is eager
attention with the steps through ``torch.compile`` (``SAID_ALIGN_COMPILE``; its seconds
include the compiling).

    python benchmarks/alignment_sweep.py --dataset ../shared/data/amazon-beauty-2k \\
        --items 160 --passes 8 --out sweep.json [--candidates base,rowadam,adagrad,...] \\
        [--attention sdpa,eager]

``--smoke``: 16 items of amazon-beauty-2k, 2 passes, k=1, candidates base and default, and
a tiny random LLM with SmolLM2's tokenizer, into a temporary file: checks that the
benchmark runs, not a result.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
from _bench import DATA, SMOKE_NOTE, attention_runs, tiny_llm_folder  # a sibling module of the benchmarks
from _flops import bound_line, flops_per_item, matmul_gflops

from core.dataset import load_dataset
from core.settings import AlignSettings, get_settings
from models.aligner import AlignerConfig, FrozenLM, ItemAligner, text_init_rows, tokenize_texts
from models.llm import load_llm, pick_device, pooled_text_features
from training.align import fidelity, train_full

# name -> (AlignSettings changes, start rows from text?)
CANDIDATES = {
    "base": (dict(row_optimizer="sparseadam", lr_final=1.0, warmup=0.0), False),  # main today
    "rowadam": (dict(row_optimizer="rowadam", lr_final=0.1, warmup=0.05), False),
    "adagrad": (dict(row_optimizer="adagrad", lr_rows=0.3, lr_final=0.1, warmup=0.05), False),
    "rowadam-text": (dict(row_optimizer="rowadam", lr_final=0.1, warmup=0.05), True),
    "adagrad-text": (dict(row_optimizer="adagrad", lr_rows=0.3, lr_final=0.1, warmup=0.05), True),
    "rowadam-text-lr05": (dict(row_optimizer="rowadam", lr_rows=0.5, lr_final=0.1, warmup=0.05), True),
    "default": (dict(acc_bar=1.0), True),  # the product defaults (core/settings.py), per-item stop on
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=False, help="a data-set folder (required but with --smoke)")
    p.add_argument("--items", type=int, default=160)
    p.add_argument("--passes", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--llm", default=None)
    p.add_argument("--llm-cache", type=Path, default=Path("said-data/llm"))
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument(
        "--attention",
        type=attention_runs,
        default="auto",
        help="comma-separated LLM attention kernels (SAID_ATTENTION), each optionally +compile",
    )
    p.add_argument("--first", action="store_true", help="the first N items (the demo's slice), not a sample")
    p.add_argument("--out", type=Path, help="the results JSON (required but with --smoke)")
    p.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.dataset = args.dataset or str(DATA / "amazon-beauty-2k")
        args.items, args.passes, args.k, args.candidates = 16, 2, 1, "base,default"
        args.attention = attention_runs("sdpa,eager")
        args.llm = args.llm or str(tiny_llm_folder())
        tmp = tempfile.TemporaryDirectory(prefix="said-smoke-")  # removed at exit
        args.out = args.out or Path(tmp.name) / "sweep.json"
        print(SMOKE_NOTE)
    if not args.dataset or not args.out:
        p.error("--dataset and --out are required (but with --smoke)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = pick_device("auto")
    ds = load_dataset(args.dataset)
    pick = (
        list(range(args.items))
        if args.first
        else sorted(random.Random(0).sample(range(len(ds.titles)), args.items))
    )
    texts = [ds.titles[i] for i in pick]
    llm, tok = load_llm(args.llm, args.llm_cache, device)
    tokens = tokenize_texts(tok, texts)
    feats = pooled_text_features(llm, tok, texts, device)
    idx = list(range(1, len(texts) + 1))
    prompt = get_settings().align.prompt  # SAID_PROMPT, as `said aligner train` reads it
    text_len = sum(map(len, tokens)) / len(tokens)
    step_flops = flops_per_item(
        llm, text_len + FrozenLM.around(llm, tok, device, prompt).prefix.length(args.k), text_len
    )
    gflops = matmul_gflops(device, 512 if args.smoke else 2048)
    results = {
        "items": len(texts),
        "passes": args.passes,
        "k": args.k,
        "batch": args.batch,
        "mean_text_tokens": text_len,
        "matmul_gflops": gflops,
        "flop_bound_items_per_second": gflops * 1e9 / step_flops,
        "runs": {},
    }
    planned = args.attention
    runs = [(name, run) for run in planned for name in args.candidates.split(",")]
    for name, (run_label, kernel, compiled) in runs:
        # a fresh LLM per run: fresh LoRA adapters, and the run's attention kernel
        llm, tok = load_llm(args.llm, args.llm_cache, device, args.lora_rank, kernel)
        changes, from_text = CANDIDATES[name]
        base = AlignSettings(epochs=args.passes, batch_size=args.batch, acc_bar=1.01, checkpoint_every_s=1e9)
        cfg = base.model_copy(update=changes | {"k": args.k, "compile": compiled})
        lm = FrozenLM.around(llm, tok, device, prompt)
        torch.manual_seed(0)
        aligner = ItemAligner(
            AlignerConfig(n_items=len(texts), hidden=lm.hidden, item_dim=cfg.item_dim, k=cfg.k)
        )
        if from_text:
            with torch.no_grad():
                aligner.items.weight[1:] = text_init_rows(feats, aligner.cfg.item_dim)
        aligner.to(device)
        t0 = time.perf_counter()
        history = train_full(aligner, lm, tokens, idx, cfg, progress=False)
        seconds = time.perf_counter() - t0
        fid = fidelity(aligner.soft_tokens, lm, tokens, idx)
        label = name if len(planned) == 1 else f"{name}@{run_label}"
        results["runs"][label] = {
            "config": changes | {"text_init": from_text, "attention": run_label},
            "acc_per_pass": [round(h["token_accuracy"], 4) for h in history],
            "loss_per_pass": [round(h["loss"], 4) for h in history],
            "token_accuracy": fid["mean_token_accuracy"],
            "exact": fid["exact_match"],
            "mean_loss": fid["mean_loss"],
            "seconds": seconds,
            "items_per_second": len(texts) * args.passes / seconds,
            "share_of_flop_bound": len(texts)
            * args.passes
            / seconds
            / results["flop_bound_items_per_second"],
        }
        logging.info("%s: %s", label, json.dumps(results["runs"][label]))
        args.out.write_text(json.dumps(results, indent=1))
    bound = results["flop_bound_items_per_second"]
    print(bound_line(bound, gflops, step_flops))
    print(f"{'candidate':26s} {'acc/pass':60s} {'tok acc':>8s} {'exact':>6s} {'items/s':>8s} {'bound':>6s}")
    for name, r in results["runs"].items():
        accs = " ".join(f"{a:.2f}" for a in r["acc_per_pass"])
        print(
            f"{name:26s} {accs:60s} {r['token_accuracy']:8.3f} {r['exact']:6.2f} {r['items_per_second']:8.1f}"
            f" {r['share_of_flop_bound']:6.0%}"
        )


if __name__ == "__main__":
    main()
