"""The quality table: does SAID beat id and text? (issue 13)

Runs ``training.evaluate.run`` (the code behind ``said dataset evaluate``) with every variant, two
alignment seeds and three scorer seeds, on the standard and the cold-start protocol:
- one SAID alignment per alignment seed (the default configuration), with 10% of items
  held out of it; those enter through the worker's incremental path (ridge estimate, then
  refinement of their rows alone), as new ads do in production;
- every variant's scorer is early-stopped on the validation users (each user's second to
  last item) and measured on the test users (the last item), full ranking over all items;
- mean ± sample std over all runs, and a paired comparison with ``id`` (same scorer seed);
- the default variant is the one with the best mean validation NDCG@10, never test.

Results are rewritten after every run (``--out``), so a stopped run keeps what it finished.

    python benchmarks/quality.py --dataset ../shared/data/amazon-beauty-2k --out DIR

``--smoke``: every variant on a slice of amazon-beauty-2k (its first 60 items and their
users), one alignment seed (one pass, k=1) and one scorer seed (2 epochs), a tiny random
LLM with SmolLM2's tokenizer, into a temporary OUT: checks that the benchmark runs, not a
result.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from _bench import DATA, SMOKE_NOTE, smoke_dataset, smoke_settings  # a sibling module of the benchmarks

from core.settings import get_settings
from models.sasrec import SASRecConfig
from training.evaluate import (
    JOINT,
    VARIANTS,
    Plan,
    changed_settings,
    format_table,
    paired,
    pick_default,
    run,
    write_results,
)
from training.mixed import format_compare


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=False, help="a data-set folder (required but with --smoke)")
    p.add_argument(
        "--out", type=Path, help="folder for the cached tables and results.json (required but with --smoke)"
    )
    p.add_argument(
        "--variant",
        nargs="+",
        choices=VARIANTS,
        default=[v for v in VARIANTS if v not in JOINT],
        help="default: all but the said-joint diagnostic, which costs one more alignment",
    )
    p.add_argument("--align-seeds", default="0,1")
    p.add_argument("--seeds", default="0,1,2", help="scorer seeds")
    p.add_argument("--cold-fraction", type=float, default=0.1)
    p.add_argument(
        "--split-seed", type=int, default=0, help="the held-out item draw (0: every earlier table's)"
    )
    p.add_argument("--resume", action="store_true", help="keep the finished runs of the results file")
    p.add_argument("--results", default="results.json", help="results file name, in OUT")
    p.add_argument(
        "--protocol", choices=["standard", "cold", "mixed"], default=None, help="only this protocol"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an SASRecConfig field (JSON value) for every run of every --variant given: an "
        "experiment, its runs labelled with it; give it only with the variants it changes",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = p.parse_args()
    settings = get_settings()
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="said-smoke-")  # removed at exit
        src = Path(args.dataset) if args.dataset else DATA / "amazon-beauty-2k"
        args.dataset = str(smoke_dataset(src, Path(tmp.name) / src.name, items=60, users=400))
        args.out = args.out or Path(tmp.name) / "quality"
        args.align_seeds, args.seeds = "0", "0"
        settings = smoke_settings(settings, align_epochs=1, scorer_epochs=2, scorer_eval_every=1)
        print(SMOKE_NOTE)
    if not args.dataset or not args.out:
        p.error("--dataset and --out are required (but with --smoke)")
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    SASRecConfig(n_items=1, **options)  # an unknown or mistyped option fails now, not after the alignment
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    out = args.out / args.results
    earlier = json.loads(out.read_text()) if args.resume and out.exists() else {"split_seed": args.split_seed}
    if (held := earlier.get("split_seed", 0)) != args.split_seed:
        p.error(f"{out} holds split seed {held}, not {args.split_seed}: use another --results")
    if changed := changed_settings(earlier, settings):
        p.error(f"{out} was run with other settings ({', '.join(changed)}): use another --results")
    done = earlier.get("runs", [])
    plan = Plan(
        Path(args.dataset),
        args.variant,
        [int(s) for s in args.seeds.split(",")],
        [int(s) for s in args.align_seeds.split(",")],
        args.cold_fraction,
        model_options=options,
        only_protocol=args.protocol,
        split_seed=args.split_seed,
    )
    results = run(plan, settings, args.out, results_path=out, done=done)
    chosen_on = "mixed" if results.get("mixed") else "standard"
    results["default_variant"] = pick_default(results["summary"], chosen_on)
    results["minutes"] = (time.perf_counter() - t0) / 60
    write_results(results, out)
    print(
        f"Quality of {args.dataset} ({results['items']} items, {results['users']} users, {results['device']})"
    )
    print("test NDCG/Recall; 'val ndcg@10' is the validation figure each model was chosen on")
    print(format_table(results["summary"], paired(results["runs"])))
    if results.get("mixed"):
        print("\nmixed protocol: all / warm-target / cold-target test users of one training, 95% bootstrap")
        print("intervals over users, paired differences against id, text and text-init (where run)")
        print(format_compare(results["mixed"]))
    print(
        f"default variant (best mean validation NDCG@10, {chosen_on} protocol): {results['default_variant']}"
    )
    print(f"wall minutes: {results['minutes']:.1f}")


if __name__ == "__main__":
    main()
