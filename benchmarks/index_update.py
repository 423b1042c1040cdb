"""Index updates while serving: items/s added or replaced, and the search latency meanwhile.

Method (in one process, as in ``said scorer serve``): an ``ItemIndex`` of N synthetic 64-d item
vectors (exact below 50,000 items, HNSW above) and an untrained SASRec scorer. A search
thread issues queries back to back (5-item history -> SASRec query -> top-10, under the
serving lock) while the main thread applies updates the way the refresher does: a batch
of B fresh 576-d SAID vectors -> the scorer's adapter -> upsert under the same lock (half
new items, half replacements), compacting when the delta tier asks for it. Each run lasts
D seconds; the baseline is the same search thread with no updates, in the same run.
Figures are medians over runs.

    python benchmarks/index_update.py [--sizes 12101,100000] [--batch 16] [--seconds 10] [--smoke]

``--smoke``: 400 items (exact) and 1,500 (HNSW, its threshold lowered to 1,000), one 1 s
run each: checks that the benchmark runs, not a result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np
import torch
from _bench import SMOKE_NOTE  # a sibling module of the benchmarks
from scorer_latency import SAID_DIM, index_settings, synthetic  # a sibling script: same vectors

from models.sasrec import SASRec, SASRecConfig
from scorer.index import ItemIndex
from scorer.scorers import SASRecScorer


def run(n: int, batch: int, seconds: float, updating: bool) -> dict[str, float]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    scorer = SASRecScorer(SASRec(SASRecConfig(n_items=2), torch.randn(3, SAID_DIM)), "bench")
    index = ItemIndex(64, index_settings())
    index.build(np.arange(1, n + 1), synthetic(n, 64))
    lock, stop, lat = threading.Lock(), threading.Event(), []
    rng = np.random.default_rng(1)

    def searcher() -> None:
        while not stop.is_set():
            hist = rng.integers(1, n + 1, 5)
            t0 = time.perf_counter()
            with lock:
                query = scorer.query(np.stack([index.vector(i) for i in hist]))
                index.search(query, 10, set(hist.tolist()))
            lat.append(time.perf_counter() - t0)

    thread = threading.Thread(target=searcher)
    thread.start()
    updated, compactions, next_id = 0, 0, n + 1
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if not updating:
            time.sleep(0.05)
            continue
        new = np.arange(next_id, next_id + batch // 2)
        old = rng.integers(1, n + 1, batch - len(new))
        ids = np.unique(np.concatenate([new, old]))
        vecs = scorer.item_vectors(ids, synthetic(len(ids), SAID_DIM, seed=int(next_id)))
        with lock:
            index.upsert(ids, vecs)
        next_id += len(new)
        updated += len(ids)
        if index.needs_compaction():  # built off the lock, then swapped (the scorer builds on its own thread)
            fresh = index.compacted()
            with lock:
                index = fresh
            compactions += 1
    stop.set()
    thread.join()
    a = np.array(lat) * 1000
    return {
        "items_per_s": updated / seconds,
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "searches_per_s": len(a) / seconds,
        "compactions": compactions,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="12101,100000")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.seconds, args.runs = "400,1500", 1.0, 1
        os.environ["SAID_HNSW_MIN_ITEMS"] = "1000"  # HNSW from 1,000 items
        print(SMOKE_NOTE)
    print(
        f"batch {args.batch}, {args.runs} runs of {args.seconds:g} s, medians; "
        f"HNSW from {index_settings().hnsw_min_items:,} items"
    )
    print(
        "| items | updates | items/s upserted | search p50 ms | search p99 ms | searches/s | "
        "compactions |\n|---|---|---|---|---|---|---|"
    )
    for n in [int(x) for x in args.sizes.split(",")]:
        for updating in (False, True):
            runs = [run(n, args.batch, args.seconds, updating) for _ in range(args.runs)]
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(
                f"| {n:,} | {'yes' if updating else 'no (baseline)'} | {m['items_per_s']:.0f} | "
                f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['searches_per_s']:.0f} | "
                f"{m['compactions']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
