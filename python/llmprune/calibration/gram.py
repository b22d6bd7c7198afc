"""Gram statistics (`llmprune stats MODEL --gram`): H = Σ x xᵀ of every distinct input of the prunable
linears, one decoder block at a time, written into the Gram sidecar (docs/sidecar.md).

Linears that read the same tensor (q/k/v, gate/up, OPT's q/k/v) share one matrix. Which ones do is
seen once: block 0 runs its first calibration window with forward pre-hooks that record the tensor
each linear receives, and the grouping found (by module names relative to the block) serves every
block, as the blocks are one class. Each block's hooks also count the tokens every linear receives,
so a block whose linears do not share their inputs as block 0's did is an error, never a wrong sum.

Precision: each window's inputs x [tokens, n] (one calibration window of seqlen tokens) are upcast
from the compute dtype; on a CPU xᵀx is a float64 matrix product; on a GPU it is a float32 product
(TF32 off for the pass) added into a float64 accumulator, so rounding stays within one window.
Memory: one float64 n×n matrix per distinct input of the block being run, on the compute device.

The core writes the file (`_core.GramWriter`): the layout of every block is given up front from the
model's shapes, each block's matrices are written as soon as the block is done (all-reduced first
under torchrun), and the file is renamed into place once complete.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from llmprune.errors import UsageError

if TYPE_CHECKING:
    from llmprune.calibration.distributed import DistInfo
    from llmprune.model.skeleton import Linear
    from llmprune.model.stream import LayerStreamer


def gram_name() -> str:
    """The Gram sidecar's file name inside a model directory (the core's default)."""
    from llmprune import _core

    return _core.DEFAULT_GRAM


@dataclass
class GramTarget:
    """Where `collect_stats` writes Gram statistics, and the calibration facts recorded with them
    (`tokens` is filled in by the pass)."""

    path: Path | None  # None: the matrices are used in the pass (sequential mode) and dropped
    calibration: dict[str, Any] = field(default_factory=dict)
    # the stored element type: "float64", or "float32" (half the size; the sums are float64 either way)
    storage: str = "float64"


STORAGE_BYTES = {"float64": 8, "float32": 4}


@dataclass
class GramSummary:
    path: Path
    inputs: int
    bytes: int


# --------------------------------------------------------------------------------------------
# Which linears share an input
# --------------------------------------------------------------------------------------------


def block_linears(streamer: LayerStreamer, i: int) -> list[tuple[str, str, Linear, int]]:
    """(name relative to the block, checkpoint weight name, module, input axis) of block i's linears."""
    rel = {id(mod): name for name, mod in streamer.blocks[i].named_modules()}
    return [(rel[id(mod)], name, mod, axis) for name, mod, axis in streamer.prunable(i)]


