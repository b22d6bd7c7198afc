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
