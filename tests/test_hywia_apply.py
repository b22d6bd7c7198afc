"""`llmprune apply --method hywia` against an independent numpy reference of docs/hywia.md.

The sidecars here carry the reference activation statistics plus synthesized gradient statistics
(`W.grad_out`, `W.grad_in`, `W.grad_count`, as `llmprune stats --grad` writes them). The synthesized
values are multiples of 1/8, so every sum is exact whatever its order, and their noise differs
between layers so that the fine estimate is the reproducible one in some layers and the coarse one in
others. The reference computes the group values, the estimates, their split-half Spearman
reliabilities, the fusion weights and the kept groups; structured_reference.py plans and checks the
slices.
"""

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
from conftest import copy_model
from structured_reference import apply_json, check_output, expect_failure, expected_tensors, layer_modules, load_and_compare_perplexity, plan_groups, stock_heads

LAYERS = 10  # default skips: round(10/8) = 1 first, round(10/16) = 1 last
MODEL = dict(num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4)  # 2 query heads per group
COUNTS = (4, 2, 2)


@pytest.fixture(scope="module")
def base_model(tiny_models):
    return tiny_models("bfloat16", sharded=True, stats=True, **MODEL)


# --------------------------------------------------------------------------------------------
# Gradient statistics, synthesized
# --------------------------------------------------------------------------------------------


def synth_grads(tensors: dict[str, R.RawTensor], names: list[str], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per weight: grad_out [3, 4, out] and grad_in [3, 4, in] in eighths. Splits A and B share a
    base and add noise; the fine quantities (0, 3) are noisy in layers 3k+1 and 3k+2, the coarse ones
    (1, 2) in layers 3k and 3k+1. Small integer bases make many MLP channels tie."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        layer = int(name.split(".layers.")[1].split(".")[0])
        noise = {0: [0, 3, 12][layer % 3], 3: [0, 3, 12][layer % 3], 1: [12, 3, 0][layer % 3], 2: [12, 3, 0][layer % 3]}
        g = {}
        for key, n in (("out", tensors[name].shape[0]), ("in", tensors[name].shape[1])):
            arr = np.zeros((3, 4, n))
            for q in range(4):
                base = rng.integers(-4 if q == 1 else 0, 5, n)
                a, b = (base + rng.integers(-noise[q], noise[q] + 1, n) for _ in range(2))
                if q != 1:  # Σ|·| and the Fisher term are never negative
                    a, b = np.abs(a), np.abs(b)
                arr[:, q] = np.stack([a + b, a, b]) / 8.0
            g[key] = arr
        out[name] = g
    return out


def write_grad_sidecar(model: Path, grads: dict[str, dict[str, np.ndarray]], counts=COUNTS) -> Path:
    """The model's activation sidecar with the gradient statistics added."""
    from safetensors.numpy import load_file, save_file

    path = model / R.SIDECAR_NAME
    header, _ = R.read_header(path)
    meta = json.loads(header["__metadata__"]["llmprune"])
    arrays = load_file(str(path))
    for name, g in grads.items():
        arrays[f"{name}.grad_out"] = np.ascontiguousarray(g["out"], dtype=np.float64)
        arrays[f"{name}.grad_in"] = np.ascontiguousarray(g["in"], dtype=np.float64)
        arrays[f"{name}.grad_count"] = np.array(counts, dtype=np.int64)
    meta["grad"] = {"nsamples": counts[0], "seqlen": 32, "tokens": counts[0] * 31, "loss": 5.5, "mode": "full", "dtype": "float32"}
    save_file(arrays, str(path), metadata={"llmprune": json.dumps(meta)})
    return path


def model_with_grads(base, dest: Path, counts=COUNTS) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    model = copy_model(base, dest)
    tensors, _ = R.read_checkpoint(model)
    grads = synth_grads(tensors, sorted(base.stats))
    write_grad_sidecar(model, grads, counts)
    return model, grads


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def group_values(mod: dict[str, Any], grads) -> np.ndarray:
    """Q[split, quantity, group]: the group's rows of the input projections and columns of the output."""
    name, cpg = mod["output"]
    q = grads[f"{name}.weight"]["in"].reshape(3, 4, -1, cpg).sum(axis=-1)
    for n, rpg in mod["inputs"]:
        q = q + grads[f"{n}.weight"]["out"].reshape(3, 4, -1, rpg).sum(axis=-1)
    return q


def estimates(q: np.ndarray, taylor: str) -> tuple[np.ndarray, np.ndarray]:
    """(fine, coarse), each [split, group]."""
    if taylor == "first":
        return q[:, 0], np.abs(q[:, 1])
    return q[:, 3], np.abs(q[:, 1] - 0.5 * q[:, 2])


def average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j + 2) / 2.0
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    rx, ry = average_ranks(x) - (len(x) + 1) / 2, average_ranks(y) - (len(y) + 1) / 2
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else 0.0


