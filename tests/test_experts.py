"""MoE expert pruning (`stats` routing statistics, `apply --method reap|frequency`) on tiny Mixtral,
Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE, DeepSeek-V2/V3 (shared expert; V3's sigmoid router with
its score correction) and gpt-oss (experts fused on disk) models built from configs, under whichever
transformers major is installed (`make test` runs both): the statistics against a dense reference
computed from the checkpoint's tensors, the pruned model's logits against the original's with the
removed experts never routed to, FP8 expert tensors copied bit for bit, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import reference as R
import stats_helpers as H
from conftest import assert_clean_error, listing, slow_except, tree_hashes

from llmprune.calibration.activations import collect_stats

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
              max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False)
SWIGLU = ("gate_proj", "up_proj", "down_proj")
ARCHS: dict[str, tuple[str, dict[str, Any], str, str, str, tuple[str, str, str]]] = {
    # name: (config class, overrides, MoE module on disk, config key of the expert count (transformers 5
    #        may write another of num_local_experts / num_experts / n_routed_experts), router kind,
    #        one expert's (gate, up, down) linears on disk)
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=8), "block_sparse_moe", "num_local_experts", "softmax", ("w1", "w3", "w2")),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                                         norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]), "mlp", "num_experts", "softmax", SWIGLU),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, head_dim=16, norm_topk_prob=True,
                                         decoder_sparse_step=1, mlp_only_layers=[]), "mlp", "num_experts", "softmax", SWIGLU),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8), "mlp", "num_experts", "softmax", SWIGLU),
    # DeepSeek-V3: sigmoid router with a score correction, a shared expert, routed weights scaled
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, n_group=1,
                                             topk_group=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=16, norm_topk_prob=True, routed_scaling_factor=2.5, num_key_value_heads=4),
                    "mlp", "n_routed_experts", "sigmoid", SWIGLU),
    # DeepSeek-V3 routing within groups: each token picks the better of 2 groups of 4 experts (by the
    # sum of each group's two best scores), then its 2 experts there
    "deepseek_v3_grouped": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                                     n_group=2, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, norm_topk_prob=True,
                                                     routed_scaling_factor=2.5, num_key_value_heads=4),
                            "mlp", "n_routed_experts", "sigmoid", SWIGLU),
    # DeepSeek-V2: softmax router, greedy top-k scaled (not renormalized), a shared expert; transformers 4 gathers
    # each expert's tokens in argsort order
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, n_group=1,
                                             topk_group=1, topk_method="greedy", first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=False,
                                             num_key_value_heads=4),
                    "mlp", "n_routed_experts", "softmax", SWIGLU),
    # DeepSeek-V2's group-limited greedy routing: the better of 2 groups of 4 by their best score
    "deepseek_v2_grouped": ("DeepseekV2Config", dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                                                     n_group=2, topk_group=1, topk_method="group_limited_greedy", first_k_dense_replace=0,
                                                     kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                     routed_scaling_factor=2.5, norm_topk_prob=False, num_key_value_heads=4),
                            "mlp", "n_routed_experts", "softmax", SWIGLU),
    # gpt-oss: fused [experts, ...] tensors on disk, a `router` with a bias, top-k of the logits then
    # softmax over them, biased experts with a clamped GLU
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=8, head_dim=16, sliding_window=8), "mlp", "num_local_experts", "logit-topk", ()),
}
ROUTER = {"gpt_oss": "router"}  # the router's name; others: gate
# DeepSeek-V3's router fills the experts of the groups it did not pick with 0.0 in transformers 4
# (so they can still beat negative corrected scores), with -inf in transformers 5
GROUP_FILL = 0.0 if int(transformers.__version__.split(".")[0]) < 5 else float("-inf")
KEEP = {"deepseek_v3_grouped": 6, "deepseek_v2_grouped": 6}  # experts kept by the pruning tests (a multiple of n_group); others: 5


def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def moe_in_memory(model) -> dict[int, torch.nn.Module]:
    """Layer index → the MoE module, whatever transformers calls it in memory."""
    return {layer_of(n): m for n, m in model.named_modules() if ".layers." in n and (hasattr(m, "gate") or hasattr(m, "router")) and hasattr(m, "experts")}


def reference_route(arch: str, logits: torch.Tensor, bias: torch.Tensor | None, removed=(), normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights the model applies, expert ids), [T, k] each, with `removed` experts never chosen;
    `normalize`: the router's norm_topk_prob (Mixtral always normalizes)."""
    cfg = ARCHS[arch][1]
    logits = logits.double().clone()
    if ARCHS[arch][4] == "logit-topk":
        logits[:, list(removed)] = float("-inf")
        top, ids = torch.topk(logits, 2, dim=-1)
        return torch.softmax(top, -1), ids
    groups = cfg.get("n_group", 1)
    if ARCHS[arch][4] == "softmax":
        logits[:, list(removed)] = float("-inf")
        probs = torch.softmax(logits, -1)
        if groups > 1:  # group-limited greedy: the topk_group groups with the largest best score, the others' scores 0
            by_group = probs.view(probs.shape[0], groups, -1)
            best = torch.topk(by_group.max(dim=-1).values, cfg["topk_group"], dim=-1).indices
            keep = torch.zeros(probs.shape[0], groups, dtype=torch.bool).scatter(1, best, True)
            probs = by_group.masked_fill(~keep.unsqueeze(-1), 0.0).view(probs.shape[0], -1)
        w, ids = torch.topk(probs, 2, dim=-1)
        return (w / w.sum(-1, keepdim=True) if normalize else w) * cfg.get("routed_scaling_factor", 1.0), ids
    scores = torch.sigmoid(logits)
    choice = scores + bias.double()
    choice[:, list(removed)] = float("-inf")
    if groups > 1:  # keep only the topk_group groups with the largest sums of their two best scores
        by_group = choice.view(choice.shape[0], groups, -1)
        best = torch.topk(by_group.topk(2, dim=-1).values.sum(-1), cfg["topk_group"], dim=-1).indices
        keep = torch.zeros(choice.shape[0], groups, dtype=torch.bool).scatter(1, best, True)
        choice = by_group.masked_fill(~keep.unsqueeze(-1), GROUP_FILL).view(choice.shape[0], -1)
        choice[:, list(removed)] = float("-inf")  # a removed expert is never chosen, its group picked or not
    ids = torch.topk(choice, 2, dim=-1).indices
    w = scores.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * cfg["routed_scaling_factor"], ids


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cls, overrides = ARCHS[arch][:2]
            config = getattr(transformers, cls)(**{**COMMON, **overrides})
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
            with torch.no_grad():  # routers far from uniform, so the experts' statistics differ
                for name, p in model.named_parameters():
                    if (name.endswith("gate.weight") or name.endswith("router.weight")) and p.shape[0] == 8:
                        p.normal_(0, 0.5)
                for name, b in model.named_buffers():
                    if name.endswith("e_score_correction_bias"):
                        b.normal_(0, 0.2)
            path = tmp_path_factory.mktemp(arch) / "tiny"
            model.save_pretrained(path, safe_serialization=True)
            H.add_tokenizer(path)
            cache[arch] = path
        return cache[arch]

    return get


