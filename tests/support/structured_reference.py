"""Independent numpy reference of structured pruning (docs/cli.md; FLAP: variance × squared column norm), shared by
the structured tests: group rules, group scores, per-layer standardization, the cost-weighted global
threshold or the uniform counts (with layers kept whole), the slices of every tensor and the
compensated biases, and checks of an output against them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import reference as R
from conftest import assert_clean_error, listing, tree_hashes

# Every structured method; a pruned shard's provenance names one of them.
METHODS = ("flap", "magnitude-sp", "wanda-sp", "hywia")


def layer_modules(cfg: dict[str, Any], tensors: dict[str, R.RawTensor]) -> list[dict[str, Any]]:
    """Per layer: prefix, and for "attn" / "mlp" the input projections (name, rows per group), the
    output projection (name, columns per group) and the number of groups."""
    if cfg["model_type"] == "llama":
        base, attn_in, attn_out, mlp_in, mlp_out = "model.layers.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.o_proj", ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj"
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    elif cfg["model_type"] == "opt":
        base, attn_in, attn_out, mlp_in, mlp_out = "model.decoder.layers.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.out_proj", ["fc1"], "fc2"
        heads = kv = cfg["num_attention_heads"]
        hd = cfg["hidden_size"] // heads
    else:
        raise ValueError(cfg["model_type"])
    qpk = heads // kv
    out = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"{base}{i}."
        groups = tensors[f"{p}{attn_in[1]}.weight"].shape[0] // hd
        rpg = [qpk * hd, hd, hd]
        out.append(
            {
                "prefix": p,
                "attn": {"inputs": [(f"{p}{m}", r) for m, r in zip(attn_in, rpg)], "output": (f"{p}{attn_out}", qpk * hd), "groups": groups},
                "mlp": {"inputs": [(f"{p}{m}", 1) for m in mlp_in], "output": (f"{p}{mlp_out}", 1), "groups": tensors[f"{p}{mlp_in[0]}.weight"].shape[0]},
            }
        )
    return out


def f64(t: R.RawTensor) -> np.ndarray:
    return R.to_f32(t).astype(np.float64)


def group_scores(method: str, mod: dict[str, Any], tensors, stats) -> np.ndarray:
    name, cpg = mod["output"]
    w = f64(tensors[f"{name}.weight"])
    if method == "magnitude-sp":
        total = (w**2).sum(axis=0).reshape(-1, cpg).sum(axis=1)
        for n, rpg in mod["inputs"]:
            total += (f64(tensors[f"{n}.weight"]) ** 2).sum(axis=1).reshape(-1, rpg).sum(axis=1)
        return np.sqrt(total)
    s = stats[f"{name}.weight"]
    n = float(s["act_count"])
    if method == "flap":
        mu = s["act_sum"] / n
        var = np.maximum((s["act_sqsum"] - n * mu * mu) / (n - 1.0), 0.0)
        return (var * (w**2).sum(axis=0)).reshape(-1, cpg).sum(axis=1)
    if method == "wanda-sp":
        ch = np.sqrt(s["act_sqsum"] / n) * np.abs(w).sum(axis=0)
        return ch.reshape(-1, cpg).sum(axis=1) / (w.shape[0] * cpg)
    raise ValueError(method)


def standardize(s: np.ndarray) -> np.ndarray:
    if s.size < 2:
        return np.zeros_like(s)
    std = s.std(ddof=1)
    if not (np.isfinite(std) and std > 0):
        return np.zeros_like(s)
    return (s - s.mean()) / std


def group_cost(mod: dict[str, Any], tensors) -> int:
    hidden = tensors[f"{mod['inputs'][0][0]}.weight"].shape[1]
    rows = sum(r * (hidden + (f"{n}.bias" in tensors)) for n, r in mod["inputs"])
    name, cpg = mod["output"]
    return rows + cpg * tensors[f"{name}.weight"].shape[0]


def stock_heads(cfg: dict[str, Any]):
    """Which kept key/value group counts a stock transformers config describes (docs/cli.md): OPT
    keeps every head; LLaMA, Gemma 2 and Gemma 3 need the head count to divide hidden_size."""
    heads = cfg["num_attention_heads"]
    qpk = heads // (cfg.get("num_key_value_heads") or heads)
    if cfg["model_type"] == "opt":
        return lambda k: k * qpk == heads
    if cfg["model_type"] in ("llama", "gemma2", "gemma3", "gemma3_text"):
        return lambda k: k * qpk > 0 and cfg["hidden_size"] % (k * qpk) == 0
    return lambda k: True


def round_width(kept: int, width: int, m: int) -> int:
    """Kept width rounded to the nearest multiple of m (halves up) within [m, width]; unchanged when
    width <= m."""
    if m <= 1 or width <= m:
        return kept
    return min(max(math.floor(kept / m + 0.5) * m, m), width)


def reference_plan(method, sparsity, allocation, cfg, tensors, stats, width_multiple=128):
    """(layers, kept attention groups per layer, kept MLP channels per layer, removed params)."""
    layers = layer_modules(cfg, tensors)
    scores = [{k: group_scores(method, L[k], tensors, stats) for k in ("attn", "mlp")} for L in layers]
    keep, total_removed, block_params = plan_groups(layers, scores, tensors, sparsity, allocation, kv_allowed=stock_heads(cfg), width_multiple=width_multiple)
    return layers, keep, total_removed, block_params


def plan_groups(layers, scores, tensors, sparsity, allocation, frozen=None, kv_allowed=lambda k: True, width_multiple=128):
    """(kept groups per layer and module, removed params, decoder-layer params) from group scores.
    Layers where `frozen` is true keep everything; the others carry the whole target: uniform
    allocation uses S' = S · (all layers' params) / (params of the others), global allocation ranks
    only the others' groups against S · (all layers' params). Uniform allocation removes the count of
    attention groups nearest S'·G (ties: more) that leaves a count `kv_allowed` (or none; any count
    when some layer is frozen: no stock config describes such an output), then the MLP
    channels that bring the layer nearest S', the kept width rounded by `round_width`."""
    frozen = frozen or [False] * len(layers)
    cost = [{k: group_cost(L[k], tensors) for k in ("attn", "mlp")} for L in layers]
    params = [sum(t.numel for n, t in tensors.items() if n.startswith(L["prefix"])) for L in layers]
    free = [li for li in range(len(layers)) if not frozen[li]]
    removed: list[dict[str, list[int]]] = [{"attn": [], "mlp": []} for _ in layers]
    if allocation == "global":
        entries = [(li, k, g) for k in ("attn", "mlp") for li in free for g in range(len(scores[li][k]))]
        z = np.concatenate([standardize(scores[li][k]) for k in ("attn", "mlp") for li in free])
        order = np.argsort(z, kind="stable")
        cum = np.concatenate([[0], np.cumsum([cost[entries[i][0]][entries[i][1]] for i in order])])
        k = int(np.argmin(np.abs(cum.astype(np.float64) - sparsity * sum(params))))
        for i in order[:k]:
            li, kind, g = entries[i]
            removed[li][kind].append(g)
    else:
        if len(free) < len(layers):
            sparsity = sparsity * sum(params) / sum(params[li] for li in free)
        for li in free:
            G, I = len(scores[li]["attn"]), len(scores[li]["mlp"])
            allowed = [h for h in range(G + 1) if h == G or any(frozen) or kv_allowed(G - h)]
            h = min(allowed, key=lambda h: (abs(h - sparsity * G), -h))
            c = math.floor((sparsity * params[li] - h * cost[li]["attn"]) / cost[li]["mlp"] + 0.5)
            c = min(max(c, 0), I)
            c = I - round_width(I - c, I, width_multiple)
            removed[li]["attn"] = list(np.argsort(scores[li]["attn"], kind="stable")[:h])
            removed[li]["mlp"] = list(np.argsort(scores[li]["mlp"], kind="stable")[:c])
    keep = [{k: sorted(set(range(layers[li][k]["groups"])) - set(map(int, removed[li][k]))) for k in ("attn", "mlp")} for li in range(len(layers))]
    total_removed = sum(len(removed[li][k]) * cost[li][k] for li in range(len(layers)) for k in ("attn", "mlp"))
    return keep, total_removed, sum(params)


