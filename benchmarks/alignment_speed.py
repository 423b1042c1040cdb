"""Alignment step throughput per LLM attention kernel, beside the FLOP bound of the same run.

Method: N items of a data set (default 256 of amazon-beauty-2k), tokenized as alignment
tokenizes them, in the length-bucketed batches alignment trains on (default 16). Each rep
runs every batch once as a real training step (teacher-forced loss, backward into the soft
tokens, projector and rows step) under each kernel, the kernels interleaved rep by rep so
that a noisy shared machine slows them alike; items/s is the median over reps. The FLOP
bound is benchmarks/_flops.py's: the step's matmul FLOPs over this machine's matmul
rate, sampled before every rep (a share is the median of each rep's rate over the bound
sampled just before it, so that a drifting machine moves both; each sample is the median
of single calls, each casting its fp32 operands as the steps cast their weights); where
bf16 is native, the rate of the multiply-adds alone (bf16 operands) is printed beside it,
a second share. A kernel named ``KERNEL+compile`` runs the same steps through
``torch.compile`` (``SAID_ALIGN_COMPILE``); its compiling happens in the warm-up, which is
timed and printed apart.

    python benchmarks/alignment_speed.py [--items 256] [--batch 16] [--reps 3] \\
        [--attention sdpa,eager,eager+compile] [--dataset ../shared/data/amazon-beauty-2k]

``--smoke``: 16 items, one rep, a tiny random LLM with SmolLM2's tokenizer: checks that the
benchmark runs, not a result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _bench import DATA, SMOKE_NOTE, attention_runs, tiny_llm_folder  # a sibling module of the benchmarks
from _flops import bound_line, flops_per_item, matmul_gflops

from core.dataset import load_dataset
from core.events import item_text
from core.settings import get_settings
from models.aligner import AlignerConfig, FrozenLM, ItemAligner, tokenize_texts
from models.llm import fast_bf16, load_llm, pick_device
from training.align import _train_step, length_batches
from training.optim import row_optimizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default=str(DATA / "amazon-beauty-2k"))
    p.add_argument("--items", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--attention",
        type=attention_runs,
        default="sdpa,eager",
        help="comma-separated kernels (SAID_ATTENTION), each optionally +compile (SAID_ALIGN_COMPILE)",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = p.parse_args()
    settings = get_settings()
    llm_spec = settings.llm
    if args.smoke:
        args.items, args.reps, llm_spec = 16, 1, str(tiny_llm_folder())
        print(SMOKE_NOTE)
    device = pick_device(settings.device)
    cfg = settings.align
    ds = load_dataset(args.dataset, args.items)
    texts = [item_text(t, d) for t, d in zip(ds.titles, ds.descriptions, strict=True)]
    planned = args.attention
    kernels = [label for label, _, _ in planned]
    runs = {}
    for label, kernel, compiled in planned:
        model, tok = load_llm(llm_spec, settings.data_dir / "llm", device, 0, kernel)
        lm = FrozenLM.around(model, tok, device, cfg.prompt)
        runs[label] = lm.compiled() if compiled else lm
    lm = runs[kernels[0]]
    tokens = tokenize_texts(lm.tok, texts)
    batches = length_batches([len(t) for t in tokens], args.batch, 0)
    text_len = sum(map(len, tokens)) / len(tokens)
    step_flops = flops_per_item(lm.model, lm.prefix.length(cfg.k) + text_len, text_len)
    n = 512 if args.smoke else 2048
    # the multiply-adds alone are measured beside it; without native bf16 the operands stay
    # fp32 and there is no cast to leave out
    native_bf16 = fast_bf16(device)

    def bounds() -> tuple[float, float]:
        """This moment's matmul rates, GFLOP/s: under the steps' autocast, and on bf16 operands."""
        cast = matmul_gflops(device, n)
        return cast, matmul_gflops(device, n, dtype=torch.bfloat16) if native_bf16 else cast

    torch.manual_seed(0)
    aligner = ItemAligner(AlignerConfig(n_items=len(texts), hidden=lm.hidden, item_dim=cfg.item_dim, k=cfg.k))
    aligner.to(device)
    opts = [
        row_optimizer(cfg.row_optimizer, list(aligner.items.parameters()), cfg.lr_rows),
        torch.optim.Adam(aligner.projector.parameters(), lr=cfg.lr_proj),
    ]

    def one_pass(kernel: str) -> float:
        t0 = time.perf_counter()
        for b in batches:
            idx = torch.tensor([i + 1 for i in b], device=device)
            _train_step(runs[kernel], aligner.soft_tokens, idx, [tokens[i] for i in b], opts)
        return len(texts) / (time.perf_counter() - t0)

    warm_up = {}
    for kernel in kernels:  # warm-up: first calls allocate and pick kernels, or compile
        t0 = time.perf_counter()
        one_pass(kernel)
        warm_up[kernel] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {k: [] for k in kernels}
    rep_bounds = []  # the bound is sampled before every rep: the machine's speed drifts, and
    # a bound measured once per run read 336 to 734 GFLOP/s over four runs in one hour (stop 53)
    for _ in range(args.reps):
        rep_bounds.append(bounds())
        for kernel in kernels:
            rates[kernel].append(one_pass(kernel))
    gflops = statistics.median(b[0] for b in rep_bounds)
    mac_gflops = statistics.median(b[1] for b in rep_bounds)
    bound, macs = gflops * 1e9 / step_flops, mac_gflops * 1e9 / step_flops
    print(
        f"alignment steps: {len(texts)} items of {Path(args.dataset).name}, batch {args.batch}, k={cfg.k}, "
    )
    print(f"{text_len:.1f} text tokens an item, {device}, {args.reps} interleaved reps, median items/s")
    print(bound_line(bound, gflops, step_flops) + ", the median of one sample before each rep")
    print("  per rep, GFLOP/s under autocast: " + ", ".join(f"{b[0]:.0f}" for b in rep_bounds))
    if native_bf16:
        print(
            f"multiply-adds alone {macs:.1f} items/s ({mac_gflops:.0f} GFLOP/s on bf16 operands:"
            " no casts, the rate a step holding bf16 weights could approach)"
        )
        print("  per rep, GFLOP/s on bf16 operands: " + ", ".join(f"{b[1]:.0f}" for b in rep_bounds))
    print("shares: the median over reps of each rep's rate over the bound sampled just before it")
    print("| attention | items/s (median) | reps | share of FLOP bound | of multiply-adds | warm-up pass s |")
    print("|---|---|---|---|---|---|")
    for kernel, r in rates.items():
        med = statistics.median(r)
        reps = ", ".join(f"{x:.1f}" for x in r)
        paired = list(zip(r, rep_bounds, strict=True))
        share = statistics.median(x * step_flops / (b[0] * 1e9) for x, b in paired)
        mac_share = statistics.median(x * step_flops / (b[1] * 1e9) for x, b in paired)
        print(f"| {kernel} | {med:.2f} | {reps} | {share:.0%} | {mac_share:.0%} | {warm_up[kernel]:.0f} |")


if __name__ == "__main__":
    main()
