"""Hints that name a `llmprune stats` command are runnable as printed: the failing command's model, a
protocol sized for this device (minutes on a CPU, the model's context at most) and what the command
writes, with sizes. Executed here on a tiny model: the printed command, then the original command."""

from __future__ import annotations

import re
import shlex

import pytest

import reference as R
import stats_helpers as H
from conftest import assert_clean_error


@pytest.fixture
def bare_model(tmp_path):
    """A tiny LLaMA with a tokenizer and no statistics."""
    model = R.tiny_llama_dir(tmp_path / "m" / "tiny", dtype="float32", seed=2)
    H.add_tokenizer(model)
    return model


def hinted_command(stderr: str) -> list[str]:
    hint = next(line for line in stderr.splitlines() if line.startswith("hint: "))
    m = re.search(r"`(llmprune stats [^`]*)`", hint)
    assert m is not None, hint
    return shlex.split(m.group(1))


@pytest.mark.parametrize(
    "args,writes",
    [
        (["--method", "wanda", "--sparsity", "0.5"], ("llmprune-stats.safetensors",)),
        (["--method", "sparsegpt", "--sparsity", "0.5"], ("llmprune-stats.safetensors", "llmprune-gram.safetensors", "Gram matrices, about")),
    ],
)
def test_stats_hint_runs_as_printed(run_cli, bare_model, tmp_path, args, writes):
    code, stdout, stderr = run_cli(["apply", bare_model, *args, "--out", tmp_path / "out"])
    assert_clean_error(code, stdout, stderr, contains="statistics", hint_contains=f"llmprune stats {bare_model}")
    hint = stderr.splitlines()[-1]
    assert all(w in hint for w in writes) and re.search(r"\((about [\d.]+ (s|min|h) on this CPU|seconds on this CPU|on the GPU); writes ", hint), hint
    cmd = hinted_command(stderr)
    assert cmd[:3] == ["llmprune", "stats", str(bare_model)] and "--nsamples" in cmd and "--seqlen" in cmd
    # sized to the model: its context is 128 tokens
    assert int(cmd[cmd.index("--seqlen") + 1]) <= 128
    code, _, err = run_cli(cmd[1:])
    assert code == 0, err
    for name in writes[:2]:
        if name.endswith(".safetensors"):
            assert (bare_model / name).is_file()
    code, _, err = run_cli(["apply", bare_model, *args, "--out", tmp_path / "out"])
    assert code == 0, err


def test_gram_size_estimate_matches_the_written_sidecar(run_cli, bare_model):
    from llmprune.cli.hints import gram_bytes

    code, _, err = run_cli(["stats", bare_model, "--gram", "--nsamples", "2", "--seqlen", "16", "--device", "cpu"])
    assert code == 0, err
    written = (bare_model / "llmprune-gram.safetensors").stat().st_size
    # the matrices dominate; the header and the per-input counts add a little
    assert 0.95 * written <= gram_bytes(bare_model) <= written


def test_hint_without_a_model_argument_is_left_alone():
    from llmprune.cli.hints import sized

    hint = "run `llmprune stats MODEL --gram`, or pass --gram PATH"
    assert sized(hint, ["apply", "--help"]) == hint
    assert sized(None, ["apply"]) is None
    assert sized("pass --no-compensate", ["apply", "x"]) == "pass --no-compensate"


def test_stats_gram_says_it_recomputes_the_activation_statistics(run_cli, bare_model):
    flags = ["--nsamples", "2", "--seqlen", "16", "--device", "cpu"]
    code, _, err = run_cli(["stats", bare_model, *flags])
    assert code == 0 and "recomputed" not in err, err
    code, _, err = run_cli(["stats", bare_model, "--gram", *flags])
    assert code == 0, err
    assert "activation statistics in" in err and "recomputed in the same pass" in err, err


def test_gram_and_grad_refusal_names_two_passes_that_run_as_printed(run_cli, bare_model, tmp_path):
    """--gram with --grad is refused; the hint's two sized commands, run in its order, leave both the
    Gram matrices sparsegpt needs and the gradient statistics hywia needs."""
    code, stdout, stderr = run_cli(["stats", bare_model, "--gram", "--grad"])
    assert_clean_error(code, stdout, stderr, contains="cannot be combined", hint_contains=f"llmprune stats {bare_model} --gram --nsamples")
    hint = stderr.splitlines()[-1]
    commands = [shlex.split(c) for c in re.findall(r"`(llmprune stats [^`]*)`", hint)]
    assert [c[3] for c in commands] == ["--gram", "--grad"], hint
    assert len(re.findall(r"\((about [\d.]+ (s|min|h) on this CPU|seconds on this CPU|on the GPU); writes ", hint)) == 2, hint
    for cmd in commands:
        assert "--seqlen" in cmd and int(cmd[cmd.index("--seqlen") + 1]) <= 128
        code, _, err = run_cli(cmd[1:])
        assert code == 0, err
    for method, sparsity in (("sparsegpt", "0.5"), ("hywia", "0.2")):
        code, _, err = run_cli(["apply", bare_model, "--method", method, "--sparsity", sparsity, "--out", tmp_path / method])
        assert code == 0, err
