"""Sequential mode (Wanda / STADE's own algorithm): block i is pruned in memory, as `apply` would
prune it from the statistics just collected, before its outputs feed block i+1. The masks and the
SparseGPT sweep are the core's own (`_core.compute_mask`, `_core.sparsegpt`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmprune.calibration.sidecar import LayerStats
from llmprune.errors import UsageError
from llmprune.methods import method_registry
from llmprune.model.skeleton import Linear
from llmprune.model.stream import LayerStreamer

MaskFn = Callable[..., np.ndarray]


@dataclass
class Sequential:
    """Prune each block (method + sparsity or N:M pattern) before the next block's statistics."""

    method: str
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None
    # also update the kept weights with the SparseGPT sweep (method sparsegpt always does), on the
    # block's Gram matrices taken in the same pass
    update: bool = False
    # per-block sparsity: "uniform", "owl" (computed by a dense pass first) or "schedule"
    allocation: str = "uniform"
    owl_m: float | None = None
    owl_lambda: float | None = None
    block_sparsity: list[float] | None = None
    # DSnoT's keyword arguments for the core's compute_mask (refine="dsnot", ...), or None
    refine: dict[str, Any] | None = None
    # bias compensation as apply --compensate does it, b += (W - W') mu, before the next block
    compensate: bool = False

    @property
    def reconstructs(self) -> bool:
        return self.update or self.method == "sparsegpt"

    def owl_params(self) -> tuple[float, float]:
        d = method_registry()["defaults"]["owl"]
        return (self.owl_m if self.owl_m is not None else d["m"], self.owl_lambda if self.owl_lambda is not None else d["lambda"])

    def block_target(self, i: int) -> dict[str, Any]:
        """The core's target keywords for block i."""
        if self.block_sparsity is not None:
            return {"sparsity": self.block_sparsity[i], "pattern": None}
        return {"sparsity": self.sparsity, "pattern": self.pattern}

    def as_meta(self) -> dict[str, Any]:
        """The sidecar's `sequential` record, from the core (which validates and writes it, and
        compares it with apply's settings)."""
        import json

        from llmprune import _core

        return json.loads(
            _core.sequential_settings(
                self.method,
                sparsity=self.sparsity if self.pattern is None else None,
                pattern=self.pattern,
                update=self.update,
                allocation=self.allocation,
                owl_m=self.owl_m,
                owl_lambda=self.owl_lambda,
                block_sparsity=self.block_sparsity,
                compensate=self.compensate,
                **(self.refine or {}),
            )
        )


def core_compute_mask(weight: np.ndarray, method: str, **kw: Any) -> np.ndarray:
    """`llmprune._core.compute_mask`: the exact masks `apply` computes (True = pruned)."""
    from llmprune import _core

    return _core.compute_mask(weight, method, **kw)


