"""`raysys --help` and every verb's `--help` say what it does, list its
options and give an example."""

from __future__ import annotations

import pytest

from raysys.cli import build_parser

VERBS = (
    "pipeline",
    "train",
    "encode",
    "index",
    "search",
    "rerank",
    "evaluate",
    "mine",
    "demo-data",
)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_verb(capsys):
    text = _help(capsys)
    for verb in VERBS:
        assert f"    {verb}" in text, verb
    assert "examples:" in text and "--verbose" in text


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_has_description_options_and_example(capsys, verb):
    text = _help(capsys, verb)
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: raysys {verb}")
    description = rest.split("\n\n", 1)[0]
    assert len(description.split()) >= 8, description  # says what the verb does
    assert "options:" in text
    example = text.split("examples:\n", 1)[1]
    assert f"raysys {verb}" in example
