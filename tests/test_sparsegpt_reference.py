"""Self-test of the SparseGPT reference (tests/sparsegpt_reference.py): the properties the algorithm
must have, checked on small random problems, before the core's kernel is compared against it."""

from __future__ import annotations

import numpy as np
import pytest

import sparsegpt_reference as S


def problem(rows: int = 12, cols: int = 32, tokens: int = 200, seed: int = 0, correlated: bool = True):
    """W [rows, cols], X [cols, tokens] (inputs mixed so that columns correlate) and H = X Xᵀ."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols))
    Z = rng.standard_normal((cols, tokens))
    X = (np.eye(cols) + 0.6 * rng.standard_normal((cols, cols))) @ Z if correlated else Z
    X *= rng.uniform(0.2, 3.0, size=(cols, 1))  # channels of different scales, as in real layers
    return W, X, X @ X.T


def magnitude_mask(W: np.ndarray, sparsity: float) -> np.ndarray:
    """The floor(size · s) smallest |w| of the whole matrix (stable, lower index first)."""
    k = int(np.floor(W.size * sparsity))
    mask = np.zeros(W.size, dtype=bool)
    mask[np.argsort(np.abs(W).reshape(-1), kind="stable")[:k]] = True
    return mask.reshape(W.shape)


def magnitude_nm_mask(W: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, cols = W.shape
    groups = np.abs(W).reshape(rows, cols // m, m)
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, np.argsort(groups, axis=2, kind="stable")[:, :, :n], True, axis=2)
    return mask.reshape(rows, cols)


def test_empty_fixed_mask_leaves_weights_unchanged():
    W, _, H = problem()
    new, mask = S.sparsegpt_reference(W, H, mask=np.zeros(W.shape, dtype=bool), blocksize=8)
    assert not mask.any()
    np.testing.assert_array_equal(new, W)


def test_identity_gram_prunes_smallest_magnitudes_per_block_without_updates():
    """No correlations, nothing to compensate: each block loses its smallest |w|, the rest stay."""
    W, _, _ = problem(rows=6, cols=24)
    W[0, :3] = 0.25  # ties: the lower row-major index goes first
    new, mask = S.sparsegpt_reference(W, np.eye(24), sparsity=0.5, blocksize=8)
    for b in range(3):
        cols = slice(8 * b, 8 * b + 8)
        expect = magnitude_mask(W[:, cols], 0.5)
        np.testing.assert_array_equal(mask[:, cols], expect)
    assert mask.sum() == W.size // 2
    np.testing.assert_allclose(new[~mask], W[~mask], rtol=0, atol=1e-12)
    assert np.all(new[mask] == 0.0)


def test_exact_count_not_official_ties():
    """floor(rows · count · s) entries exactly, even when many scores tie (the official <= rule
    would prune every tied entry)."""
    W = np.ones((4, 8))
    new, mask = S.sparsegpt_reference(W, np.eye(8), sparsity=0.3, blocksize=8)
    assert mask.sum() == int(np.floor(32 * 0.3))
    assert mask.reshape(-1)[: mask.sum()].all()  # lower flat indices first


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern_is_respected(n, m):
    W, _, H = problem(rows=10, cols=32, seed=1)
    new, mask = S.sparsegpt_reference(W, H, pattern=(n, m), blocksize=16)
    groups = mask.reshape(10, -1, m)
    assert np.all(groups.sum(axis=2) == n)
    assert np.all(new[mask] == 0.0)
    assert np.count_nonzero(new.reshape(10, -1, m), axis=2).max() <= m - n


def test_fixed_mask_result_does_not_depend_on_blocksize():
    """The lazy block update is exact: with a fixed mask, any blocksize gives the same weights."""
    W, _, H = problem(rows=8, cols=40, seed=2)
    mask = magnitude_mask(W, 0.5)
    results = [S.sparsegpt_reference(W, H, mask=mask, blocksize=b)[0] for b in (1, 7, 16, 40, 128)]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-9, atol=1e-9)


def test_dead_inputs_are_zeroed_and_harmless():
    W, X, _ = problem(rows=6, cols=16, seed=3)
    X[[2, 9]] = 0.0
    H = X @ X.T
    new, mask = S.sparsegpt_reference(W, H, sparsity=0.5, blocksize=8)
    assert np.all(np.isfinite(new))
    assert np.all(new[:, [2, 9]] == 0.0)
    assert mask[:, [2, 9]].all()  # score 0: pruned first


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_beats_magnitude_on_correlated_inputs(seed):
    """The point of the method: at the same density, the layer output moves less than with plain
    magnitude pruning, for the adaptive mask, for N:M, and for magnitude's own mask refitted."""
    W, X, H = problem(rows=16, cols=64, tokens=400, seed=seed)
    mag = np.where(magnitude_mask(W, 0.5), 0.0, W)
    err_mag = S.reconstruction_error(W, mag, H)
    np.testing.assert_allclose(err_mag, np.sum((W @ X - mag @ X) ** 2), rtol=1e-9)

    sgpt, mask = S.sparsegpt_reference(W, H, sparsity=0.5, blocksize=16)
    assert mask.sum() == W.size // 2
    assert S.reconstruction_error(W, sgpt, H) < 0.6 * err_mag

    mag24 = np.where(magnitude_nm_mask(W, 2, 4), 0.0, W)
    s24, _ = S.sparsegpt_reference(W, H, pattern=(2, 4), blocksize=16)
    assert S.reconstruction_error(W, s24, H) < 0.6 * S.reconstruction_error(W, mag24, H)

    # magnitude's mask refitted: better than no update, never better than the least-squares optimum
    # of that mask (the sweep compensates each column only with the columns after it)
    mask = magnitude_mask(W, 0.5)
    upd, _ = S.sparsegpt_reference(W, H, mask=mask)
    assert np.all(upd[mask] == 0.0)
    err_upd = S.reconstruction_error(W, upd, H)
    best = np.zeros_like(W)
    for r in range(W.shape[0]):
        keep = ~mask[r]
        best[r, keep] = np.linalg.solve(H[np.ix_(keep, keep)], H[keep] @ W[r])
    assert S.reconstruction_error(W, best, H) <= err_upd < 0.95 * err_mag


def test_positive_scale_of_gram_changes_nothing():
    """The official code keeps 2/nsamples · Σ x xᵀ; the sums llmprune stores give the same result."""
    W, _, H = problem(rows=8, cols=24, seed=4)
    a, ma = S.sparsegpt_reference(W, H, sparsity=0.6, blocksize=8)
    b, mb = S.sparsegpt_reference(W, H * (2 / 37), sparsity=0.6, blocksize=8)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_packed_lower_triangle_layout():
    H = np.arange(16, dtype=np.float64).reshape(4, 4)
    H = H + H.T
    p = S.pack_lower(H)
    assert p.shape == (10,)
    for i in range(4):
        for j in range(i + 1):
            assert p[i * (i + 1) // 2 + j] == H[i, j]
    np.testing.assert_array_equal(S.unpack_lower(p, 4), H)
