"""Alert rules pass their promtool unit tests; the dashboard uses only metrics we export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import core.metrics  # noqa: F401 - registers the metrics
import scorer.app  # noqa: F401 - registers the scorer metrics

OPS = Path(__file__).resolve().parents[1] / "ops"


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        msg = "promtool not installed (Debian package prometheus; scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return tool


def test_alert_rules_unit_tests_pass():
    tool = _promtool()
    check = subprocess.run([tool, "check", "rules", "alerts.yml"], cwd=OPS, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([tool, "test", "rules", "alerts_test.yml"], cwd=OPS, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _exported_names() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for metric in REGISTRY.collect():
        names |= {metric.name + s for s in suffixes.get(metric.type, ("",))}
    return names


def test_dashboard_and_alerts_reference_only_exported_metrics():
    exported = _exported_names()
    texts = [
        json.dumps(json.loads((OPS / "grafana-dashboard.json").read_text())),
        (OPS / "alerts.yml").read_text(),
    ]
    used = set()
    for text in texts:
        used |= set(re.findall(r"\bsaid_[a-z_]+", text))
    missing = {n for n in used if n not in exported}
    assert not missing, f"referenced but never exported: {missing}"