def normalized(e: np.ndarray) -> np.ndarray:
    total = e.sum()
    return e / total if total > 0 else np.full(len(e), 1.0 / len(e))


def hywia_reference(layers, grads, fusion: str, taylor: str, temperature: float, frozen: list[bool]):
    """(scores per layer and module, fusion entries of the pruned layers)."""
    scores, entries = [], []
    for li, L in enumerate(layers):
        if frozen[li]:
            scores.append({k: np.zeros(L[k]["groups"]) for k in ("attn", "mlp")})
            continue
        entry: dict[str, Any] = {"layer": li}
        layer_scores = {}
        for k in ("attn", "mlp"):
            fine, coarse = estimates(group_values(L[k], grads), taylor)
            rho = np.array([spearman(fine[1], fine[2]), spearman(coarse[1], coarse[2])])
            if fusion == "adaptive":
                w = np.exp((rho - rho.max()) / temperature)
                alpha = w / w.sum()
            else:
                alpha = np.array([1.0, 0.0] if fusion == "fine" else [0.0, 1.0])
            layer_scores[k] = alpha[0] * normalized(fine[0]) + alpha[1] * normalized(coarse[0])
            entry[k] = {"alpha_fine": alpha[0], "alpha_coarse": alpha[1], "rho_fine": rho[0], "rho_coarse": rho[1]}
        scores.append(layer_scores)
        entries.append(entry)
    return scores, entries


def default_skips(n: int) -> tuple[int, int]:
    return math.floor(n / 8 + 0.5), math.floor(n / 16 + 0.5)


# --------------------------------------------------------------------------------------------
# Kept groups equal the reference
# --------------------------------------------------------------------------------------------

CASES = [
    # fusion, taylor, allocation (None: hywia's default, uniform), extra arguments
    ("adaptive", "first", None, []),
    ("adaptive", "mix", "uniform", []),
    ("fine", "first", None, []),
    ("coarse", "mix", None, []),
    ("adaptive", "first", "global", []),
    ("coarse", "first", "global", []),
    ("adaptive", "mix", None, ["--skip-first", "0", "--skip-last", "3", "--fusion-temperature", "0.5"]),
    ("fine", "mix", "global", ["--skip-first", "2", "--skip-last", "0"]),
]


@pytest.mark.parametrize("fusion,taylor,allocation,extra", CASES)
def test_matches_reference(run_cli, base_model, tmp_path, fusion, taylor, allocation, extra):
    model, grads = model_with_grads(base_model, tmp_path / "m")
    sparsity, out = 0.25, tmp_path / "out"
    args = ["--method", "hywia", "--sparsity", sparsity, "--fusion", fusion, "--taylor", taylor, "--out", out, *extra]
    if allocation is not None:
        args += ["--allocation", allocation]
    s = apply_json(run_cli, model, *args)

    first, last = default_skips(LAYERS)
    opts = dict(zip(extra[::2], extra[1::2]))
    first, last = int(opts.get("--skip-first", first)), int(opts.get("--skip-last", last))
    temperature = float(opts.get("--fusion-temperature", 0.1))
    frozen = [i < first or i >= LAYERS - last for i in range(LAYERS)]
    tensors, _ = R.read_checkpoint(model)
    layers = layer_modules(H.read_config(model), tensors)
    scores, entries = hywia_reference(layers, grads, fusion, taylor, temperature, frozen)
    keep, removed, block_params = plan_groups(layers, scores, tensors, sparsity, allocation or "uniform", frozen, kv_allowed=stock_heads(H.read_config(model)))

    assert (s["method"], s["allocation"], s["compensate"]) == ("hywia", allocation or "uniform", False)
    assert (s["fusion_mode"], s["taylor"], s["fusion_temperature"]) == (fusion, taylor, temperature)
    assert (s["skip_first"], s["skip_last"]) == (first, last)
    assert [f["layer"] for f in s["fusion"]] == [e["layer"] for e in entries]
    for got, want in zip(s["fusion"], entries):
        for k in ("attn", "mlp"):
            for key, v in want[k].items():
                assert math.isclose(got[k][key], v, rel_tol=1e-12, abs_tol=1e-15), (got, want)
    assert s["params_removed"] == removed and s["block_params_before"] == block_params
    assert [(x["num_key_value_heads"], x["intermediate_size"]) for x in s["per_layer"]] == [(len(k["attn"]), len(k["mlp"])) for k in keep]
    for li in range(LAYERS):
        if frozen[li] or allocation is None:
            assert (len(keep[li]["attn"]) < 4) == (not frozen[li]), "uniform: every pruned layer loses a group; skipped ones none"
    check_output(out, model, expected_tensors(layers, keep, tensors, None, False))
    recorded = H.read_config(out)["llmprune"]["structured"]
    assert (recorded["method"], recorded["fusion_mode"], recorded["taylor"]) == ("hywia", fusion, taylor)
    assert (recorded["skip_first"], recorded["skip_last"], recorded["fusion_temperature"]) == (first, last, temperature)


