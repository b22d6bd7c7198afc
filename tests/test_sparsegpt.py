"""SparseGPT in the core against the independent float64 transcription (sparsegpt_reference.py), on
random and real-model-like layers (dead inputs, an ill-conditioned H), and `apply --method sparsegpt`
/ `--update` end to end on a tiny checkpoint with a Gram sidecar from `stats --gram`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import reference as R
from conftest import assert_clean_error, copy_model, tree_hashes
from sparsegpt_reference import reconstruction_error, sparsegpt_reference, unpack_lower

from llmprune import _core


def correlated_gram(n: int, tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, n)) @ (np.eye(n) + 0.3 * rng.normal(size=(n, n)) / np.sqrt(n)) + 0.5 * rng.normal(size=(tokens, 1))
    return x.T @ x


def agree(got_w, got_m, want_w, want_m, *, mask_tol: float = 0.0):
    """Masks equal (up to `mask_tol` of entries decided by float32 rounding of near-equal scores) and
    weights equal to float32 tolerance where the masks agree."""
    differ = (got_m != want_m).mean()
    assert differ <= mask_tol, f"{differ:.4%} of mask entries differ"
    same = got_m == want_m
    scale = np.abs(want_w).max()
    assert np.allclose(got_w[same], want_w[same], atol=2e-4 * scale, rtol=2e-3)
    assert (got_w[got_m] == 0).all() and not np.signbit(got_w[got_m]).any()


@pytest.mark.parametrize("sel", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"pattern": (2, 4)}, {"pattern": (4, 8)}])
def test_kernel_equals_reference(sel):
    rng = np.random.default_rng(1)
    rows, cols = 48, 96
    H = correlated_gram(cols, 600, 2)
    W = rng.normal(size=(rows, cols)).astype(np.float32)
    got_w, got_m, warnings = _core.sparsegpt(W, H, blocksize=32, **sel)
    want_w, want_m = sparsegpt_reference(W.astype(np.float64), H, blocksize=32, **sel)
    agree(got_w, got_m, want_w, want_m, mask_tol=0.002)
    assert warnings == []
    if "pattern" in sel:
        n, m = sel["pattern"]
        assert (got_m.reshape(rows, -1, m).sum(-1) == n).all()
    else:
        per_block = got_m.reshape(rows, -1, 32).sum(axis=(0, 2))
        assert (per_block == int(rows * 32 * sel["sparsity"])).all()


def test_fixed_mask_update_and_dead_inputs():
    rng = np.random.default_rng(3)
    rows, cols = 32, 64
    H = correlated_gram(cols, 400, 4)
    H[5, :] = H[:, 5] = 0.0  # an input that was always zero
    W = rng.normal(size=(rows, cols)).astype(np.float32)
    mask = np.abs(W) < np.quantile(np.abs(W), 0.5)
    got_w, got_m, _ = _core.sparsegpt(W, H, mask=mask, blocksize=16)
    want_w, want_m = sparsegpt_reference(W.astype(np.float64), H, mask=mask, blocksize=16)
    assert (got_m == mask).all() and (want_m == mask).all()
    agree(got_w, got_m, want_w, want_m)
    assert (got_w[:, 5] == 0).all()
    # the update restores the layer's output better than zeroing the same mask
    zeroed = np.where(mask, 0, W)
    assert reconstruction_error(W, got_w, H) < 0.95 * reconstruction_error(W, zeroed, H)


def test_ill_conditioned_gram_is_damped_not_fatal():
    rng = np.random.default_rng(5)
    rows, cols = 16, 32
    x = rng.normal(size=(8, cols))  # 8 tokens for 32 inputs: rank 8
    H = x.T @ x
    W = rng.normal(size=(rows, cols)).astype(np.float32)
    got_w, got_m, _ = _core.sparsegpt(W, H, sparsity=0.5, blocksize=16)
    want_w, want_m = sparsegpt_reference(W.astype(np.float64), H, sparsity=0.5, blocksize=16)
    assert np.isfinite(got_w).all()
    agree(got_w, got_m, want_w, want_m, mask_tol=0.01)


# --------------------------------------------------------------------------------------------
# apply end to end
# --------------------------------------------------------------------------------------------


def _check_layers(model: Path, out: Path, method: str, **sel):
    """Every prunable weight of `out` equals the reference run on the input weight and its H."""
    meta, groups = _core.read_gram(str(model / _core.DEFAULT_GRAM))
    before, _ = R.read_checkpoint(model)
    after, _ = R.read_checkpoint(out)
    checked = 0
    for key, (weights, packed, count) in groups.items():
        n = int(round((np.sqrt(8 * len(packed) + 1) - 1) / 2))
        H = unpack_lower(packed, n)
        for name in weights:
            W = R.to_f32(before[name]).reshape(before[name].shape)
            got = R.to_f32(after[name]).reshape(after[name].shape)
            if method == "sparsegpt":
                want_w, want_m = sparsegpt_reference(W.astype(np.float64), H, **sel)
            else:
                mask = R.reference_mask(W, method, stats=R.read_sidecar_stats(model / R.SIDECAR_NAME)[name], **sel)
                want_w, want_m = sparsegpt_reference(W.astype(np.float64), H, mask=mask)
            got_m = got == 0
            # the output is rounded to the checkpoint's dtype: compare at bf16 precision
            differ = (got_m != want_m).mean()
            assert differ <= 0.02, f"{name}: {differ:.3%} of the mask differs"
            keep = ~got_m & ~want_m
            assert np.allclose(got[keep], want_w[keep], atol=0.02 * np.abs(want_w).max(), rtol=0.02), name
            checked += 1
    assert checked >= 7


def test_apply_sparsegpt_matches_reference(run_cli, gram_model, tmp_path):
    out = tmp_path / "o"
    code, stdout, err = run_cli(["apply", gram_model, "--method", "sparsegpt", "--sparsity", "0.5", "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    assert s["update"] and s["gram"].endswith(_core.DEFAULT_GRAM)
    assert not (out / _core.DEFAULT_GRAM).exists()
    prov = json.loads(_core.inspect(str(out)))["provenance"]
    assert prov["method"] == "sparsegpt" and prov["update"] == "sparsegpt" and prov["damp"] == 0.01
    _check_layers(gram_model, out, "sparsegpt", sparsity=0.5)


def test_apply_update_matches_reference(run_cli, gram_model, tmp_path):
    out = tmp_path / "o"
    code, stdout, err = run_cli(["apply", gram_model, "--method", "wanda", "--pattern", "2:4", "--update", "--out", out])
    assert code == 0, err
    _check_layers(gram_model, out, "wanda", pattern=(2, 4))


def test_float32_gram_gives_the_same_output_bit_for_bit(run_cli, gram_model, tmp_path):
    """The kernel computes in float32, so a Gram sidecar stored as float32 (`stats --gram-dtype
    float32`) prunes and updates to exactly the same checkpoint as the float64 one."""
    f32 = tmp_path / "g32.safetensors"
    code, _, err = run_cli(["stats", gram_model, "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--gram", "--gram-dtype", "float32",
                            "--out", tmp_path / "s.safetensors", "--gram-out", f32])
    assert code == 0, err
    code, _, err = run_cli(["stats", gram_model, "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--gram",
                            "--out", tmp_path / "s64.safetensors", "--gram-out", tmp_path / "g64.safetensors"])
    assert code == 0, err
    assert f32.stat().st_size < 0.55 * (tmp_path / "g64.safetensors").stat().st_size
    for args in (["--method", "sparsegpt", "--sparsity", "0.5"], ["--method", "wanda", "--pattern", "2:4", "--update"]):
        outs = []
        for gram in (tmp_path / "g64.safetensors", f32):
            out = tmp_path / f"o-{args[1]}-{gram.stem}"
            code, _, err = run_cli(["apply", gram_model, *args, "--gram", gram, "--stats", tmp_path / "s.safetensors", "--out", out])
            assert code == 0, err
            outs.append(R.read_checkpoint(out)[0])
        assert sorted(outs[0]) == sorted(outs[1])
        for name, t in outs[0].items():
            assert t.data == outs[1][name].data, name


def test_apply_missing_gram_is_a_clean_error(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "w")
    before = tree_hashes(tmp_path)
    for args in (["--method", "sparsegpt", "--sparsity", "0.5"], ["--method", "wanda", "--sparsity", "0.5", "--update"]):
        code, out, err = run_cli(["apply", model, *args])
        assert_clean_error(code, out, err, contains="gram", hint_contains=f"llmprune stats {model} --gram --nsamples")
    assert tree_hashes(tmp_path) == before


def test_apply_gram_of_another_model_is_refused(run_cli, gram_model, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=False, intermediate_size=96), tmp_path / "w")
    before = tree_hashes(tmp_path)
    code, out, err = run_cli(["apply", model, "--method", "sparsegpt", "--sparsity", "0.5", "--gram", gram_model / _core.DEFAULT_GRAM])
    assert_clean_error(code, out, err, contains="does not match")
    assert tree_hashes(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Sequential mode
# --------------------------------------------------------------------------------------------


def sequential_sparsegpt_reference(model_dir: Path, samples, sparsity: float) -> dict[str, np.ndarray]:
    """The official sequential algorithm on the whole float32 model: block by block, the Gram
    matrices of block i's inputs with blocks 0..i-1 already pruned and updated, then block i pruned
    and updated by the float64 reference sweep."""
    import torch
    from sparsegpt_reference import gram_reference
    from stats_helpers import _decoder_blocks, _module_name

    model = R.load_f32_model(model_dir)
    out: dict[str, np.ndarray] = {}
    for blk in _decoder_blocks(model):
        prefix = _module_name(model, blk)
        grams = {k: v for k, v in gram_reference(model, samples).items() if k.startswith(prefix + ".")}
        with torch.no_grad():
            for name, mod in blk.named_modules():
                if not isinstance(mod, torch.nn.Linear):
                    continue
                key = f"{prefix}.{name}.weight"
                w, _ = sparsegpt_reference(mod.weight.detach().double().numpy(), grams[key]["gram"], sparsity=sparsity)
                mod.weight.copy_(torch.from_numpy(w))
                out[key] = w
    return out


@pytest.mark.slow
def test_sequential_stats_then_apply_equal_the_block_by_block_reference(run_cli, gram_model, tmp_path):
    from llmprune.data.windows import calibration_samples
    from llmprune.data.tokenizer import load_tokenizer

    model = copy_model(gram_model, tmp_path / "w")
    for f in (R.SIDECAR_NAME, _core.DEFAULT_GRAM):
        (model / f).unlink()
    code, _, err = run_cli(["stats", model, "--sequential", "--method", "sparsegpt", "--sparsity", "0.5", "--gram", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"])
    assert code == 0, err
    meta = json.loads(_core.read_gram(str(model / _core.DEFAULT_GRAM))[0])
    assert meta["mode"] == "sequential" and meta["sequential"] == {"method": "sparsegpt", "sparsity": 0.5, "update": True}
    out = tmp_path / "o"
    code, _, err = run_cli(["apply", model, "--method", "sparsegpt", "--sparsity", "0.5", "--out", out])
    assert code == 0 and "does not reproduce" not in err, err
    ids = calibration_samples(None, load_tokenizer(model), 4, 32, 0)
    want = sequential_sparsegpt_reference(model, ids, 0.5)
    got, _ = R.read_checkpoint(out)
    for name, w in want.items():
        g = R.to_f32(got[name]).reshape(w.shape)
        differ = ((g == 0) != (w == 0)).mean()
        assert differ <= 0.03, f"{name}: {differ:.3%} of the mask differs"
        keep = (g != 0) & (w != 0)
        assert np.allclose(g[keep], w[keep], atol=0.03 * np.abs(w).max(), rtol=0.03), name
    # another method or target on these statistics is warned about
    code, _, err = run_cli(["apply", model, "--method", "sparsegpt", "--pattern", "2:4", "--out", tmp_path / "o2"])
    assert code == 0 and "does not reproduce" in err, err


@pytest.mark.slow
def test_sequential_reconstruction_needs_gram(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "w")
    before = tree_hashes(tmp_path)
    code, out, err = run_cli(["stats", model, "--sequential", "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "1", "--seqlen", "8"])
    assert_clean_error(code, out, err, hint_contains="--gram")
    assert tree_hashes(tmp_path) == before


def _corrupt_gram(src: Path, dst: Path, edit) -> None:
    """A copy of a Gram sidecar with its header or data edited in place."""
    import struct

    raw = bytearray(src.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(raw, header, 8 + n)
    dst.write_bytes(bytes(raw))


@pytest.mark.parametrize("what", ["nan", "negative-diagonal", "zero-count", "wrong-features"])
def test_apply_refuses_a_bad_gram_sidecar(run_cli, gram_model, tmp_path, what):
    import struct

    model = copy_model(gram_model, tmp_path / "w")
    gram = model / _core.DEFAULT_GRAM

    def edit(raw, header, start):
        key = sorted(k for k in header if k.endswith(".gram"))[0]
        a, b = header[key]["data_offsets"]
        if what == "nan":
            raw[start + a + 8 : start + a + 16] = struct.pack("<d", float("nan"))
        elif what == "negative-diagonal":
            raw[start + a : start + a + 8] = struct.pack("<d", -1.0)
        elif what == "zero-count":
            c = header[key + "_count"]["data_offsets"][0]
            raw[start + c : start + c + 8] = struct.pack("<q", 0)
        else:
            meta = json.loads(header["__metadata__"]["llmprune"])
            g = meta["groups"][key[: -len(".gram")]]
            g["features"] += 1
            header["__metadata__"]["llmprune"] = json.dumps(meta)
            hb = json.dumps(header).encode()
            hb += b" " * ((-len(hb)) % 8)
            raw[:] = struct.pack("<Q", len(hb)) + hb + raw[start:]

    _corrupt_gram(gram, gram, edit)
    before = tree_hashes(tmp_path)
    code, out, err = run_cli(["apply", model, "--method", "sparsegpt", "--sparsity", "0.5"])
    assert_clean_error(code, out, err, contains="gram")
    assert tree_hashes(tmp_path) == before


def test_gram_writer_refuses_impossible_matrices(gram_model, tmp_path):
    meta, groups = _core.read_gram(str(gram_model / _core.DEFAULT_GRAM))
    key, (weights, packed, count) = next(iter(groups.items()))
    n = int(round((np.sqrt(8 * len(packed) + 1) - 1) / 2))
    layout = [(key, [(w, 1) for w in weights], n)]
    bad = packed.copy()
    bad[0] = np.nan
    with _core.GramWriter(str(tmp_path / "g.safetensors"), str(gram_model), layout, json.dumps({"calibration": {}, "mode": "dense"})) as w:
        with pytest.raises(_core.LlmpruneError, match="non-finite"):
            w.write(key, bad, count)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args,gram",
    [(["--method", "sparsegpt", "--sparsity", "0.5"], True), pytest.param(["--method", "wanda", "--pattern", "2:4"], False, marks=pytest.mark.slow)],
)
def test_sequential_pruned_out_equals_apply_and_keeps_no_gram_file(run_cli, gram_model, tmp_path, args, gram):
    """`stats --sequential --pruned-out DIR` writes the checkpoint `apply` writes from the same
    pass's sidecars, bit for bit, without a Gram file: each block's matrices are used and dropped."""
    model = copy_model(gram_model, tmp_path / "w")
    for f in (R.SIDECAR_NAME, _core.DEFAULT_GRAM):
        (model / f).unlink()
    common = ["stats", model, "--sequential", *args, *(["--gram"] if gram else []), "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
    kept = tmp_path / "kept"
    kept.mkdir()
    code, _, err = run_cli([*common, "--out", kept / "s.safetensors", *(["--gram-out", kept / "g.safetensors"] if gram else [])])
    assert code == 0, err
    code, _, err = run_cli(
        ["apply", model, *args, "--stats", kept / "s.safetensors", *(["--gram", kept / "g.safetensors"] if gram else []), "--out", tmp_path / "applied"]
    )
    assert code == 0 and "does not reproduce" not in err, err
    before = sorted(p.name for p in model.iterdir())
    code, out, err = run_cli([*common, "--out", tmp_path / "s2.safetensors", "--pruned-out", tmp_path / "pruned", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["pruned"]["out"] == str(tmp_path / "pruned") and summary["pruned"]["weights_pruned"] > 0 and "gram" not in summary
    assert sorted(p.name for p in model.iterdir()) == before  # no Gram file (nor anything else) written into the model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["applied", "kept", "pruned", "s2.safetensors", "w"]
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == sorted(p.name for p in (tmp_path / "applied").iterdir())
    got, metas = R.read_checkpoint(tmp_path / "pruned")
    want, _ = R.read_checkpoint(tmp_path / "applied")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].data == t.data, name
    prov = json.loads(next(iter(metas.values()))["llmprune"])
    assert prov["written_by"] == "stats --sequential --pruned-out" and prov["method"] == args[1] and prov["sequential"]["method"] == args[1]


def test_pruned_out_bad_input_writes_nothing(run_cli, gram_model, tmp_path):
    model = copy_model(gram_model, tmp_path / "w")
    (tmp_path / "taken").mkdir()
    before = tree_hashes(tmp_path)
    seq = ["--sequential", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "1", "--seqlen", "8", "--device", "cpu"]
    for args, contains in (
        (["--pruned-out", tmp_path / "p"], "applies with --sequential only"),
        ([*seq, "--pruned-out", tmp_path / "taken"], "exists"),
        ([*seq, "--compensate", "--pruned-out", tmp_path / "p"], "cannot write the biases"),
    ):
        code, out, err = run_cli(["stats", model, *args])
        assert_clean_error(code, out, err, contains=contains)
        assert tree_hashes(tmp_path) == before


def test_spilled_blocks_are_deleted_once_written(tmp_path):
    """--pruned-out's disk: a block's spill file goes as soon as every tensor in it is in a shard."""
    import torch

    from llmprune.reconstruct import SpilledTensors

    spilled = SpilledTensors(tmp_path)
    spilled.add(0, {"a": torch.ones(2, 2), "b": torch.zeros(3)})
    spilled.add(1, {"c": torch.full((2,), 7.0)})
    assert "a" in spilled and "x" not in spilled and torch.equal(spilled["c"], torch.full((2,), 7.0))
    spilled.release(["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-00000.safetensors", "block-00001.safetensors"] and "a" not in spilled
    spilled.release(["b", "c"])
    assert list(tmp_path.iterdir()) == [] and len(spilled) == 0
