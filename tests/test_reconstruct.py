"""Structured reconstruction (`apply --method M --reconstruct`): the output projections refitted on
the kept channels equal a numpy least-squares reference on the Gram and stats sidecars, the plan is
the one plain M chooses, and the refit restores the layer's output better than slicing does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import reference as R
from conftest import assert_clean_error, copy_model, tree_hashes
from sparsegpt_reference import unpack_lower

from llmprune import _core

OUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def kept_columns(w: np.ndarray, sliced: np.ndarray) -> list[int]:
    """Which columns of w the plain output kept (columns are compared bit for bit)."""
    cols = [tuple(w[:, j]) for j in range(w.shape[1])]
    out = []
    for c in range(sliced.shape[1]):
        out.append(cols.index(tuple(sliced[:, c]), out[-1] + 1 if out else 0))
    return out


def refit_reference(w, H, count, mu, K, damp, bias):
    C = H / count
    if mu is not None:
        C = C - np.outer(mu, mu)
    A = C[np.ix_(K, K)]
    A = A + damp * np.mean(np.diag(A)) * np.eye(len(K))
    wk = np.linalg.solve(A, C[K, :] @ w.T).T
    b = None if mu is None else bias + w @ mu - wk @ mu[K]
    return wk, b


@pytest.mark.parametrize("method,compensate", [("flap", True), ("wanda-sp", False)])
def test_refit_equals_least_squares(run_cli, gram_model, tmp_path, method, compensate):
    model = gram_model
    plain, recon = tmp_path / "plain", tmp_path / "recon"
    for out, extra in ((plain, []), (recon, ["--reconstruct"])):
        code, stdout, err = run_cli(["apply", model, "--method", method, "--sparsity", "0.3", "--allocation", "uniform", "--out", out, *extra])
        assert code == 0, err
    prov = json.loads(_core.inspect(str(recon)))["provenance"]
    assert prov["reconstruct"] is True and prov["damp"] == 0.01
    before, _ = R.read_checkpoint(model)
    a, _ = R.read_checkpoint(plain)
    b, _ = R.read_checkpoint(recon)
    _, groups = _core.read_gram(str(model / _core.DEFAULT_GRAM))
    stats = R.read_sidecar_stats(model / R.SIDECAR_NAME)
    checked = 0
    for key, (weights, packed, count) in groups.items():
        for name in weights:
            if not name.endswith(OUTS) or a[name].shape == before[name].shape:
                continue
            w = R.to_f32(before[name]).reshape(before[name].shape).astype(np.float64)
            K = kept_columns(R.to_f32(before[name]).reshape(before[name].shape), R.to_f32(a[name]).reshape(a[name].shape))
            H = unpack_lower(packed, w.shape[1])
            s = stats[name]
            mu = s["act_sum"] / s["act_count"] if compensate else None
            bias_name = name[: -len("weight")] + "bias"
            old_bias = np.zeros(w.shape[0])
            want_w, want_b = refit_reference(w, H, count, mu, K, 0.01, old_bias)
            got = R.to_f32(b[name]).reshape(b[name].shape)
            assert got.shape == want_w.shape
            tol = 0.01 * np.abs(want_w).max()
            assert np.allclose(got, want_w, atol=tol, rtol=0.01), name
            if compensate:
                got_b = R.to_f32(b[bias_name])
                assert np.allclose(got_b, want_b, atol=0.01 * np.abs(want_b).max() + 1e-3, rtol=0.01), bias_name
            # the refit restores the layer's output better than keeping the sliced columns (with
            # compensation both errors are of the centered inputs: the biases absorb the means)
            C = H / count - (np.outer(mu, mu) if compensate else 0.0)

            def err(wk):
                D = w.copy()
                D[:, K] -= wk
                return float(np.einsum("ij,jk,ik->", D, C, D))

            assert err(got.astype(np.float64)) <= 1.02 * err(w[:, K])
            checked += 1
    assert checked >= 2


def test_reconstruct_without_gram_is_a_clean_error(run_cli, tiny_models, tmp_path):
    m = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "w")
    before = tree_hashes(tmp_path)
    code, out, err = run_cli(["apply", m, "--method", "flap", "--sparsity", "0.2", "--reconstruct"])
    assert_clean_error(code, out, err, contains="gram", hint_contains=f"llmprune stats {m} --gram --nsamples")
    assert tree_hashes(tmp_path) == before


def test_reconstruct_is_for_structured_methods(run_cli, tiny_models, tmp_path):
    m = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "w")
    code, out, err = run_cli(["apply", m, "--method", "wanda", "--sparsity", "0.5", "--reconstruct"])
    assert_clean_error(code, out, err, contains="--reconstruct")
