"""Shared by the benchmark scripts (a sibling module, not a benchmark): bounded waits and
the tiny model and data that ``--smoke`` runs use.

``--smoke`` keeps a script's real code path and output, at a size that finishes in
seconds: its figures check that the script still runs, they are not results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:  # at run time ``core`` is found through REPO, put on the path below
    from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project, and ``tests.support`` (the tiny model), without an install
    sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared/data"  # the data sets (README: ../shared/data)
SMOKE_NOTE = "smoke size: checks that the benchmark runs; its figures are not results"


def attention_runs(spec: str) -> list[tuple[str, str, bool]]:
    """``--attention`` of the alignment benchmarks: comma-separated ``KERNEL`` or
    ``KERNEL+compile``, as (label, ``SAID_ATTENTION`` kernel, ``SAID_ALIGN_COMPILE``).
    An argparse ``type``: a bad spec is the parser's usage error, with its reason."""
    runs = []
    for label in spec.split(","):
        kernel, _, extra = label.partition("+")
        if not kernel or extra not in ("", "compile") or label.endswith("+"):
            raise argparse.ArgumentTypeError(f"{label!r}: give KERNEL or KERNEL+compile")
        runs.append((label, kernel, extra == "compile"))
    return runs


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, poll_s: float = 0.25) -> dict:
    """Poll ``url`` until it answers 200 (its JSON body is returned), sleeping between polls,
    with one client; TimeoutError with the last answer after ``timeout_s``, RuntimeError as
    soon as ``proc`` (the server) has exited."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    with httpx.Client(timeout=5) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{url}: the server exited with code {proc.returncode} before it was ready"
                )
            try:
                r = client.get(url)
                if r.status_code == 200:
                    return r.json()
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s; last answer: {last}")
            time.sleep(poll_s)


def tiny_llm_folder(cache: Path | None = None) -> Path:
    """A Hugging Face folder: SmolLM2's real tokenizer (read from the default GGUF) around a
    2-layer, 64-wide random Llama, as the tests' ``tiny_hf_folder``; built once under
    ``cache`` (default ``said-data/llm``, git-ignored) and reused."""
    target = (cache or REPO / "said-data/llm") / "tiny-random-smollm2"
    if (target / "config.json").exists():
        return target
    from transformers import AutoTokenizer  # here: a cached folder needs no transformers

    from models.llm import default_gguf
    from tests.support.llm_fixtures import write_tiny_llama

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_llama(tok, tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process built it first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smoke_settings(settings: Settings, **flat) -> Settings:
    """``settings`` for a smoke run on the tiny random LLM: one soft token, few refinement
    passes and decoded items (a random model never reaches the accuracy bar), plus ``flat``."""
    base = {"soft_tokens": 1, "refine_epochs": 3, "fidelity_exact_items": 4, "reference_items": 4}
    return settings.override(llm=str(tiny_llm_folder()), **(base | flat))


def smoke_dataset(src: Path, folder: Path, items: int, users: int) -> Path:
    """A slice of data set ``src`` in ``folder``: its first ``items`` items and the first
    ``users`` users' sequences cut to those items (users left with fewer than 3 dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (src / "items.tsv").read_text().splitlines()
    (folder / "items.tsv").write_text("\n".join(lines[: items + 1]) + "\n")
    kept = {line.split("\t", 1)[0] for line in lines[1 : items + 1]}
    seqs = []
    for line in (src / "sequences.txt").read_text().splitlines():
        user, *clicks = line.split()
        clicks = [c for c in clicks if c in kept]
        if len(clicks) >= 3:
            seqs.append(" ".join([user, *clicks]))
        if len(seqs) == users:
            break
    (folder / "sequences.txt").write_text("\n".join(seqs) + "\n")
    for extra in ("README.md",):
        if (src / extra).exists():
            shutil.copy(src / extra, folder / extra)
    return folder


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``), NaN if unreadable."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