def expert_output(tensors: dict[str, torch.Tensor], p: str, j: int, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """Expert j of MoE module p on x, from the checkpoint's tensors: a SwiGLU MLP, or gpt-oss's
    fused expert (interleaved gate/up with biases, gate clamped at 7, up to ±7, (up + 1) · gate · σ(1.702 gate))."""
    if not names:
        gu = x @ tensors[f"{p}.experts.gate_up_proj"][j] + tensors[f"{p}.experts.gate_up_proj_bias"][j]
        gate, up = gu[:, ::2].clamp(max=7.0), gu[:, 1::2].clamp(-7.0, 7.0)
        h = (up + 1) * gate * torch.sigmoid(1.702 * gate)
        return h @ tensors[f"{p}.experts.down_proj"][j] + tensors[f"{p}.experts.down_proj_bias"][j]
    gate, up, down = (tensors[f"{p}.experts.{j}.{n}.weight"] for n in names)
    return torch.nn.functional.silu(x @ gate.t()) * (x @ up.t()) @ down.t()


def dense_reference(model, path: Path, ids: torch.Tensor, arch: str) -> dict[str, dict[str, np.ndarray]]:
    """Per MoE module (checkpoint name): routed-token count, Σ g and Σ g·‖f_j‖, with the routing
    and every expert computed in float64 from the checkpoint's tensors on every token (dense), and
    g the applied top-k weights renormalized. The model only supplies each MoE module's input."""
    attr, names, router = ARCHS[arch][2], ARCHS[arch][5], ROUTER.get(arch, "gate")
    tensors = {k: torch.from_numpy(R.to_f32(t)).double() for k, t in R.read_checkpoint(path)[0].items()}
    prefixes = sorted({k.removesuffix(f".{router}.weight") for k in tensors if k.endswith(f"{attr}.{router}.weight")})
    out = {p: {"count": np.zeros(8, np.int64), "gate_sum": np.zeros(8), "reap_sum": np.zeros(8)} for p in prefixes}
    handles = []
    for p in prefixes:
        def hook(_m, args, p=p, acc=out[p]):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            logits = x @ tensors[f"{p}.{router}.weight"].t() + tensors.get(f"{p}.{router}.bias", 0)
            w, sel = reference_route(arch, logits, tensors.get(f"{p}.gate.e_score_correction_bias"))
            w = w / w.sum(-1, keepdim=True)
            for j in range(8):
                f = expert_output(tensors, p, j, names, x)
                routed = sel == j
                g = (w * routed).sum(-1)
                hit = routed.any(-1)
                acc["count"][j] += int(hit.sum())
                acc["gate_sum"][j] += float(g[hit].sum())
                acc["reap_sum"][j] += float((g[hit] * f[hit].norm(dim=-1)).sum())

        handles.append(moe_in_memory(model)[layer_of(p)].register_forward_pre_hook(hook))
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(ids[j : j + 1])
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch", slow_except(sorted(ARCHS), "deepseek_v3", "mixtral"))
def test_routing_statistics_equal_dense_reference(moe_dir, arch):
    path = moe_dir(arch)
    ids = R.random_samples(3, 20, vocab=256, seed=1)
    res = collect_stats(path, ids, device="cpu")
    want = dense_reference(R.load_f32_model(path), path, ids, arch)
    assert sorted(res.experts) == sorted(want) and len(want) == 2
    # routers choose experts and are never pruned: not in the statistics, not prunable
    assert not [k for k in res.layers if k.endswith(f"{ARCHS[arch][2]}.gate.weight")]
    if ARCHS[arch][5]:  # per-expert linears are measured too (fused experts have none)
        assert any(".experts.0." in k for k in res.layers)
    for name, w in want.items():
        got = res.experts[name]
        assert got["top_k"] == 2
        assert got["count"] == w["count"].tolist(), name
        assert sum(got["count"]) == 60 * 2  # every token goes to two experts
        np.testing.assert_allclose(got["gate_sum"], w["gate_sum"], rtol=1e-5)
        np.testing.assert_allclose(got["reap_sum"], w["reap_sum"], rtol=1e-4)
        assert abs(sum(got["gate_sum"]) - 60) < 1e-4  # renormalized top-k weights sum to 1 per token


def sidecar_experts(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The expert statistics of a sidecar, read with safetensors (independent of llmprune)."""
    from safetensors.numpy import load_file

    meta = json.loads(R.read_header(path)[0]["__metadata__"]["llmprune"])
    arrays = load_file(str(path))
    return {m: {k: arrays[f"{m}.expert_{k}"] for k in ("count", "gate_sum", "reap_sum")} for m in meta["experts"]}


def stats_cli(run_cli, model: Path) -> Path:
    code, _, err = run_cli(["stats", model, "--nsamples", "4", "--seqlen", "24", "--device", "cpu"])
    assert code == 0, err
    return model / "llmprune-stats.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["reap", "frequency"])
def test_pruned_model_equals_masked_router(run_cli, moe_dir, tmp_path, arch, method):
    model = tmp_path / "m" / "tiny"
    shutil.copytree(moe_dir(arch), model)
    stats = sidecar_experts(stats_cli(run_cli, model))
    out = tmp_path / "out"
    keep, groups = KEEP.get(arch, 5), ARCHS[arch][1].get("n_group", 1)
    code, stdout, err = run_cli(["apply", model, "--method", method, "--experts-keep", str(keep), "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    removed: dict[str, list[int]] = {}
    for layer in s["layers"]:
        st = stats[layer["layer"]]
        n = st["count"].astype(np.float64)
        sal = np.where(n > 0, st["reap_sum"] / np.maximum(n, 1), 0.0) if method == "reap" else n
        size, per = 8 // groups, (8 - keep) // groups  # grouped routers: the least salient of every group
        removed[layer["layer"]] = sorted(j for g in range(groups) for j in sorted(range(g * size, (g + 1) * size), key=lambda j: (sal[j], j))[:per])
        assert layer["kept"] == [j for j in range(8) if j not in removed[layer["layer"]]], layer
    cfg = json.loads((out / "config.json").read_text())
    key = next(k for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in json.loads((model / "config.json").read_text()))
    assert cfg[key] == keep and s["experts_after"] == keep and cfg.get("n_group") == ARCHS[arch][1].get("n_group")
    assert cfg["llmprune"]["experts"]["kept_experts"] == {l["layer"]: l["kept"] for l in s["layers"]}

    ref = R.load_f32_model(model)
    tensors = {k: torch.from_numpy(R.to_f32(t)) for k, t in R.read_checkpoint(model)[0].items()}
    moes = moe_in_memory(ref)
    for name, r in removed.items():
        def mask(gate, args, out, r=r, bias=tensors.get(f"{name}.gate.e_score_correction_bias")):
            """The router as the original computes it, with the removed experts' logits at -inf."""
            x = args[0].reshape(-1, args[0].shape[-1])
            b = getattr(gate, "bias", None)
            logits = torch.nn.functional.linear(x.float(), gate.weight.float(), b.float() if isinstance(b, torch.Tensor) else None)
            if isinstance(out, torch.Tensor):  # transformers 4 softmax routers return logits only
                return logits.index_fill(1, torch.tensor(r), float("-inf"))
            w, ids = reference_route(arch, logits, bias, removed=r, normalize=ARCHS[arch][1].get("norm_topk_prob", getattr(gate, "norm_topk_prob", True)))
            if len(out) == 3:  # transformers 5: (logits, weights, ids)
                return logits.index_fill(1, torch.tensor(r), float("-inf")), w.float(), ids
            if out[0].is_floating_point():  # gpt-oss on transformers 4: (scores [T, E], ids)
                return torch.zeros_like(logits).scatter(1, ids, w.float()), ids
            return ids, w.float()  # DeepSeek-V3 on transformers 4

        moes[layer_of(name)].get_submodule(ROUTER.get(arch, "gate")).register_forward_hook(mask)
    ids = R.random_samples(2, 16, vocab=256, seed=9)
    pruned = R.load_f32_model(out)
    with torch.no_grad():
        want = ref(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # every kept expert's tensors are the original ones, renumbered, byte for byte
    before, _ = R.read_checkpoint(model)
    after, _ = R.read_checkpoint(out)
    for layer in s["layers"]:
        for new, old in enumerate(layer["kept"]):
            for k, t in before.items():
                prefix = f"{layer['layer']}.experts.{old}."
                if k.startswith(prefix):
                    assert R.bits(after[f"{layer['layer']}.experts.{new}." + k[len(prefix):]]).tobytes() == R.bits(t).tobytes()
        for k, t in before.items():  # fused [experts, ...] tensors and the router: the kept rows, in order
            fused = k.startswith(f"{layer['layer']}.experts.") and not k.split(".experts.")[1].split(".")[0].isdigit()
            if fused or k.startswith(f"{layer['layer']}.{ROUTER.get(arch, 'gate')}."):
                assert R.bits(after[k]).tobytes() == R.bits(t)[layer["kept"]].tobytes(), k


def relabel_sidecar(sidecar: Path, model: Path, rename: tuple[str, str] = ("", "")) -> None:
    """A copy of `sidecar` in `model`, its fingerprint and tensor table rewritten for that checkpoint
    (and `rename` applied to the names of its per-layer statistics)."""
    from safetensors.numpy import load_file, save_file

    text = R.read_header(sidecar)[0]["__metadata__"]["llmprune"]
    meta = json.loads(text.replace(*rename) if rename[0] else text)
    meta["model_fingerprint"], meta["model_tensors"] = R.fingerprint_and_tensors(model)
    arrays = {k.replace(*rename) if rename[0] else k: v for k, v in load_file(str(sidecar)).items()}
    save_file(arrays, str(model / "llmprune-stats.safetensors"), metadata={"llmprune": json.dumps(meta)})


@pytest.mark.slow
def test_fp8_experts_copied_bit_for_bit(run_cli, moe_dir, tmp_path):
    """Expert weights stored as F8_E4M3 with per-expert scale tensors: the core copies what it keeps
    without decoding it (the sidecar is the BF16 model's, relabelled for the FP8 checkpoint)."""
    src = tmp_path / "src" / "tiny"
    shutil.copytree(moe_dir("mixtral"), src)
    sidecar = stats_cli(run_cli, src)
    fp8 = tmp_path / "fp8" / "tiny"
    shutil.copytree(src, fp8)
    (fp8 / "llmprune-stats.safetensors").unlink()
    tensors = {}
    for k, t in R.read_checkpoint(src)[0].items():
        tensors[k] = R.to_f32(t)
        if ".experts." in k:
            tensors[k] = torch.from_numpy(tensors[k]).to(torch.float8_e4m3fn)
            tensors[k.replace(".weight", ".weight_scale_inv")] = torch.tensor([0.5 + len(k) / 100], dtype=torch.float32)
    from safetensors.torch import save_file as save_torch

    save_torch({k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)) for k, v in tensors.items()}, str(fp8 / "model.safetensors"))
    relabel_sidecar(sidecar, fp8)

    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", fp8, "--method", "reap", "--sparsity", "0.5", "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    before, _ = R.read_checkpoint(fp8)
    after, _ = R.read_checkpoint(out)
    n = 0
    for layer in s["layers"]:
        assert len(layer["kept"]) == 4
        for new, old in enumerate(layer["kept"]):
            for k, t in before.items():
                prefix = f"{layer['layer']}.experts.{old}."
                if k.startswith(prefix):
                    a = after[f"{layer['layer']}.experts.{new}." + k[len(prefix):]]
                    assert a.dtype == t.dtype and a.data == t.data, k
                    n += 1
    assert n == 2 * 4 * 6  # 2 layers x 4 kept experts x (3 weights + 3 scales)
    assert {t.dtype for k, t in after.items() if k.endswith(".w1.weight")} == {"F8_E4M3"}


def test_magnitude_leaves_routers_alone(run_cli, moe_dir, tmp_path):
    """Without a sidecar the naming rule prunes block linears, but not an MoE router."""
    out = tmp_path / "o"
    code, stdout, err = run_cli(["apply", moe_dir("mixtral"), "--method", "magnitude", "--sparsity", "0.5", "--out", out, "--json"])
    assert code == 0, err
    before, _ = R.read_checkpoint(moe_dir("mixtral"))
    after, _ = R.read_checkpoint(out)
    routers = [k for k in before if k.endswith("block_sparse_moe.gate.weight")]
    assert len(routers) == 2
    for k in routers:
        assert after[k].data == before[k].data
    assert (R.to_f32(after["model.layers.0.block_sparse_moe.experts.0.w1.weight"]) == 0).mean() >= 0.5


@pytest.mark.slow
def test_bad_input(run_cli, moe_dir, tmp_path):
    model = tmp_path / "m" / "tiny"
    shutil.copytree(moe_dir("mixtral"), model)
    stats_cli(run_cli, model)
    dense = tmp_path / "d" / "tiny"
    R.tiny_llama_dir(dense)
    R.write_sidecar(dense, R.reference_stats(R.load_f32_model(dense), R.random_samples(2, 8, vocab=256, seed=0)))
    before = tree_hashes(tmp_path)
    cases = [
        ([dense, "--method", "reap", "--sparsity", "0.5"], "has none", "block-influence"),
        ([model, "--method", "reap", "--experts-keep", "1"], "fewer than the 2", "keep at least 2"),
        ([model, "--method", "frequency", "--sparsity", "0.1"], "removes no expert", None),
        ([model, "--method", "reap", "--experts-keep", "9"], "more than the 8", None),
        ([model, "--method", "reap", "--sparsity", "0.5", "--experts-keep", "4"], "exactly one", None),
        ([model, "--method", "wanda", "--sparsity", "0.5", "--experts-keep", "4"], "--experts-keep", None),
        ([model, "--method", "reap", "--sparsity", "0.5", "--refine", "dsnot"], "do not apply", None),
    ]
    # an MoE layout llmprune does not know: the experts' tensors are not under <moe>.experts.*
    odd = tmp_path / "odd" / "tiny"
    shutil.copytree(model, odd)
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    renamed = {k.replace(".experts.", ".moe_experts."): v for k, v in load_torch(str(odd / "model.safetensors")).items()}
    save_torch(renamed, str(odd / "model.safetensors"))
    relabel_sidecar(model / "llmprune-stats.safetensors", odd, rename=(".experts.", ".moe_experts."))
    cases.append(([odd, "--method", "reap", "--sparsity", "0.5"], "an MoE layout llmprune does not know", "supported: one module per expert"))
    # group-limited routing (2 groups of 4, a token's router picks 1): every group loses as many
    grouped = tmp_path / "g" / "tiny"
    shutil.copytree(moe_dir("deepseek_v3_grouped"), grouped)
    stats_cli(run_cli, grouped)
    cases += [
        ([grouped, "--method", "reap", "--experts-keep", "5"], "2 groups of experts", "keep a multiple of 2, e.g. 4"),
        ([grouped, "--method", "reap", "--experts-keep", "2"], "1 per group in the 1 of 2 groups a token's router picks, is fewer than the 2", "keep at least 4"),
        ([grouped, "--method", "reap", "--sparsity", "0.2"], "removes no expert", None),  # ⌊0.2 · 4⌋ = 0 per group
    ]
    before = tree_hashes(tmp_path)
    for args, needle, hint in cases:
        code, stdout, stderr = run_cli(["apply", *args, "--out", tmp_path / "out"])
        assert_clean_error(code, stdout, stderr, contains=needle, hint_contains=hint)
        assert tree_hashes(tmp_path) == before, args
        assert "out" not in listing(tmp_path)


FP4_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An in-memory gpt-oss expert tensor [E, in, out] as OCP MXFP4 on disk: blocks U8 [E, out, in/32,
    16] (two FP4 codes a byte, low nibble first) and scales U8 [E, out, in/32] (2^(s-127))."""
    x = np.ascontiguousarray(np.swapaxes(w, 1, 2), dtype=np.float64)  # [E, R, in]
    e, r, n = x.shape
    groups = x.reshape(e, r, n // 32, 32)
    amax = np.maximum(np.abs(groups).max(-1, keepdims=True), 1e-30)
    exp = np.ceil(np.log2(amax / 6.0))
    codes = np.abs(groups / 2.0**exp)[..., None] - FP4_GRID[None, None, None, None, :8]
    code = np.abs(codes).argmin(-1) + 8 * (groups < 0)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp[..., 0] + 127).astype(np.uint8)


def dequantize_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    codes = np.stack((blocks & 0x0F, blocks >> 4), axis=-1).reshape(*blocks.shape[:3], 32)
    values = FP4_GRID[codes] * 2.0 ** (scales.astype(np.float64) - 127)[..., None]
    return np.ascontiguousarray(np.swapaxes(values.reshape(blocks.shape[0], blocks.shape[1], -1), 1, 2))


@pytest.mark.slow
def test_mxfp4_gpt_oss(run_cli, moe_dir, tmp_path):
    """gpt-oss as the hub ships it, experts in MXFP4: `stats` reads the blocks and scales as the
    dequantized tensors (statistics equal those of the dequantized float checkpoint), and expert
    pruning copies the kept experts' blocks and scales bit for bit."""
    from safetensors.numpy import save_file

    src = moe_dir("gpt_oss")
    tensors = {k: R.to_f32(t) for k, t in R.read_checkpoint(src)[0].items()}
    packed, dense = {}, {}
    for k, v in tensors.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            blocks, scales = quantize_mxfp4(v)
            packed[k + "_blocks"], packed[k + "_scales"] = blocks, scales
            dense[k] = dequantize_reference(blocks, scales).astype(np.float32)
        else:
            packed[k] = dense[k] = v
    dirs = {}
    for name, ts in (("mxfp4", packed), ("dense", dense)):
        d = tmp_path / name / "tiny"
        shutil.copytree(src, d)
        (d / "llmprune-stats.safetensors").unlink(missing_ok=True)
        save_file(ts, str(d / "model.safetensors"))
        dirs[name] = d
    cfg = json.loads((dirs["mxfp4"] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dirs["mxfp4"] / "config.json").write_text(json.dumps(cfg))
    ids = R.random_samples(3, 20, vocab=256, seed=1)
    got, want = collect_stats(dirs["mxfp4"], ids, device="cpu"), collect_stats(dirs["dense"], ids, device="cpu")
    assert sorted(got.experts) == sorted(want.experts) and len(got.experts) == 2
    for m, w in want.experts.items():
        assert got.experts[m]["count"] == w["count"]
        np.testing.assert_allclose(got.experts[m]["reap_sum"], w["reap_sum"], rtol=1e-6)
    assert sorted(got.layers) == sorted(want.layers)

    stats_cli(run_cli, dirs["mxfp4"])
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", dirs["mxfp4"], "--method", "reap", "--experts-keep", "5", "--out", out, "--json"])
    assert code == 0, err
    after, _ = R.read_checkpoint(out)
    for layer in json.loads(stdout)["layers"]:
        for k, v in packed.items():
            if k.startswith(layer["layer"] + ".experts.") or k.startswith(layer["layer"] + ".router."):
                assert R.bits(after[k]).tobytes() == np.ascontiguousarray(v[layer["kept"]]).view(np.uint8 if v.dtype == np.uint8 else np.uint32).tobytes(), k
