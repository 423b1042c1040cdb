"""Every `said` option says what it does, and its help shows its default: checked on the
help text each command prints, as a user reads it. And one grammar, `said NOUN VERB`, with
the first releases' spellings kept as aliases that parse to the same command."""

from __future__ import annotations

import argparse

import pytest

from said.cli import build_parser, main, parse

# old spelling -> the same command in the grammar
ALIASES = {
    ("align", "--if-none"): ("aligner", "train", "--if-none"),
    ("update", "--batch", "3"): ("worker", "run", "--batch", "3"),
    ("serve", "--port", "9"): ("scorer", "serve", "--port", "9"),
    ("retrain", "--watch"): ("scorer", "train", "--watch"),
    ("consume", "items"): ("consumer", "run", "items"),
    ("produce", "--dataset", "d"): ("dataset", "replay", "--dataset", "d"),
    ("evaluate", "--dataset", "d"): ("dataset", "evaluate", "--dataset", "d"),
    ("inspect", "i1"): ("items", "inspect", "i1"),
    ("status", "--json"): ("status", "show", "--json"),
    ("demo", "--items", "20"): ("demo", "run", "--items", "20"),
    ("broker", "--port", "1"): ("broker", "run", "--port", "1"),
}


def _sub(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every spelling a user can type, listed or not: "noun verb", bare nouns, aliases."""
    out = {}
    for name, parser in _sub(build_parser()).choices.items():
        out[name] = parser
        verbs = _sub(parser)
        for verb, vp in (verbs.choices if verbs else {}).items():
            out[f"{name} {verb}"] = vp
    return out


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]


@pytest.mark.parametrize("name", sorted(commands()))
def test_each_option_of_each_command_has_help_and_shows_its_default(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([*name.split(), "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in options(commands()[name]):
        assert action.help, f"said {name} {action.option_strings or action.dest}: no help"
        assert " ".join(action.help.split()) in text
        if action.default is not None and action.default is not False and action.option_strings:
            assert "default:" in action.help or f"(default: {action.default})" in text, (
                f"said {name} {action.option_strings[0]}: its default is not shown"
            )


def test_the_listed_commands_are_nouns_each_with_its_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    ")]
    old = {spelling[0] for spelling in ALIASES} - {"status", "demo", "broker"}
    assert listed and not old & set(listed), f"old spellings listed: {old & set(listed)}"
    for noun in listed:
        parser = commands()[noun]
        verbs = _sub(parser)
        positional = [a for a in parser._actions if a.dest == "action" and a.choices]
        assert verbs or positional, f"said {noun}: no verb"


@pytest.mark.parametrize(("old", "new"), ALIASES.items(), ids=lambda x: " ".join(x))
def test_an_old_spelling_is_the_same_command(old, new):
    parsed_old, parsed_new = parse(list(old)), parse(list(new))
    assert parsed_old.fn is parsed_new.fn
    keep = lambda ns: {k: v for k, v in vars(ns).items() if k not in {"command", "verb"}}  # noqa: E731
    assert keep(parsed_old) == keep(parsed_new)


def test_an_option_before_the_verb_is_an_error_never_a_silent_default(capsys):
    with pytest.raises(SystemExit) as done:
        parse(["status", "--json", "show"])  # once: parsed, then reset to json=False by `show`
    assert done.value.code == 2
