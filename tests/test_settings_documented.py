"""Every setting is documented: docs/configuration.md is generated from ``Settings`` and is
committed as generated, with a row and a meaning for each key."""

from __future__ import annotations

import re
from pathlib import Path

from core.settings import env_names
from said.config_doc import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def documented(doc: str) -> dict[str, str]:
    """Variable -> meaning, from the table rows of a rendered file."""
    return dict(re.findall(r"^\| `(SAID_[A-Z0-9_]+)` \| [^|]*\| (.*) \|$", doc, re.M))


def test_the_committed_configuration_doc_is_the_generated_one():
    assert DOC.read_text() == render(), "run: python -m said.config_doc > docs/configuration.md"


def test_every_setting_has_a_row_with_a_meaning():
    rows = documented(render())
    assert sorted(rows) == sorted(env_names())
    assert [name for name, meaning in rows.items() if not meaning.strip()] == []


def test_a_changed_default_shows_as_a_stale_doc(monkeypatch):
    from core.settings import WorkerSettings

    monkeypatch.setattr(WorkerSettings.model_fields["batch"], "default", 17)
    assert "| `SAID_WORKER_BATCH` | `17` |" in render()
    assert DOC.read_text() != render()
