"""Scorer latency and throughput over HTTP on loopback, by catalogue size and request kind.

Method: for each size, a SQLite catalogue of N items, 1,000 users with 20 clicks each, the
served model (the warm/cold composite, 193-d scoring vectors with the similarity term and
the history-read block; untrained: latency does not depend on training) and an index
snapshot of N item vectors (the composite's, of synthetic clustered SAID vectors: the
teacher's ID rows for the first min(N/2, 50,000), the student's for the rest, as for fresh
items) are written; ``said scorer serve``'s app runs in its own process (uvicorn) exactly as
in production: the index is exact below ``SAID_HNSW_MIN_ITEMS`` (50,000) and HNSW above. The
baseline, in the same run, is the first serving path: cosine similarity of 576-d SAID
vectors, exact search (``--baseline-sizes``). Two request kinds are measured apart:
``user_id`` (a random one of the 1,000 users: the history is read from the catalogue, and a
repeated one's query vector comes from the cache) and ``history`` (a random 5-item history
in the body). The load generator is ``wrk`` (Debian package; C) on 1 thread with 1
connection (latency alone) and 4 (under load), posting ``/recommend`` with k=10 for D
seconds after a 2 s warm-up; its latency percentiles are client-side, and the table gives
the cores wrk itself took (its CPU seconds over the wall seconds) on the 2 cores it shares
with the server. Without wrk, a Python thread pool (httpx) stands in, and the table says so.
Each catalogue is served by 1 and by 2 uvicorn worker processes (``--workers``). Figures are
medians over runs. Recall@10 of the HNSW index against exact search, and a single query's
search time, are measured in-process on 500 composite queries from random histories (200 of
them timed, one at a time, on one FAISS thread as served; the build is single-threaded too),
over vectors with log-normal norms and over the served ones, at the served efSearch
(``SAID_HNSW_EF_SEARCH``) and at those of ``--ef-search``: the frontier an operator picks
from. ``--profile PREFIX`` also samples the server with py-spy during one more 10 s run per
point, after the measured ones (two-worker runs measured straight after it ran at one
worker's rate), and prints the frames most often on the stack and at its top.

    python benchmarks/scorer_latency.py [--sizes 100000,1000000] [--clients 1,4] [--smoke]

``--smoke``: 400 items (baseline, exact) and 1,500 (HNSW, its threshold lowered to 1,000), one 0.5 s
run per point: checks that the benchmark runs, not a result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
from _bench import SMOKE_NOTE, rss_mib, wait_http  # a sibling module of the benchmarks

from core.settings import ApiSettings, CompositeSettings, IndexSettings, Settings
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


WARM_ITEMS = 50_000  # items the composite's teacher trained on (at most half the catalogue)
USERS = 1_000  # users with a stored history, for ``user_id`` requests
HISTORY = 20  # clicks per user


def _rows(conn, table, rows) -> None:
    """Insert a generator of rows in chunks (1M rows at once would need GBs)."""
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == 20_000:
            conn.execute(table.insert(), chunk)
            chunk = []
    if chunk:
        conn.execute(table.insert(), chunk)


def composite(n: int):
    """The served model, untrained: a 64-d ID teacher over the first ``min(n // 2,
    WARM_ITEMS)`` items (each with one interaction) and a student for the rest, which are
    scored as fresh items are. Latency does not depend on training.

    The teacher's rows start where a retrain starts them (``updater.retrain.content_start``,
    ``SAID_COMPOSITE_TEACHER_INIT=content``, the default): at their content's principal
    axes. Before stop 53 they kept their random start, which no served model holds; the
    served vectors' HNSW recall did not move with it (100k items, efSearch 128: 0.858
    against 0.865; docs/results.md)."""
    import torch

    from models.sasrec import SASRec, SASRecConfig, init_id_rows
    from training.composite import new_composite

    warm = min(n // 2, WARM_ITEMS)
    torch.manual_seed(0)
    teacher = SASRec(SASRecConfig(n_items=warm))
    content = torch.from_numpy(synthetic(warm + 1, SAID_DIM, seed=1))
    cfg = CompositeSettings(dropout=0.0)  # the served shape: the similarity term's blocks too
    if cfg.teacher_init == "content":
        init_id_rows(teacher, content, torch.arange(1, warm + 1))
    return new_composite(teacher, content, torch.ones(warm + 1), cfg).eval()


def build(folder: Path, n: int, mode: str) -> str:
    """A catalogue of n items, ``USERS`` users' click histories and the snapshot the scorer
    loads; mode composite | cosine."""
    from sqlalchemy import update

    from core.db import make_engine
    from core.tables import interactions, item_embeddings, items, model_versions, sequences
    from models.composite import save_composite
    from said.migrate import upgrade
    from scorer.index import ItemIndex
    from scorer.scorers import CompositeScorer, CosineScorer

    url = f"sqlite:///{folder}/bench.db"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    item_row = {"title": "item", "event_time": now, "text_hash": "x", "status": "aligned"}
    rng = np.random.default_rng(3)
    with engine.begin() as conn:
        _rows(
            conn,
            items,
            (
                item_row | {"idx": i, "item_id": f"i{i}", "received_at": now, "updated_at": now}
                for i in range(1, n + 1)
            ),
        )
        clicks = rng.integers(1, n + 1, (USERS, HISTORY))
        _rows(
            conn,
            interactions,
            (
                {"event_id": f"e{u}-{t}", "user_id": f"u{u}", "item_idx": int(clicks[u, t]), "type": "click"}
                | {"event_time": now + timedelta(seconds=t)}
                for u in range(USERS)
                for t in range(HISTORY)
            ),
        )
    if mode == "composite":
        model = composite(n)
        path = save_composite(folder / "scorer.pt", model, {"aligner_version": "bench"})
        with engine.begin() as conn:
            conn.execute(
                model_versions.insert().values(
                    version="composite-bench",
                    kind="scorer",
                    path=str(path),
                    status="active",
                    metrics={},
                    created_at=now,
                )
            )
        scorer = CompositeScorer(model, "composite-bench")
    else:
        scorer = CosineScorer("bench", SAID_DIM)
    ids = np.arange(1, n + 1)
    vecs = served_vectors(scorer, ids)
    index = ItemIndex(vecs.shape[1], index_settings(), scorer.silent)
    index.build(ids, vecs)
    # The scorer loads a snapshot named <version>-q<watermark>, the watermark being the
    # newest item_embeddings.seq it holds, and keeps an item's vector only if the catalogue
    # has an embedding row of the item's current text at or below it (scorer/state.py). The
    # rows say so (seq 1..n, the item's text hash); their vector bytes are a placeholder, as
    # nothing reads a row the snapshot already holds (real 576-d rows would be 2.3 GB at 1M items).
    row = {"model_version": "bench", "text_hash": "x", "vector": b"\0\0\0\0", "kind": "full"}
    with engine.begin() as conn:
        _rows(
            conn,
            item_embeddings,
            (row | {"item_idx": i, "created_at": now, "seq": i} for i in range(1, n + 1)),
        )
        conn.execute(update(sequences).where(sequences.c.name == "embeddings").values(value=n))
    index.save(folder / "index", f"{scorer.version}-q{n}")
    return url


def served_vectors(scorer, ids: np.ndarray) -> np.ndarray:
    """The scorer's index vectors of synthetic SAID vectors, 50,000 items at a time."""
    return np.concatenate(
        [
            scorer.item_vectors(ids[s : s + 50_000], synthetic(len(ids[s : s + 50_000]), SAID_DIM, seed=s))
            for s in range(0, len(ids), 50_000)
        ]
    )