def shared_inputs(streamer: LayerStreamer, sample: torch.Tensor) -> list[list[str]]:
    """Block 0's linears (relative names) grouped by the tensor they receive when block 0 (loaded)
    runs `sample` ([1, L, H]); groups in call order, a linear never called alone in its own group."""
    seen: list[tuple[torch.Tensor, int, list[str]]] = []
    handles = []

    def recorder(rel: str):
        def hook(_mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            for t, version, names in seen:
                if t is x and version == x._version:
                    if rel not in names:
                        names.append(rel)
                    return
            seen.append((x, x._version, [rel]))

        return hook

    linears = block_linears(streamer, 0)
    for rel, _, mod, _ in linears:
        handles.append(mod.register_forward_pre_hook(recorder(rel)))
    try:
        with torch.no_grad():
            streamer.run_block(0, sample)
    finally:
        for h in handles:
            h.remove()
    groups = [names for _, _, names in seen]
    called = {n for g in groups for n in g}
    groups += [[rel] for rel, _, _, _ in linears if rel not in called]
    return groups


@dataclass
class _Group:
    key: str  # the first weight name in name order
    weights: list[tuple[str, int]]  # (checkpoint weight name, input axis), in name order
    members: list[str]  # relative module names
    features: int


def block_layout(streamer: LayerStreamer, i: int, groups: list[list[str]]) -> list[_Group]:
    """Block i's inputs, from block 0's grouping of relative names."""
    by_rel = {rel: (name, mod, axis) for rel, name, mod, axis in block_linears(streamer, i)}
    if sorted(by_rel) != sorted(r for g in groups for r in g):
        raise UsageError(f"decoder block {i} has other linear layers than block 0; Gram statistics need blocks of one shape")
    out = []
    for members in groups:
        weights = sorted((by_rel[r][0], by_rel[r][2]) for r in members)
        widths = {int(by_rel[r][1].weight.shape[by_rel[r][2]]) for r in members}
        if len(widths) != 1:
            raise UsageError(f"the linears {', '.join(w for w, _ in weights)} read one input but differ in input width")
        out.append(_Group(key=weights[0][0], weights=weights, members=list(members), features=widths.pop()))
    return out


# --------------------------------------------------------------------------------------------
# Accumulation in one block
# --------------------------------------------------------------------------------------------


class _Acc:
    def __init__(self, group: _Group, device: torch.device):
        self.group = group
        self.gram = torch.zeros((group.features, group.features), dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)
        self.last: tuple[torch.Tensor, int] | None = None


def float64_products(device: torch.device) -> bool:
    """Whether each window's xᵀx is a float64 product (CPU) or a float32 one (GPU)."""
    return device.type == "cpu"


class BlockGram:
    """Forward pre-hooks on block i's linears adding each distinct input's xᵀx into float64 sums."""

    def __init__(self, streamer: LayerStreamer, i: int, groups: list[list[str]]):
        self.block = i
        self.device = streamer.device
        self.float64_products = float64_products(streamer.device)
        self.accs = [_Acc(g, streamer.device) for g in block_layout(streamer, i, groups)]
        self.received: dict[str, int] = {}
        self._handles = []
        mods = {rel: mod for rel, _, mod, _ in block_linears(streamer, i)}
        for acc in self.accs:
            for rel in acc.group.members:
                self.received[rel] = 0
                self._handles.append(mods[rel].register_forward_pre_hook(self._hook(acc, rel)))

    def _hook(self, acc: _Acc, rel: str):
        n = acc.group.features

        def hook(_mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            tokens = x.numel() // n
            self.received[rel] += tokens
            if acc.last is not None and acc.last[0] is x and acc.last[1] == x._version:
                return  # a linear of the same group, same tensor: already counted
            acc.last = (x, x._version)
            x2 = x.detach().reshape(-1, n)
            if self.float64_products:
                x64 = x2.to(torch.float64)
                acc.gram.addmm_(x64.t(), x64)
            else:
                x32 = x2.to(torch.float32)
                acc.gram.add_(x32.t() @ x32)
            acc.count += tokens

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for acc in self.accs:
            acc.last = None

    def check(self) -> None:
        """Every linear received exactly the tokens of its group's input (sharing as in block 0)."""
        for acc in self.accs:
            total = int(acc.count.item())
            for rel in acc.group.members:
                if self.received[rel] != total:
                    names = ", ".join(w for w, _ in acc.group.weights)
                    raise UsageError(
                        f"in decoder block {self.block} the linears {names} did not all read one input as in block 0; cannot share their Gram matrix"
                    )

    def reduce_across(self, info: DistInfo) -> None:
        for acc in self.accs:
            info.all_reduce_(acc.gram)
            info.all_reduce_(acc.count)

    def full_matrices(self) -> dict[str, np.ndarray]:
        """Weight name -> its input's whole H (float64, after the reduction across ranks)."""
        out = {}
        for acc in self.accs:
            full = acc.gram.cpu().numpy()
            for name, _ in acc.group.weights:
                out[name] = full
        return out

    def results(self) -> Iterator[tuple[_Group, np.ndarray, int]]:
        """(group, packed lower triangle (float64, row-major), token count), one at a time."""
        for acc in self.accs:
            full = acc.gram.cpu().numpy()
            yield acc.group, pack_lower(full), int(acc.count.item())


def pack_lower(full: np.ndarray) -> np.ndarray:
    """Entry (i, j), j <= i, at index i(i+1)/2 + j (without an index array of n² entries)."""
    n = full.shape[0]
    return np.concatenate([full[i, : i + 1] for i in range(n)]) if n else np.zeros(0, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# The whole pass
# --------------------------------------------------------------------------------------------


@contextmanager
def _float32_matmul_exact() -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the float32 products
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class GramPass:
    """Used by `collect_stats`: `block(i, hidden)` before block i's calibration forwards (block 0
    finds the shared inputs and opens the writer), `commit(bg)` after them, `finish()` at the end.
    A context manager: leaving it without `finish()` removes the temporary file."""

    def __init__(self, target: GramTarget, streamer: LayerStreamer, dist: DistInfo, *, tokens: int, mode: str, sequential: dict[str, Any] | None):
        self.target = target
        self.streamer = streamer
        self.dist = dist
        self.info = {"calibration": {**target.calibration, "tokens": tokens}, "mode": mode, "sequential": sequential, "storage": target.storage}
        self.groups: list[list[str]] | None = None
        self.writer: Any = None
        self.inputs = 0
        self.bytes = 0
        self._exact = _float32_matmul_exact()

    def __enter__(self) -> GramPass:
        self._exact.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.writer is not None:
                self.writer.__exit__(*exc)
                self.writer = None
        finally:
            self._exact.__exit__(*exc)

    def _open(self) -> None:
        from llmprune import _core

        assert self.groups is not None
        layout = []
        for i in range(self.streamer.num_blocks):
            for g in block_layout(self.streamer, i, self.groups):
                layout.append((g.key, g.weights, g.features))
        self.inputs = len(layout)
        self.bytes = sum(n * (n + 1) // 2 * STORAGE_BYTES[self.target.storage] + 8 for _, _, n in layout)
        if self.dist.rank == 0 and self.target.path is not None:
            self._announce()
            writer = _core.GramWriter(str(self.target.path), str(self.streamer.ckpt.dir), layout, json.dumps(self.info))
            self.writer = writer.__enter__()

    def _announce(self) -> None:
        """Say how large the Gram sidecar will be (packed float64 is often larger than the model; float32
        halves it) before writing it, and refuse at once when its folder lacks the room, rather than
        hours later."""
        import shutil

        from llmprune.console import err

        assert self.target.path is not None
        ckpt = self.streamer.ckpt
        model_bytes = sum((ckpt.dir / f).stat().st_size for f in ckpt.files)
        folder = self.target.path.resolve().parent
        free = shutil.disk_usage(folder).free
        if free < self.bytes:
            raise UsageError(
                f"the Gram sidecar needs {self.bytes / 1e6:,.0f} MB and {folder} has {free / 1e6:,.0f} MB free",
                hint="free space there, or write it elsewhere with --gram-out PATH",
            )
        smaller = " (--gram-dtype float32 halves it)" if self.target.storage == "float64" and self.bytes > model_bytes else ""
        err.print(
            f"Gram matrices of {self.inputs} inputs: {self.bytes / 1e6:,.0f} MB ({self.target.storage}, packed; {self.bytes / max(model_bytes, 1):.1f}x "
            f"the model's {model_bytes / 1e6:,.0f} MB) into {self.target.path}{smaller}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def block(self, i: int, hidden: torch.Tensor) -> BlockGram:
        """Hooks for block i (loaded). Call before any other hook is registered on block 0: its
        grouping is found by running the first window once more."""
        if self.groups is None:
            self.groups = shared_inputs(self.streamer, hidden[0:1])
            self._open()
        return BlockGram(self.streamer, i, self.groups)

    def commit(self, bg: BlockGram) -> None:
        bg.check()
        bg.reduce_across(self.dist)
        if self.writer is not None:
            for group, packed, count in bg.results():
                self.writer.write(group.key, packed, count)

    def finish(self) -> GramSummary | None:
        """The file written; None when the target keeps no file."""
        if self.writer is not None:
            self.writer.finish()
            self.writer.__exit__(None, None, None)
            self.writer = None
        if self.target.path is None:
            return None
        return GramSummary(path=self.target.path, inputs=self.inputs, bytes=self.bytes)
