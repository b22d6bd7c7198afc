"""The stats sidecar v1 (docs/sidecar.md): writing, reading and merging.

Per prunable weight W: `W.act_sum` F64[in], `W.act_sqsum` F64[in], `W.act_count` I64[1]; the
`__metadata__["llmprune"]` JSON names the model (fingerprint + tensor list), the calibration, the mode
and each weight's input axis. Files are written beside their destination and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmprune.errors import UsageError

SIDECAR_NAME = "llmprune-stats.safetensors"
FORMAT = "llmprune-stats"
FORMAT_VERSION = 1


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


GRAD_SUFFIXES = ("grad_out", "grad_in", "grad_count")


@dataclass
class Sidecar:
    path: Path
    meta: dict[str, Any]
    layers: dict[str, LayerStats]
    grad: dict[str, GradStats] | None = None


def describe_model(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """(model_fingerprint, model_tensors) of a checkpoint, as the Rust core computes them."""
    try:
        from llmprune import _core
    except ImportError:  # a source tree without the compiled extension
        return _describe_model_py(Path(model_dir))
    doc = json.loads(_core.describe_model(str(model_dir)))
    return doc["fingerprint"], doc["tensors"]


def _describe_model_py(model_dir: Path) -> tuple[str, dict[str, str]]:
    """docs/sidecar.md's fingerprint from the shard headers (same files the core reads)."""
    from llmprune.stream import Checkpoint

    ckpt = Checkpoint(model_dir)
    lines = []
    tensors = {}
    for name in sorted(ckpt.entries):
        _, dtype, shape = ckpt.entries[name]
        dims = ",".join(str(d) for d in shape)
        lines.append(f"{name}\t{dtype}\t{dims}\n")
        tensors[name] = f"{dtype}[{dims}]"
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest(), tensors


def llmprune_version() -> str:
    from llmprune import __version__

    return __version__


