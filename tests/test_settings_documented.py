"""Every setting is documented: the README's configuration table names each key."""

from __future__ import annotations

import re
from pathlib import Path

from core.settings import env_names

README = Path(__file__).resolve().parents[1] / "README.md"


def undocumented(readme: str) -> list[str]:
    named = set(re.findall(r"`SAID_([A-Z0-9_]+)`", readme))
    return [name for name in env_names() if name.removeprefix("SAID_") not in named]


def test_every_setting_is_in_the_readme():
    assert undocumented(README.read_text()) == []


def test_a_missing_row_is_caught():
    text = README.read_text().replace("`SAID_ALIGN_BATCH`", "`SAID_X`")
    assert undocumented(text) == ["SAID_ALIGN_BATCH"]
