"""Bad input to `llmprune apply`: exit code 2, one `error:` line (plus an optional `hint:`), the input
untouched, and no output or temporary directory left behind."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import reference as R
from conftest import assert_clean_error, compute_stats, copy_model, listing, tree_hashes

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
MAG = ["--method", "magnitude", "--sparsity", "0.5"]


@pytest.fixture
def model(tiny_models, tmp_path) -> Path:
    """A private copy (bf16, sharded, no sidecar) at tmp_path/m/tiny."""
    return copy_model(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "m")


@pytest.fixture
def model_stats(tiny_models) -> dict[str, dict[str, Any]]:
    return tiny_models("bfloat16", sharded=True, stats=True).stats


def expect_failure(
    run_cli,
    model: Path,
    args: list[Any],
    *,
    watch: tuple[Path, ...] = (),
    **assert_kw,
) -> str:
    """Run `apply MODEL ARGS`, check the clean failure; MODEL, its parent dir and `watch` dirs unchanged."""
    dirs = [model.parent, *watch]
    before_lists = {d: listing(d) for d in dirs}
    before_hash = tree_hashes(model) if model.is_dir() else None
    code, out, err = run_cli(["apply", model, *args])
    msg = assert_clean_error(code, out, err, **assert_kw)
    for d in dirs:
        assert listing(d) == before_lists[d], f"{d} changed: something was left behind\n{err}"
    if before_hash is not None:
        assert tree_hashes(model) == before_hash, "the input directory was modified"
    return msg


def shard_of(model: Path, name: str) -> Path:
    idx = json.loads((model / R.INDEX_NAME).read_text())
    return model / idx["weight_map"][name]


def rewrite_header(path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a shard with a mutated header (data buffer kept as is)."""
    header, start = R.read_header(path)
    data = path.read_bytes()[start:]
    mutate(header)
    hb = json.dumps(header).encode()
    hb += b" " * ((-len(hb)) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def ordered_entries(header: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def test_missing_model_dir(run_cli, tmp_path):
    (tmp_path / "m").mkdir()
    expect_failure(run_cli, tmp_path / "m" / "nope", MAG)


def test_model_is_a_file(run_cli, tmp_path):
    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "tiny"
    f.write_text("not a dir")
    expect_failure(run_cli, f, MAG)


def test_missing_config(run_cli, model):
    (model / "config.json").unlink()
    expect_failure(run_cli, model, MAG, contains="config.json")


def test_no_weights_at_all(run_cli, model):
    for f in model.glob("*.safetensors*"):
        f.unlink()
    expect_failure(run_cli, model, MAG)


def test_missing_shard(run_cli, model):
    shard = shard_of(model, DOWN0)
    shard.unlink()
    expect_failure(run_cli, model, MAG, contains=shard.name)


def test_truncated_shard(run_cli, model):
    shard = shard_of(model, Q0)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    expect_failure(run_cli, model, MAG, contains=shard.name)


def test_header_length_beyond_file(run_cli, model):
    shard = shard_of(model, Q0)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 16)
    shard.write_bytes(bytes(data))
    expect_failure(run_cli, model, MAG, contains=shard.name)


def test_tiny_file_shorter_than_length_prefix(run_cli, model):
    shard = shard_of(model, Q0)
    shard.write_bytes(b"\x01\x02\x03")
    expect_failure(run_cli, model, MAG, contains=shard.name)


def test_corrupt_json_header(run_cli, model):
    shard = shard_of(model, Q0)
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = (b'{"oops": [1, 2,' + b"x" * n)[:n]
    shard.write_bytes(bytes(data))
    expect_failure(run_cli, model, MAG, contains=shard.name)


def test_overlapping_offsets(run_cli, model):
    shard = shard_of(model, Q0)

    def mutate(header):
        entries = ordered_entries(header)
        # make the second tensor start in the middle of the first (same size, so only the overlap is wrong)
        (_, a), (_, b) = entries[0], entries[1]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        start = a["data_offsets"][0] + (a["data_offsets"][1] - a["data_offsets"][0]) // 2
        b["data_offsets"] = [start, start + size]

    rewrite_header(shard, mutate)
    expect_failure(run_cli, model, MAG, contains=shard.name)


def test_out_of_range_offsets(run_cli, model):
    shard = shard_of(model, Q0)

    def mutate(header):
        _, last = ordered_entries(header)[-1]
        a, b = last["data_offsets"]
        last["data_offsets"] = [a + 64, b + 64]

    rewrite_header(shard, mutate)
    expect_failure(run_cli, model, MAG, contains=shard.name)


def test_offsets_disagree_with_shape(run_cli, model):
    shard = shard_of(model, Q0)

    def mutate(header):
        header[Q0]["shape"] = [64, 65]

    rewrite_header(shard, mutate)
    expect_failure(run_cli, model, MAG)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_index_names_shard_outside_model(run_cli, model, where):
    idx_path = model / R.INDEX_NAME
    idx = json.loads(idx_path.read_text())
    victim = idx["weight_map"][Q0]
    if where == "absolute":
        outside = model.parent.parent / "outside.safetensors"
        ref = str(outside)
    else:
        outside = model.parent / "x.safetensors"
        ref = "../x.safetensors"
    outside.write_bytes((model / victim).read_bytes())  # a real, readable file: it must still be refused
    for name, f in list(idx["weight_map"].items()):
        if f == victim:
            idx["weight_map"][name] = ref
    idx_path.write_text(json.dumps(idx))
    expect_failure(run_cli, model, MAG, watch=(model.parent.parent,))


def test_index_names_tensor_shard_lacks(run_cli, model):
    idx_path = model / R.INDEX_NAME
    idx = json.loads(idx_path.read_text())
    idx["weight_map"]["model.layers.0.self_attn.extra_proj.weight"] = idx["weight_map"][Q0]
    idx_path.write_text(json.dumps(idx))
    expect_failure(run_cli, model, MAG, contains="model.layers.0.self_attn.extra_proj.weight")


def test_index_corrupt_json(run_cli, model):
    (model / R.INDEX_NAME).write_text('{"weight_map": {')
    expect_failure(run_cli, model, MAG, contains=R.INDEX_NAME)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


def retype_tensor(model: Path, name: str, dtype: str) -> None:
    shard = shard_of(model, name)
    tensors, meta = R.read_file_tensors(shard)
    t = tensors[name]
    t.data = R.from_f32(R.to_f32(t) * (64 if dtype == "I32" else 1), dtype)
    t.dtype = dtype
    R.write_safetensors(shard, list(tensors.values()), meta)


@pytest.mark.parametrize("dtype", ["F64", "I32"])
def test_unsupported_dtype_on_prunable_tensor(run_cli, model, dtype):
    retype_tensor(model, Q0, dtype)
    expect_failure(run_cli, model, MAG, contains=(Q0, dtype))


def test_unsupported_dtype_on_copied_tensor_is_copied(run_cli, model, tmp_path):
    """The contrast case: an F64 norm weight is not prunable and is copied byte for byte."""
    norm = "model.layers.1.input_layernorm.weight"
    retype_tensor(model, norm, "F64")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", model, *MAG, "--out", out])
    assert code == 0, err
    tin, _ = R.read_checkpoint(model)
    tout, _ = R.read_checkpoint(out)
    assert tout[norm].dtype == "F64" and tout[norm].data == tin[norm].data


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--method", "magnitude", "--sparsity", "-0.1"], id="sparsity-negative"),
        pytest.param(["--method", "magnitude", "--sparsity", "1.0"], id="sparsity-one"),
        pytest.param(["--method", "magnitude", "--sparsity", "1.5"], id="sparsity-above-one"),
        pytest.param(["--method", "magnitude", "--sparsity", "nan"], id="sparsity-nan"),
        pytest.param(["--method", "magnitude", "--pattern", "4:4"], id="pattern-4:4"),
        pytest.param(["--method", "magnitude", "--pattern", "5:4"], id="pattern-5:4"),
        pytest.param(["--method", "magnitude", "--pattern", "2:0"], id="pattern-2:0"),
        pytest.param(["--method", "magnitude", "--pattern", "two:four"], id="pattern-garbage"),
        pytest.param(["--method", "magnitude", "--pattern", "1:7"], id="pattern-1:7-indivisible"),
        pytest.param(["--method", "magnitude"], id="neither-sparsity-nor-pattern"),
        pytest.param(["--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4"], id="both-sparsity-and-pattern"),
        pytest.param(["--method", "nosuchmethod", "--sparsity", "0.5"], id="unknown-method"),
        pytest.param(["--sparsity", "0.5"], id="no-method"),
        pytest.param(["--method", "magnitude", "--sparsity", "0.5", "--scope", "column"], id="unknown-scope"),
        pytest.param(["--method", "magnitude", "--pattern", "2:4", "--scope", "layer"], id="pattern-with-layer-scope"),
        pytest.param(["--method", "magnitude", "--sparsity", "0.5", "--threads", "-3"], id="negative-threads"),
    ],
)
def test_bad_arguments(run_cli, model, args):
    expect_failure(run_cli, model, args)


