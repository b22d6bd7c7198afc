"""The stats sidecar v1 (docs/sidecar.md), as typed Python values.

The Rust core owns the format: it validates every file it reads (shapes, dtypes, finite and
possible statistics), writes sidecars atomically after the same checks, and merges them. This module
only converts between its answers and the dataclasses the torch passes use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmprune import _core

SIDECAR_NAME = _core.DEFAULT_SIDECAR


@dataclass
class LayerStats:
    """Σx, Σx² (float64, per input channel) and the token count of one prunable weight."""

    act_sum: np.ndarray
    act_sqsum: np.ndarray
    act_count: int
    input_axis: int = 1


@dataclass
class GradStats:
    """HyWIA gradient estimates of one weight (docs/sidecar.md): [split, quantity, row] sums in
    `out`, [split, quantity, column] sums in `inp`, samples per split in `count`."""

    out: np.ndarray
    inp: np.ndarray
    count: np.ndarray


@dataclass
class BlockStats:
    """Per decoder block: Σ over calibration tokens of cos(block input, block output) and the token
    count; ShortGPT's Block Influence is 1 - cos_sum / count."""

    cos_sum: np.ndarray
    count: np.ndarray

    def influence(self) -> np.ndarray:
        return 1.0 - self.cos_sum / self.count


@dataclass
class Sidecar:
    path: Path
    meta: dict[str, Any]
    layers: dict[str, LayerStats]
    grad: dict[str, GradStats] | None = None
    blocks: BlockStats | None = None


def write(
    path: str | Path,
    model_dir: str | Path,
    layers: dict[str, LayerStats],
    *,
    calibration: dict[str, Any],
    mode: str = "dense",
    sequential: dict[str, Any] | None = None,
    grad: dict[str, GradStats] | None = None,
    grad_meta: dict[str, Any] | None = None,
    blocks: BlockStats | None = None,
    experts: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a v1 sidecar for the checkpoint in `model_dir` (with gradient statistics when `grad`
    is given); returns its path. The core records the model's fingerprint and tensor list."""
    arrays = {
        name: (np.ascontiguousarray(s.act_sum, dtype=np.float64), np.ascontiguousarray(s.act_sqsum, dtype=np.float64), int(s.act_count), int(s.input_axis))
        for name, s in layers.items()
    }
    grads = None
    if grad is not None:
        grads = {
            name: (
                np.ascontiguousarray(g.out, dtype=np.float64).reshape(-1),
                np.ascontiguousarray(g.inp, dtype=np.float64).reshape(-1),
                [int(c) for c in np.asarray(g.count).reshape(-1)],
            )
            for name, g in grad.items()
        }
    info = {"calibration": calibration, "mode": mode, "sequential": sequential, "grad": grad_meta if grad is not None else None}
    if experts:
        info["experts"] = experts
    if blocks is not None:
        info["blocks"] = {"cos_sum": [float(x) for x in blocks.cos_sum], "count": [int(x) for x in blocks.count]}
    _core.write_sidecar(str(path), str(model_dir), arrays, json.dumps(info), grads)
    return Path(path)


def read(path: str | Path) -> Sidecar:
    """Load a sidecar; the core validates it and names the file in any error."""
    meta_text, layers, grads, blocks = _core.read_sidecar(str(path))
    out = {name: LayerStats(act_sum=s, act_sqsum=q, act_count=int(n), input_axis=int(axis)) for name, (s, q, n, axis) in layers.items()}
    grad = None
    if grads:
        grad = {name: GradStats(out=o.reshape(3, 4, -1), inp=i.reshape(3, 4, -1), count=np.asarray(c, dtype=np.int64)) for name, (o, i, c) in grads.items()}
    block_stats = BlockStats(np.asarray(blocks[0], dtype=np.float64), np.asarray(blocks[1], dtype=np.int64)) if blocks is not None else None
    return Sidecar(path=Path(path), meta=json.loads(meta_text), layers=out, grad=grad, blocks=block_stats)


def merge(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Element-wise sum of sidecars of one model computed on disjoint calibration sets."""
    return json.loads(_core.merge_sidecars([str(p) for p in paths], str(out)))
