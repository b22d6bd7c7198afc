"""Typed surface of the Rust extension (rust/llmprune-py). Summaries cross as JSON strings."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class LlmpruneError(Exception):
    hint: str | None  # the suggested next step, set by the core on every error it raises
class InvalidCheckpointError(LlmpruneError): ...
class InvalidStatsError(LlmpruneError): ...
class StatsMismatchError(LlmpruneError): ...
class InvalidArgumentError(LlmpruneError): ...
class TensorError(LlmpruneError): ...
class OutputError(LlmpruneError): ...

def apply(
    model_dir: str,
    out_dir: str,
    method: str,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    scope: str = "row",
    stats: str | None = None,
    threads: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    input_axis: int | None = None,
    force: bool = False,
    provenance: dict[str, str] | None = None,
    progress: Callable[[str, int, int, int, int], None] | None = None,
    check_only: bool = False,
) -> str:
    """Prune MODEL into OUT; returns a JSON summary. progress(name, bytes_done, bytes_total,
    tensors_done, tensors_total) is called after every tensor (and may raise to stop).
    check_only validates everything (checkpoint, sidecar, output location) and writes nothing."""

def apply_structured(
    model_dir: str,
    out_dir: str,
    method: str,
    *,
    sparsity: float,
    allocation: str | None = None,
    compensate: bool | None = None,
    stats: str | None = None,
    threads: int | None = None,
    force: bool = False,
    provenance: dict[str, str] | None = None,
    progress: Callable[[str, int, int, int, int], None] | None = None,
    fusion: str | None = None,
    taylor: str | None = None,
    fusion_temperature: float | None = None,
    skip_first: int | None = None,
    skip_last: int | None = None,
) -> str:
    """Structured pruning (method flap, magnitude-sp, wanda-sp or hywia): remove attention groups and
    MLP channels until `sparsity` of the decoder blocks' parameters are gone, and write the smaller
    checkpoint into OUT; returns a JSON summary. allocation: global or uniform. compensate: fold the
    removed channels' mean contribution into output-projection biases (None: on for flap only).
    hywia only (None: its defaults, see docs/hywia.md): fusion adaptive|fine|coarse, taylor
    first|mix, fusion_temperature > 0, skip_first / skip_last layers kept whole."""

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
) -> npt.NDArray[np.bool_]:
    """Mask (True = pruned) of a 2-D [out, in] float32 weight, exactly as `apply` computes it."""

def compensation_flag(model_type: str, weight: str) -> str | None:
    """The config flag that lets linear `weight` carry a bias it lacks (apply --compensate's rule)."""

def inspect(model_dir: str, input_axis: int | None = None) -> str:
    """Per-tensor sparsity, N:M compliance and provenance of a checkpoint, as JSON (tensors in
    natural name order). input_axis None: from config.json (see default_input_axis)."""

def default_input_axis(model_dir: str) -> int:
    """The input axis assumed for weights no sidecar describes: 0 for GPT-2's Conv1D checkpoints."""

def methods() -> str:
    """JSON {"unstructured": [{"name", "needs_stats"}], "structured": [{"name", "needs_stats",
    "compensates", "allocation"}]}: every method the core implements and its defaults."""

def open_checkpoint(model_dir: str) -> str:
    """Validate a checkpoint as apply does; JSON {"dir", "files", "fingerprint", "tensors":
    {name: [file, dtype, shape]}, "model_tensors": {name: "DTYPE[d0,d1]"}}."""

class StagingDir:
    """A directory beside `target` that becomes `target` on commit(); close() (or leaving a with
    block) without a commit removes it with everything written."""

    path: str
    target: str
    warnings: list[str]

    def __init__(self, model_dir: str, target: str, force: bool = False) -> None: ...
    def commit(self) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> StagingDir: ...
    def __exit__(self, *exc: object) -> bool: ...

def copy_model_files(model_dir: str, dst: str, rewritten: Sequence[str] = (), with_index: bool = False) -> None:
    """Copy the model directory's other files (tokenizer, configs, ...) into dst, except the
    top-level names in `rewritten`; with_index also writes the index for an unchanged layout."""

def read_sidecar(
    path: str,
) -> tuple[
    str,
    dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int, int]],
    dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[int]]],
]:
    """(metadata JSON, {name: (act_sum, act_sqsum, act_count, input_axis)}, {name: (grad_out,
    grad_in, grad_count)}) of a validated sidecar; gradient arrays flattened from [3, 4, n]."""

def write_sidecar(
    path: str,
    model_dir: str,
    layers: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int, int]],
    info: str,
    grads: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], Sequence[int]]] | None = None,
) -> None:
    """Validate and write a v1 sidecar atomically for the checkpoint in model_dir. info: JSON with
    calibration, mode, sequential and grad (docs/sidecar.md)."""

def check_file_destination(path: str) -> None:
    """Raise unless a file can be written at path (checked before a long pass)."""

def merge_sidecars(paths: Sequence[str], out: str) -> str:
    """Sum sidecars of one model taken on disjoint calibration sets into out; JSON summary."""

DEFAULT_SIDECAR: str
MAX_THREADS: int

class InternalError(LlmpruneError): ...
