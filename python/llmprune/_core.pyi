"""Typed surface of the Rust extension (rust/llmprune-py). Summaries and metadata cross as JSON
strings. tests/test_core_stub.py checks this file against the compiled module: the same names, and
for every function and method the same parameters and defaults."""

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

StrPath = str | os.PathLike[str]
Progress = Callable[[str, int, int, int, int], object]
# act_sum, act_sqsum, act_count, input_axis
LayerArrays = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int, int]
# grad_out, grad_in (flattened from [3, 4, n]), grad_count
GradArrays = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], Sequence[int]]

__version__: str
DEFAULT_SIDECAR: str
DEFAULT_GRAM: str
MAX_THREADS: int
MAX_DSNOT_ITERS: int

class LlmpruneError(Exception):
    hint: str | None  # the suggested next step, set by the core on every error it raises

class InvalidCheckpointError(LlmpruneError): ...
class InvalidStatsError(LlmpruneError): ...
class StatsMismatchError(LlmpruneError): ...
class InvalidArgumentError(LlmpruneError): ...
class TensorError(LlmpruneError): ...
class OutputError(LlmpruneError): ...
class InternalError(LlmpruneError): ...

def apply(
    model_dir: StrPath,
    out_dir: StrPath,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    scope: str = "row",
    stats: StrPath | None = None,
    threads: int | None = None,
    include: Sequence[str] = ...,
    exclude: Sequence[str] = ...,
    input_axis: int | None = None,
    force: bool = False,
    provenance: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    check_only: bool = False,
    update: bool = False,
    gram: StrPath | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    allocation: str = "uniform",
    owl_m: float | None = None,
    owl_lambda: float | None = None,
    block_sparsity: Sequence[float] | None = None,
    refine: str | None = None,
    dsnot_iters: int | None = None,
    dsnot_threshold: float | None = None,
    dsnot_skip: str | None = None,
    dsnot_same_sign: bool | None = None,
    compensate: bool = False,
) -> str:
    """Prune MODEL into OUT; returns a JSON summary. progress(name, bytes_done, bytes_total,
    tensors_done, tensors_total) is called after every tensor (and may raise to stop).
    check_only validates everything (checkpoint, sidecar, output location) and writes nothing.
    update: update the kept weights with SparseGPT's sweep on the Gram sidecar `gram` (method
    sparsegpt always does), with `damp` and `blocksize`. allocation: uniform, owl (owl_m,
    owl_lambda) or schedule (block_sparsity, one per decoder block). refine="dsnot" with the
    dsnot_* options refines each mask; compensate folds what pruning removed into the biases."""

def apply_structured(
    model_dir: StrPath,
    out_dir: StrPath,
    method: str,
    *,
    sparsity: float,
    allocation: str | None = None,
    width_multiple: int | None = None,
    compensate: bool | None = None,
    stats: StrPath | None = None,
    threads: int | None = None,
    force: bool = False,
    provenance: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    fusion: str | None = None,
    taylor: str | None = None,
    fusion_temperature: float | None = None,
    skip_first: int | None = None,
    skip_last: int | None = None,
    reconstruct: bool = False,
    gram: StrPath | None = None,
    damp: float = 0.01,
    layer_sparsity: Sequence[float] | None = None,
) -> str:
    """Structured pruning (method flap, magnitude-sp, wanda-sp or hywia): remove attention groups and
    MLP channels until `sparsity` of the decoder blocks' parameters are gone, and write the smaller
    checkpoint into OUT; returns a JSON summary. allocation: global or uniform. compensate: fold the
    removed channels' mean contribution into output-projection biases (None: on for flap only).
    hywia only (None: its defaults, see docs/hywia.md): fusion adaptive|fine|coarse, taylor
    first|mix, fusion_temperature > 0, skip_first / skip_last layers kept whole. reconstruct refits
    the output projections on the kept channels with the Gram sidecar `gram` and `damp`.
    layer_sparsity (a searched schedule, mean `sparsity`): each layer removes its own share by the
    uniform rule, with any kept head count; allocation stays uniform (its width multiple applies)."""

