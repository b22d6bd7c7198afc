"""`stats --sequential --pruned-out DIR`: the pruned checkpoint written by the sequential pass itself,
so a second-order run (sparsegpt, or --update) needs no whole-model Gram file and no `apply` after it.

Each block's pruned weights, rounded to the checkpoint's dtype as `apply` rounds them, are spilled to
one file per block inside the output's staging directory as the pass goes; at the end the shards are
written one at a time and each block file is deleted once its tensors are in a shard, so the disk
holds about the output plus one shard, and memory one shard."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import UsageError

FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def check(model: Path, target: Path) -> None:
    """Refuse, before the pass, an output this mode cannot write."""
    from llmprune.calibration.estimate import BLOCK_RE
    from llmprune.model.checkpoint import Checkpoint

    if target.exists():
        raise UsageError(f"--pruned-out {target} exists", hint="choose another --pruned-out, or remove it first")
    ckpt = Checkpoint(model)
    if ckpt.mxfp4:
        raise UsageError(f"{model} stores experts as MXFP4, which --pruned-out does not write", hint="drop --pruned-out and run llmprune apply after this pass")
    odd = [n for n, (_, dt, shape) in ckpt.entries.items() if BLOCK_RE.search(n) and len(shape) == 2 and dt not in FLOAT_DTYPES]
    if odd:
        raise UsageError(
            f"{model} stores {odd[0]} as {ckpt.entries[odd[0]][1]}, which --pruned-out does not write",
            hint="drop --pruned-out and run llmprune apply after this pass",
        )


class PrunedOutput:
    """The staging directory of the output and the block files spilled into it."""

    def __init__(self, model: Path, target: Path):
        from llmprune import _core
        from llmprune.model.checkpoint import Checkpoint
        from llmprune.reconstruct import SpilledTensors

        self.ckpt = Checkpoint(model)
        self.staging = _core.StagingDir(str(model), str(target), False)
        self.spill_dir = Path(self.staging.path) / ".llmprune-blocks"
        self.spill_dir.mkdir()
        self.spilled = SpilledTensors(self.spill_dir)

    def add(self, block: int, weights: dict[str, torch.Tensor]) -> None:
        """Block `block`'s pruned weights (float32), kept rounded to each tensor's stored dtype."""
        self.spilled.add(block, {n: w.to(FLOAT_DTYPES[self.ckpt.entries[n][1]]) for n, w in weights.items()})

    def commit(self, provenance: dict[str, Any]) -> Path:
        from llmprune import finetune as ft

        ft.write_checkpoint(self.ckpt, self.spilled, Path(self.staging.path), provenance, after_shard=self.spilled.release)
        shutil.rmtree(self.spill_dir)
        ft.check_same_layout(self.ckpt, Path(self.staging.path))
        return Path(self.staging.commit())

    def close(self) -> None:
        self.staging.close()
