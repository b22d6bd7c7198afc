"""`stats` with its default protocol on a CPU says how long it will take and how to ask for less."""

from __future__ import annotations

import re

import pytest

import reference as R
import stats_helpers as H
from llmprune import cli
from llmprune.calibration import estimate


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = R.tiny_llama_dir(tmp_path_factory.mktemp("est") / "tiny")
    H.add_tokenizer(path, vocab_size=int(H.read_config(path)["vocab_size"]))
    return path


def test_pass_flops_count_block_weights_and_attention(model):
    cfg = H.read_config(model)
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    seqlen, tokens = 64, 640
    want = tokens * (2 * layers * per_layer + 2 * 2 * (seqlen / 2) * h * layers)
    assert estimate.pass_flops(model, tokens, seqlen) == want


def test_default_protocol_on_cpu_warns_with_an_estimate(model, tmp_path, monkeypatch, capsys):
    from llmprune.data import windows as token_windows
    from llmprune.errors import UsageError

    def stop(*args, **kwargs):  # the warning comes before the text is read: no need for the pass
        raise UsageError("stopped before the pass")

    monkeypatch.setattr(estimate, "matmul_flops_per_second", lambda: 1e6)  # a very slow CPU
    monkeypatch.setattr(token_windows, "calibration_samples", stop)
    out = tmp_path / "s.safetensors"
    assert cli.main(["stats", str(model), "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert re.search(r"128 x 128 calibration tokens \(the default\) take about [\d.]+ h on this CPU", warning), warning
    assert "--nsamples 32 --seqlen 128" in warning
    # a protocol asked for explicitly: no warning
    for args in (["--nsamples", "128"], ["--seqlen", "128"]):
        assert cli.main(["stats", str(model), "--device", "cpu", *args, "--out", str(out)]) == 2
        assert "warning:" not in capsys.readouterr().err
