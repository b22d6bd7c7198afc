"""Nothing silently wrong: every output that exits 0 is a model that loads and means what its
summary says, and every input that would make it otherwise is refused cleanly (exit 2, one
`error:` line, at most one `hint:`, the inputs unchanged, nothing at the output path, no temporary
directory left). The surfaces: expert pruning against the sidecar's expert table and config.json's
top-k, Gram sidecars without signal, --damp out of range, the pruned counts of the summary against
the zeros actually written, sidecar files given in the wrong place, and `stats merge` / `stats
--out` destinations that are a model's own files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, copy_model, listing, tree_hashes

import reference as R
import stats_helpers as H
from llmprune import _core

GRAM = _core.DEFAULT_GRAM
STATS = R.SIDECAR_NAME


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def expect_clean_failure(run_cli, args, root: Path, out: Path | None, *, contains=None, hint_contains=None) -> str:
    """Runs the CLI expecting the corpus's failure contract: a clean error, every file under
    `root` unchanged (inputs included), nothing at `out`, no temporary name left beside it."""
    before = tree_hashes(root)
    code, stdout, stderr = run_cli(args)
    msg = assert_clean_error(code, stdout, stderr, contains=contains, hint_contains=hint_contains)
    assert "Traceback" not in stderr
    assert tree_hashes(root) == before, "an input or output file changed"
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not [n for n in listing(out.parent) if ".llmprune-tmp-" in n], listing(out.parent)
    return msg


def assert_loads_and_runs(out: Path, *, structured: bool = False) -> torch.nn.Module:
    """The output loads (stock transformers, or llmprune.load_pruned for structured outputs whose
    layers may differ) and a forward pass gives finite logits."""
    if structured:
        from llmprune import load_pruned

        model = load_pruned(out)
    else:
        model = R.load_f32_model(out)
    vocab = int(model.config.vocab_size)
    ids = R.random_samples(2, 12, vocab=vocab, seed=3)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all(), f"non-finite logits from {out}"
    return model


def edit_gram(path: Path, how: str) -> None:
    """Edits a Gram sidecar in place: `all-zero` (every matrix), `first-zero` (the first input's
    matrix), `zero-diagonal` (every diagonal entry of every matrix), `dead-input` (input 0 of every
    matrix never fired: its row and column zero) or `nan`."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start = 8 + n
    meta = json.loads(header["__metadata__"]["llmprune"])
    keys = sorted(k for k in header if k.endswith(".gram"))
    for key in keys[:1] if how == "first-zero" else keys:
        a, b = header[key]["data_offsets"]
        feats = meta["groups"][key[: -len(".gram")]]["features"]
        if how in ("all-zero", "first-zero"):
            raw[start + a : start + b] = bytes(b - a)
        elif how == "zero-diagonal":
            for i in range(feats):
                at = start + a + 8 * (i * (i + 1) // 2 + i)
                raw[at : at + 8] = bytes(8)
        elif how == "dead-input":
            for k in range(feats):  # entries (k, 0) of the packed lower triangle
                at = start + a + 8 * (k * (k + 1) // 2)
                raw[at : at + 8] = bytes(8)
        elif how == "nan":
            raw[start + a + 8 : start + a + 16] = struct.pack("<d", float("nan"))
        else:
            raise ValueError(how)
    path.write_bytes(bytes(raw))


def prunable_zero_counts(model: Path, out: Path) -> tuple[int, int, int]:
    """(entries of the pruned linears, zeros in the output, zeros in the output where the input
    was not zero) over the decoder blocks' 2-D weights."""
    before, _ = R.read_checkpoint(model)
    after, _ = R.read_checkpoint(out)
    total = zeros = new = 0
    for name, t in after.items():
        if ".layers." not in name or len(t.shape) != 2:
            continue
        a = R.to_f32(t)
        b = R.to_f32(before[name])
        total += a.size
        zeros += int((a == 0).sum())
        new += int(((a == 0) & (b != 0)).sum())
    return total, zeros, new


@pytest.fixture
def gram_copy(gram_model, tmp_path) -> Path:
    """A private copy of the tiny model with its stats and Gram sidecars (tmp_path/w/tiny)."""
    return copy_model(gram_model, tmp_path / "w")


# --------------------------------------------------------------------------------------------
# Gram sidecars without signal, and --damp
# --------------------------------------------------------------------------------------------

GRAM_RUNS = {
    "sparsegpt": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda-update": ["--method", "wanda", "--sparsity", "0.5", "--update"],
    "flap-reconstruct": ["--method", "flap", "--sparsity", "0.3", "--reconstruct"],
}


# the refit of flap reads only the output projections' matrices, and the first input is not one
GRAM_FAULTS = [
    (how, run) for run in sorted(GRAM_RUNS) for how in ("all-zero", "zero-diagonal", "first-zero") if (how, run) != ("first-zero", "flap-reconstruct")
]


@pytest.mark.parametrize("how,run", GRAM_FAULTS)
def test_gram_without_signal_is_refused(run_cli, gram_copy, tmp_path, how, run):
    edit_gram(gram_copy / GRAM, how)
    out = tmp_path / "out"
    msg = expect_clean_failure(run_cli, ["apply", gram_copy, *GRAM_RUNS[run], "--out", out], tmp_path, out, contains="Gram", hint_contains="--gram")
    assert "no signal" in msg or "zero on its whole diagonal" in msg, msg


def test_corrupt_gram_names_the_gram_sidecar(run_cli, gram_copy, tmp_path):
    edit_gram(gram_copy / GRAM, "nan")
    out = tmp_path / "out"
    msg = expect_clean_failure(run_cli, ["apply", gram_copy, *GRAM_RUNS["sparsegpt"], "--out", out], tmp_path, out, hint_contains="--gram")
    assert "invalid Gram sidecar" in msg and "invalid stats sidecar" not in msg, msg


@pytest.mark.parametrize("damp", ["1e300", "1000", "10.5", "0", "-0.01"])
@pytest.mark.parametrize("run", ["sparsegpt", "flap-reconstruct"])
def test_damp_out_of_range_is_refused(run_cli, gram_copy, tmp_path, damp, run):
    out = tmp_path / "out"
    msg = expect_clean_failure(run_cli, ["apply", gram_copy, *GRAM_RUNS[run], "--damp", damp, "--out", out], tmp_path, out, contains="--damp")
    assert "recompute" not in msg, msg


@pytest.mark.parametrize("damp", ["0.01", "10"])
@pytest.mark.parametrize("run", ["sparsegpt", "flap-reconstruct"])
def test_damp_in_range_gives_a_working_model(run_cli, gram_copy, tmp_path, damp, run):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", gram_copy, *GRAM_RUNS[run], "--damp", damp, "--out", out, "--json"])
    assert code == 0, err
    assert_loads_and_runs(out, structured=run == "flap-reconstruct")
    if run == "flap-reconstruct":  # no refitted projection is entirely zero
        after, _ = R.read_checkpoint(out)
        for name, t in after.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                assert np.any(R.to_f32(t) != 0), name


@pytest.mark.parametrize("run", ["sparsegpt", "wanda-update"])
def test_summary_counts_the_zeros_written(run_cli, gram_copy, tmp_path, run):
    """The pruned count is read off the written tensors: with an input that never fired, the
    update zeroes its column, and those zeros are counted (wanda's mask is chosen before)."""
    edit_gram(gram_copy / GRAM, "dead-input")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", gram_copy, *GRAM_RUNS[run], "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    total, zeros, new = prunable_zero_counts(gram_copy, out)
    assert s["params_prunable"] == total
    assert new <= s["params_pruned"] <= zeros, (s["params_pruned"], new, zeros)
    if run == "wanda-update":  # the dead column's kept weights went to zero on top of the mask
        assert s["params_pruned"] > total // 2, (s["params_pruned"], total)
    assert_loads_and_runs(out)


# --------------------------------------------------------------------------------------------
# Sidecar files in the wrong place
# --------------------------------------------------------------------------------------------


def test_gram_given_as_stats_says_so(run_cli, gram_copy, tmp_path):
    out = tmp_path / "out"
    msg = expect_clean_failure(
        run_cli,
        ["apply", gram_copy, "--method", "wanda", "--sparsity", "0.5", "--stats", gram_copy / GRAM, "--out", out],
        tmp_path,
        out,
        contains="is a Gram sidecar",
        hint_contains="--gram",
    )
    assert '"layers" table' not in msg


@pytest.mark.parametrize("option", ["--stats", "--gram"])
def test_directory_given_as_a_sidecar(run_cli, gram_copy, tmp_path, option):
    out = tmp_path / "out"
    method = ["--method", "wanda", "--sparsity", "0.5"] if option == "--stats" else GRAM_RUNS["sparsegpt"]
    (tmp_path / "adir").mkdir()
    msg = expect_clean_failure(run_cli, ["apply", gram_copy, *method, option, tmp_path / "adir", "--out", out], tmp_path, out, contains="is a directory")
    assert "not found" not in msg


# --------------------------------------------------------------------------------------------
# Destinations of sidecars: never a model's own files
# --------------------------------------------------------------------------------------------

MODEL_FILES = ["model-00001-of-00003.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def two_sidecars(gram_copy, tmp_path):
    """Two stats sidecars and two Gram sidecars of the copy (the same statistics, renamed)."""
    side = tmp_path / "sides"
    side.mkdir()
    for name, src in (("a", STATS), ("b", STATS), ("ga", GRAM), ("gb", GRAM)):
        shutil.copyfile(gram_copy / src, side / f"{name}.safetensors")
    return side


@pytest.mark.parametrize("target", MODEL_FILES)
@pytest.mark.parametrize("kind", ["stats", "gram"])
def test_merge_never_replaces_a_model_file(run_cli, gram_copy, two_sidecars, tmp_path, target, kind):
    assert (gram_copy / target).is_file(), sorted(p.name for p in gram_copy.iterdir())
    a, b = (two_sidecars / f"{p}.safetensors" for p in (("a", "b") if kind == "stats" else ("ga", "gb")))
    before = tree_hashes(tmp_path)
    code, stdout, stderr = run_cli(["stats", "merge", a, b, "--out", gram_copy / target])
    assert_clean_error(code, stdout, stderr, contains="llmprune writes a sidecar only over an llmprune sidecar", hint_contains="--out")
    assert tree_hashes(tmp_path) == before
    assert not [n for n in listing(gram_copy) if ".llmprune-tmp-" in n]


def test_merge_never_replaces_another_file(run_cli, two_sidecars, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    before = tree_hashes(tmp_path)
    code, stdout, stderr = run_cli(["stats", "merge", two_sidecars / "a.safetensors", two_sidecars / "b.safetensors", "--out", notes])
    assert_clean_error(code, stdout, stderr, contains="not an llmprune sidecar")
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
def test_merge_writes_a_new_file_or_over_a_sidecar(run_cli, two_sidecars, tmp_path, existing):
    out = tmp_path / "ab.safetensors"
    if existing:
        shutil.copyfile(two_sidecars / "a.safetensors", out)
    code, stdout, err = run_cli(["stats", "merge", two_sidecars / "a.safetensors", two_sidecars / "b.safetensors", "--out", out, "--json"])
    assert code == 0, err
    assert json.loads(stdout)["format"] == "llmprune-stats"
    assert not [n for n in listing(tmp_path) if ".llmprune-tmp-" in n]


@pytest.mark.parametrize("target", [pytest.param("model-00001-of-00003.safetensors", marks=pytest.mark.slow), "config.json"])
def test_stats_out_never_replaces_a_model_file(run_cli, gram_copy, tmp_path, target):
    before = tree_hashes(tmp_path)
    code, stdout, stderr = run_cli(["stats", gram_copy, "--nsamples", "2", "--seqlen", "8", "--device", "cpu", "--out", gram_copy / target])
    assert_clean_error(code, stdout, stderr, hint_contains="--out")
    assert tree_hashes(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Expert pruning: the sidecar's expert table against config.json
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mixtral(tmp_path_factory) -> Path:
    """A tiny Mixtral (2 MoE layers of 8 experts, top-2) with a tokenizer and the statistics of
    `llmprune stats`. Read-only."""
    from conftest import run_cli_subprocess

    path = H.tiny_mixtral_dir(tmp_path_factory.mktemp("mixtral") / "tiny")
    code, _, err = run_cli_subprocess(["stats", path, "--nsamples", "4", "--seqlen", "24", "--device", "cpu"])
    assert code == 0, err
    return path


def edit_experts(sidecar: Path, drop: str | None = None, top_k: int | None = None) -> list[str]:
    """Rewrites a sidecar's expert table in place: `drop` one MoE layer's statistics ("all" for
    every layer), or set every layer's `top_k`. Returns the MoE layers it listed."""
    from safetensors.numpy import load_file, save_file

    meta = json.loads(R.read_header(sidecar)[0]["__metadata__"]["llmprune"])
    arrays = load_file(str(sidecar))
    layers = sorted(meta["experts"])
    for moe in layers if drop == "all" else [drop] if drop else []:
        del meta["experts"][moe]
        arrays = {k: v for k, v in arrays.items() if not k.startswith(f"{moe}.expert_")}
    if drop == "all":
        del meta["experts"]
    if top_k is not None:
        for info in meta.get("experts", {}).values():
            info["top_k"] = top_k
    save_file(arrays, str(sidecar), metadata={"llmprune": json.dumps(meta)})
    return layers


@pytest.mark.parametrize("which", [0, 1])
def test_expert_table_missing_a_layer_is_refused(run_cli, mixtral, tmp_path, which):
    model = copy_model(mixtral, tmp_path / "m")
    layers = edit_experts(model / STATS)
    edit_experts(model / STATS, drop=layers[which])
    out = tmp_path / "out"
    msg = expect_clean_failure(
        run_cli,
        ["apply", model, "--method", "reap", "--experts-keep", "2", "--out", out],
        tmp_path,
        out,
        contains=layers[which],
        hint_contains="llmprune stats",
    )
    assert "has none" not in msg


def test_sidecar_without_expert_statistics_is_not_told_the_model_has_no_moe(run_cli, mixtral, tmp_path):
    model = copy_model(mixtral, tmp_path / "m")
    edit_experts(model / STATS, drop="all")
    out = tmp_path / "out"
    msg = expect_clean_failure(
        run_cli,
        ["apply", model, "--method", "reap", "--experts-keep", "4", "--out", out],
        tmp_path,
        out,
        contains="no expert routing statistics",
        hint_contains="llmprune stats",
    )
    assert "has none" not in msg and "no MoE" not in msg


@pytest.mark.parametrize("keep", ["1"])
def test_experts_keep_below_the_configs_top_k_is_refused(run_cli, mixtral, tmp_path, keep):
    model = copy_model(mixtral, tmp_path / "m")
    edit_experts(model / STATS, top_k=1)  # the sidecar says 1, config.json's num_experts_per_tok says 2
    out = tmp_path / "out"
    expect_clean_failure(
        run_cli,
        ["apply", model, "--method", "reap", "--experts-keep", keep, "--out", out],
        tmp_path,
        out,
        contains="fewer than the 2",
        hint_contains="keep at least 2",
    )


@pytest.mark.parametrize("keep,top_k", [("2", 1), ("4", None), ("6", None)])
@pytest.mark.parametrize("method", ["reap", "frequency"])
def test_expert_pruning_gives_a_working_model(run_cli, mixtral, tmp_path, keep, top_k, method):
    model = copy_model(mixtral, tmp_path / "m")
    if top_k is not None:
        edit_experts(model / STATS, top_k=top_k)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", model, "--method", method, "--experts-keep", keep, "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == int(keep) == s["experts_after"]
    after, _ = R.read_checkpoint(out)
    for layer in s["layers"]:
        ids = {int(k.split(".experts.")[1].split(".")[0]) for k in after if k.startswith(f"{layer['layer']}.experts.")}
        assert ids == set(range(int(keep))), layer["layer"]
        assert after[f"{layer['layer']}.gate.weight"].shape[0] == int(keep)
    assert_loads_and_runs(out)


# --------------------------------------------------------------------------------------------
# Other write paths: what exits 0 loads and runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,structured",
    [
        (["--method", "wanda", "--sparsity", "0.5"], False),
        (["--method", "magnitude", "--pattern", "2:4"], False),
        (["--method", "block-influence", "--remove-blocks", "1"], False),
        (["--method", "flap", "--sparsity", "0.3"], True),
    ],
    ids=["wanda", "magnitude-2:4", "depth", "flap"],
)
def test_other_write_paths_give_working_models(run_cli, gram_copy, tmp_path, args, structured):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", gram_copy, *args, "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    if "params_pruned" in s:
        total, zeros, new = prunable_zero_counts(gram_copy, out)
        assert new <= s["params_pruned"] <= zeros
    assert_loads_and_runs(out, structured=structured)


@pytest.mark.parametrize("sparsity,word", [("0.02", "raise --sparsity"), ("0.98", "lower --sparsity")])
def test_owl_out_of_range_hint_points_the_right_way(run_cli, gram_copy, tmp_path, sparsity, word):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["apply", gram_copy, "--method", "wanda", "--allocation", "owl", "--sparsity", sparsity, "--owl-lambda", "0.08", "--out", out]
    )
    if code == 0:
        pytest.skip("OWL kept every block inside [0, 1) for this model")
    assert_clean_error(code, stdout, stderr, contains="OWL", hint_contains=word)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The finiteness postcondition, reached through the CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e40, 1e300])
def test_non_finite_compensated_bias_is_never_published(run_cli, tiny_models, tmp_path, scale):
    """Statistics that pass validation (finite, no negative variance) but whose means overflow
    float32: the compensated bias would be infinite, and the postcondition refuses it."""
    tm = tiny_models("bfloat16", sharded=True, stats=True)
    model = copy_model(tm, tmp_path / "w", sidecar=False)
    stats = {k: dict(v) for k, v in tm.stats.items()}
    name = sorted(k for k in stats if k.endswith("o_proj.weight"))[0]
    s = stats[name]
    n = float(s["act_count"])
    s["act_sum"] = np.full_like(np.asarray(s["act_sum"], dtype=np.float64), scale * n)
    s["act_sqsum"] = np.full_like(np.asarray(s["act_sqsum"], dtype=np.float64), min(scale * scale, 1e306) * n)
    side = R.write_sidecar(model, stats, tmp_path / "w" / "huge.safetensors")
    out = tmp_path / "out"
    msg = expect_clean_failure(
        run_cli,
        ["apply", model, "--method", "magnitude", "--sparsity", "0.5", "--compensate", "--stats", side, "--out", out],
        tmp_path,
        out,
        contains=(name.replace(".weight", ""), "non-finite"),
    )
    assert msg.startswith("error: output check failed for tensor"), msg
