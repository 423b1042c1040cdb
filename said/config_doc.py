"""``docs/configuration.md``, generated from ``Settings``: every ``SAID_*`` variable, its
default and its meaning, by section.

The table is written from the code so it cannot drift: ``tests/test_settings_documented.py``
fails when the committed file differs from what this renders. Regenerate it with
``python -m said.config_doc > docs/configuration.md``.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from core.settings import FLAT, SECTIONS, Section, Settings, field_at

INTRO = """# Configuration

Every setting comes from the environment, as `SAID_<NAME>`, validated by pydantic when a
process starts (`core/settings.py`, the one home of every configurable default). Settings
come in sections; a service is handed its section whole (`said/wiring.py` builds each one
from one `Settings`), CLI flags take their defaults from it, and an override by a name that
does not exist is an error, not a no-op. The environment names stay flat:
`SAID_ALIGN_EPOCHS` is `align.epochs`, `SAID_SOFT_TOKENS` is `align.k`. In code, an override
is `settings.override(align_epochs=...)` or `section.model_copy(update=...)`.
`tests/test_settings_sections.py` sets one value per section in the environment and checks
that retraining, evaluation, the worker, the alignment and the API each see it.

This file is generated from `Settings` (`python -m said.config_doc > docs/configuration.md`);
`tests/test_settings_documented.py` keeps it in sync.
"""


def shown(value: object) -> str:
    """A default as the environment would spell it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list | frozenset):
        return "`" + ",".join(str(v) for v in value) + "`"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = f"./{value}" if not value.is_absolute() and not str(value).startswith(".") else value
    if isinstance(value, float) and value.is_integer() and abs(value) >= 10:
        value = int(value)
    return f"`{value}`"


def default_of(info: FieldInfo) -> object:
    if info.default is not PydanticUndefined:
        return info.default
    return info.default_factory() if info.default_factory else None  # type: ignore[call-arg]


def row(name: str, info: FieldInfo) -> str:
    meaning = (info.description or "").replace("|", "\\|")
    return f"| `SAID_{name.upper()}` | {shown(default_of(info))} | {meaning} |"


def section_rows(section: str) -> list[str]:
    """The rows of one section, its sub-sections' rows included, in field order."""
    return [row(flat, field_at(path)) for flat, path in FLAT.items() if path[0] == section]


def render() -> str:
    """The whole file: process-wide keys first, then each section."""
    header = ["| variable | default | meaning |", "|---|---|---|"]
    parts = [INTRO, "## Process-wide", "", *header]
    for name, info in Settings.model_fields.items():
        if name not in SECTIONS:
            parts.append(row(name, info))
    for section, cls in SECTIONS.items():
        parts += ["", f"## `{section}`", ""]
        if cls.__doc__ and cls.__doc__ != Section.__doc__:
            parts += [inspect.cleandoc(cls.__doc__).replace("\n", " "), ""]
        parts += [*header, *section_rows(section)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
