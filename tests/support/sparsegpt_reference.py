"""Independent float64 references for second-order pruning (issue 12): the SparseGPT sweep, and the
input Gram matrices H = Σ x xᵀ of a whole transformers model. Nothing here calls into llmprune.

`sparsegpt_reference` is a numpy transcription of the algorithm of Frantar & Alistarh, "SparseGPT:
Massive Language Models Can Be Accurately Pruned in One-Shot" (2023), as its official implementation
(`SparseGPT.fasterprune`) runs it, written from the paper and a reading of that code:

1. dead inputs: a column j with H[j, j] == 0 gets H[j, j] = 1 and W[:, j] = 0;
2. damping: H += damp · mean(diag H) · I (after step 1);
3. U = the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U);
4. the columns in blocks of `blocksize`; in each block [i1, i2) a mask is chosen, then the columns
   are visited left to right: the column's pruned entries are zeroed, the error (w − q) / U[i, i]
   is spread over the block's later columns through row i of U, and after the block the
   accumulated errors update every later column at once (the "lazy batch" update).

Masks (True = pruned):
- unstructured (`sparsity`): per block, over all rows at once, score = W1² / diag(U_block)², and
  exactly k = floor(rows · count · sparsity) entries with the smallest scores are pruned, ties to the
  lower row-major index in the block (a stable ascending sort). The official code instead prunes
  every score ≤ the k-th smallest (k + 1 entries, and all ties); llmprune keeps its own rule for
  every method (floor(size · s) entries exactly), so the reference follows llmprune here;
- N:M (`pattern`): inside the sweep, at each column i of the block with i % m == 0, per row the n
  smallest of W1[r, i:i+m]² / diag(U)[i:i+m]² — the current, already-updated values — ties to the
  lower index (the official code uses torch.topk, whose tie order is unspecified);
- fixed (`mask`): the given mask, only reconstructed ("update" mode: the mask of another method,
  the remaining weights refitted by the same sweep).

H is the plain sum Σ x xᵀ; the official code keeps 2/nsamples · Σ x xᵀ, a positive scale that changes
neither the masks nor the updates (the damping is relative to mean(diag H)).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def sparsegpt_reference(
    W: np.ndarray,
    H: np.ndarray,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    mask: np.ndarray | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """The SparseGPT sweep of W [rows, cols] with input Gram matrix H [cols, cols] (= Σ x xᵀ).

    Exactly one of `sparsity`, `pattern` (n, m) and `mask` (bool [rows, cols], True = prune).
    Returns (the new weights, float64, pruned entries exactly 0; the mask used, bool).
    """
    if sum(a is not None for a in (sparsity, pattern, mask)) != 1:
        raise ValueError("give exactly one of sparsity, pattern and mask")
    W = np.array(W, dtype=np.float64, copy=True)
    H = np.array(H, dtype=np.float64, copy=True)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H is {H.shape}, expected {(cols, cols)}")
    if blocksize < 1:
        raise ValueError("blocksize must be at least 1")
    if pattern is not None:
        n, m = pattern
        if not 0 <= n <= m or m < 1 or blocksize % m or cols % m:
            raise ValueError(f"pattern {n}:{m} needs n <= m, blocksize and columns multiples of m")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != W.shape:
            raise ValueError(f"mask is {mask.shape}, expected {W.shape}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError("sparsity must lie in [0, 1)")

    dead = np.diag(H) == 0
    idx = np.flatnonzero(dead)
    H[idx, idx] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(cols)] += damp * float(np.mean(np.diag(H)))
    U = upper_cholesky_of_inverse(H)

    chosen = np.zeros((rows, cols), dtype=bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Ub = U[i1:i2, i1:i2]
        dU = np.diag(Ub)
        if mask is not None:
            mask1 = mask[:, i1:i2].copy()
        elif sparsity is not None:
            score = (W1 * W1 / (dU * dU)[None, :]).reshape(-1)
            k = math.floor(rows * count * sparsity)
            order = np.argsort(score, kind="stable")
            flat = np.zeros(rows * count, dtype=bool)
            flat[order[:k]] = True
            mask1 = flat.reshape(rows, count)
        else:
            mask1 = np.zeros((rows, count), dtype=bool)
        for i in range(count):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                score = W1[:, i : i + m] ** 2 / (dU[i : i + m] ** 2)[None, :]
                order = np.argsort(score, axis=1, kind="stable")[:, :n]
                np.put_along_axis(mask1[:, i : i + m], order, True, axis=1)
            w = W1[:, i].copy()
            d = Ub[i, i]
            q = w.copy()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, Ub[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        chosen[:, i1:i2] = mask1
    return W, chosen


def upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper triangular with H⁻¹ = Uᵀ U (H symmetric positive definite), in float64."""
    L = np.linalg.cholesky(H)  # H = L Lᵀ
    Linv = np.linalg.solve(L, np.eye(H.shape[0]))
    Hinv = Linv.T @ Linv
    Hinv = (Hinv + Hinv.T) / 2
    return np.linalg.cholesky(Hinv).T  # Hinv = L2 L2ᵀ = Uᵀ U with U = L2ᵀ