def write(
    path: str | Path,
    layers: dict[str, LayerStats],
    *,
    fingerprint: str,
    model_tensors: dict[str, str],
    calibration: dict[str, Any],
    mode: str = "dense",
    sequential: dict[str, Any] | None = None,
    grad: dict[str, GradStats] | None = None,
    grad_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a v1 sidecar atomically (with gradient statistics when `grad` is given); returns its path."""
    if mode not in ("dense", "sequential"):
        raise ValueError(f"mode must be dense or sequential, not {mode!r}")
    if (mode == "sequential") != (sequential is not None):
        raise ValueError("sequential settings go with mode 'sequential' only")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llmprune_version": llmprune_version(),
        "model_fingerprint": fingerprint,
        "model_tensors": model_tensors,
        "calibration": calibration,
        "mode": mode,
        "sequential": sequential,
        "layers": {name: {"input_axis": int(layers[name].input_axis)} for name in sorted(layers)},
        "grad": grad_meta if grad is not None else None,
    }
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(layers):
        s = layers[name]
        tensors[f"{name}.act_sum"] = np.ascontiguousarray(s.act_sum, dtype=np.float64)
        tensors[f"{name}.act_sqsum"] = np.ascontiguousarray(s.act_sqsum, dtype=np.float64)
        tensors[f"{name}.act_count"] = np.array([int(s.act_count)], dtype=np.int64)
    for name, g in sorted((grad or {}).items()):
        tensors[f"{name}.grad_out"] = np.ascontiguousarray(g.out, dtype=np.float64)
        tensors[f"{name}.grad_in"] = np.ascontiguousarray(g.inp, dtype=np.float64)
        tensors[f"{name}.grad_count"] = np.ascontiguousarray(g.count, dtype=np.int64)
    return _atomic_save(Path(path), tensors, {"llmprune": json.dumps(meta)})


def _atomic_save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    from safetensors.numpy import save_file

    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: directory {parent} is not writable", hint="choose another location with --out")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read(path: str | Path) -> Sidecar:
    """Load and validate a sidecar; problems are UsageErrors naming the file."""
    from safetensors import safe_open

    from llmprune.stream import read_safetensors_header

    p = Path(path)
    if not p.exists():
        raise UsageError(f"stats file not found: {p}")
    if not p.is_file():
        raise UsageError(f"not a file: {p}")
    if not os.access(p, os.R_OK):
        raise UsageError(f"cannot read {p}: permission denied")
    header = read_safetensors_header(p)
    text = (header.get("__metadata__") or {}).get("llmprune")
    if text is None:
        raise UsageError(f"{p} is not an llmprune stats sidecar (no llmprune metadata)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{p}: corrupt llmprune metadata ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{p}: unsupported sidecar format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})")
    info = meta.get("layers")
    if not isinstance(info, dict):
        raise UsageError(f"{p}: metadata has no layers table")
    layers: dict[str, LayerStats] = {}
    with safe_open(str(p), framework="numpy") as f:
        keys = set(f.keys())
        for name, li in info.items():
            for suffix in ("act_sum", "act_sqsum", "act_count"):
                if f"{name}.{suffix}" not in keys:
                    raise UsageError(f"{p}: missing tensor {name}.{suffix}")
            count = f.get_tensor(f"{name}.act_count")
            layers[name] = LayerStats(
                act_sum=f.get_tensor(f"{name}.act_sum").astype(np.float64, copy=False),
                act_sqsum=f.get_tensor(f"{name}.act_sqsum").astype(np.float64, copy=False),
                act_count=int(count.reshape(-1)[0]),
                input_axis=int((li or {}).get("input_axis", 1)),
            )
        grad = _read_grad(p, f, keys, info) if meta.get("grad") else None
    return Sidecar(path=p, meta=meta, layers=layers, grad=grad)


def _read_grad(p: Path, f: Any, keys: set[str], info: dict[str, Any]) -> dict[str, GradStats]:
    grad = {}
    for name in info:
        for suffix in GRAD_SUFFIXES:
            if f"{name}.{suffix}" not in keys:
                raise UsageError(f"{p}: missing tensor {name}.{suffix}")
        grad[name] = GradStats(
            out=f.get_tensor(f"{name}.grad_out"),
            inp=f.get_tensor(f"{name}.grad_in"),
            count=f.get_tensor(f"{name}.grad_count"),
        )
    return grad


def _combine(values: list[Any]) -> Any:
    """One value when all agree, else the list of distinct values in order."""
    distinct: list[Any] = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    return distinct[0] if len(distinct) == 1 else distinct


def merge(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Element-wise sum of sidecars of one model computed on disjoint calibration sets."""
    if len(paths) < 2:
        raise UsageError("merge needs at least two sidecars", hint="llmprune stats merge A B ... --out C")
    cars = [read(p) for p in paths]
    for c in cars:
        if c.grad is not None:
            raise UsageError(
                f"{c.path} carries gradient statistics (stats --grad), which do not add up across calibration sets",
                hint="run stats --grad once over all the samples instead",
            )
    first = cars[0]
    fp = first.meta.get("model_fingerprint")
    for c in cars[1:]:
        if c.meta.get("model_fingerprint") != fp:
            raise UsageError(
                f"{first.path} and {c.path} were computed for different models (fingerprints differ)",
                hint="merge only statistics of the same checkpoint",
            )
        if set(c.layers) != set(first.layers):
            only = sorted(set(c.layers) ^ set(first.layers))[0]
            raise UsageError(f"{first.path} and {c.path} list different prunable weights (e.g. {only})")
        for name, s in c.layers.items():
            r = first.layers[name]
            if s.input_axis != r.input_axis or s.act_sum.shape != r.act_sum.shape:
                raise UsageError(f"{first.path} and {c.path} disagree on the shape of {name}'s statistics")
        if (c.meta.get("mode"), c.meta.get("sequential")) != (first.meta.get("mode"), first.meta.get("sequential")):
            raise UsageError(
                f"{first.path} and {c.path} were computed in different modes "
                f"({_mode_text(first.meta)} vs {_mode_text(c.meta)})"
            )
    merged: dict[str, LayerStats] = {}
    for name, r in first.layers.items():
        merged[name] = LayerStats(
            act_sum=np.sum([c.layers[name].act_sum for c in cars], axis=0),
            act_sqsum=np.sum([c.layers[name].act_sqsum for c in cars], axis=0),
            act_count=sum(c.layers[name].act_count for c in cars),
            input_axis=r.input_axis,
        )
    cals = [c.meta.get("calibration") or {} for c in cars]
    calibration = {
        "source": _combine([c.get("source") for c in cals]),
        "nsamples": sum(int(c.get("nsamples") or 0) for c in cals),
        "seqlen": _combine([c.get("seqlen") for c in cals]),
        "seed": _combine([c.get("seed") for c in cals]),
        "tokens": sum(int(c.get("tokens") or 0) for c in cals),
        "merged_from": [c.path.name for c in cars],
    }
    out_path = write(
        out,
        merged,
        fingerprint=fp,
        model_tensors=first.meta.get("model_tensors") or {},
        calibration=calibration,
        mode=first.meta.get("mode", "dense"),
        sequential=first.meta.get("sequential"),
    )
    tokens = max((s.act_count for s in merged.values()), default=0)
    return {"out": str(out_path), "inputs": [str(c.path) for c in cars], "layers": len(merged), "tokens": tokens}


def _mode_text(meta: dict[str, Any]) -> str:
    seq = meta.get("sequential")
    if meta.get("mode") != "sequential" or not isinstance(seq, dict):
        return "dense"
    target = seq.get("pattern") or seq.get("sparsity")
    return f"sequential {seq.get('method')} {target}"
