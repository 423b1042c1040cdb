"""``said demo`` end to end in a subprocess (tiny real-tokenizer LLM, generated data set):
the summary, the plots, and a Ctrl-C that leaves no broker process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from said.broker import free_port
from tests.support.catalogue import write_dataset


def _demo(tmp_path: Path, tiny_hf_folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = os.environ | {
        "SAID_LLM": str(tiny_hf_folder),
        "SAID_DATA_DIR": str(tmp_path / "data"),
        "SAID_DATABASE_URL": f"sqlite:///{tmp_path}/demo.db",
        "SAID_DEVICE": "cpu",
        "SAID_LOG_LEVEL": "INFO",
        "SAID_API_TOKEN": "demo-token",  # the demo's own requests must carry it
    }
    cmd = [
        sys.executable,
        "-m",
        "said.cli",
        "demo",
        "--dataset",
        str(write_dataset(tmp_path / "ds")),
        "--items",
        "60",
        "--align-epochs",
        "1",
        "--fresh",
        "3",
        "--port",
        str(port),
        *extra,
    ]
    # output to a file, not a pipe: nobody reads a pipe while the demo serves, and a full pipe
    # (64 KiB of progress bars on a slow machine) would block the demo's writes
    log = open(tmp_path / "demo.log", "w")  # noqa: SIM115 - the child holds it; closed with it
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), port


@pytest.mark.slow
def test_demo_prints_the_summary_and_writes_the_plots(tmp_path, tiny_hf_folder):
    proc, _ = _demo(tmp_path, tiny_hf_folder)
    proc.wait(600)
    out = (tmp_path / "demo.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    for line in (
        "catalogue items / interactions",
        "alignment passes, token accuracy, exact rebuild",
        "fresh-path reference: token accuracy, exact",
        "fresh items refined: token accuracy, exact rebuild",
        "served composite NDCG@10: all / warm / cold test users",
        "id SASRec NDCG@10, same users: all / warm / cold",
        "text SASRec NDCG@10, same users: all / warm / cold",
        "event -> servable seconds",
        "fresh items in their user's top-10 (refined)",
        "fresh items in their user's top-10 (retrained)",
        "retrain after the fresh items' clicks",
        "(catalogue item)  ",
        "(fresh item)  ",
        "decodes to '",
        "wall seconds",
    ):
        assert line in out, f"{line!r} missing from the summary:\n{out[-3000:]}"
    retrain = r"fresh items' clicks +[1-9]\d* clicks; (promoted: \d+ of \d+ graduated|refused)"
    # (a click or two per item: whether the retrain trains on a fresh item is the data's call)
    assert re.search(retrain, out), "the fresh items' clicks were consumed and judged by a retrain"
    plots = sorted(p.name for p in (tmp_path / "data" / "plots").glob("*.png"))
    assert plots == ["alignment_loss.png", "fresh_vs_reference.png", "freshness.png"]


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_its_broker(tmp_path, tiny_hf_folder):
    proc, port = _demo(tmp_path, tiny_hf_folder, "--keep-serving")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # up once the API answers after the summary
        assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
        if (tmp_path / "data" / "plots" / "freshness.png").exists() and _answers(port):
            break
        time.sleep(0.5)
    family = _descendants(proc.pid)
    assert any("tansu" in _cmdline(p) for p in family), "the broker runs as a child"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the CLI dumps every thread's stack: say where it hangs
        time.sleep(2)
        proc.kill()
        pytest.fail("the demo did not stop:\n" + (tmp_path / "demo.log").read_text()[-8000:])
    assert proc.returncode == 130
    time.sleep(0.5)
    assert [p for p in family if Path(f"/proc/{p}").exists()] == [], "no orphaned process"


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        path = Path(f"/proc/{p}/task/{p}/children")
        kids = [int(c) for c in path.read_text().split()] if path.exists() else []
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""
