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


def test_apply_missing_gram_is_a_clean_error(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "w")
    before = tree_hashes(tmp_path)
    for args in (["--method", "sparsegpt", "--sparsity", "0.5"], ["--method", "wanda", "--sparsity", "0.5", "--update"]):
        code, out, err = run_cli(["apply", model, *args])
        assert_clean_error(code, out, err, contains="gram", hint_contains="llmprune stats MODEL --gram")
    assert tree_hashes(tmp_path) == before


def test_apply_gram_of_another_model_is_refused(run_cli, gram_model, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=False, intermediate_size=96), tmp_path / "w")
    before = tree_hashes(tmp_path)
    code, out, err = run_cli(["apply", model, "--method", "sparsegpt", "--sparsity", "0.5", "--gram", gram_model / _core.DEFAULT_GRAM])
    assert_clean_error(code, out, err, contains="does not match")
    assert tree_hashes(tmp_path) == before