class StructuredPlanner:
    """Structured pruning of one decoder layer at any sparsity, exactly as apply_structured with a
    schedule writes it (what `llmprune search` scores)."""

    layers: int
    compensate: bool
    warnings: list[str]
    def __init__(
        self,
        model_dir: StrPath,
        method: str,
        *,
        width_multiple: int | None = None,
        compensate: bool | None = None,
        stats: StrPath | None = None,
        threads: int | None = None,
        fusion: str | None = None,
        taylor: str | None = None,
        fusion_temperature: float | None = None,
    ) -> None: ...
    def layer(self, layer: int, sparsity: float) -> dict[str, Any]:
        """{"attn_keep", "mlp_keep", "removed_params", "params", "slices": {tensor: (row ranges or
        None, column ranges or None)}, "tensors": {tensor: (shape or None, float32 values)}}: the
        kept groups, the sliced tensors' kept ranges, and the biases computed or added."""

def apply_depth(
    model_dir: StrPath,
    out_dir: StrPath,
    *,
    sparsity: float | None = None,
    remove_blocks: int | None = None,
    blocks: Sequence[int] | None = None,
    stats: StrPath | None = None,
    threads: int | None = None,
    force: bool = False,
    provenance: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> str:
    """Depth pruning (method block-influence): remove whole decoder blocks by the sidecar's Block
    Influence, `sparsity` of them or `remove_blocks`, or exactly the listed `blocks` (original
    indices; no sidecar needed); returns a JSON summary."""

def apply_experts(
    model_dir: StrPath,
    out_dir: StrPath,
    method: str,
    *,
    sparsity: float | None = None,
    experts_keep: int | None = None,
    stats: StrPath | None = None,
    threads: int | None = None,
    force: bool = False,
    provenance: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> str:
    """Expert pruning (method reap or frequency): remove routed experts of every MoE layer by the
    sidecar's routing statistics, `sparsity` of them or keeping `experts_keep`; JSON summary."""

def compute_mask(
    weight: npt.NDArray[np.float32],
    method: str,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    scope: str = "row",
    act_sum: npt.NDArray[np.float64] | None = None,
    act_sqsum: npt.NDArray[np.float64] | None = None,
    act_count: int = 0,
    name: str = "",
    threads: int | None = None,
    refine: str | None = None,
    dsnot_iters: int | None = None,
    dsnot_threshold: float | None = None,
    dsnot_skip: str | None = None,
    dsnot_same_sign: bool | None = None,
) -> npt.NDArray[np.bool_]:
    """Mask (True = pruned) of a 2-D [out, in] float32 weight, exactly as `apply` computes it
    (refined by DSnoT with refine="dsnot", which needs act_sum and act_sqsum)."""

def sparsegpt(
    weight: npt.NDArray[np.float32],
    gram: npt.NDArray[np.float64],
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    mask: npt.NDArray[np.bool_] | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], list[str]]:
    """SparseGPT on one [out, in] weight with its input's Gram matrix, as apply runs it (with a
    sparsity or pattern, or a fixed `mask` as --update); (new weight, mask, warnings)."""

def owl_allocation(
    model_dir: StrPath,
    layers: Mapping[str, tuple[Sequence[float], Sequence[float], int, int]],
    *,
    sparsity: float,
    owl_m: float | None = None,
    owl_lambda: float | None = None,
    threads: int | None = None,
) -> list[float]:
    """OWL's sparsity of every decoder block from activation statistics {name: (act_sum,
    act_sqsum, count, input_axis)}, as apply --allocation owl computes it."""

def sequential_settings(
    method: str,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    update: bool = False,
    allocation: str = "uniform",
    owl_m: float | None = None,
    owl_lambda: float | None = None,
    block_sparsity: Sequence[float] | None = None,
    refine: str | None = None,
    dsnot_iters: int | None = None,
    dsnot_threshold: float | None = None,
    dsnot_skip: str | None = None,
    dsnot_same_sign: bool | None = None,
    compensate: bool = False,
) -> str:
    """The `sequential` metadata (JSON) of a stats --sequential pass with these settings, validated
    as apply validates its own; block_sparsity: the sparsity each block was pruned at."""

def compensation_flag(model_type: str, weight: str) -> str | None:
    """The config flag that lets linear `weight` carry a bias it lacks (apply --compensate's rule)."""

def schedule_mean_warning(block_sparsity: Sequence[float], sparsity: float) -> str | None:
    """The warning apply gives when a schedule's block sparsities do not average `sparsity`."""

def inspect(model_dir: StrPath, input_axis: int | None = None) -> str:
    """Per-tensor sparsity, N:M compliance and provenance of a checkpoint, as JSON (tensors in
    natural name order). input_axis None: from config.json (see default_input_axis)."""

def default_input_axis(model_dir: StrPath) -> int:
    """The input axis assumed for weights no sidecar describes: 0 for GPT-2's Conv1D checkpoints."""

def methods() -> str:
    """JSON {"unstructured", "structured", "depth", "experts": [{"name", "needs_stats", ...}],
    "defaults": {"owl": {"m", "lambda"}, "dsnot": {"iters", "threshold", "skip"}}}."""

def open_checkpoint(model_dir: StrPath) -> str:
    """Validate a checkpoint as apply does; JSON {"dir", "files", "fingerprint", "tensors":
    {name: [file, dtype, shape]}, "model_tensors": {name: "DTYPE[d0,d1]"}}."""

class StagingDir:
    """A directory beside `target` that becomes `target` on commit(); close() (or leaving a with
    block) without a commit removes it with everything written."""

    path: Path
    target: Path
    warnings: list[str]

    def __init__(self, model_dir: StrPath, target: StrPath, force: bool = False) -> None: ...
    def commit(self) -> Path: ...
    def close(self) -> None: ...
    def __enter__(self) -> StagingDir: ...
    def __exit__(self, _t: object, _v: object, _tb: object) -> bool: ...

def copy_model_files(model_dir: StrPath, dst: StrPath, rewritten: Sequence[str] = ..., with_index: bool = False) -> None:
    """Copy the model directory's other files (tokenizer, configs, ...) into dst, except the
    top-level names in `rewritten`; with_index also writes the index for an unchanged layout."""

def read_sidecar(
    path: StrPath,
) -> tuple[str, dict[str, LayerArrays], dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[int]]], tuple[list[float], list[int]] | None]:
    """(metadata JSON, {name: (act_sum, act_sqsum, act_count, input_axis)}, {name: (grad_out,
    grad_in, grad_count)}, the Block Influence sums (cos_sum, count) or None) of a validated
    sidecar; gradient arrays flattened from [3, 4, n]."""

