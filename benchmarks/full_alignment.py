"""Full SAID alignment of a data set plus the scorer comparison, sized for one GPU lease.

Runs ``training.evaluate.run`` (standard and cold-start protocols, variants id/text/said,
3 scorer seeds) and then, time permitting, a k=4 alignment for the fidelity trade-off.
Everything is written under OUT as it finishes, so a run stopped at its time limit keeps
every finished number. Works on CPU too (slowly); prints a results table at the end.

    python benchmarks/full_alignment.py --dataset DIR --out DIR [--llm PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from models.llm import pick_device
from training.align import AlignConfig
from training.evaluate import format_table, run
from training.recommender import ScorerTrainConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--llm", default=None, help="HF folder or .gguf; default the SmolLM2 GGUF")
    p.add_argument("--llm-cache", type=Path, default=Path("/tmp/said-llm"))
    p.add_argument("--align-epochs", type=int, default=40)
    p.add_argument("--align-batch", type=int, default=512, help="H100: ~100 ms a step at any batch")
    p.add_argument("--scorer-batch", type=int, default=512)
    p.add_argument("--scorer-lr", type=float, default=2e-3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget-s", type=float, default=520, help="skip the k=4 extra past this")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.time()
    device = pick_device("auto")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    logging.info("device %s", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    common = dict(
        dataset=args.dataset,
        seeds=[int(s) for s in args.seeds.split(",")],
        artifacts=args.out / "art",
        device=device,
        llm_spec=args.llm,
        llm_cache=args.llm_cache,
        align_cfg=AlignConfig(epochs=args.align_epochs, batch_size=args.align_batch),
        scorer_cfg=ScorerTrainConfig(batch_size=args.scorer_batch, lr=args.scorer_lr),
        progress=not args.no_progress,
    )
    results = run(
        variants=["id", "text", "said"],
        cold_fraction=0.1,
        k=1,
        results_path=args.out / "results_k1.json",
        **common,
    )
    print(format_table(results["summary"]))
    logging.info("k=1 done after %.0fs", time.time() - t0)
    if time.time() - t0 < args.budget_s:
        extra = run(
            variants=["said"], cold_fraction=0.0, k=4, results_path=args.out / "results_k4.json", **common
        )
        print(format_table(extra["summary"]))
    for name in ("results_k1.json", "results_k4.json"):
        path = args.out / name
        if path.exists():
            rep = json.loads(path.read_text()).get("said_report_standard", {})
            print(
                name, json.dumps({k: rep.get(k) for k in ("fidelity", "items_per_second", "align_seconds")})
            )
    logging.info("total %.0fs", time.time() - t0)


if __name__ == "__main__":
    main()