def expand(groups: list[int], per: int) -> np.ndarray:
    return np.array([g * per + j for g in groups for j in range(per)], dtype=np.int64)


def expected_tensors(layers, keep, tensors, stats, compensate: bool) -> dict[str, tuple[str, Any]]:
    """name -> ("bits", uint array) for sliced / added-zero tensors, ("values", float32) for
    compensated biases. Tensors not listed are copied unchanged."""
    out: dict[str, tuple[str, Any]] = {}
    for L, K in zip(layers, keep):
        for kind in ("attn", "mlp"):
            mod, kept = L[kind], K[kind]
            pruned = len(kept) < mod["groups"]
            add_bias = compensate and f"{mod['output'][0]}.bias" not in tensors and any(len(k[kind]) < l[kind]["groups"] for l, k in zip(layers, keep))
            for n, rpg in mod["inputs"]:
                rows = expand(kept, rpg)
                out[f"{n}.weight"] = ("bits", R.bits(tensors[f"{n}.weight"])[rows])
                if f"{n}.bias" in tensors:
                    out[f"{n}.bias"] = ("bits", R.bits(tensors[f"{n}.bias"])[rows])
                elif add_bias:
                    out[f"{n}.bias"] = ("bits", np.zeros(len(rows), dtype=np.uint16 if tensors[f"{n}.weight"].dtype != "F32" else np.uint32))
            name, cpg = mod["output"]
            cols = expand(kept, cpg)
            out[f"{name}.weight"] = ("bits", R.bits(tensors[f"{name}.weight"])[:, cols])
            if compensate and (pruned or add_bias):
                w = f64(tensors[f"{name}.weight"])
                s = stats[f"{name}.weight"]
                mu = s["act_sum"] / float(s["act_count"])
                gone = np.setdiff1d(np.arange(w.shape[1]), cols)
                b = w[:, gone] @ mu[gone]
                if f"{name}.bias" in tensors:
                    b = b + f64(tensors[f"{name}.bias"])
                out[f"{name}.bias"] = ("values", b.astype(np.float32))
    return out