def write_sidecar(
    path: StrPath,
    model_dir: StrPath,
    layers: Mapping[str, LayerArrays],
    info: str,
    grads: Mapping[str, GradArrays] | None = None,
) -> None:
    """Validate and write a v1 sidecar atomically for the checkpoint in model_dir. info: JSON with
    calibration, mode, sequential, grad, blocks and experts (docs/sidecar.md)."""

def check_file_destination(path: StrPath) -> None:
    """Raise unless a file can be written at path (checked before a long pass)."""

def merge_sidecars(paths: Sequence[StrPath], out: StrPath) -> str:
    """Sum sidecars of one model taken on disjoint calibration sets into out; JSON summary."""

class GramWriter:
    """Writes a Gram sidecar one matrix at a time: write(key, packed, count) for every input of
    the layout [(key, [(weight, input_axis)], features)], then finish(); leaving a with block
    unfinished removes the file."""

    def __init__(self, path: StrPath, model_dir: StrPath, layout: Sequence[tuple[str, Sequence[tuple[str, int]], int]], info: str) -> None: ...
    def write(self, key: str, packed: npt.NDArray[np.float64], count: int) -> None: ...
    def finish(self) -> Path: ...
    def close(self) -> None: ...
    def __enter__(self) -> GramWriter: ...
    def __exit__(self, _t: object, _v: object, _tb: object) -> bool: ...

def read_gram(path: StrPath) -> tuple[str, dict[str, tuple[list[str], npt.NDArray[np.float64], int]]]:
    """(metadata JSON, {key: (weights, packed float64 upper triangle, count)}) of a whole Gram
    sidecar (for tests and small models)."""
