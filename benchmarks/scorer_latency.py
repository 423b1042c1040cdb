"""Scorer latency and throughput over HTTP on loopback, by catalogue size.

Method: for each size, a SQLite catalogue of N items, an active SASRec scorer (64-d,
random weights: latency does not depend on training) and an index snapshot of N synthetic
clustered 64-d item vectors are written; ``said scorer serve``'s app runs in its own process
(uvicorn, one worker) exactly as in production: the index is exact below
``SAID_HNSW_MIN_ITEMS`` (50,000) and HNSW above. The baseline, in the same run, is the
previous serving path: cosine similarity of 576-d SAID vectors, exact search
(``--baseline-sizes``). The load generator is ``wrk`` (Debian package; C, so it takes little
of the 2 cores) on 1 thread with 1 connection (latency alone) and 4 (under load), posting
``/recommend`` with a random 5-item history (Lua) and k=10 for D seconds after a 2 s
warm-up; wrk's latency percentiles are client-side. Without wrk, a Python thread pool
(httpx) stands in, and the table says so.
Each catalogue is served by one and by two uvicorn worker processes (``said scorer serve
--workers``). Figures are medians over runs. Recall@10 of the HNSW index against exact
search is measured in-process on 500 SASRec queries from random histories over item
vectors with log-normal norms.

    python benchmarks/scorer_latency.py [--sizes 12101,100000,1000000] [--clients 4] [--smoke]

``--smoke``: 400 items (baseline, exact) and 1,500 (HNSW, its threshold lowered to 1,000), one 0.5 s
run per point: checks that the benchmark runs, not a result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from _bench import SMOKE_NOTE, rss_mib, wait_http  # a sibling module of the benchmarks

from core.settings import ApiSettings, IndexSettings, Settings
from said.broker import free_port

SAID_DIM = 576


def synthetic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered vectors, the shape of real item embeddings (256 centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    return centres[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)


def index_settings() -> IndexSettings:
    """The index section as ``said scorer serve`` reads it (``SAID_HNSW_MIN_ITEMS`` included)."""
    return Settings().index


def build(folder: Path, n: int, mode: str) -> str:
    """A catalogue of n items plus the snapshot the scorer loads; mode sasrec | cosine."""
    import torch
    from sqlalchemy import update

    from core.db import make_engine
    from core.tables import item_embeddings, items, model_versions, sequences
    from models.sasrec import SASRec, SASRecConfig, save_scorer
    from said.migrate import upgrade
    from scorer.index import ItemIndex
    from scorer.scorers import CosineScorer

    url = f"sqlite:///{folder}/bench.db"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for s in range(1, n + 1, 20_000):
            conn.execute(
                items.insert(),
                [
                    {
                        "idx": i,
                        "item_id": f"i{i}",
                        "title": f"item {i}",
                        "event_time": now,
                        "text_hash": "x",
                        "status": "aligned",
                        "received_at": now,
                        "updated_at": now,
                    }
                    for i in range(s, min(s + 20_000, n + 1))
                ],
            )
    if mode == "sasrec":
        torch.manual_seed(0)
        model = SASRec(SASRecConfig(n_items=2), torch.randn(3, SAID_DIM))
        path = save_scorer(folder / "scorer.pt", model, {"aligner_version": "bench"})
        with engine.begin() as conn:
            conn.execute(
                model_versions.insert().values(
                    version="sasrec-bench",
                    kind="scorer",
                    path=str(path),
                    status="active",
                    metrics={},
                    created_at=now,
                )
            )
        version, vecs = "sasrec-bench", synthetic(n, model.cfg.hidden)
    else:
        scorer = CosineScorer("bench", SAID_DIM)
        version, vecs = scorer.version, scorer.item_vectors(np.arange(1, n + 1), synthetic(n, SAID_DIM))
    index = ItemIndex(vecs.shape[1], index_settings().hnsw_min_items)
    index.build(np.arange(1, n + 1), vecs)
    # The scorer loads a snapshot named <version>-q<watermark>, the watermark being the
    # newest item_embeddings.seq it holds, and keeps an item's vector only if the catalogue
    # has an embedding row of the item's current text at or below it (scorer/state.py). The
    # rows say so (seq 1..n, the item's text hash); their vector bytes are a placeholder, as
    # nothing reads a row the snapshot already holds (the index was built from synthetic
    # vectors directly; real 576-d rows would be 2.3 GB at 1M items).
    with engine.begin() as conn:
        for s in range(1, n + 1, 20_000):
            conn.execute(
                item_embeddings.insert(),
                [
                    {"item_idx": i, "model_version": "bench", "text_hash": "x", "vector": b"\0\0\0\0"}
                    | {"kind": "full", "created_at": now, "seq": i}
                    for i in range(s, min(s + 20_000, n + 1))
                ],
            )
        conn.execute(update(sequences).where(sequences.c.name == "embeddings").values(value=n))
    index.save(folder / "index", f"{version}-q{n}")
    return url


def hnsw_recall(n: int, queries: int = 500) -> tuple[float, float]:
    """(recall@10 of HNSW vs exact, HNSW build seconds): n synthetic 64-d item vectors with
    log-normal norms, queries from an untrained SASRec over random 5-item histories."""
    import torch

    from models.sasrec import SASRec, SASRecConfig
    from scorer.index import ItemIndex
    from scorer.scorers import SASRecScorer

    rng = np.random.default_rng(2)
    vecs = synthetic(n, 64) * rng.lognormal(0, 0.7, (n, 1)).astype(np.float32)
    torch.manual_seed(0)
    scorer = SASRecScorer(SASRec(SASRecConfig(n_items=2), torch.randn(3, SAID_DIM)), "bench")
    q = np.concatenate([scorer.query(vecs[rng.integers(0, n, 5)]) for _ in range(queries)])
    exact, approx = ItemIndex(64, hnsw_min_items=n + 1), ItemIndex(64, hnsw_min_items=1)
    exact.build(np.arange(1, n + 1), vecs)
    t0 = time.perf_counter()
    approx.build(np.arange(1, n + 1), vecs)
    build_s = time.perf_counter() - t0
    _, e = exact.search(q, 10)
    _, a = approx.search(q, 10)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, e, strict=True)])), build_s


def factory():
    """The app for one uvicorn worker process (as ``said scorer serve``'s ``said.wiring.serving_app``)."""
    import torch

    from core.db import make_engine
    from scorer.app import create_app
    from scorer.state import ServingState

    torch.set_num_threads(1)  # as `said scorer serve` does
    engine = make_engine(os.environ["BENCH_URL"])
    state = ServingState(
        engine, "bench", SAID_DIM, Path(os.environ["BENCH_INDEX"]), index_settings(), ("click",)
    )
    return create_app(engine, state, ApiSettings())


def serve(url: str, index_dir: str, port: int, workers: int) -> None:
    import uvicorn

    os.environ |= {"BENCH_URL": url, "BENCH_INDEX": index_dir}
    uvicorn.run(
        "scorer_latency:factory",
        factory=True,
        port=port,
        workers=workers,
        app_dir=str(Path(__file__).parent),
        log_level="warning",
    )


WRK_LUA = """
math.randomseed(42)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local h = {}
  for i = 1, 5 do h[i] = '"i' .. math.random(1, %d) .. '"' end
  return wrk.format(nil, nil, nil, '{"history": [' .. table.concat(h, ",") .. '], "k": 10}')
end
"""


def load_wrk(port: int, n: int, clients: int, seconds: float) -> dict[str, float]:
    """wrk run; parses its --latency percentiles, requests/s and non-2xx count."""
    import re

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA % n)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{clients}",
            f"-d{max(1, round(seconds))}s",  # whole seconds: wrk reads -d0s as "no limit"
            "--latency",
            "-s",
            f.name,
            f"http://127.0.0.1:{port}/recommend",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": int(errors.group(1)) if errors else 0,
    }