def hnsw_recall(n: int, efs: list[int], queries: int = 500) -> list[dict[str, float]]:
    """Recall@10 of HNSW against exact search (``queries`` queries), and one query's search
    time (median ms over 200 of them, one thread, as served), at each efSearch of ``efs``:
    on clustered vectors with log-normal norms and on the vectors this benchmark serves, n
    served-width scoring vectors, queries from the untrained composite over random 5-item
    histories. The served vectors are the untrained composite's: its teacher's rows at
    their content's start, the student's for the rest; a trained model's rows are not
    measured here."""
    import faiss

    from scorer.index import ItemIndex
    from scorer.scorers import CompositeScorer

    faiss.omp_set_num_threads(1)  # as ``ServingState`` searches
    rng = np.random.default_rng(2)
    model = composite(n)
    scorer = CompositeScorer(model, "bench")
    ids = np.arange(1, n + 1)
    rows = [{"ef": ef} for ef in efs]
    lognormal = synthetic(n, model.cfg.hidden) * rng.lognormal(0, 0.7, (n, 1)).astype(np.float32)
    for name, vecs in (("clustered", lognormal), ("served", served_vectors(scorer, ids))):
        q = np.concatenate([scorer.query(vecs[rng.integers(0, n, 5)]) for _ in range(queries)])
        exact = ItemIndex(vecs.shape[1], IndexSettings(hnsw_min_items=n + 1), scorer.silent)
        exact.build(ids, vecs)
        _, e = exact.search(q, 10)
        t0 = time.perf_counter()
        approx = ItemIndex(vecs.shape[1], IndexSettings(hnsw_min_items=1), scorer.silent)
        approx.build(ids, vecs)
        build_s = time.perf_counter() - t0
        for row in rows:
            row.setdefault("build_s", build_s)  # the clustered vectors' build
            approx.cfg = approx.cfg.model_copy(update={"hnsw_ef_search": row["ef"]})
            _, a = approx.search(q, 10)
            hits = [len(set(x) & set(y)) / 10 for x, y in zip(a, e, strict=True)]
            row[f"{name}_recall"] = float(np.mean(hits))
            times = []
            for one in q[:200]:
                t = time.perf_counter()
                approx.search(one[None], 10)
                times.append(time.perf_counter() - t)
            row[f"{name}_ms"] = 1e3 * statistics.median(times)
    return rows