def reconstruction_error(W: np.ndarray, W_new: np.ndarray, H: np.ndarray) -> float:
    """||W X − W_new X||² (Frobenius) for H = X Xᵀ, without X: trace(D H Dᵀ), D = W − W_new."""
    D = np.asarray(W, dtype=np.float64) - np.asarray(W_new, dtype=np.float64)
    return float(np.einsum("ij,jk,ik->", D, np.asarray(H, dtype=np.float64), D))


# --------------------------------------------------------------------------------------------
# The packed lower triangle (the Gram sidecar's layout)
# --------------------------------------------------------------------------------------------


def pack_lower(H: np.ndarray) -> np.ndarray:
    """Entry (i, j), j <= i, at index i(i+1)/2 + j: the lower triangle row by row."""
    return np.asarray(H)[np.tril_indices(H.shape[0])].astype(np.float64)


def unpack_lower(packed: np.ndarray, n: int) -> np.ndarray:
    """The symmetric [n, n] matrix of a packed lower triangle."""
    packed = np.asarray(packed, dtype=np.float64).reshape(-1)
    if packed.size != n * (n + 1) // 2:
        raise ValueError(f"{packed.size} packed values do not make an {n} x {n} triangle")
    H = np.zeros((n, n), dtype=np.float64)
    H[np.tril_indices(n)] = packed
    return H + np.tril(H, -1).T


# --------------------------------------------------------------------------------------------
# Gram matrices of a whole model
# --------------------------------------------------------------------------------------------


def gram_reference(model, samples) -> dict[str, dict[str, Any]]:
    """H = Σ x xᵀ (float64) of the input of every linear inside the decoder blocks, taken by forward
    pre-hooks on the plain transformers model (float32 CPU forward, every product in float64).

    Returns {"<module>.weight": {"gram": [in, in], "count": tokens, "input_axis": 1 or 0 (Conv1D)}}.
    Layers fed the same tensor get equal matrices, each computed on its own.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    import reference as R

    model = model.float().eval()
    out: dict[str, dict[str, Any]] = {}
    hooks = []

    def make_hook(key: str, in_features: int, axis: int):
        out[key] = {"gram": np.zeros((in_features, in_features), dtype=np.float64), "count": 0, "input_axis": axis}

        def hook(_mod, args, kwargs=None):
            x = args[0].detach().to(torch.float64).reshape(-1, in_features).cpu().numpy()
            out[key]["gram"] += x.T @ x
            out[key]["count"] += int(x.shape[0])

        return hook

    for name, mod in model.named_modules():
        if not R.BLOCK_RE.search(name + "."):
            continue
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(make_hook(f"{name}.weight", mod.in_features, 1)))
        elif isinstance(mod, Conv1D):
            hooks.append(mod.register_forward_pre_hook(make_hook(f"{name}.weight", int(mod.weight.shape[0]), 0)))
    try:
        with torch.no_grad():
            rows = list(samples) if isinstance(samples, torch.Tensor) and samples.dim() == 2 else samples
            for s in rows:
                model(input_ids=s if s.dim() == 2 else s.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return out