def check_output(out_dir: Path, model_dir: Path, expected) -> None:
    tin, _ = R.read_checkpoint(model_dir)
    tout, metas = R.read_checkpoint(out_dir)
    assert set(tout) == set(tin) | set(expected), set(tout) ^ (set(tin) | set(expected))
    for name, t in tout.items():
        if name not in expected:
            assert t.data == tin[name].data, f"{name} must be copied unchanged"
            continue
        kind, ref = expected[name]
        if kind == "bits":
            got = R.bits(t)
            assert got.shape == ref.shape and np.array_equal(got, ref), name
        else:
            got = R.to_f32(t)
            # f64 sums rounded once to f32 and then to the dtype: at most one unit in the last place
            rtol = {"BF16": 2.0**-7, "F16": 2.0**-10, "F32": 1e-6}[t.dtype]
            ref_d = R.to_f32(R.RawTensor(name, t.dtype, ref.shape, R.from_f32(ref, t.dtype), ""))
            np.testing.assert_allclose(got, ref_d, rtol=rtol, atol=1e-30, err_msg=name)
    for m in metas.values():
        prov = json.loads(m["llmprune"])
        assert prov["method"] in METHODS
    if (out_dir / R.INDEX_NAME).exists():
        idx = json.loads((out_dir / R.INDEX_NAME).read_text())
        assert idx["metadata"]["total_size"] == sum(len(t.data) for t in tout.values())
        assert set(idx["weight_map"]) == set(tout)
        assert all(tout[n].file == f for n, f in idx["weight_map"].items())


def apply_json(run_cli, model: Path, *args: Any) -> dict[str, Any]:
    code, out, err = run_cli(["apply", model, *args, "--json"])
    assert code == 0, err
    return json.loads(out)


def load_and_compare_perplexity(out: Path):
    """load_pruned's full forward and the layer-streamed perplexity agree; returns the model."""
    import llmprune
    from llmprune.evaluation import perplexity

    model = llmprune.load_pruned(out)
    ids = torch.randint(0, 256, (1, 3 * 16), generator=torch.Generator().manual_seed(4))
    total = 0.0
    with torch.no_grad():
        for w in range(3):
            x = ids[:, w * 16 : (w + 1) * 16]
            logits = model(input_ids=x).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
    ref = math.exp(total / (3 * 15))
    res = perplexity(out, ids, 16, device="cpu")
    assert math.isclose(res.perplexity, ref, rel_tol=1e-4), (res.perplexity, ref)
    return model


def expect_failure(run_cli, model: Path, args: list[Any], **kw: Any) -> str:
    before, hashes = listing(model.parent), tree_hashes(model)
    code, out, err = run_cli(["apply", model, *args])
    msg = assert_clean_error(code, out, err, **kw)
    assert listing(model.parent) == before, "nothing may be left behind"
    assert tree_hashes(model) == hashes
    return msg
