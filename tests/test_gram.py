"""`llmprune stats --gram`: the input Gram matrices of the layer-streamed pass against a whole-model
hook reference on four architectures, the Gram sidecar's layout (docs/sidecar.md), merging, data
parallelism, the command line and its refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reference as R
import sparsegpt_reference as S
from conftest import assert_clean_error, cli_env, listing
from test_stats import arch_dir, assert_stats_close, cli_model, model_copy  # noqa: F401 - fixtures

from llmprune.calibration.gram import GramTarget
from llmprune.calibration.activations import collect_stats

GRAM_NAME = "llmprune-gram.safetensors"

# the inputs each block's linears share (relative names), per architecture
SHARING = {
    "llama": [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "qwen2": [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "opt": [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
}
BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}


def read_gram_file(path: Path) -> tuple[dict[str, Any], dict[str, tuple[dict[str, int], np.ndarray, int]]]:
    """(metadata, {key: ({weight: input axis}, full symmetric matrix, count)}), parsed by hand."""
    tensors, file_meta = R.read_file_tensors(path)
    meta = json.loads(file_meta["llmprune"])
    out = {}
    for key, g in meta["groups"].items():
        n = g["features"]
        t, c = tensors[f"{key}.gram"], tensors[f"{key}.gram_count"]
        assert t.dtype == {"float64": "F64", "float32": "F32"}[meta.get("storage", "float64")] and t.shape == (n * (n + 1) // 2,), key
        assert c.dtype == "I64" and c.shape == (1,), key
        packed = np.frombuffer(t.data, dtype="<f8" if t.dtype == "F64" else "<f4").astype(np.float64)
        out[key] = (g["weights"], S.unpack_lower(packed, n), int(np.frombuffer(c.data, dtype="<i8")[0]))
    assert len(tensors) == 2 * len(out)
    return meta, out


def assert_gram_close(groups: dict[str, tuple[dict[str, int], np.ndarray, int]], ref: dict[str, dict[str, Any]], rtol: float = 1e-6) -> None:
    """Every prunable weight is in exactly one group, whose matrix is the weight's own input's."""
    covered = [w for weights, _, _ in groups.values() for w in weights]
    assert sorted(covered) == sorted(ref)
    for key, (weights, full, count) in groups.items():
        assert key == min(weights)
        for w, axis in weights.items():
            r = ref[w]
            assert axis == r["input_axis"] and count == r["count"], w
            assert full.shape == r["gram"].shape, w
            scale = float(np.abs(r["gram"]).max())
            np.testing.assert_allclose(full, r["gram"], rtol=rtol, atol=rtol * scale, err_msg=w)


def gram_run(path: Path, ids, out: Path, **kw: Any):
    return collect_stats(path, ids, device="cpu", gram=GramTarget(out, {"source": "random-ids", "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": 0}), **kw)


# --------------------------------------------------------------------------------------------
# Against the whole-model reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,sharded", [("llama", True), ("opt", False), ("gpt2", False), ("qwen2", True)])
def test_gram_equals_whole_model_reference(arch_dir, tmp_path, arch, sharded):
    path = arch_dir(arch, sharded=sharded)
    ids = R.random_samples(3, 24, vocab=256, seed=1)
    out = tmp_path / "g.safetensors"
    res = gram_run(path, ids, out)
    model = R.load_f32_model(path)
    meta, groups = read_gram_file(out)
    assert_gram_close(groups, S.gram_reference(model, ids))
    # the activation statistics of the same pass are untouched by the Gram hooks
    assert_stats_close(res.layers, R.reference_stats(model, ids))

    prefix = BLOCKS[arch]
    expect = {
        f"{prefix}.{i}.{members[0]}.weight": sorted(f"{prefix}.{i}.{m}.weight" for m in members) for i in range(2) for members in SHARING[arch]
    }
    assert {k: sorted(w) for k, (w, _, _) in groups.items()} == expect
    assert res.gram is not None and res.gram.path == out and res.gram.inputs == len(expect)
    assert res.gram.bytes == sum(n * (n + 1) // 2 * 8 + 8 for n in (g["features"] for g in meta["groups"].values()))
    if arch == "gpt2":  # Conv1D stores [in, out]: the input is axis 0, mlp.c_proj reads 4 x 64 features
        assert {a for w, _, _ in groups.values() for a in w.values()} == {0}
        assert meta["groups"][f"{prefix}.0.mlp.c_proj.weight"]["features"] == 256

    fp, described = R.fingerprint_and_tensors(path)
    assert meta["format"] == "llmprune-gram" and meta["format_version"] == 1
    assert meta["model_fingerprint"] == fp and meta["model_tensors"] == described
    assert meta["mode"] == "dense" and meta["sequential"] is None
    assert meta["calibration"] == {"source": "random-ids", "nsamples": 3, "seqlen": 24, "seed": 0, "tokens": 72}
    assert listing(tmp_path) == ["g.safetensors"]  # no temporary file left


def test_float32_products_as_on_a_gpu(arch_dir, tmp_path, monkeypatch):
    """The GPU path (float32 xᵀx per window, summed in float64), run on the CPU."""
    from llmprune.calibration import gram

    monkeypatch.setattr(gram, "float64_products", lambda device: False)
    path = arch_dir("qwen2", sharded=True)
    ids = R.random_samples(2, 24, vocab=256, seed=5)
    gram_run(path, ids, tmp_path / "g.safetensors")
    _, groups = read_gram_file(tmp_path / "g.safetensors")
    assert_gram_close(groups, S.gram_reference(R.load_f32_model(path), ids), rtol=2e-6)


def test_float32_storage_is_the_float64_sums_rounded_once(run_cli, arch_dir, tmp_path):
    """--gram-dtype float32 stores each float64 sum rounded once to float32 (bit for bit), in half
    the bytes, every value at a multiple of its size; the core reads it back; merging float32 halves
    sums them in float64 and stores the result as float32."""
    from llmprune import _core

    path = arch_dir("llama", sharded=True)
    ids = R.random_samples(4, 16, seed=7)
    calib = {"source": "random-ids", "nsamples": 4, "seqlen": 16, "seed": 0}
    res64 = collect_stats(path, ids, device="cpu", gram=GramTarget(tmp_path / "d.safetensors", calib))
    res32 = collect_stats(path, ids, device="cpu", gram=GramTarget(tmp_path / "f.safetensors", calib, storage="float32"))
    meta64, g64 = read_gram_file(tmp_path / "d.safetensors")
    meta32, g32 = read_gram_file(tmp_path / "f.safetensors")
    assert meta64["storage"] == "float64" and meta32["storage"] == "float32" and meta32["groups"] == meta64["groups"]
    for key, (_, m, count) in g32.items():
        assert count == g64[key][2]
        np.testing.assert_array_equal(m, g64[key][1].astype(np.float32).astype(np.float64))
    assert res64.gram is not None and res32.gram is not None
    matrices = sum(n * (n + 1) // 2 for n in (g["features"] for g in meta32["groups"].values()))
    assert res64.gram.bytes - res32.gram.bytes == 4 * matrices
    size = lambda p: p.stat().st_size  # noqa: E731
    assert size(tmp_path / "d.safetensors") - size(tmp_path / "f.safetensors") == pytest.approx(4 * matrices, abs=4096)
    header, start = R.read_header(tmp_path / "f.safetensors")
    assert start % 8 == 0
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % (8 if info["dtype"] == "I64" else 4) == 0, name
    _, core = _core.read_gram(str(tmp_path / "f.safetensors"))
    for key, (_, packed, count) in core.items():
        np.testing.assert_array_equal(S.unpack_lower(packed, g32[key][1].shape[0]), g32[key][1])
    for name, part in (("a", ids[:2]), ("b", ids[2:])):
        collect_stats(path, part, device="cpu", gram=GramTarget(tmp_path / f"{name}.safetensors", calib, storage="float32"))
    code, _, err = run_cli(["stats", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--out", tmp_path / "ab.safetensors"])
    assert code == 0, err
    meta, merged = read_gram_file(tmp_path / "ab.safetensors")
    _, a = read_gram_file(tmp_path / "a.safetensors")
    _, b = read_gram_file(tmp_path / "b.safetensors")
    assert meta["storage"] == "float32"
    for key, (_, m, count) in merged.items():
        assert count == 64
        np.testing.assert_array_equal(m, (a[key][1] + b[key][1]).astype(np.float32).astype(np.float64))


def test_core_reader_agrees(arch_dir, tmp_path):
    from llmprune import _core

    path = arch_dir("llama", sharded=True)
    out = tmp_path / "g.safetensors"
    gram_run(path, R.random_samples(2, 16, seed=2), out)
    meta, groups = read_gram_file(out)
    core_meta, core_groups = _core.read_gram(str(out))
    assert json.loads(core_meta)["groups"] == meta["groups"]
    assert sorted(core_groups) == sorted(groups)
    for key, (weights, packed, count) in core_groups.items():
        assert sorted(weights) == sorted(groups[key][0]) and count == groups[key][2]
        np.testing.assert_array_equal(S.unpack_lower(packed, groups[key][1].shape[0]), groups[key][1])


def test_sequential_mode_is_recorded(arch_dir, tmp_path):
    """In sequential mode block 0 sees the dense model; the metadata says how later blocks were pruned."""
    from llmprune.calibration.sequential import Sequential

    path = arch_dir("llama")
    ids = R.random_samples(2, 16, seed=3)
    gram_run(path, ids, tmp_path / "d.safetensors")
    gram_run(path, ids, tmp_path / "s.safetensors", sequential=Sequential("wanda", pattern=(2, 4)))
    dense_meta, dense = read_gram_file(tmp_path / "d.safetensors")
    seq_meta, seq = read_gram_file(tmp_path / "s.safetensors")
    assert seq_meta["mode"] == "sequential" and seq_meta["sequential"] == {"method": "wanda", "pattern": "2:4"}
    for key in dense:
        if ".layers.0." in key:
            np.testing.assert_array_equal(seq[key][1], dense[key][1])
    later = [k for k in dense if ".layers.1." in k]
    assert later and all(not np.array_equal(seq[k][1], dense[k][1]) for k in later)


def test_failed_pass_leaves_no_file(arch_dir, tmp_path, monkeypatch):
    from llmprune.model.stream import LayerStreamer

    path = arch_dir("llama")
    real = LayerStreamer.run_block

    def failing(self, i, hidden):
        if i == 1:
            raise RuntimeError("stop")
        return real(self, i, hidden)

    monkeypatch.setattr(LayerStreamer, "run_block", failing)
    with pytest.raises(RuntimeError, match="stop"):
        gram_run(path, R.random_samples(2, 16, seed=4), tmp_path / "g.safetensors")
    assert listing(tmp_path) == []


def test_a_folder_without_room_is_refused_before_writing(arch_dir, tmp_path, monkeypatch):
    """The Gram sidecar's size is known once block 0's inputs are grouped: a folder with less free
    space is refused then, with the sizes, rather than when the disk fills."""
    import shutil
    from collections import namedtuple

    from llmprune.errors import UsageError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UsageError, match="the Gram sidecar needs .* MB free"):
        gram_run(arch_dir("llama"), R.random_samples(2, 16, seed=4), tmp_path / "g.safetensors")
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Sums are additive: merge and data parallelism
# --------------------------------------------------------------------------------------------


def test_merge_of_halves_equals_one_run(run_cli, arch_dir, tmp_path):
    path = arch_dir("llama", sharded=True)
    ids = R.random_samples(4, 16, seed=7)
    for name, part in (("all", ids), ("a", ids[:2]), ("b", ids[2:])):
        gram_run(path, part, tmp_path / f"{name}.safetensors")
    code, out, err = run_cli(["stats", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--out", tmp_path / "ab.safetensors", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["tokens"] == 64 and summary["layers"] == 8
    meta, merged = read_gram_file(tmp_path / "ab.safetensors")
    full_meta, full = read_gram_file(tmp_path / "all.safetensors")
    assert meta["groups"] == full_meta["groups"] and meta["model_fingerprint"] == full_meta["model_fingerprint"]
    assert meta["calibration"]["nsamples"] == 4 and meta["calibration"]["tokens"] == 64
    for key, (_, m, count) in merged.items():
        assert count == full[key][2] == 64
        np.testing.assert_allclose(m, full[key][1], rtol=1e-12, atol=1e-12 * float(np.abs(m).max()))
    code, out, err = run_cli(["stats", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--out", tmp_path / "ab2.safetensors"])
    assert code == 0 and out.startswith("merged 2 Gram sidecars") and err == "", (out, err)


def test_merge_refuses_gram_of_another_model(run_cli, arch_dir, tmp_path):
    ids = R.random_samples(2, 16, seed=8)
    gram_run(arch_dir("llama"), ids, tmp_path / "a.safetensors")
    gram_run(arch_dir("llama", num_hidden_layers=3), ids, tmp_path / "b.safetensors")
    code, out, err = run_cli(["stats", "merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--out", tmp_path / "ab.safetensors"])
    assert_clean_error(code, out, err, contains="different models")
    assert not (tmp_path / "ab.safetensors").exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run_cli, model_copy, tmp_path):  # noqa: F811 - fixture
    common = ["stats", str(model_copy), "--nsamples", "5", "--seqlen", "16", "--device", "cpu", "--gram"]
    code, _, err = run_cli([*common, "--out", tmp_path / "one.safetensors", "--gram-out", tmp_path / "one-gram.safetensors"])
    assert code == 0, err
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmprune", *common,
         "--out", str(tmp_path / "two.safetensors"), "--gram-out", str(tmp_path / "two-gram.safetensors"), "--json"],
        capture_output=True,
        text=True,
        env=cli_env(OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gram"]["inputs"] == 8
    one_meta, one = read_gram_file(tmp_path / "one-gram.safetensors")
    two_meta, two = read_gram_file(tmp_path / "two-gram.safetensors")
    assert one_meta["calibration"] == two_meta["calibration"] and one_meta["calibration"]["tokens"] == 80
    for key, (_, m, count) in two.items():
        assert count == one[key][2] == 80
        np.testing.assert_allclose(m, one[key][1], rtol=1e-12, atol=1e-12 * float(np.abs(m).max()))


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_stats_gram_writes_default_file(run_cli, model_copy):  # noqa: F811 - fixture
    from transformers import AutoTokenizer

    from llmprune.data.windows import calibration_samples

    code, out, err = run_cli(["stats", model_copy, "--nsamples", "2", "--seqlen", "16", "--seed", "3", "--gram", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    gram = model_copy / GRAM_NAME
    assert summary["gram"]["out"] == str(gram) and summary["gram"]["inputs"] == 8
    assert 0 < gram.stat().st_size - summary["gram"]["bytes"] < 100_000  # the data, and the header
    assert (model_copy / R.SIDECAR_NAME).is_file() and gram.is_file()
    meta, groups = read_gram_file(gram)
    assert meta["calibration"]["nsamples"] == 2 and meta["calibration"]["seqlen"] == 16 and meta["calibration"]["seed"] == 3
    assert meta["calibration"]["tokens"] == 32
    ids = calibration_samples(None, AutoTokenizer.from_pretrained(str(model_copy)), 2, 16, 3)
    assert_gram_close(groups, S.gram_reference(R.load_f32_model(model_copy), ids))
    code, out, err = run_cli(["stats", model_copy, "--nsamples", "1", "--seqlen", "8", "--gram", "--gram-out", model_copy / "g2.safetensors", "--out", model_copy / "s2.safetensors"])
    assert code == 0, err
    assert "Gram matrices of 8 inputs" in out and "g2.safetensors" in out
    # the size is said before the pass writes it, against the model's size
    assert re.search(r"Gram matrices of 8 inputs: [\d,]+ MB \(float64, packed; [\d.]+x the model's [\d,]+ MB\)", err), err


@pytest.mark.parametrize(
    "args,contains",
    [
        (["--gram", "--grad"], "cannot be combined"),
        (["--gram", "--gram-dtype", "float16"], "unknown --gram-dtype"),
        (["--gram-dtype", "float32"], "--gram-dtype applies with --gram only"),
        pytest.param(["--gram-out", "x.safetensors"], "--gram-out applies with --gram only", marks=pytest.mark.slow),
        pytest.param(["--gram", "--out", "same.safetensors", "--gram-out", "same.safetensors"], "both name", marks=pytest.mark.slow),
    ],
)
def test_cli_stats_gram_bad_input(run_cli, model_copy, args, contains):  # noqa: F811 - fixture
    before = listing(model_copy)
    code, out, err = run_cli(["stats", model_copy, "--nsamples", "1", "--seqlen", "8", *args], cwd=model_copy)
    assert_clean_error(code, out, err, contains=contains)
    assert listing(model_copy) == before
