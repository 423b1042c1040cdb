"""Scorer latency and throughput over HTTP on loopback, by catalogue size.

Method: for each size, a SQLite catalogue of N items and an index snapshot of N synthetic
576-d vectors (clustered, unit length) are written; ``said serve``'s app runs in its own
process (uvicorn, one worker). The load generator is ``wrk`` (Debian package; C, so it
takes little of the 2 cores) with C connections on 1 thread, posting ``/recommend`` with a
random 5-item history (Lua) and k=10 for D seconds after a 2 s warm-up; wrk's latency
percentiles are client-side. Without wrk, a Python thread pool (httpx) stands in, and the
table says so: it costs the server about half the CPU. Figures are medians over runs.

    python benchmarks/scorer_latency.py [--sizes 12101,100000] [--clients 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
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

DIM = 576


def build(folder: Path, n: int) -> str:
    from said.db import make_engine
    from said.migrate import upgrade
    from said.tables import items
    from updater.index import ItemIndex

    url = f"sqlite:///{folder}/bench.db"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    rows = [{"idx": i, "item_id": f"i{i}", "title": f"item {i}", "event_time": now,
             "text_hash": "x", "status": "aligned", "received_at": now, "updated_at": now}
            for i in range(1, n + 1)]  # fmt: skip
    with engine.begin() as conn:
        for s in range(0, n, 5000):
            conn.execute(items.insert(), rows[s : s + 5000])
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, DIM)).astype(np.float32)
    vecs = centres[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = ItemIndex(DIM)
    index.upsert(np.arange(1, n + 1), vecs)
    index.save(folder / "index", "bench-1")
    return url


def serve(url: str, index_dir: str, port: int) -> None:
    import uvicorn

    from said.db import make_engine
    from scorer.app import create_app
    from scorer.state import ServingState

    engine = make_engine(url)
    state = ServingState(engine, "bench", DIM, Path(index_dir))
    uvicorn.run(create_app(engine, state), port=port, log_level="warning")


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
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s",
                          f.name, f"http://127.0.0.1:{port}/recommend"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50_ms": ms("50"), "p99_ms": ms("99"),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "errors": int(errors.group(1)) if errors else 0}  # fmt: skip


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
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "rps": len(a) / wall, "errors": errors[0]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="12101,100000")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--serve", nargs=3, metavar=("URL", "INDEX_DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return
    import shutil

    from said.broker import free_port

    generator = load_wrk if shutil.which("wrk") else load
    print(f"load generator: {'wrk' if generator is load_wrk else 'python threads (no wrk)'}, "
          f"{args.clients} connections")  # fmt: skip
    print("| items | p50 ms | p99 ms | requests/s | errors |\n|---|---|---|---|---|")
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            url = build(Path(tmp), n)
            port = free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", url, f"{tmp}/index", str(port)])
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.2)
                generator(port, n, args.clients, 2.0)  # warm-up
                runs = [generator(port, n, args.clients, args.seconds) for _ in range(args.runs)]
            finally:
                proc.terminate()
                proc.wait()
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {n:,} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | {med['rps']:.0f} | "
              f"{sum(r['errors'] for r in runs)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
