"""End-to-end tests of `llmprune apply` and `llmprune inspect` against the independent references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reference as R
from conftest import TinyModel, compute_stats, copy_model, listing

METHODS = ["magnitude", "wanda", "stade", "stade-w"]
CONFIGS = [("--sparsity", "0.5"), ("--pattern", "2:4"), ("--pattern", "4:8")]
MODELS = [("bfloat16", True), ("bfloat16", False), ("float16", False), ("float32", True)]
N_PRUNABLE = 14  # 2 layers x (q, k, v, o, gate, up, down)
N_COPIED = 7  # embed_tokens, lm_head, model.norm, 2 x (input_layernorm, post_attention_layernorm)


def config_kwargs(flag: str, value: str) -> dict[str, Any]:
    return {"sparsity": float(value)} if flag == "--sparsity" else {"pattern": value}


def apply_ok(run_cli, args: list[Any], **kw) -> tuple[str, str]:
    code, out, err = run_cli(["apply", *args], **kw)
    assert code == 0, f"apply {args} failed with {code}:\n{err}\n{out}"
    return out, err


def verify_pruned(
    in_dir: Path,
    out_dir: Path,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    scope: str = "row",
    stats: dict[str, dict[str, Any]] | None = None,
    prunable: set[str] | None = None,
) -> dict[str, np.ndarray]:
    """Check OUT against the reference masks bit for bit; returns the masks of the pruned tensors.

    Every prunable tensor of OUT must equal the input with exactly the reference-masked positions
    replaced by +0.0 (all-zero bits); every other tensor must be byte-identical to the input.
    """
    tin, _ = R.read_checkpoint(in_dir)
    tout, _ = R.read_checkpoint(out_dir)
    assert sorted(tout) == sorted(tin), "output must hold exactly the input's tensors"
    if prunable is None:
        prunable = set(stats) if stats is not None else {n for n, t in tin.items() if R.is_prunable_default(n, t.shape)}
    masks = {}
    for name, ti in tin.items():
        to = tout[name]
        assert (to.dtype, to.shape) == (ti.dtype, ti.shape), name
        assert to.file == ti.file, f"{name} moved from {ti.file} to {to.file}"
        if name not in prunable:
            assert to.data == ti.data, f"non-prunable tensor {name} changed"
            continue
        w = R.to_f32(ti)
        mask = R.reference_mask(w, method, sparsity=sparsity, pattern=pattern, scope=scope, stats=stats, name=name)
        rows, cols = w.shape
        if pattern is not None:
            n, m = R.parse_pattern(pattern)
            assert (mask.sum(axis=1) == cols // m * n).all()
        elif scope == "row":
            assert (mask.sum(axis=1) == int(cols * sparsity)).all()
        else:
            assert mask.sum() == int(w.size * sparsity)
        expected = np.where(mask, 0, R.bits(ti))
        got = R.bits(to)
        if not np.array_equal(got, expected):
            bad = np.argwhere(got != expected)
            r = int(bad[0][0])
            got_zero = np.flatnonzero(R.to_f32(to)[r] == 0)
            want_zero = np.flatnonzero(mask[r] | (w[r] == 0))
            pytest.fail(
                f"{name}: {len(bad)} elements differ from the reference ({method}, "
                f"sparsity={sparsity}, pattern={pattern}, scope={scope}); first at {tuple(bad[0])}: "
                f"got bits {got[tuple(bad[0])]:#x}, want {expected[tuple(bad[0])]:#x}.\n"
                f"row {r} zero columns got  {got_zero.tolist()}\nrow {r} zero columns want {want_zero.tolist()}"
            )
        # exact per-row sparsity of the output (already-zero weights can only add zeros)
        zeros = (R.to_f32(to) == 0).sum(axis=1)
        assert (zeros >= mask.sum(axis=1)).all()
        masks[name] = mask
    return masks


# --------------------------------------------------------------------------------------------
# Masks equal the reference, bit for bit
# --------------------------------------------------------------------------------------------


def _mask_cases():
    cases = []
    for dtype, sharded in MODELS:
        full = (dtype, sharded) == ("bfloat16", True)
        for method in METHODS:
            for flag, value in CONFIGS:
                if not full and value == "4:8":
                    continue
                cases.append(pytest.param(dtype, sharded, method, flag, value, "row", id=f"{dtype}-{'sharded' if sharded else 'single'}-{method}-{value}",
                                          marks=() if full and value == "0.5" else pytest.mark.slow))
        cases.append(pytest.param(dtype, sharded, "magnitude", "--sparsity", "0.5", "layer", id=f"{dtype}-{'sharded' if sharded else 'single'}-magnitude-0.5-layer",
                                  marks=() if full else pytest.mark.slow))
    # floor(size * s) with a fractional product
    for method, scope in [("wanda", "row"), ("stade-w", "row"), ("magnitude", "layer"), ("magnitude", "row")]:
        cases.append(pytest.param("bfloat16", True, method, "--sparsity", "0.3", scope, id=f"bfloat16-sharded-{method}-0.3-{scope}", marks=pytest.mark.slow))
    cases.append(pytest.param("bfloat16", True, "stade", "--sparsity", "0.9", "row", id="bfloat16-sharded-stade-0.9", marks=pytest.mark.slow))
    cases.append(pytest.param("bfloat16", True, "wanda", "--pattern", "1:4", "row", id="bfloat16-sharded-wanda-1:4", marks=pytest.mark.slow))
    return cases


@pytest.mark.parametrize("dtype,sharded,method,flag,value,scope", _mask_cases())
def test_masks_match_reference(run_cli, tiny_models, tmp_path, dtype, sharded, method, flag, value, scope):
    tm: TinyModel = tiny_models(dtype, sharded=sharded)
    out = tmp_path / "out"
    args = [tm.path, "--method", method, flag, value, "--out", out]
    if scope != "row":
        args += ["--scope", scope]
    apply_ok(run_cli, args)
    verify_pruned(tm.path, out, method, scope=scope, stats=tm.stats, **config_kwargs(flag, value))
    assert not (out / R.SIDECAR_NAME).exists(), "the sidecar must not be copied into the output"


def test_magnitude_without_sidecar_uses_default_rule(run_cli, tiny_models, tmp_path):
    tm = tiny_models("bfloat16", sharded=False, stats=False)
    assert tm.sidecar is None
    out = tmp_path / "out"
    apply_ok(run_cli, [tm.path, "--method", "magnitude", "--sparsity", "0.5", "--out", out])
    masks = verify_pruned(tm.path, out, "magnitude", sparsity=0.5)
    assert len(masks) == N_PRUNABLE


def test_exclude_glob(run_cli, tiny_models, tmp_path):
    tm = tiny_models("bfloat16", sharded=True, stats=False)
    out = tmp_path / "out"
    apply_ok(run_cli, [tm.path, "--method", "magnitude", "--pattern", "2:4", "--exclude", "*.mlp.*", "--out", out])
    tin, _ = R.read_checkpoint(tm.path)
    prunable = {n for n, t in tin.items() if R.is_prunable_default(n, t.shape) and ".mlp." not in n}
    masks = verify_pruned(tm.path, out, "magnitude", pattern="2:4", prunable=prunable)
    assert len(masks) == 8


def test_threads_do_not_change_result(run_cli, tiny_model, tmp_path):
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"out{threads}"
        apply_ok(run_cli, [tiny_model.path, "--method", "stade-w", "--sparsity", "0.5", "--threads", threads, "--out", out])
        outs.append(R.read_checkpoint(out)[0])
    assert {n: t.data for n, t in outs[0].items()} == {n: t.data for n, t in outs[1].items()}


def test_sparsity_zero_is_identity(run_cli, tiny_model, tmp_path):
    out = tmp_path / "out"
    apply_ok(run_cli, [tiny_model.path, "--method", "wanda", "--sparsity", "0", "--out", out])
    tin, _ = R.read_checkpoint(tiny_model.path)
    tout, _ = R.read_checkpoint(out)
    assert {n: (t.dtype, t.shape, t.data) for n, t in tin.items()} == {n: (t.dtype, t.shape, t.data) for n, t in tout.items()}


# --------------------------------------------------------------------------------------------
# Sidecar selection
# --------------------------------------------------------------------------------------------


def test_default_sidecar_used_and_explicit_stats_win(run_cli, tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path / "m")  # carries default sidecar (stats seed 0)
    other_stats = compute_stats(model, seed=7, nsamples=2, seqlen=16)
    (tmp_path / "elsewhere").mkdir()
    other = R.write_sidecar(model, other_stats, tmp_path / "elsewhere" / "other.safetensors")

    tin, _ = R.read_checkpoint(model)
    differs = False
    for name in tiny_model.stats:
        w = R.to_f32(tin[name])
        a = R.reference_mask(w, "stade", sparsity=0.5, stats=tiny_model.stats, name=name)
        b = R.reference_mask(w, "stade", sparsity=0.5, stats=other_stats, name=name)
        differs |= not np.array_equal(a, b)
    assert differs, "test setup: the two sidecars should give different masks"

    out_default = tmp_path / "out-default"
    apply_ok(run_cli, [model, "--method", "stade", "--sparsity", "0.5", "--out", out_default])
    verify_pruned(model, out_default, "stade", sparsity=0.5, stats=tiny_model.stats)
    assert not (out_default / R.SIDECAR_NAME).exists()

    out_explicit = tmp_path / "out-explicit"
    apply_ok(run_cli, [model, "--method", "stade", "--sparsity", "0.5", "--stats", other, "--out", out_explicit])
    verify_pruned(model, out_explicit, "stade", sparsity=0.5, stats=other_stats)


def test_explicit_stats_outside_model(run_cli, tiny_models, tmp_path):
    tm = tiny_models("float16", sharded=False)
    model = copy_model(tm, tmp_path / "m", sidecar=False)
    side = R.write_sidecar(model, tm.stats, tmp_path / "stats.safetensors")
    out = tmp_path / "out"
    apply_ok(run_cli, [model, "--method", "wanda", "--pattern", "2:4", "--stats", side, "--out", out])
    verify_pruned(model, out, "wanda", pattern="2:4", stats=tm.stats)


# --------------------------------------------------------------------------------------------
# Output layout, metadata, provenance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_output_layout(run_cli, tiny_models, tmp_path, sharded):
    tm = tiny_models("bfloat16", sharded=sharded)
    out = tmp_path / "out"
    apply_ok(run_cli, [tm.path, "--method", "wanda", "--sparsity", "0.5", "--out", out])

    expected_files = sorted(f for f in listing(tm.path) if f != R.SIDECAR_NAME)
    assert listing(out) == expected_files
    for f in ("config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tm.path / f).read_bytes(), f"{f} must be copied byte for byte"

    if sharded:
        idx_in = json.loads((tm.path / R.INDEX_NAME).read_text())
        idx_out = json.loads((out / R.INDEX_NAME).read_text())
        assert idx_out["weight_map"] == idx_in["weight_map"]
        data_bytes = 0
        for shard in R.tensor_files(out):
            header, _ = R.read_header(out / shard)
            data_bytes += sum(b - a for k, v in header.items() if k != "__metadata__" for a, b in [v["data_offsets"]])
        assert int(idx_out["metadata"]["total_size"]) == data_bytes
    else:
        assert not (out / R.INDEX_NAME).exists()

    _, meta_in = R.read_checkpoint(tm.path)
    _, meta_out = R.read_checkpoint(out)
    assert sorted(meta_out) == sorted(meta_in)
    for shard, m_in in meta_in.items():
        m_out = meta_out[shard]
        for k, v in m_in.items():
            assert m_out.get(k) == v, f"{shard}: input metadata {k!r} not kept"
        assert "llmprune" in m_out, f"{shard}: no llmprune provenance in __metadata__"
        prov = json.loads(m_out["llmprune"])
        assert prov.get("method") == "wanda"
        assert float(prov.get("sparsity")) == 0.5
        assert "version" in json.dumps(prov)


def test_output_loads_in_transformers(run_cli, tiny_model, tmp_path):
    import torch

    out = tmp_path / "out"
    apply_ok(run_cli, [tiny_model.path, "--method", "stade-w", "--pattern", "2:4", "--out", out])
    model = R.load_f32_model(out)
    with torch.no_grad():
        logits = model(input_ids=R.random_samples(2, 16, seed=3)).logits
    assert logits.shape == (2, 16, 256)
    assert torch.isfinite(logits).all()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert R.nm_compliant(q, 2, 4)


# --------------------------------------------------------------------------------------------
# --json and the default output dir
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--sparsity", "0.5"), ("--pattern", "2:4")])
def test_json_summary(run_cli, tiny_model, tmp_path, flag, value):
    out = tmp_path / "out"
    stdout, _ = apply_ok(run_cli, [tiny_model.path, "--method", "wanda", flag, value, "--out", out, "--json"])
    doc = json.loads(stdout)  # exactly one JSON document, nothing else on stdout
    assert Path(doc["out"]).resolve() == out.resolve()
    assert doc["method"] == "wanda"
    if flag == "--sparsity":
        assert float(doc["sparsity"]) == 0.5
    else:
        assert doc["pattern"] == "2:4"
    assert doc["tensors_pruned"] == N_PRUNABLE
    assert doc["tensors_copied"] == N_COPIED
    tin, _ = R.read_checkpoint(tiny_model.path)
    prunable = sum(tin[n].numel for n in tiny_model.stats)
    assert doc["params_prunable"] == prunable
    assert doc["params_pruned"] == prunable // 2
    assert isinstance(doc["bytes_written"], int) and doc["bytes_written"] > 0
    assert isinstance(doc["seconds"], (int, float)) and doc["seconds"] >= 0
    assert isinstance(doc["warnings"], list)


@pytest.mark.parametrize(
    "method,flag,value,suffix,trailing_slash",
    [
        ("wanda", "--sparsity", "0.5", "wanda-0.5", False),
        ("wanda", "--pattern", "2:4", "wanda-2_4", False),
        ("magnitude", "--sparsity", "0.25", "magnitude-0.25", True),
        ("stade-w", "--pattern", "4:8", "stade-w-4_8", False),
    ],
)
def test_default_out_dir(run_cli, tiny_model, tmp_path, method, flag, value, suffix, trailing_slash):
    parent = tmp_path / "m"
    model = copy_model(tiny_model, parent)
    before = listing(parent)
    arg = str(model) + ("/" if trailing_slash else "")
    stdout, _ = apply_ok(run_cli, [arg, "--method", method, flag, value, "--json"], cwd=tmp_path)
    expected = parent / f"tiny-{suffix}"
    assert listing(parent) == sorted(before + [expected.name]), "exactly one new dir beside MODEL (no temp dir left)"
    assert Path(json.loads(stdout)["out"]).resolve() == expected.resolve()
    assert not (expected / R.SIDECAR_NAME).exists()
    verify_pruned(model, expected, method, stats=tiny_model.stats, **config_kwargs(flag, value))


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def inspect_json(run_cli, path: Path) -> dict[str, Any]:
    code, out, err = run_cli(["inspect", path, "--json"])
    assert code == 0, err
    return json.loads(out)


def check_inspect(doc: dict[str, Any], model_dir: Path, prunable: set[str]) -> None:
    """Every number of `inspect --json` against our own count."""
    tensors, _ = R.read_checkpoint(model_dir)
    rows = {t["name"]: t for t in doc["tensors"]}
    assert sorted(rows) == sorted(tensors)
    tot = {"numel": 0, "zeros": 0}
    pru = {"numel": 0, "zeros": 0}
    for name, t in tensors.items():
        row = rows[name]
        x = R.to_f32(t)
        zeros = int((x == 0).sum())
        assert row["dtype"] == t.dtype
        assert list(row["shape"]) == list(t.shape)
        assert row["numel"] == t.numel
        assert row["zeros"] == zeros, name
        assert row["sparsity"] == pytest.approx(zeros / t.numel, abs=1e-9)
        assert bool(row["prunable"]) == (name in prunable), name
        for pat in ("2:4", "4:8"):
            n, m = R.parse_pattern(pat)
            want = R.nm_compliant(x, n, m) if x.ndim == 2 else False
            got = (row.get("nm") or {}).get(pat)
            assert bool(got) == want, f"{name} {pat}: inspect says {got}, expected {want}"
        tot["numel"] += t.numel
        tot["zeros"] += zeros
        if name in prunable:
            pru["numel"] += t.numel
            pru["zeros"] += zeros
    for key, ref in (("total", tot), ("prunable", pru)):
        assert doc[key]["numel"] == ref["numel"]
        assert doc[key]["zeros"] == ref["zeros"]
        assert doc[key]["sparsity"] == pytest.approx(ref["zeros"] / ref["numel"], abs=1e-9)


def test_inspect_dense_input(run_cli, tiny_model):
    doc = inspect_json(run_cli, tiny_model.path)
    check_inspect(doc, tiny_model.path, set(tiny_model.stats))
    assert doc["provenance"] is None
    assert not any((t.get("nm") or {}).get("2:4") for t in doc["tensors"] if t["prunable"])


@pytest.mark.parametrize("flag,value", [("--pattern", "2:4"), ("--pattern", "4:8"), ("--sparsity", "0.5")])
def test_inspect_pruned_output(run_cli, tiny_model, tmp_path, flag, value):
    out = tmp_path / "out"
    apply_ok(run_cli, [tiny_model.path, "--method", "wanda", flag, value, "--out", out])
    doc = inspect_json(run_cli, out)
    check_inspect(doc, out, set(tiny_model.stats))
    prunable_rows = [t for t in doc["tensors"] if t["prunable"]]
    assert len(prunable_rows) == N_PRUNABLE
    if value == "2:4":
        assert all(t["nm"]["2:4"] and t["nm"]["4:8"] for t in prunable_rows)
    if value == "4:8":
        assert all(t["nm"]["4:8"] for t in prunable_rows)
    for t in prunable_rows:
        assert t["sparsity"] >= 0.5
    assert doc["prunable"]["sparsity"] >= 0.5
    prov = doc["provenance"]
    assert isinstance(prov, dict)
    assert prov.get("method") == "wanda"
    if flag == "--pattern":
        assert prov.get("pattern") == value
    else:
        assert float(prov.get("sparsity")) == 0.5


def test_inspect_text(run_cli, tiny_model, tmp_path):
    out = tmp_path / "out"
    apply_ok(run_cli, [tiny_model.path, "--method", "magnitude", "--pattern", "2:4", "--out", out])
    code, stdout, err = run_cli(["inspect", out])
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj.weight" in stdout
    assert "2:4" in stdout


def test_inspect_summary_comes_first_and_says_what_was_done(run_cli, tiny_model, tmp_path):
    """The summary precedes the per-tensor table (--summary prints it alone), and the share of zeros
    is reported only where zeros measure what was done: unstructured pruning, not depth pruning."""
    pruned, short = tmp_path / "pruned", tmp_path / "short"
    apply_ok(run_cli, [tiny_model.path, "--method", "wanda", "--sparsity", "0.5", "--out", pruned])
    from llmprune.model.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny_model.path)  # a depth schedule as `llmprune search` writes it
    schedule = tmp_path / "drop.json"
    schedule.write_text(
        json.dumps(
            {
                "format": "llmprune-schedule",
                "format_version": 1,
                "model_fingerprint": ckpt.fingerprint,
                "model_content_sha256": ckpt.content_digest(),
                "method": "block-influence",
                "kind": "depth",
                "removed_blocks": [1],
            }
        )
    )
    apply_ok(run_cli, [tiny_model.path, "--method", "block-influence", "--allocation", schedule, "--out", short])
    code, stdout, err = run_cli(["inspect", pruned])
    assert code == 0, err
    lines = stdout.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("tensor"))
    summary = "\n".join(lines[:table])
    assert "unstructured pruning: wanda 0.5" in summary and "prunable weights: 5" in summary
    code, stdout, err = run_cli(["inspect", short, "--summary"])
    assert code == 0, err
    assert "depth pruning: removed 1 of 2 blocks" in stdout
    assert "prunable weights" not in stdout and "model.layers.0" not in stdout
