"""The layers of the house stay true: every import points down (see docs/architecture.md, Layout).

    said/                                   composition root: wires the services together
    consumers/ updater/ scorer/ training/   services: none imports another, but updater/ -> training/
    models/                                 pure torch: LLM, aligner, SASRec, checkpoint formats
    core/                                   kernel: imports nothing inside the project

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"core": 0, "models": 1, "consumers": 2, "updater": 2, "scorer": 2, "training": 2, "said": 3}
ALSO_ALLOWED = {("updater", "training"), ("migrations", "core"), ("said", "migrations")}
PROJECT = set(RANK) | {"migrations", "tests", "benchmarks"}


def project_imports(path: Path, root: Path) -> set[str]:
    """Top-level project packages that ``path`` imports, anywhere in the file (relative
    imports resolved against the file's own package)."""
    found = set()
    package = path.relative_to(root).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            names = [".".join([*base, node.module] if node.module else base)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        # the test harness (tests.support: throwaway PostgreSQL, tiny models) is its own node,
        # so benchmarks may share it without depending on test modules
        found |= {
            "tests.support"
            if n.startswith("tests.support")
            else "tests.test"
            if n.startswith("tests.test")
            else n.split(".")[0]
            for n in names
            if n.split(".")[0] in PROJECT
        }
    return found


def allowed(src: str, dst: str) -> bool:
    if src == dst or (src, dst) in ALSO_ALLOWED:
        return True
    if dst == "tests.test":
        return False  # test modules share fixtures through conftest and tests/support only
    if src in ("tests", "benchmarks"):
        return dst != "tests" or src == "tests"  # "tests.support" is not "tests"
    if src not in RANK or dst not in RANK:
        return False
    return RANK[dst] < RANK[src] and not (RANK[src] == RANK[dst] == 2)


def violations(root: Path) -> list[str]:
    out = [
        f"{d.name}/ is a package of no known layer"
        for d in sorted(root.iterdir())
        if d.is_dir() and (d / "__init__.py").exists() and d.name not in PROJECT
    ]
    for package in sorted(PROJECT):
        for path in sorted((root / package).rglob("*.py")):
            for dst in sorted(project_imports(path, root)):
                if not allowed(package, dst):
                    out.append(f"{path.relative_to(root)} imports {dst}")
    return out


def test_every_import_points_down_the_layers():
    assert violations(ROOT) == []


def test_the_checker_catches_upward_sideways_relative_and_test_imports(tmp_path):
    # the guard itself: a kernel module importing a service, scorer importing updater (once
    # by a relative import), a test module importing another, and a package of no layer
    cases = [
        ("core", "from scorer.app import x"),
        ("scorer", "import updater.worker"),
        ("scorer/sub", "from ...updater import worker"),
        ("tests", "from tests.test_x import helper"),
        ("extra", "import core"),
    ]
    for package, source in cases:
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "bad.py").write_text(f"def f():\n    {source}\n")
    assert violations(tmp_path) == [
        "extra/ is a package of no known layer",
        "core/bad.py imports scorer",
        "scorer/bad.py imports updater",
        "scorer/sub/bad.py imports updater",
        "tests/bad.py imports tests.test",
    ]