def load(port: int, n: int, clients: int, seconds: float) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/recommend"
    lat: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    errors = [0]

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client() as c:
            while time.perf_counter() < stop_at:
                body = {"history": [f"i{i}" for i in rng.integers(1, n + 1, 5)], "k": 10}
                t0 = time.perf_counter()
                r = c.post(url, json=body)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    errors[0] += r.status_code != 200

    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "rps": len(a) / wall,
        "errors": errors[0],
    }


def measure(n: int, mode: str, generator, args) -> list[dict[str, float]]:
    """One catalogue of n items, served by 1 then 2 worker processes: a row each."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = build(Path(tmp), n, mode)
        for workers in (1, 2):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", url, f"{tmp}/index", str(port), str(workers)]
            )
            try:
                ready = wait_http(f"http://127.0.0.1:{port}/readyz", 600, proc)
                if ready["index_items"] != n:
                    raise RuntimeError(f"the scorer serves {ready['index_items']} items, not {n}: {ready}")
                time.sleep(args.settle * workers)  # every worker process is ready
                generator(port, n, max(args.clients), args.warmup)
                for clients in args.clients:
                    runs = [generator(port, n, clients, args.seconds) for _ in range(args.runs)]
                    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    rows.append(
                        out
                        | {"errors": sum(r["errors"] for r in runs), "workers": workers, "clients": clients}
                    )
                rss = rss_mib(proc.pid) + sum(rss_mib(c) for c in _children(proc.pid))
                for row in rows[-len(args.clients) :]:
                    row["rss"] = rss
            finally:
                proc.terminate()
                proc.wait()
    return rows


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="12101,100000,1000000")
    ap.add_argument("--baseline-sizes", default="12101", help="cosine 576-d, the former path")
    ap.add_argument("--clients", default="1,4", help="connections: 1 = latency alone, 4 = under load")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds per worker process to start")
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    ap.add_argument(
        "--serve", nargs=4, metavar=("URL", "INDEX_DIR", "PORT", "WORKERS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.baseline_sizes, args.seconds, args.runs = "1500", "400", 0.5, 1
        args.warmup, args.settle = 0.2, 0.5
        os.environ["SAID_HNSW_MIN_ITEMS"] = "1000"  # HNSW from 1,000 items; the servers inherit it
        print(SMOKE_NOTE)
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]), int(args.serve[3]))
        return
    import shutil

    generator = load_wrk if shutil.which("wrk") else load
    print(
        f"load generator: {'wrk' if generator is load_wrk else 'python threads (no wrk)'}, "
        f"{args.runs} runs of {args.seconds:g} s, medians"
    )
    print(
        "| scorer | items | index | workers | connections | p50 ms | p99 ms | requests/s | errors "
        "| server RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    hnsw_min_items = index_settings().hnsw_min_items

    jobs = [("cosine 576-d (baseline)", "cosine", int(x)) for x in args.baseline_sizes.split(",") if x]
    jobs += [("SASRec 64-d", "sasrec", int(x)) for x in args.sizes.split(",")]
    for label, mode, n in jobs:
        kind = "HNSW" if n >= hnsw_min_items else "exact"
        for m in measure(n, mode, generator, args):
            print(
                f"| {label} | {n:,} | {kind} | {m['workers']} | {m['clients']} | {m['p50_ms']:.1f} | "
                f"{m['p99_ms']:.1f} | {m['rps']:.0f} | {m['errors']} | {m['rss']:.0f} |",
                flush=True,
            )
    print("\n| items | HNSW recall@10 vs exact | HNSW build s |\n|---|---|---|")
    for n in [int(x) for x in args.sizes.split(",") if int(x) >= hnsw_min_items]:
        recall, build_s = hnsw_recall(n)
        print(f"| {n:,} | {recall:.3f} | {build_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
