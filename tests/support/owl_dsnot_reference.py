"""Independent numpy transcriptions of OWL's layer allocation, DSnoT's prune-and-grow and bias
compensation, following the papers' formulas and the official code's semantics (documented in
docs/refinements.md), for the tests to compare the core with."""

from __future__ import annotations

import re
from typing import Any

import numpy as np


def block_of(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def wanda_scores(w: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """float32 |W| * f32(sqrt(sumsq / n)) of an [out, in] weight."""
    f = np.sqrt(np.asarray(stats["act_sqsum"], np.float64) / float(stats["act_count"])).astype(np.float32)
    return (np.abs(w.astype(np.float32)) * f[None, :]).astype(np.float32)


def outlier_ratios(weights: dict[str, np.ndarray], stats: dict[str, dict[str, Any]], m: float = 5.0) -> dict[int, float]:
    """Per block: the share of the block's Wanda scores (all its weights) above m x their mean."""
    blocks: dict[int, list[np.ndarray]] = {}
    for name, w in weights.items():
        b = block_of(name)
        if b is not None:
            blocks.setdefault(b, []).append(wanda_scores(w, stats[name]).ravel())
    out = {}
    for b, parts in sorted(blocks.items()):
        s = np.concatenate(parts)
        mean = s.astype(np.float64).mean()
        out[b] = float((s.astype(np.float64) > mean * m).mean())
    return out


def owl_sparsities(d: list[float], sparsity: float, lam: float = 0.08) -> np.ndarray:
    """OWL: r = (D - min) / (max - min) * 2 lambda; density = r - mean(r) + (1 - S); sparsity = 1 - density."""
    d = np.asarray(d, dtype=np.float64)
    r = (d - d.min()) * (1.0 / (d.max() - d.min()) * lam * 2)
    density = r - r.mean() + (1 - sparsity)
    return 1 - density


def dsnot_reference(
    w: np.ndarray,
    score: np.ndarray,
    mask: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    iters: int = 50,
    threshold: float = 0.1 / 2048,
    same_sign: bool = False,
) -> np.ndarray:
    """DSnoT's unstructured loop, row by row (with `same_sign`, a row stops at the first swap that
    would flip the sign of its error, without making it): each cycle grows one pruned weight (the next from the
    top of the pruned weights ordered by w mu / var when the row's error e = sum of pruned w mu is
    positive, else from the bottom) and prunes one kept weight (kept weights by score ascending,
    negative w mu first, then positive ones in reverse order; the last one when e < 0, else the
    first), until |e| <= threshold, `iters` cycles, or a list runs out. Weights with w mu = 0 are
    no candidates. Returns the refined mask."""
    mask = mask.copy()
    for i in range(w.shape[0]):
        metric = w[i].astype(np.float64) * mu
        m = mask[i]
        err = metric[m].sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(var > 0, metric / np.where(var > 0, var, 1), np.sign(metric) * np.inf)
        pruned = np.nonzero(m & (metric != 0))[0]
        grow = list(pruned[np.argsort(ratio[pruned], kind="stable")])
        kept = np.nonzero(~m & (metric != 0))[0]
        kept = kept[np.argsort(score[i, kept], kind="stable")]
        prune = list(kept[metric[kept] < 0]) + list(kept[metric[kept] > 0][::-1])
        for _ in range(iters):
            if not abs(err) > threshold or not grow or not prune:
                break
            g = grow.pop() if err > 0 else grow.pop(0)
            p = prune.pop() if err < 0 else prune.pop(0)
            if same_sign and np.sign(err + metric[p] - metric[g]) != np.sign(err):
                break
            m[g], m[p] = False, True
            err += metric[p] - metric[g]
    return mask


def dsnot_nm_reference(
    w: np.ndarray,
    score: np.ndarray,
    mask: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    m: int,
    iters: int = 50,
    threshold: float = 0.1 / 2048,
) -> np.ndarray:
    """DSnoT's N:M loop, row by row: the grown weight comes from the ends of the same grow order as
    the unstructured loop; the weight pruned in exchange is the lowest-scored weight of the grown
    weight's group of m that the original mask kept and no swap has pruned yet. A row stops at
    |e| <= threshold, after `iters` cycles, when the grow list or the group runs out, or at the
    first swap that would flip the sign of e (that swap is not made)."""
    mask = mask.copy()
    for i in range(w.shape[0]):
        metric = w[i].astype(np.float64) * mu
        row = mask[i]
        err = metric[row].sum()
        sign = np.sign(err)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(var > 0, metric / np.where(var > 0, var, 1), np.sign(metric) * np.inf)
        pruned = np.nonzero(row & (metric != 0))[0]
        grow = list(pruned[np.argsort(ratio[pruned], kind="stable")])
        candidate = ~row.copy()
        for _ in range(iters):
            if not abs(err) > threshold or not grow:
                break
            g = grow.pop() if err > 0 else grow.pop(0)
            group = [j for j in range(g - g % m, min(g - g % m + m, w.shape[1])) if candidate[j]]
            if not group:
                break
            p = min(group, key=lambda j: (score[i, j], j))
            after = err + metric[p] - metric[g]
            if np.sign(after) != sign:
                break
            row[g], row[p], candidate[p] = False, True, False
            err = after
    return mask


def compensated_bias(w_before: np.ndarray, w_after: np.ndarray, mu: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """b + (W - W') mu of an [out, in] weight, in float64."""
    b = np.zeros(w_before.shape[0]) if bias is None else bias.astype(np.float64)
    return b + (w_before.astype(np.float64) - w_after.astype(np.float64)) @ mu
