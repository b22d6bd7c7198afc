"""Typed surface of the Rust extension (rust/llmprune-py). Summaries cross as JSON strings."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class LlmpruneError(Exception): ...
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
    input_axis: int = 1,
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
    allocation: str = "global",
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

def inspect(model_dir: str, input_axis: int = 1) -> str:
    """Per-tensor sparsity, N:M compliance and provenance of a checkpoint, as JSON."""

def describe_model(model_dir: str) -> str:
    """JSON {"fingerprint": str, "tensors": {name: "DTYPE[d0,d1,...]"}} of a checkpoint."""