def test_indivisible_pattern_names_tensor(run_cli, model):
    expect_failure(run_cli, model, ["--method", "magnitude", "--pattern", "1:7"], contains="7")


# --------------------------------------------------------------------------------------------
# The sidecar
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "stade", "stade-w"])
def test_method_needs_sidecar(run_cli, model, method):
    expect_failure(run_cli, model, ["--method", method, "--sparsity", "0.5"], hint_contains="llmprune stats")


def test_missing_explicit_sidecar(run_cli, model, tmp_path):
    expect_failure(run_cli, model, ["--method", "wanda", "--sparsity", "0.5", "--stats", tmp_path / "nope.safetensors"])


def test_sidecar_not_safetensors(run_cli, model, tmp_path):
    side = tmp_path / "garbage.safetensors"
    side.write_bytes(b"this is not a safetensors file at all")
    expect_failure(run_cli, model, ["--method", "wanda", "--sparsity", "0.5", "--stats", side])


@pytest.mark.parametrize("location", ["explicit", "default"])
def test_sidecar_for_another_model(run_cli, tiny_models, model, tmp_path, location):
    other = tiny_models("bfloat16", sharded=False, stats=False, intermediate_size=96).path
    other_stats = compute_stats(other, nsamples=1, seqlen=8)
    if location == "explicit":
        side = R.write_sidecar(other, other_stats, tmp_path / "other.safetensors")
        args = ["--method", "wanda", "--sparsity", "0.5", "--stats", side]
    else:
        # a sidecar copied into MODEL from another model: its fingerprint names the other model
        R.write_sidecar(other, other_stats, model / R.SIDECAR_NAME)
        args = ["--method", "wanda", "--sparsity", "0.5"]
    # first mismatching tensor in name order
    expect_failure(run_cli, model, args, contains=DOWN0)