def factory():
    """The app for one uvicorn worker process (as ``said scorer serve``'s ``said.wiring.serving_app``)."""
    import torch

    from core.db import make_engine
    from scorer.app import create_app
    from scorer.state import ServingState, freeze_heap

    torch.set_num_threads(1)  # as `said scorer serve` does
    engine = make_engine(os.environ["BENCH_URL"])
    state = ServingState(
        engine, "bench", SAID_DIM, Path(os.environ["BENCH_INDEX"]), index_settings(), ("click",)
    )
    app = create_app(engine, state, ApiSettings())
    freeze_heap()  # as `said scorer serve` does
    return app


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
  if "%(kind)s" == "user_id" then
    return wrk.format(nil, nil, nil, '{"user_id": "u' .. math.random(0, %(users)d - 1) .. '", "k": 10}')
  end
  local h = {}
  for i = 1, 5 do h[i] = '"i' .. math.random(1, %(n)d) .. '"' end
  return wrk.format(nil, nil, nil, '{"history": [' .. table.concat(h, ",") .. '], "k": 10}')
end
"""


def load_wrk(port: int, n: int, kind: str, clients: int, seconds: float) -> dict[str, float]:
    """wrk run: its --latency percentiles, requests/s, non-2xx count, and the cores wrk
    itself used (its CPU seconds over the run's wall seconds: taken from the server)."""
    import re
    import resource

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA % {"kind": kind, "users": USERS, "n": n})
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
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
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": int(errors.group(1)) if errors else 0,
        "load_cores": cpu / wall,
    }


def load(port: int, n: int, kind: str, clients: int, seconds: float) -> dict[str, float]:
    """Python threads (httpx) instead of wrk; the same figures, the load's cores being this
    process's CPU over the run's wall time."""
    url = f"http://127.0.0.1:{port}/recommend"
    lat: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    errors = [0]

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client() as c:
            while time.perf_counter() < stop_at:
                if kind == "user_id":
                    body = {"user_id": f"u{rng.integers(USERS)}", "k": 10}
                else:
                    body = {"history": [f"i{i}" for i in rng.integers(1, n + 1, 5)], "k": 10}
                t0 = time.perf_counter()
                r = c.post(url, json=body)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    errors[0] += r.status_code != 200

    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    t0, cpu0 = time.perf_counter(), time.process_time()
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
        "load_cores": (time.process_time() - cpu0) / wall,
    }


