"""Structured pruning (`apply --method flap|magnitude-sp|wanda-sp`) against an independent reference.

The reference (structured_reference.py) is written from the definitions in docs/cli.md (FLAP:
variance × squared column norm) with numpy only: group scores, per-layer standardization, the cost-weighted global
threshold or the uniform counts, the slices of every tensor and the compensated biases. Outputs are
then loaded with stock transformers (uniform) or `llmprune.load_pruned` (layers of different sizes)
and run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
import stats_helpers as H
from conftest import copy_model
from structured_reference import (
    apply_json,
    check_output,
    expect_failure,
    expected_tensors,
    group_cost,
    layer_modules,
    load_and_compare_perplexity,
    reference_plan,
)

STRUCTURED = ["flap", "magnitude-sp", "wanda-sp"]


# --------------------------------------------------------------------------------------------
# Slices and biases equal the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation,width", [("global", None), ("uniform", None), ("uniform", 16)])
@pytest.mark.parametrize("method", STRUCTURED)
def test_matches_reference(run_cli, tiny_model, tmp_path, method, allocation, width):
    model = copy_model(tiny_model, tmp_path / "m")
    sparsity = 0.3
    out = tmp_path / "out"
    extra = ["--width-multiple", str(width)] if width else []
    s = apply_json(run_cli, model, "--method", method, "--sparsity", sparsity, "--allocation", allocation, *extra, "--out", out)
    cfg = H.read_config(model)
    tensors, _ = R.read_checkpoint(model)
    stats = tiny_model.stats
    layers, keep, removed, block_params = reference_plan(method, sparsity, allocation, cfg, tensors, stats, width_multiple=width or 128)
    if width:  # the kept widths are multiples of the width (a 128-wide MLP: not rounded by default)
        assert s["width_multiple"] == width and all(len(k["mlp"]) % width == 0 for k in keep)
    compensate = method == "flap"
    assert s["compensate"] is compensate
    assert s["params_removed"] == removed and s["block_params_before"] == block_params
    assert s["achieved_sparsity"] == removed / block_params
    assert [(x["num_key_value_heads"], x["intermediate_size"]) for x in s["per_layer"]] == [(len(k["attn"]), len(k["mlp"])) for k in keep]
    check_output(out, model, expected_tensors(layers, keep, tensors, stats, compensate))
    tout, _ = R.read_checkpoint(out)
    assert s["block_params_after"] == sum(t.numel for n, t in tout.items() if n.startswith("model.layers."))
    assert s["block_params_after"] == block_params - removed + s["bias_params_added"]
    new = H.read_config(out)
    assert new["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert new["llmprune"]["structured"]["layers"] == s["per_layer"]
    assert new.get("attention_bias", False) is compensate and new.get("mlp_bias", False) is compensate
    if allocation == "uniform":
        assert s["loader"] == "transformers"
        kv = {len(k["attn"]) for k in keep}
        assert len(kv) == 1 and new["num_key_value_heads"] == kv.pop()
        assert new["intermediate_size"] == len(keep[0]["mlp"])


@pytest.mark.parametrize("allocation", ["global", None])
def test_opt_matches_reference(run_cli, tmp_path, allocation):
    """Global allocation removes OPT heads (load_pruned); the default, uniform, keeps every head (a
    stock OPT config derives the head size from hidden_size) and takes the target from the MLP."""
    model = H.tiny_opt_dir(tmp_path / "m" / "tiny", dtype="float32")
    stats = R.reference_stats(R.load_f32_model(model), R.random_samples(4, 32))
    R.write_sidecar(model, stats)
    out = tmp_path / "out"
    s = apply_json(run_cli, model, "--method", "flap", "--sparsity", "0.25", "--out", out, *(["--allocation", allocation] if allocation else []))
    tensors, _ = R.read_checkpoint(model)
    layers, keep, removed, _ = reference_plan("flap", 0.25, allocation or "uniform", H.read_config(model), tensors, stats)
    assert s["params_removed"] == removed and s["family"] == "opt"
    check_output(out, model, expected_tensors(layers, keep, tensors, stats, True))
    pruned = load_and_compare_perplexity(out)
    assert pruned.model.decoder.layers[0].self_attn.num_heads == s["per_layer"][0]["num_attention_heads"]
    if allocation is None:
        assert s["loader"] == "transformers" and s["heads_after"] == s["heads_before"] and s["mlp_channels_after"] < s["mlp_channels_before"]


# --------------------------------------------------------------------------------------------
# Compensation: constant inputs are removed without changing the output
# --------------------------------------------------------------------------------------------


def constant_channel_model(path: Path, n_const: int) -> Path:
    """A float32 LLaMA with biases where KV group 0 of every layer has zero value rows (its heads
    output the value bias, a constant) and the first n_const MLP channels have zero gate/up rows (they
    output silu(gate bias) * up bias, a constant)."""
    from transformers import LlamaForCausalLM

    config = R.tiny_llama_config(attention_bias=True, mlp_bias=True)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    hd = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.bias.normal_(0, 0.5)
            layer.self_attn.v_proj.weight[:hd] = 0.0
            layer.mlp.gate_proj.weight[:n_const] = 0.0
            layer.mlp.up_proj.weight[:n_const] = 0.0
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_compensation_reproduces_dense_output(run_cli, tmp_path):
    n_const = 32
    model = constant_channel_model(tmp_path / "m" / "tiny", n_const)
    dense = R.load_f32_model(model)
    R.write_sidecar(model, R.reference_stats(dense, R.random_samples(4, 32)))
    tensors, _ = R.read_checkpoint(model)
    cfg = H.read_config(model)
    layers = layer_modules(cfg, tensors)
    # uniform allocation removing exactly one KV group and n_const channels per layer
    params = sum(t.numel for n, t in tensors.items() if n.startswith("model.layers.0."))
    sparsity = (group_cost(layers[0]["attn"], tensors) + n_const * group_cost(layers[0]["mlp"], tensors)) / params
    ids = R.random_samples(2, 24, seed=9)
    with torch.no_grad():
        want = dense(ids).logits
    from transformers import AutoModelForCausalLM

    for compensate in (True, False):
        out = tmp_path / f"out-{compensate}"
        flag = "--compensate" if compensate else "--no-compensate"
        s = apply_json(run_cli, model, "--method", "flap", "--sparsity", repr(sparsity), "--allocation", "uniform", flag, "--out", out)
        assert s["per_layer"] == [{"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128 - n_const}] * 2
        w = R.read_checkpoint(out)[0]["model.layers.0.self_attn.k_proj.weight"]
        assert np.array_equal(R.to_f32(w), R.to_f32(tensors["model.layers.0.self_attn.k_proj.weight"])[16:]), "KV group 0 must go"
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            got = pruned(ids).logits
        diff = (got - want).abs().max().item()
        if compensate:
            assert diff < 2e-5, diff
        else:
            assert diff > 1e-2, "without compensation the constant channels' contribution is lost"


# --------------------------------------------------------------------------------------------
# Grouped-query attention, loading, evaluation
# --------------------------------------------------------------------------------------------


def test_gqa_groups_stay_consistent(run_cli, tiny_models, tmp_path):
    # 8 query heads share 2 key/value heads: a group is one KV head and its 4 query heads
    tm = tiny_models("float32", sharded=False, stats=True, num_attention_heads=8, num_key_value_heads=2)
    model = copy_model(tm, tmp_path / "m")
    out = tmp_path / "out"
    s = apply_json(run_cli, model, "--method", "wanda-sp", "--sparsity", "0.4", "--allocation", "uniform", "--out", out)
    assert s["per_layer"][0] == {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": s["per_layer"][0]["intermediate_size"]}
    tin, tout = R.read_checkpoint(model)[0], R.read_checkpoint(out)[0]
    hd = 8  # 64 / 8
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        k_in, k_out = R.to_f32(tin[p + "k_proj.weight"]), R.to_f32(tout[p + "k_proj.weight"])
        g = next(g for g in range(2) if np.array_equal(k_in[g * hd : (g + 1) * hd], k_out))
        heads = slice(g * 4 * hd, (g + 1) * 4 * hd)
        assert np.array_equal(R.to_f32(tout[p + "q_proj.weight"]), R.to_f32(tin[p + "q_proj.weight"])[heads])
        assert np.array_equal(R.to_f32(tout[p + "v_proj.weight"]), R.to_f32(tin[p + "v_proj.weight"])[g * hd : (g + 1) * hd])
        assert np.array_equal(R.to_f32(tout[p + "o_proj.weight"]), R.to_f32(tin[p + "o_proj.weight"])[:, heads])
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert pruned.config.num_attention_heads == 4 and pruned.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.isfinite(pruned(R.random_samples(1, 12)).logits).all()


def test_uniform_output_loads_with_transformers(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "m")
    out = tmp_path / "out"
    s = apply_json(run_cli, model, "--method", "flap", "--sparsity", "0.5", "--allocation", "uniform", "--out", out)
    assert s["loader"] == "transformers" and s["bias_params_added"] > 0
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert stock.config.attention_bias and stock.config.mlp_bias
    assert sum(p.numel() for p in stock.parameters()) == s["model_params_after"]
    ours = load_and_compare_perplexity(out)
    ids = R.random_samples(1, 20, seed=2)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ours(ids).logits)


@pytest.mark.slow
def test_non_uniform_loads_with_load_pruned(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "m")
    H.add_tokenizer(model)
    code, stdout, err = run_cli(["apply", model, "--method", "flap", "--sparsity", "0.3", "--allocation", "global", "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    out = Path(s["out"])
    assert out == model.parent / "tiny-flap-0.3-global"
    assert s["loader"] == "llmprune.load_pruned" and s["width_multiple"] is None
    assert "layers differ in size" in err and "load_pruned" in err
    sizes = {(x["num_key_value_heads"], x["intermediate_size"]) for x in s["per_layer"]}
    assert len(sizes) > 1, "global allocation should differ between layers here"
    pruned = load_and_compare_perplexity(out)
    assert sum(p.numel() for p in pruned.parameters()) == s["model_params_after"]
    for layer, size in zip(pruned.model.layers, s["per_layer"]):
        assert layer.mlp.down_proj.in_features == size["intermediate_size"]
        assert layer.self_attn.k_proj.out_features == size["num_key_value_heads"] * 16
    code, stdout, err = run_cli(["eval", out, "--seqlen", "16", "--max-tokens", "200", "--device", "cpu", "--json"])
    assert code == 0, err
    assert math.isfinite(json.loads(stdout)["perplexity"])


def test_text_summary_and_default_names(run_cli, tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path / "m")
    code, out, err = run_cli(["apply", model, "--method", "magnitude-sp", "--sparsity", "0.2"])
    assert code == 0, err
    assert (model.parent / "tiny-magnitude-sp-0.2" / "config.json").is_file()
    assert out.startswith("magnitude-sp 0.2 (uniform, width multiple 128): kept ") and "decoder-block parameters" in out
    code, out, err = run_cli(["apply", model, "--method", "magnitude-sp", "--sparsity", "0.2", "--allocation", "global"])
    assert code == 0, err
    assert (model.parent / "tiny-magnitude-sp-0.2-global" / "config.json").is_file()
    assert out.startswith("magnitude-sp 0.2 (global): kept ")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_removing_every_head_of_a_layer(run_cli, tiny_models, tmp_path):
    # one key/value head per layer: any attention group removed empties the layer
    model = copy_model(tiny_models("bfloat16", sharded=False, stats=False, num_key_value_heads=1), tmp_path / "m")
    expect_failure(run_cli, model, ["--method", "magnitude-sp", "--sparsity", "0.6", "--allocation", "uniform"], contains=("layer 0", "attention groups"), hint_contains=None)


def test_architecture_without_group_rule(run_cli, tmp_path):
    model = H.tiny_gpt2_dir(tmp_path / "m" / "tiny")
    expect_failure(run_cli, model, ["--method", "magnitude-sp", "--sparsity", "0.2"], contains=("no group rule", "gpt2"))


@pytest.mark.parametrize(
    "args,contains",
    [
        (["--method", "flap", "--pattern", "2:4"], "--sparsity"),
        (["--method", "flap"], "--sparsity"),
        (["--method", "flap", "--sparsity", "1.0"], "sparsity"),
        (["--method", "flap", "--sparsity", "-0.1"], "sparsity"),
        (["--method", "flap", "--sparsity", "0.2", "--allocation", "per-layer"], "allocation"),
        (["--method", "flap", "--sparsity", "0.2", "--scope", "layer"], "--scope"),
        (["--method", "wanda-sp", "--sparsity", "0.2", "--include", "*q_proj*"], "--include"),
        # unstructured methods take --allocation uniform|owl|FILE and --compensate (docs/refinements.md)
        (["--method", "wanda", "--sparsity", "0.2", "--allocation", "global"], "structured"),
        (["--method", "flap", "--sparsity", "0.2", "--allocation", "owl"], "allocation"),
        (["--method", "flap", "--sparsity", "0.2", "--allocation", "global", "--width-multiple", "64"], "uniform allocation"),
        (["--method", "flap", "--sparsity", "0.2", "--width-multiple", "0"], "--width-multiple"),
        (["--method", "wanda", "--sparsity", "0.2", "--width-multiple", "64"], "structured"),
        (["--method", "block-influence", "--remove-blocks", "1", "--width-multiple", "64"], "--width-multiple"),
    ],
)
def test_bad_arguments(run_cli, tiny_model, tmp_path, args, contains):
    expect_failure(run_cli, copy_model(tiny_model, tmp_path / "m"), args, contains=contains)


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_needs_sidecar(run_cli, tiny_models, tmp_path, method):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "m")
    expect_failure(run_cli, model, ["--method", method, "--sparsity", "0.2"], hint_contains="llmprune stats")
    # magnitude-sp needs none, unless asked to compensate
    expect_failure(run_cli, model, ["--method", "magnitude-sp", "--sparsity", "0.2", "--compensate"], contains="statistics")


def test_sidecar_of_another_model(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "m")
    other = tiny_models("bfloat16", sharded=False, stats=True, intermediate_size=96)
    shutil.copy(other.sidecar, model / R.SIDECAR_NAME)
    expect_failure(run_cli, model, ["--method", "flap", "--sparsity", "0.2"], contains="does not match")


# --------------------------------------------------------------------------------------------
# The benchmark, at a tiny size so it cannot rot
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_structured_bench_tiny(tiny_models, tmp_path):
    import subprocess
    import sys

    model = copy_model(tiny_models("bfloat16", sharded=False, stats=True), tmp_path / "m")  # with its sidecar
    H.add_tokenizer(model)
    rows = tmp_path / "rows.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve().parent.parent / "benches" / "structured_bench.py"),
        "--model", str(model), "--workdir", str(tmp_path / "w"), "--sparsities", "0.3",
        "--variants", "flap:global,flap:uniform:nocomp", "--seqlen", "32", "--max-tokens", "256",
        "--latency-tokens", "16", "--latency-runs", "1", "--latency-rounds", "2", "--device", "cpu", "--json", str(rows),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for row in ("| dense |", "| flap global | 30% |", "| flap uniform, no compensation | 30% |"):
        assert row in proc.stdout, proc.stdout
    doc = json.loads(rows.read_text())
    assert len(doc) == 3 and all(math.isfinite(r["perplexity"]) and r["cpu_ms"] > 0 for r in doc)
    assert [r["compensate"] for r in doc] == [False, True, False]
    assert doc[1]["params"] < doc[0]["params"] and doc[1]["bytes"] < doc[0]["bytes"]
    assert list((tmp_path / "w").iterdir()) == [], "pruned checkpoints are removed"
