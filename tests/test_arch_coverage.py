"""The architecture table of the README, cell by cell: for every architecture, tiny models built from
transformers configs go through `stats` (against a whole-model hook reference), unstructured `apply`
(masks against the reference, output loads in stock transformers), depth pruning (loads and runs) and
`eval` (against a full-model perplexity). Structured pruning is covered per architecture in
test_structured.py / test_arch_structured.py, expert pruning in test_experts.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import reference as R
import stats_helpers as H
from conftest import slow_except

from llmprune.calibration import sidecar
from llmprune.evaluation import perplexity
from llmprune.calibration.activations import collect_stats

DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
MOE = dict(DENSE, intermediate_size=32, num_experts_per_tok=2)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", DENSE),
    "mistral": ("MistralConfig", DENSE),
    "qwen2": ("Qwen2Config", DENSE),
    "qwen3": ("Qwen3Config", dict(DENSE, head_dim=12)),
    "gemma2": ("Gemma2Config", dict(DENSE, head_dim=12, query_pre_attn_scalar=12)),
    "gemma3": ("Gemma3TextConfig", dict(DENSE, head_dim=12, query_pre_attn_scalar=12, sliding_window=8)),
    "phi3": ("Phi3Config", dict(DENSE, pad_token_id=0)),
    "mixtral": ("MixtralConfig", dict(MOE, num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE, moe_intermediate_size=32, num_experts=4, head_dim=12, decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(MOE, num_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, decoder_sparse_step=1, mlp_only_layers=[])),
    "deepseek_v3": ("DeepseekV3Config", dict(MOE, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16, num_key_value_heads=8)),
    "deepseek_v2": ("DeepseekV2Config", dict(MOE, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                                             topk_method="greedy", first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=8)),
    "gpt_oss": ("GptOssConfig", dict(MOE, num_local_experts=4, head_dim=16, sliding_window=8)),
}
MOE_ARCHS = ("deepseek_v2", "deepseek_v3", "gpt_oss", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
FUSED_ON_DISK = ("gpt_oss",)  # experts stored as [experts, ...] tensors: no per-expert linears to measure
BUILT = {"opt": H.tiny_opt_dir, "gpt2": H.tiny_gpt2_dir}
ARCHS = sorted([*CONFIGS, *BUILT])


@pytest.fixture(scope="module")
def arch_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            path = tmp_path_factory.mktemp(arch) / "tiny"
            if arch in BUILT:
                BUILT[arch](path, dtype="float32", n_layer=3) if arch == "gpt2" else BUILT[arch](path, dtype="float32", num_hidden_layers=3)
            else:
                import transformers

                cls, cfg = CONFIGS[arch]
                torch.manual_seed(0)
                model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**cfg))
                model.save_pretrained(path, safe_serialization=True)
            ids = R.random_samples(3, 16, vocab=256, seed=2)
            res = collect_stats(path, ids, device="cpu")
            sidecar.write(path / sidecar.SIDECAR_NAME, path, res.layers, calibration={"source": "ids", "nsamples": 3, "seqlen": 16, "seed": 2, "tokens": 48},
                          blocks=res.block_cos, experts=res.experts)
            cache[arch] = path
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", slow_except(ARCHS, "llama"))
def test_stats(arch_model, arch):
    path = arch_model(arch)
    ids = R.random_samples(3, 16, vocab=256, seed=2)
    ours = sidecar.read(path / sidecar.SIDECAR_NAME).layers
    ref = {k: v for k, v in R.reference_stats(R.load_f32_model(path), ids, per_expert=arch not in FUSED_ON_DISK).items() if v["act_count"] > 0}
    # MoE routers (`<moe>.gate.weight` beside `<moe>.experts.*`) are never prunable
    routers = {k for k in ref if k.endswith(".gate.weight") and any(o.startswith(k[: -len("gate.weight")] + "experts.") for o in ref)}
    ref = {k: v for k, v in ref.items() if k not in routers}
    assert sorted(ours) == sorted(ref)
    for k, r in ref.items():
        assert ours[k].act_count == r["act_count"], k
        np.testing.assert_allclose(ours[k].act_sqsum, r["act_sqsum"], rtol=1e-5, err_msg=k)


def apply_and_load(run_cli, path: Path, out: Path, *args: str) -> dict:
    """`llmprune apply` into `out`; the output loads in stock transformers and gives finite logits."""
    code, stdout, err = run_cli(["apply", path, *args, "--out", out, "--json"])
    assert code == 0, err
    with torch.no_grad():
        logits = R.load_f32_model(out)(R.random_samples(1, 8, vocab=256, seed=4)).logits
    assert torch.isfinite(logits).all()
    return json.loads(stdout)


@pytest.mark.parametrize("arch", slow_except(ARCHS, "llama", "mixtral"))
def test_unstructured(run_cli, arch_model, tmp_path, arch):
    path = arch_model(arch)
    out = tmp_path / "o"
    apply_and_load(run_cli, path, out, "--method", "wanda", "--sparsity", "0.5")
    stats = R.read_sidecar_stats(path / sidecar.SIDECAR_NAME)
    before, _ = R.read_checkpoint(path)
    after, _ = R.read_checkpoint(out)
    for name, st in stats.items():
        w = R.to_f32(before[name])
        w_oi = w.T if st["input_axis"] == 0 else w
        want = R.reference_mask(w_oi, "wanda", sparsity=0.5, stats=st)
        got = R.to_f32(after[name])
        got = got.T if st["input_axis"] == 0 else got
        assert np.array_equal(got == 0, want | (w_oi == 0)), name


@pytest.mark.parametrize("arch", slow_except(ARCHS, "llama"))
def test_blocks(run_cli, arch_model, tmp_path, arch):
    s = apply_and_load(run_cli, arch_model(arch), tmp_path / "o", "--method", "block-influence", "--remove-blocks", "1")
    assert s["blocks_after"] == 2


@pytest.mark.parametrize("arch", slow_except(ARCHS, "llama"))
def test_eval(arch_model, arch):
    path = arch_model(arch)
    ids = torch.randint(0, 256, (1, 3 * 16), generator=torch.Generator().manual_seed(1))
    res = perplexity(path, ids, 16, device="cpu")
    ref, windows = H.reference_perplexity(path, ids, 16)
    assert res.windows == windows == 3
    assert math.isclose(res.perplexity, ref, rel_tol=1e-4), (res.perplexity, ref)


@pytest.mark.parametrize("arch", slow_except(["gpt2", *MOE_ARCHS], "mixtral"))
def test_structured_refused_naming_the_architecture(run_cli, arch_model, tmp_path, arch):
    """Structured groups are defined for LLaMA's relatives and OPT; anything else is one clear
    error naming its model_type (GPT-2's Conv1D, MoE layers)."""
    from conftest import assert_clean_error, listing

    path = arch_model(arch)
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    code, stdout, stderr = run_cli(["apply", path, "--method", "magnitude-sp", "--sparsity", "0.2", "--out", tmp_path / "out"])
    assert_clean_error(code, stdout, stderr, contains=(f'model_type "{model_type}"', "supported"))
    assert "out" not in listing(tmp_path)


@pytest.mark.parametrize("arch", slow_except([a for a in ARCHS if a not in MOE_ARCHS], "llama"))
def test_experts_refused_on_dense_models(run_cli, arch_model, tmp_path, arch):
    from conftest import assert_clean_error

    code, stdout, stderr = run_cli(["apply", arch_model(arch), "--method", "reap", "--sparsity", "0.5", "--out", tmp_path / "out"])
    assert_clean_error(code, stdout, stderr, contains="has none", hint_contains="block-influence")
