"""Every `said` option says what it does, and its help shows its default: checked on the
help text each sub-command prints, as a user reads it."""

from __future__ import annotations

import argparse

import pytest

from said.cli import build_parser, main


def commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(commands()))
def test_each_option_of_each_command_has_help_and_shows_its_default(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in options(commands()[name]):
        assert action.help, f"said {name} {action.option_strings or action.dest}: no help"
        assert " ".join(action.help.split()) in text
        if action.default is not None and action.default is not False and action.option_strings:
            assert "default:" in action.help or f"(default: {action.default})" in text, (
                f"said {name} {action.option_strings[0]}: its default is not shown"
            )