def measure(n: int, mode: str, generator, args) -> list[dict[str, float]]:
    """One catalogue of n items, served by each number of worker processes: a row per
    (workers, request kind, connections)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = build(Path(tmp), n, mode)
        for workers in args.workers:
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", url, f"{tmp}/index", str(port), str(workers)]
            )
            try:
                ready = wait_http(f"http://127.0.0.1:{port}/readyz", 600, proc)
                if ready["index_items"] != n:
                    raise RuntimeError(f"the scorer serves {ready['index_items']} items, not {n}: {ready}")
                time.sleep(args.settle * workers)  # every worker process is ready
                first = len(rows)
                for kind in args.requests:
                    generator(port, n, kind, max(args.clients), args.warmup)
                    for clients in args.clients:
                        runs = [generator(port, n, kind, clients, args.seconds) for _ in range(args.runs)]
                        out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                        errors = sum(r["errors"] for r in runs)
                        rows.append(
                            out | {"errors": errors, "workers": workers, "clients": clients, "kind": kind}
                        )
                    if args.profile:  # after the measured runs: they ran at one worker's rate after py-spy
                        profile(
                            proc.pid,
                            f"{args.profile}-{mode}-{n}-{workers}w-{kind}.txt",
                            generator,
                            (port, n, kind, 4, 10),
                        )
                rss = rss_mib(proc.pid) + sum(rss_mib(c) for c in _children(proc.pid))
                for row in rows[first:]:
                    row["rss"] = rss
            finally:
                proc.terminate()
                proc.wait()
    return rows


def profile(pid: int, out: str, generator, load_args: tuple) -> None:
    """py-spy samples the server (and its worker processes) for one extra 10 s run at 4
    connections; prints the 12 frames most often on the stack (inclusive share) and the 12
    most often at its top (own share), from the raw (collapsed) stacks it writes to ``out``."""
    from collections import Counter

    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "-r", "200"]
        + ["-d", "12", "-o", out, "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    generator(*load_args)
    spy.wait()
    inclusive, own, total = Counter(), Counter(), 0
    for line in Path(out).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # "function (file:line)" -> "function (file)": a function's lines count as one frame
        frames = [f.rsplit(":", 1)[0] + ")" for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    print(f"\nprofile ({out}, {total} samples): on the stack | at its top")
    for (f_in, n_in), (f_own, n_own) in zip(inclusive.most_common(12), own.most_common(12), strict=False):
        print(f"  {100 * n_in / total:5.1f}% {f_in[:90]:90s} | {100 * n_own / total:5.1f}% {f_own[:90]}")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def counts(spec: str) -> list[int]:
    """A comma-separated list of positive integers (an argparse ``type``)."""
    try:
        values = [int(x) for x in spec.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: give positive integers, comma-separated")
    return values


def counts_or_none(spec: str) -> list[int]:
    """``counts``, or no sizes at all for an empty string (``--baseline-sizes ""``)."""
    return counts(spec) if spec else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=counts, default="12101,100000,1000000")
    ap.add_argument(
        "--baseline-sizes", type=counts_or_none, default="12101", help="cosine 576-d, the former path"
    )
    ap.add_argument(
        "--clients", type=counts, default="1,4", help="connections: 1 = latency alone, 4 = under load"
    )
    ap.add_argument("--workers", type=counts, default="1,2", help="uvicorn worker processes")
    ap.add_argument("--requests", default="user_id,history", help="request kinds: user_id, history")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds per worker process to start")
    ap.add_argument(
        "--ef-search",
        type=counts,
        default="64,256,512",
        help="efSearch values of the recall table, beside the served one (SAID_HNSW_EF_SEARCH)",
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny size that checks the script runs")
    ap.add_argument(
        "--profile",
        metavar="PREFIX",
        help="py-spy the server, to <PREFIX>-<scorer>-<items>-<workers>w-<kind>.txt",
    )
    ap.add_argument(
        "--serve", nargs=4, metavar=("URL", "INDEX_DIR", "PORT", "WORKERS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        ap.error("--profile needs py-spy on the PATH: pip install py-spy")
    if args.smoke:
        args.sizes, args.baseline_sizes, args.seconds, args.runs = [1500], [400], 0.5, 1
        args.warmup, args.settle = 0.2, 0.5
        os.environ["SAID_HNSW_MIN_ITEMS"] = "1000"  # HNSW from 1,000 items; the servers inherit it
        print(SMOKE_NOTE)
    args.requests = args.requests.split(",")
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]), int(args.serve[3]))
        return
    generator = load_wrk if shutil.which("wrk") else load
    print(
        f"load generator: {'wrk' if generator is load_wrk else 'python threads (no wrk)'}, "
        f"{args.runs} runs of {args.seconds:g} s, medians"
    )
    print(
        "| scorer | items | index | workers | request | connections | p50 ms | p99 ms | requests/s "
        "| errors | load generator cores | server RSS MiB |\n" + "|---" * 12 + "|"
    )
    hnsw_min_items = index_settings().hnsw_min_items

    jobs = [("cosine 576-d (baseline)", "cosine", n) for n in args.baseline_sizes]
    width = composite(64).cfg.hidden  # the served width, from the model itself
    jobs += [(f"composite {width}-d", "composite", n) for n in args.sizes]
    for label, mode, n in jobs:
        kind = "HNSW" if n >= hnsw_min_items else "exact"
        for m in measure(n, mode, generator, args):
            print(
                f"| {label} | {n:,} | {kind} | {m['workers']} | {m['kind']} | {m['clients']} | "
                f"{m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['rps']:.0f} | {m['errors']} | "
                f"{m['load_cores']:.2f} | {m['rss']:.0f} |",
                flush=True,
            )
    served_ef = index_settings().hnsw_ef_search
    efs = sorted({served_ef, *args.ef_search})
    print(
        "\n| items | efSearch | HNSW recall@10 vs exact: clustered, log-normal norms | search ms "
        "| served vectors (untrained, content-started) | search ms | HNSW build s |\n" + "|---" * 7 + "|"
    )
    for n in [n for n in args.sizes if n >= hnsw_min_items]:
        for r in hnsw_recall(n, efs):
            ef = f"{r['ef']} (served)" if r["ef"] == served_ef else str(r["ef"])
            print(
                f"| {n:,} | {ef} | {r['clustered_recall']:.3f} | {r['clustered_ms']:.2f} | "
                f"{r['served_recall']:.3f} | {r['served_ms']:.2f} | {r['build_s']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
