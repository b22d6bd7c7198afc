"""`llmprune eval`: layer-streamed perplexity against a full-model transformers forward, and bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import reference as R
import stats_helpers as H
from conftest import assert_clean_error

from llmprune import cli
from llmprune.errors import UsageError
from llmprune.evaluation import perplexity

BUILDERS = {"llama": R.tiny_llama_dir, "opt": H.tiny_opt_dir, "gpt2": H.tiny_gpt2_dir, "qwen2": H.tiny_qwen2_dir}


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory):
    cache: dict[tuple, Path] = {}

    def get(arch: str, tokenizer: bool = False, **config: Any) -> Path:
        key = (arch, tokenizer, tuple(sorted(config.items())))
        if key not in cache:
            path = BUILDERS[arch](tmp_path_factory.mktemp(f"eval-{arch}") / "tiny", **config)
            if tokenizer:
                H.add_tokenizer(path, vocab_size=int(H.read_config(path)["vocab_size"]))
            cache[key] = path
        return cache[key]

    return get


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "arch,config",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("opt", {}), ("gpt2", {}), ("qwen2", {})],
)
def test_perplexity_equals_full_model(eval_dir, arch, config):
    path = eval_dir(arch, **config)
    ids = token_ids(5 * 24 + 7, seed=1)  # 5 windows of 24 and an incomplete tail, dropped
    res = perplexity(path, ids, 24, device="cpu")
    ref, windows = H.reference_perplexity(path, ids, 24)
    assert res.windows == windows == 5
    assert res.tokens == 5 * 24 and res.seqlen == 24 and res.dtype == "float32"
    assert math.isclose(res.perplexity, ref, rel_tol=1e-4), (res.perplexity, ref)
    assert math.isclose(math.exp(res.nll), res.perplexity, rel_tol=1e-12)


def test_windows_in_chunks_give_the_same_result(eval_dir):
    path = eval_dir("llama")
    ids = token_ids(6 * 16, seed=2)
    whole = perplexity(path, ids, 16, device="cpu")
    chunked = perplexity(path, ids, 16, device="cpu", activation_budget=1)  # one window at a time
    assert math.isclose(whole.perplexity, chunked.perplexity, rel_tol=1e-9)


def test_seqlen_longer_than_text_or_context(eval_dir):
    path = eval_dir("llama")
    with pytest.raises(UsageError, match="longer than the evaluation text"):
        perplexity(path, token_ids(10), 16, device="cpu")
    with pytest.raises(UsageError, match="context"):
        perplexity(path, token_ids(300), 200, device="cpu")
    with pytest.raises(UsageError, match="at least 2"):
        perplexity(path, token_ids(300), 1, device="cpu")


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cli_model(eval_dir) -> Path:
    return eval_dir("llama", tokenizer=True)


@pytest.mark.slow
def test_cli_eval_json(run_cli, cli_model):
    from transformers import AutoTokenizer

    from llmprune.data.windows import eval_token_ids

    code, out, err = run_cli(["eval", cli_model, "--seqlen", "32", "--max-tokens", "300", "--device", "cpu", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) >= {"perplexity", "tokens", "seconds", "windows"}
    assert doc["windows"] == 300 // 32 and doc["tokens"] == doc["windows"] * 32
    ids = eval_token_ids(None, AutoTokenizer.from_pretrained(str(cli_model)), 300)
    ref, _ = H.reference_perplexity(cli_model, ids, 32)
    assert math.isclose(doc["perplexity"], ref, rel_tol=1e-4)


@pytest.mark.slow
def test_cli_eval_text_file(run_cli, cli_model, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(H.TEXT)
    code, out, err = run_cli(["eval", cli_model, "--data", text, "--seqlen", "16"])
    assert code == 0, err
    assert out.startswith("perplexity ") and str(text) in out


def test_cli_eval_bad_input(run_cli, cli_model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    # one through a real process; the others through the same entry point in this one (a process
    # each cost 3 s of imports and checked nothing more)
    code, out, err = run_cli(["eval", tmp_path / "nope"])
    assert_clean_error(code, out, err, contains="not found")
    cases = [
        (["eval", cli_model, "--data", empty], "no text"),
        (["eval", cli_model, "--data", short, "--seqlen", "64"], "longer than the evaluation text"),
        (["eval", cli_model, "--seqlen", "4096"], "context"),
        (["eval", cli_model, "--seqlen", "1"], "--seqlen"),
        (["eval", cli_model, "--max-tokens", "0"], "--max-tokens"),
        (["eval", cli_model, "--data", "nosuchsource"], "unknown text source"),
    ]
    if importlib.util.find_spec("lm_eval") is None:
        cases.append((["eval", cli_model, "--tasks", "boolq"], "lm_eval is not installed"))
    for args, contains in cases:
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert_clean_error(code, out, err, contains=contains)


@pytest.mark.slow
def test_cli_eval_model_without_tokenizer(run_cli, eval_dir, tmp_path):
    shutil.copytree(eval_dir("opt"), tmp_path / "o")
    code, out, err = run_cli(["eval", tmp_path / "o", "--seqlen", "16"])
    assert_clean_error(code, out, err, contains="tokenizer")


# --------------------------------------------------------------------------------------------
# The default protocol on a CPU: a warning with an estimate (the decision, not the timing)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def held_out(tmp_path) -> Path:
    """A local evaluation text of some thousands of tokens: read whole, as the default protocol reads
    its text, in a fraction of the time the built-in text takes to tokenize."""
    path = tmp_path / "held-out.txt"
    path.write_text("\n\n".join([H.TEXT] * 20))
    return path


@pytest.fixture
def stop_before_pass(monkeypatch):
    """The estimate (seconds of a pass) set by the test, and the pass itself stopped: the warning
    comes before it. Returns the windows x seqlen the command would have run."""
    from llmprune import evaluation
    from llmprune.calibration import estimate

    seen: dict[str, Any] = {}

    def stop(model, ids, seqlen, **kwargs):
        seen.update(tokens=ids.numel(), seqlen=seqlen)
        raise UsageError("stopped before the pass")

    def fake_seconds(model, nsamples, seqlen):
        return seen["per_window"] * nsamples

    monkeypatch.setattr(evaluation, "perplexity", stop)
    monkeypatch.setattr(estimate, "pass_seconds", fake_seconds)
    return seen


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_cli_eval_default_protocol_on_cpu_warns(cli_model, held_out, stop_before_pass, capsys):
    from llmprune.calibration.estimate import duration
    from llmprune.data.sources import EVAL, describe_source

    stop_before_pass["per_window"] = 60.0  # a minute a window: the whole text is hours
    assert cli.main(["eval", str(cli_model), "--data", str(held_out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    tokens, seqlen = stop_before_pass["tokens"], stop_before_pass["seqlen"]
    windows = tokens // seqlen
    assert seqlen == H.read_config(cli_model)["max_position_embeddings"] and windows > 2 * 4096 // seqlen
    [warning] = _warnings(err)
    assert warning == (
        f"warning: {windows} x {seqlen} evaluation tokens (the default: all of {describe_source(str(held_out), EVAL)}) take about {duration(60.0 * windows)} on this CPU; "
        f"for a first try pass fewer, e.g. --max-tokens 4096 (about {duration(60.0 * (4096 // seqlen))})"
    )
    assert "stopped before the pass" in err  # the protocol was kept: the pass was reached as asked


@pytest.mark.parametrize(
    "args,per_window,rank",
    [
        (["--max-tokens", "100000"], 60.0, "0"),  # a protocol asked for, even the whole text
        (["--seqlen", "128"], 60.0, "0"),
        ([], 1e-3, "0"),  # a quick pass on this CPU
        ([], 60.0, "1"),  # another rank of torchrun: rank 0 alone warns
    ],
)
def test_cli_eval_no_warning(cli_model, held_out, stop_before_pass, capsys, monkeypatch, args, per_window, rank):
    stop_before_pass["per_window"] = per_window
    monkeypatch.setenv("RANK", rank)
    assert cli.main(["eval", str(cli_model), "--data", str(held_out), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert not _warnings(err) and "stopped before the pass" in err


def test_duration():
    from llmprune.calibration.estimate import duration

    assert [duration(s) for s in (0.4, 89, 90, 5399, 5400, 2.5 * 3600)] == ["0 s", "89 s", "2 min", "90 min", "1.5 h", "2.5 h"]