def read_grads(sidecar: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    arrays = load_file(str(sidecar))
    names = {k.rsplit(".", 1)[0] for k in arrays if k.endswith(".grad_count")}
    return {n: {"out": arrays[f"{n}.grad_out"], "in": arrays[f"{n}.grad_in"]} for n in names}


@pytest.mark.slow
def test_statistics_from_stats_grad(run_cli, tmp_path):
    """End to end with the sidecar `llmprune stats --grad` writes."""
    model = R.tiny_llama_dir(tmp_path / "m" / "tiny", dtype="float32", seed=5, **MODEL)
    H.add_tokenizer(model)
    code, _, err = run_cli(["stats", model, "--grad", "--nsamples", "4", "--seqlen", "24", "--device", "cpu"])
    assert code == 0, err
    s = apply_json(run_cli, model, "--method", "hywia", "--sparsity", "0.3", "--fusion", "adaptive", "--taylor", "mix", "--out", tmp_path / "out")
    tensors, _ = R.read_checkpoint(model)
    layers = layer_modules(H.read_config(model), tensors)
    frozen = [i < 1 or i >= LAYERS - 1 for i in range(LAYERS)]
    scores, entries = hywia_reference(layers, read_grads(model / R.SIDECAR_NAME), "adaptive", "mix", 0.1, frozen)
    keep, removed, _ = plan_groups(layers, scores, tensors, 0.3, "uniform", frozen, kv_allowed=stock_heads(H.read_config(model)))
    assert s["params_removed"] == removed
    check_output(tmp_path / "out", model, expected_tensors(layers, keep, tensors, None, False))
    for got, want in zip(s["fusion"], entries):
        assert math.isclose(got["mlp"]["rho_fine"], want["mlp"]["rho_fine"], rel_tol=1e-12, abs_tol=1e-15)


def test_reliability_decides_the_fusion(run_cli, base_model, tmp_path):
    """Where the fine estimate is noise-free between halves and the coarse one noisy (layers 3k), the
    fine estimate dominates; the other way round in layers 3k+2."""
    model, _ = model_with_grads(base_model, tmp_path / "m")
    s = apply_json(run_cli, model, "--method", "hywia", "--sparsity", "0.2", "--fusion", "adaptive", "--out", tmp_path / "out")
    by_layer = {f["layer"]: f for f in s["fusion"]}
    assert by_layer[3]["mlp"]["rho_fine"] == 1.0 and by_layer[3]["mlp"]["alpha_fine"] > 0.99
    assert by_layer[5]["mlp"]["rho_coarse"] == 1.0 and by_layer[5]["mlp"]["alpha_coarse"] > 0.99
    assert all(math.isclose(f[k]["alpha_fine"] + f[k]["alpha_coarse"], 1.0) for f in s["fusion"] for k in ("attn", "mlp"))


# --------------------------------------------------------------------------------------------
# The outputs load and run
# --------------------------------------------------------------------------------------------


def test_outputs_load_and_run(run_cli, base_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = model_with_grads(base_model, tmp_path / "m")
    code, stdout, err = run_cli(["apply", model, "--method", "hywia", "--sparsity", "0.25"])
    assert code == 0, err
    assert stdout.startswith("hywia 0.25 (uniform, width multiple 128): kept "), stdout
    line = stdout.splitlines()[1]
    assert line.startswith("fusion fine (taylor first, temperature 0.1): mean alpha_fine 1.000 ") and "over 8 pruned layers" in line, line
    assert line.endswith("first 1 and last 1 layers kept whole"), line
    # the skipped layers keep every head and channel, so layers differ in size
    out = model.parent / "tiny-hywia-0.25"
    assert json.loads((out / "config.json").read_text())["llmprune"]["loader"] == "llmprune.load_pruned"
    # apply says so, and how to get an output stock transformers loads
    assert "layers differ in size" in err and "--skip-first 0 --skip-last 0" in err, err
    pruned = load_and_compare_perplexity(out)
    sizes = [(layer.self_attn.k_proj.out_features, layer.mlp.down_proj.in_features) for layer in pruned.model.layers]
    assert sizes[0] == sizes[-1] == (32, 128) and sizes[1][0] == 24

    # no layer skipped: every layer the same size; stock transformers loads it when the head count
    # divides hidden_size (transformers 5's LlamaConfig refuses anything else, head_dim or not)
    # (6 of 8 heads would not: uniform allocation removes 2 of the 4 groups instead of 1)
    flat = apply_json(run_cli, model, "--method", "hywia", "--sparsity", "0.25", "--skip-first", "0", "--skip-last", "0", "--out", tmp_path / "six")
    assert {layer["num_attention_heads"] for layer in flat["per_layer"]} == {4} and flat["loader"] == "transformers"
    s = apply_json(run_cli, model, "--method", "hywia", "--sparsity", "0.5", "--skip-first", "0", "--skip-last", "0", "--out", tmp_path / "flat")
    assert {layer["num_attention_heads"] for layer in s["per_layer"]} == {4}
    assert s["loader"] == "transformers" and len(s["fusion"]) == LAYERS
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "flat", dtype=torch.float32).eval()
    assert sum(p.numel() for p in stock.parameters()) == s["model_params_after"]
    with torch.no_grad():
        assert torch.isfinite(stock(R.random_samples(1, 16, seed=3)).logits).all()


@pytest.mark.slow
def test_global_output_runs_with_load_pruned(run_cli, base_model, tmp_path):
    model, _ = model_with_grads(base_model, tmp_path / "m")
    s = apply_json(run_cli, model, "--method", "hywia", "--sparsity", "0.3", "--allocation", "global", "--fusion", "coarse")
    assert Path(s["out"]) == model.parent / "tiny-hywia-0.3-global"
    assert s["loader"] == "llmprune.load_pruned"
    pruned = load_and_compare_perplexity(Path(s["out"]))
    assert sum(p.numel() for p in pruned.parameters()) == s["model_params_after"]


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one error line, nothing written
# --------------------------------------------------------------------------------------------

# the core's hint, sized by the command line for this model (cli/hints.py; tests/test_hints.py)
HINT = "run: `llmprune stats {} --grad --nsamples"


def test_sidecar_without_gradient_statistics(run_cli, base_model, tmp_path):
    model = copy_model(base_model, tmp_path / "m")  # activation statistics only
    msg = expect_failure(run_cli, model, ["--method", "hywia", "--sparsity", "0.2"], contains="method hywia needs gradient statistics;", hint_contains=HINT.format(model))
    assert str(model / R.SIDECAR_NAME) in msg and msg.endswith("has none")
    (model / R.SIDECAR_NAME).unlink()
    expect_failure(run_cli, model, ["--method", "hywia", "--sparsity", "0.2"], contains="needs gradient statistics", hint_contains=HINT.format(model))


def test_adaptive_needs_both_halves(run_cli, base_model, tmp_path):
    model, _ = model_with_grads(base_model, tmp_path / "m", counts=(1, 1, 0))
    expect_failure(run_cli, model, ["--method", "hywia", "--sparsity", "0.2", "--fusion", "adaptive"], contains="adaptive fusion", hint_contains="--fusion fine|coarse")
    # one estimate alone (the default, fine) needs no halves
    s = apply_json(run_cli, model, "--method", "hywia", "--sparsity", "0.2", "--out", tmp_path / "out")
    assert s["fusion_mode"] == "fine"
    assert all((f[k]["alpha_fine"], f[k]["alpha_coarse"]) == (1.0, 0.0) for f in s["fusion"] for k in ("attn", "mlp"))


@pytest.mark.parametrize(
    "args,contains",
    [
        (["--fusion", "bogus"], "unknown fusion"),
        (["--taylor", "second"], "unknown taylor"),
        (["--fusion-temperature", "0"], "--fusion-temperature"),
        (["--skip-first", str(LAYERS)], "leave no layer"),
        (["--skip-first", "5", "--skip-last", "5"], "leave no layer"),
        (["--skip-last", "-1"], "--skip-last"),
        (["--skip-first", "8", "--skip-last", "1", "--sparsity", "0.5"], "must stay below 1"),
        (["--method", "flap", "--fusion", "fine"], "apply to --method hywia"),
        (["--method", "wanda", "--skip-first", "1"], "apply to --method hywia"),
    ],
)
def test_bad_arguments(run_cli, base_model, tmp_path, args, contains):
    model, _ = model_with_grads(base_model, tmp_path / "m")
    base = ["--method", "hywia", "--sparsity", "0.2"]
    # later options win: a case's own --method / --sparsity replaces the default
    expect_failure(run_cli, model, [*base, *args], contains=contains)


def test_architecture_without_group_rule(run_cli, tmp_path):
    model = H.tiny_gpt2_dir(tmp_path / "m" / "tiny")
    expect_failure(run_cli, model, ["--method", "hywia", "--sparsity", "0.2"], contains=("no group rule", "gpt2"))
