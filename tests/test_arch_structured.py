"""Structured pruning of LLaMA's relatives (Mistral, Qwen2 with its q/k/v biases, Qwen3 with
q_norm/k_norm, Gemma 2 with an explicit head_dim and extra norms): the pruned checkpoint computes what
the original computes with the removed attention groups' and MLP channels' output columns zeroed,
loaded by stock transformers (uniform allocation) or `llmprune.load_pruned` (global); compensation
refused where the architecture has no bias flag to load it with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import reference as R
from conftest import assert_clean_error, listing, slow_except, tree_hashes

from llmprune import load_pruned
from llmprune.calibration import sidecar
from llmprune.calibration.activations import collect_stats
from llmprune.calibration.gradients import collect_grad_stats

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=12)),
    "gemma2": ("Gemma2Config", dict(head_dim=12, query_pre_attn_scalar=12)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=12, query_pre_attn_scalar=12, sliding_window=8)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
}

OTHER_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", COMMON),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=8, vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=64)),
}


@pytest.fixture(scope="module")
def arch_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            import transformers

            if arch in ARCHS:
                cls, overrides = ARCHS[arch]
                config = getattr(transformers, cls)(**COMMON, **overrides)
            else:  # the other architectures with structured pruning, for the default-output test
                config = getattr(transformers, OTHER_ARCHS[arch][0])(**OTHER_ARCHS[arch][1])
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
            with torch.no_grad():  # non-trivial norms and biases, so that slicing mistakes show
                for name, p in model.named_parameters():
                    if p.dim() == 1:
                        p.normal_(0.5 if "norm" in name else 0.0, 0.3)
            path = tmp_path_factory.mktemp(arch) / "tiny"
            model.save_pretrained(path, safe_serialization=True)
            ids = R.random_samples(3, 20, vocab=256, seed=3)
            calibration = {"source": "ids", "nsamples": 3, "seqlen": 20, "seed": 3, "tokens": 60}
            if arch == "phi3":  # hywia refuses fused projections: activation statistics only
                res = collect_stats(path, ids, device="cpu")
                sidecar.write(path / sidecar.SIDECAR_NAME, path, res.layers, calibration=calibration)
            else:  # gradient statistics too, from the same pass, for hywia
                g = collect_grad_stats(path, ids, device="cpu")
                sidecar.write(path / sidecar.SIDECAR_NAME, path, g.stats.layers, calibration=calibration, grad=g.layers, grad_meta=g.meta(20))
            cache[arch] = path
        return cache[arch]

    return get


def kept_rows(before: np.ndarray, after: np.ndarray, block: int) -> list[int]:
    """Which `block`-row groups of `before` survive in `after` (matched by value)."""
    groups = [before[i : i + block] for i in range(0, before.shape[0], block)]
    out = []
    for k in range(0, after.shape[0], block):
        out.append(next(i for i, g in enumerate(groups) if np.array_equal(g, after[k : k + block])))
    return out


def key_rows(tensors: dict, p: str, head_dim: int, q_per_kv: int) -> np.ndarray:
    """The key projection's rows: k_proj, or the k part of Phi-3's fused qkv_proj."""
    if p + "self_attn.k_proj.weight" in tensors:
        return R.to_f32(tensors[p + "self_attn.k_proj.weight"])
    qkv = R.to_f32(tensors[p + "self_attn.qkv_proj.weight"])
    k = qkv.shape[0] // (q_per_kv + 2)
    return qkv[q_per_kv * k : (q_per_kv + 1) * k]


def up_rows(tensors: dict, p: str) -> np.ndarray:
    """The up projection's rows: up_proj, or the up half of Phi-3's fused gate_up_proj."""
    if p + "mlp.up_proj.weight" in tensors:
        return R.to_f32(tensors[p + "mlp.up_proj.weight"])
    gu = R.to_f32(tensors[p + "mlp.gate_up_proj.weight"])
    return gu[gu.shape[0] // 2 :]


def masked_reference(model_dir: Path, out_dir: Path, head_dim: int):
    """The original model with the output columns of every removed key/value group (and its query
    heads) and of every removed MLP channel zeroed."""
    ref = R.load_f32_model(model_dir)
    before, _ = R.read_checkpoint(model_dir)
    after, _ = R.read_checkpoint(out_dir)
    q_per_kv = COMMON["num_attention_heads"] // COMMON["num_key_value_heads"]
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            p = f"model.layers.{i}."
            k_before, k_after = key_rows(before, p, head_dim, q_per_kv), key_rows(after, p, head_dim, q_per_kv)
            kv = kept_rows(k_before, k_after, head_dim)
            cols = torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.bool)
            for g in kv:
                cols[g * q_per_kv * head_dim : (g + 1) * q_per_kv * head_dim] = True
            layer.self_attn.o_proj.weight[:, ~cols] = 0
            ch = kept_rows(up_rows(before, p), up_rows(after, p), 1)
            keep = torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.bool)
            keep[ch] = True
            layer.mlp.down_proj.weight[:, ~keep] = 0
    return ref


@pytest.mark.parametrize("arch", slow_except(sorted(ARCHS), "qwen2", "gemma2"))
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_structured_equals_masked_original(run_cli, arch_model, tmp_path, arch, allocation):
    model = arch_model(arch)
    out = tmp_path / "o"
    code, stdout, err = run_cli(["apply", model, "--method", "wanda-sp", "--sparsity", "0.3", "--allocation", allocation, "--no-compensate", "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    assert s["heads_after"] < s["heads_before"] and s["mlp_channels_after"] < s["mlp_channels_before"]
    head_dim = ARCHS[arch][1].get("head_dim", COMMON["hidden_size"] // COMMON["num_attention_heads"])
    ids = R.random_samples(2, 16, vocab=256, seed=5)
    pruned = R.load_f32_model(out) if s["loader"] == "transformers" else load_pruned(out, dtype=torch.float32)
    if allocation == "uniform":  # transformers 5's Gemma 2/3 configs refuse heads that do not divide hidden_size
        heads = s["per_layer"][0]["num_attention_heads"]
        stock = arch not in ("gemma2", "gemma3") or COMMON["hidden_size"] % heads == 0
        assert s["loader"] == ("transformers" if stock else "llmprune.load_pruned")
    with torch.no_grad():
        want = masked_reference(model, out, head_dim)(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # Qwen2's q/k/v biases and Qwen3's per-head norms travel with their heads
    after, _ = R.read_checkpoint(out)
    if arch == "qwen2":
        assert after["model.layers.0.self_attn.k_proj.bias"].shape == (s["per_layer"][0]["num_key_value_heads"] * head_dim,)
    if arch == "qwen3":
        assert after["model.layers.0.self_attn.k_norm.weight"].shape == (head_dim,)


@pytest.mark.parametrize("arch,flag", [("mistral", "attention_bias"), ("qwen2", "attention_bias"), ("qwen3", "mlp_bias"), ("gemma2", "mlp_bias"), ("gemma3", "mlp_bias")])
def test_compensation_refused_without_a_bias_flag(run_cli, arch_model, tmp_path, arch, flag):
    model = tmp_path / "m" / "tiny"
    shutil.copytree(arch_model(arch), model)
    before = tree_hashes(tmp_path)
    # asked for: refused (the default gives way with a warning, test_default_output_loads_in_stock_transformers)
    code, stdout, stderr = run_cli(["apply", model, "--method", "flap", "--sparsity", "0.2", "--compensate", "--out", tmp_path / "out"])
    assert_clean_error(code, stdout, stderr, contains=(json.loads((model / "config.json").read_text())["model_type"], flag), hint_contains="--no-compensate")
    assert tree_hashes(tmp_path) == before and "out" not in listing(tmp_path)




def test_phi3_refuses_hywia(run_cli, arch_model, tmp_path):
    """hywia's gradient groups do not know fused projections (layers of different widths are fine:
    load_pruned gives each Phi-3 attention its own head counts, test_structured_equals_masked_original)."""
    model = tmp_path / "m" / "tiny"
    shutil.copytree(arch_model("phi3"), model)
    before = tree_hashes(tmp_path)
    code, stdout, stderr = run_cli(["apply", model, "--method", "hywia", "--sparsity", "0.3", "--out", tmp_path / "out"])
    assert_clean_error(code, stdout, stderr, contains="fused projections")
    assert tree_hashes(tmp_path) == before and "out" not in listing(tmp_path)


STRUCTURED = ("flap", "wanda-sp", "magnitude-sp", "hywia")


@pytest.mark.parametrize("arch", slow_except(sorted({*ARCHS, *OTHER_ARCHS}), "llama", "opt", "gemma2"))
def test_default_output_loads_in_stock_transformers(run_cli, arch_model, tmp_path, arch):
    """Every structured method's default output (uniform widths, head counts a stock config can
    describe; hywia without its skipped layers) loads with AutoModelForCausalLM.from_pretrained on
    every architecture with structured pruning, and computes what the original computes with the
    removed groups' columns zeroed."""
    from transformers import AutoModelForCausalLM

    model = arch_model(arch)
    ids = R.random_samples(2, 16, vocab=256, seed=5)
    for method in STRUCTURED:
        if arch == "phi3" and method == "hywia":
            continue  # refused: test_phi3_refuses_hywia
        out = tmp_path / method
        # hywia keeps its published recipe's first and last layers whole by default (layers of
        # different sizes; apply says so): with no layer skipped it is uniform like the others
        skips = ["--skip-first", "0", "--skip-last", "0"] if method == "hywia" else []
        code, stdout, err = run_cli(["apply", model, "--method", method, "--sparsity", "0.3", *skips, "--out", out, "--json"])
        assert code == 0, (method, err)
        s = json.loads(stdout)
        assert (s["allocation"], s["loader"]) == ("uniform", "transformers"), (method, s)
        assert s["heads_after"] < s["heads_before"] or arch == "opt", (method, s)  # OPT keeps its heads
        assert s["mlp_channels_after"] < s["mlp_channels_before"], (method, s)
        config = json.loads((out / "config.json").read_text())
        assert config["llmprune"]["loader"] == "transformers"
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert sum(p.numel() for p in stock.parameters()) == s["model_params_after"], method
        with torch.no_grad():
            got = stock(ids).logits
        assert torch.isfinite(got).all(), method
        if arch in ARCHS and not s["compensate"]:
            head_dim = ARCHS[arch][1].get("head_dim", COMMON["hidden_size"] // COMMON["num_attention_heads"])
            with torch.no_grad():
                want = masked_reference(model, out, head_dim)(ids).logits
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        if method == "flap" and arch not in ("llama", "opt"):
            # flap compensates by default only where the config can load the added biases
            assert not s["compensate"] and any("bias compensation is off" in w for w in s["warnings"]), s["warnings"]