def core_sparsegpt(weight: np.ndarray, gram: np.ndarray, **kw: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`llmprune._core.sparsegpt`: the sweep `apply --method sparsegpt` / `--update` runs."""
    from llmprune import _core

    return _core.sparsegpt(weight, gram, **kw)


def prune_block(
    streamer: LayerStreamer,
    i: int,
    stats: dict[str, LayerStats],
    seq: Sequential,
    mask_fn: MaskFn,
    grams: dict[str, np.ndarray] | None = None,
    keep: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Prune block i's weights in memory as `apply` would from these stats: zero them with the
    method's masks or, when the run reconstructs, through the core's SparseGPT sweep on the block's
    Gram matrices `grams` (weight name -> H); with compensation, add (W − W')μ to each output bias.
    With `keep`, each pruned weight is also put there (float32, laid out as the checkpoint stores it).
    Returns the weights zeroed per tensor and the pruned linears that cannot carry a bias."""
    pruned, uncompensated = {}, []
    names = [name for name, _, _ in streamer.prunable(i)]
    # the checkpoint's own values (upcast exactly), whatever dtype the block runs in
    originals = streamer.ckpt.load(names, torch.device("cpu"), torch.float32)
    for name, mod, axis in streamer.prunable(i):
        if name not in stats:  # an expert no calibration token reached: no statistics, not pruned
            continue
        w = originals[name]
        w_oi = w.t() if axis == 0 else w
        s = stats[name]
        w_np = np.ascontiguousarray(w_oi.numpy(), dtype=np.float32)
        mask = None
        if seq.method != "sparsegpt":
            mask = mask_fn(
                w_np,
                seq.method,
                **seq.block_target(i),
                act_sum=s.act_sum,
                act_sqsum=s.act_sqsum,
                act_count=s.act_count,
                name=name,
                **(seq.refine or {}),
            )
        if seq.reconstructs:
            assert grams is not None
            target = {"mask": np.ascontiguousarray(mask, dtype=np.bool_)} if mask is not None else seq.block_target(i)
            new_w, mask, _ = core_sparsegpt(w_np, grams[name], **target)
        else:
            assert mask is not None  # every method but sparsegpt (which reconstructs) masks first
            new_w = np.where(mask, np.float32(0), w_np)
        new = torch.from_numpy(np.ascontiguousarray(new_w))
        stored = new.t() if axis == 0 else new
        with torch.no_grad():
            mod.weight.copy_(stored.to(mod.weight.device, mod.weight.dtype))
        if keep is not None:
            keep[name] = stored.contiguous()
        pruned[name] = int(mask.sum())
        if seq.compensate and not _compensate(streamer, i, mod, name, w_np, new_w, s):
            uncompensated.append(name)
    return pruned, uncompensated


def _compensate(streamer: LayerStreamer, i: int, mod: Linear, name: str, w: np.ndarray, new_w: np.ndarray, s: LayerStats) -> bool:
    """b += (W − W')μ on linear `mod` (weights given [out, in]); a linear without a bias gets one
    when its architecture's config flag allows it (apply --compensate's rule), else False."""
    from llmprune._core import compensation_flag

    delta = (w.astype(np.float64) - new_w.astype(np.float64)) @ (np.asarray(s.act_sum, dtype=np.float64) / s.act_count)
    if mod.bias is None:
        if compensation_flag(getattr(streamer.config, "model_type", ""), name) is None:
            return False
        streamer.add_block_parameter(i, mod, "bias", torch.zeros(delta.shape[0], device=mod.weight.device, dtype=mod.weight.dtype))
    with torch.no_grad():
        mod.bias.add_(torch.from_numpy(delta).to(mod.bias.device, mod.bias.dtype))
    return True


def validate_schedule(values: list[float]) -> None:
    """A schedule's values in [0, 1), checked before the long pass (their count once the model's
    blocks are known, in collect_stats)."""
    bad = [v for v in values if not 0 <= v < 1]
    if bad:
        raise UsageError(f"the schedule's sparsities must be in [0, 1), got {bad[0]}")


def validate_sequential(
    method: str, sparsity: float | None, pattern: tuple[int, int] | None, mask_fn: MaskFn | None = None, refine: dict[str, Any] | None = None
) -> None:
    """Let the core reject a bad method / target / DSnoT setting before the long pass starts."""
    try:
        from llmprune import _core
    except ImportError as exc:
        raise UsageError(f"sequential mode needs the compiled llmprune core: {exc}") from None
    m = pattern[1] if pattern else 4
    w = np.ones((1, m), dtype=np.float32)
    ones = np.ones(m, dtype=np.float64)
    try:
        (mask_fn or core_compute_mask)(w, method, sparsity=sparsity, pattern=pattern, act_sum=ones, act_sqsum=2 * ones, act_count=4, name="", **(refine or {}))
    except _core.LlmpruneError as exc:  # InvalidArgumentError and the core's other errors
        raise UsageError(str(exc)) from None