def _sidecar_with(model: Path, stats: dict[str, dict[str, Any]], path: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """Write a correct sidecar for MODEL, then edit its tensors (metadata kept)."""
    from safetensors.numpy import load_file, save_file

    R.write_sidecar(model, stats, path)
    header, _ = R.read_header(path)
    arrays = load_file(str(path))
    edit(arrays)
    save_file(arrays, str(path), metadata=header["__metadata__"])
    return path


@pytest.mark.parametrize(
    "what",
    ["act_sum-short", "act_sqsum-long", "both-short", "act_count-2d", "act_sum-f32", "missing-act_sqsum"],
)
def test_sidecar_wrong_stats(run_cli, model, model_stats, tmp_path, what):
    def edit(arrays):
        if what == "act_sum-short":
            arrays[f"{Q0}.act_sum"] = arrays[f"{Q0}.act_sum"][:-1].copy()
        elif what == "act_sqsum-long":
            arrays[f"{Q0}.act_sqsum"] = np.concatenate([arrays[f"{Q0}.act_sqsum"], [1.0]])
        elif what == "both-short":
            arrays[f"{Q0}.act_sum"] = arrays[f"{Q0}.act_sum"][:-1].copy()
            arrays[f"{Q0}.act_sqsum"] = arrays[f"{Q0}.act_sqsum"][:-1].copy()
        elif what == "act_count-2d":
            arrays[f"{Q0}.act_count"] = np.array([[128, 128]], dtype=np.int64)
        elif what == "act_sum-f32":
            arrays[f"{Q0}.act_sum"] = arrays[f"{Q0}.act_sum"].astype(np.float32)
        elif what == "missing-act_sqsum":
            del arrays[f"{Q0}.act_sqsum"]

    side = _sidecar_with(model, model_stats, tmp_path / "bad.safetensors", edit)
    expect_failure(run_cli, model, ["--method", "wanda", "--sparsity", "0.5", "--stats", side], contains=Q0)


def test_sidecar_wrong_fingerprint(run_cli, model, model_stats, tmp_path):
    side = R.write_sidecar(model, model_stats, tmp_path / "fp.safetensors", fingerprint="0" * 64)
    expect_failure(run_cli, model, ["--method", "wanda", "--sparsity", "0.5", "--stats", side])


# --------------------------------------------------------------------------------------------
# The output location
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "trailing-slash", "dot", "relative"])
def test_out_equal_to_model(run_cli, model, spelling):
    out = {
        "same": str(model),
        "trailing-slash": str(model) + "/",
        "dot": str(model / "."),
        "relative": str(model / ".." / model.name),
    }[spelling]
    expect_failure(run_cli, model, [*MAG, "--out", out])


def test_out_existing_nonempty_needs_force(run_cli, model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = tree_hashes(out)
    expect_failure(run_cli, model, [*MAG, "--out", out], watch=(tmp_path,), hint_contains="--force")
    assert tree_hashes(out) == before

    code, stdout, err = run_cli(["apply", model, *MAG, "--out", out, "--force"])
    assert code == 0, err
    assert not (out / "keep.txt").exists(), "--force replaces the directory's contents"
    assert (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"], "no temp dir left behind"


def test_out_is_existing_file(run_cli, model, tmp_path):
    f = tmp_path / "out"
    f.write_text("a file")
    expect_failure(run_cli, model, [*MAG, "--out", f], watch=(tmp_path,))
    assert f.read_text() == "a file"


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_out(run_cli, model, tmp_path, where):
    if where == "under-a-file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a regular file, not a directory")
        out = blocker / "sub" / "out"
        watch: tuple[Path, ...] = (tmp_path,)
    else:
        out = Path("/proc/llmprune-test-out")
        watch = ()
    expect_failure(run_cli, model, [*MAG, "--out", out], watch=watch)
    assert not out.exists()


def test_late_tensor_failure_leaves_nothing(run_cli, model):
    """A bad tensor late in the checkpoint (the last layer's down_proj): no output or temp dir left."""
    retype_tensor(model, "model.layers.1.mlp.down_proj.weight", "F64")
    expect_failure(run_cli, model, MAG, contains="model.layers.1.mlp.down_proj.weight")
