"""Block reconstruction: recover a pruned checkpoint block by block against the dense model.

Both checkpoints are layer-streamed (model/stream.py): one dense block and one pruned block are in
memory at a time, with the calibration windows' activations. For each block the dense block's outputs
on the windows are the targets, and the pruned block's kept weights are optimized with Adam so that
its outputs match them, every pruned (zero) weight staying exactly zero, so unstructured masks and
N:M patterns are kept; structured outputs (fewer heads or channels) are reconstructed the same way.

Granularity `sublayer` (the default) optimizes the attention first, on the residual stream after it
(block input + attention output, against the dense block's), and then the rest of the block (the
MLP) on the block's output; `block` optimizes all of the block's linears at once on its output.

The pruned block's inputs are, by default, the outputs of the blocks reconstructed so far (`pruned`
inputs: each block corrects what earlier blocks still get wrong); `dense` feeds every block the dense
model's inputs instead. A depth-pruned checkpoint (fewer blocks, the provenance naming the removed
ones) maps each kept block onto its dense counterpart, and the block before a removed run is fitted
to the dense output after that run (whole-block, as it stands for several dense blocks).

A stage whose loss over all the windows does not go down (or is not finite) keeps its weights as they
were, and says so in the summary. Under torchrun every rank holds a share of the windows and all
ranks take the same steps: each batch's loss is summed where its windows are and the gradients are
all-reduced, so the result is that of one process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from llmprune.calibration.distributed import DistInfo, shard_samples
from llmprune.console import BlockProgress
from llmprune.errors import UsageError
from llmprune.model.buffers import Activations
from llmprune.model.stream import LayerStreamer

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
GRANULARITIES = ("sublayer", "block")
INPUTS = ("pruned", "dense")


@dataclass
class Settings:
    steps: int = 20
    lr: float = 2e-3
    batch_size: int = 4
    granularity: str = "sublayer"
    inputs: str = "pruned"
    seed: int = 0


@dataclass
class StageResult:
    """One optimization of one block's parameters: its loss over all windows before and after."""

    block: int
    stage: str  # "attention", "mlp" or "block"
    params: int
    before: float
    after: float
    kept: bool  # False: the loss did not go down, the weights were left as they were

    def as_dict(self) -> dict[str, Any]:
        return {"block": self.block, "stage": self.stage, "params": self.params, "loss_before": self.before, "loss_after": self.after, "kept": self.kept}


@dataclass
class Result:
    stages: list[StageResult] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # checkpoint names of the tensors rewritten
    seconds: float = 0.0
    device: str = "cpu"
    world_size: int = 1
    activations: str = "device"  # where the windows' activations were kept (Activations)


# --------------------------------------------------------------------------------------------
# Which pruned block stands for which dense blocks
# --------------------------------------------------------------------------------------------


def provenance_chain(ckpt_dir: Path, files: list[str]) -> list[dict[str, Any]]:
    """The `llmprune` provenance of a checkpoint's first shard and every `input` it records (the
    checkpoint it was made from, and so on), newest first; empty when there is none."""
    from safetensors import safe_open

    with safe_open(str(ckpt_dir / files[0]), framework="pt", device="cpu") as st:
        raw = (st.metadata() or {}).get("llmprune")
    chain: list[dict[str, Any]] = []
    try:
        node: Any = json.loads(raw) if raw else None
    except ValueError:
        node = None
    while isinstance(node, dict):
        chain.append(node)
        node = node.get("input")
    return chain


def block_spans(chain: list[dict[str, Any]], dense_blocks: int, pruned_blocks: int) -> list[tuple[int, int]]:
    """For each pruned block, the dense blocks (first, last) it stands for: itself alone, or, after
    depth pruning, its dense counterpart and the removed blocks that follow it (the first kept block
    also stands for removed blocks before it)."""
    if pruned_blocks == dense_blocks:
        return [(i, i) for i in range(dense_blocks)]
    removed: list[int] | None = None
    for p in chain:
        if isinstance(p.get("removed_blocks"), list) and p.get("blocks_before") == dense_blocks:
            removed = [int(b) for b in p["removed_blocks"]]
            break
    if removed is None:
        raise UsageError(
            f"the pruned checkpoint has {pruned_blocks} decoder blocks and the dense model {dense_blocks}, and its provenance does not say which were removed",
            hint="give the dense model it was pruned from; a depth-pruned checkpoint written by llmprune records its removed blocks",
        )
    kept = [b for b in range(dense_blocks) if b not in set(removed)]
    if len(kept) != pruned_blocks:
        raise UsageError(f"the provenance removes {len(removed)} of {dense_blocks} blocks, but the pruned checkpoint has {pruned_blocks}")
    return [(0 if k == 0 else kept[k], (kept[k + 1] - 1) if k + 1 < len(kept) else dense_blocks - 1) for k in range(len(kept))]


def check_pair(pruned: LayerStreamer, dense: LayerStreamer) -> list[tuple[int, int]]:
    """The pruned checkpoint is a pruned copy of the dense one: provenance whose source fingerprint is
    the dense model's (or, without provenance, the same tensors); the same architecture, hidden size
    and vocabulary. Returns the block spans (block_spans)."""
    pc, dc = pruned.config, dense.config
    for key in ("model_type", "hidden_size", "vocab_size"):
        a, b = getattr(pc, key, None), getattr(dc, key, None)
        if a != b:
            raise UsageError(
                f"the pruned checkpoint's {key} is {a!r} and the dense model's {b!r}: it is not a pruned copy of {dense.ckpt.dir}",
                hint="pass the model it was pruned from as --dense",
            )
    chain = provenance_chain(pruned.ckpt.dir, pruned.ckpt.files)
    sources = [str(p["source_fingerprint"]) for p in chain if p.get("source_fingerprint")]
    if sources and dense.ckpt.fingerprint not in sources:
        raise UsageError(
            f"{pruned.ckpt.dir} was pruned from another checkpoint than {dense.ckpt.dir} (its provenance records source fingerprint {sources[-1][:16]}…, the dense model's is {dense.ckpt.fingerprint[:16]}…)",
            hint="pass the model it was pruned from as --dense",
        )
    if not sources and pruned.ckpt.fingerprint != dense.ckpt.fingerprint:
        raise UsageError(
            f"{pruned.ckpt.dir} records no llmprune provenance and its tensors differ from {dense.ckpt.dir}'s, so it cannot be matched to the dense model block by block",
            hint="pass the model it was pruned from as --dense",
        )
    # pruning never changes the token embeddings: a pruned copy holds the dense model's, bit for bit
    pe, de = _stored_embeddings(pruned), _stored_embeddings(dense)
    if pe is not None and de is not None and not (pe.dtype == de.dtype and torch.equal(pe, de)):
        raise UsageError(
            f"the token embeddings of {pruned.ckpt.dir} differ from {dense.ckpt.dir}'s, which pruning never changes: it is not a pruned copy of that model",
            hint="pass the model it was pruned from as --dense",
        )
    return block_spans(chain, dense.num_blocks, pruned.num_blocks)


def _stored_embeddings(streamer: LayerStreamer) -> torch.Tensor | None:
    """The input embedding matrix as the checkpoint stores it (None if the model has none)."""
    emb = streamer.model.get_input_embeddings() if hasattr(streamer.model, "get_input_embeddings") else None
    for qual, mod in streamer.model.named_modules():
        if emb is not None and mod is emb:
            name = streamer.checkpoint_name(f"{qual}.weight")
            return streamer.ckpt.load([name], torch.device("cpu"), None)[name] if name is not None else None
    return None


# --------------------------------------------------------------------------------------------
# One block
# --------------------------------------------------------------------------------------------


def attention_module(block: nn.Module) -> nn.Module | None:
    for name in ATTENTION_NAMES:
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


class _Stop(Exception):
    pass


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Trainable:
    """The parameters of one stage: (checkpoint name, parameter, keep mask or None) of each linear's
    weight (masked: its zeros stay zero) and bias."""

    items: list[tuple[str, nn.Parameter, torch.Tensor | None]]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p, _ in self.items]

    def numel(self) -> int:
        return sum(int(p.numel()) if m is None else int(m.sum()) for _, p, m in self.items)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)


def stage_parameters(streamer: LayerStreamer, modules: Sequence[tuple[str, nn.Module]]) -> Trainable:
    """The weights (with their keep masks) and biases of the given linears of a loaded block."""
    items: list[tuple[str, nn.Parameter, torch.Tensor | None]] = []
    for wname, mod in modules:
        w = cast(nn.Parameter, mod.weight)
        items.append((wname, w, (w.detach() != 0)))
        b = getattr(mod, "bias", None)
        bname = wname.removesuffix(".weight") + ".bias"
        if isinstance(b, nn.Parameter) and bname in streamer.ckpt:
            items.append((bname, b, None))
    return Trainable(items)


class BlockData:
    """A block's windows on this rank: inputs [n, L, H], targets (the residual stream after the
    attention, and the block's output) as the dense model gives them."""

    def __init__(self, inputs: torch.Tensor, out: torch.Tensor, mid: torch.Tensor | None):
        self.inputs, self.out, self.mid = inputs, out, mid


def _batches(n_global: int, settings: Settings, block: int, stage: int) -> Iterator[torch.Tensor]:
    """The global window indices of each step: a fresh random permutation of all windows per step,
    its first batch_size entries, from a generator seeded with seed + 1000 * block + stage."""
    gen = torch.Generator().manual_seed(settings.seed + 1000 * block + stage)
    b = min(settings.batch_size, n_global)
    for _ in range(settings.steps):
        yield torch.randperm(n_global, generator=gen)[:b]


def fit_stage(
    run: Callable[[torch.Tensor, slice | torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    trainable: Trainable,
    settings: Settings,
    *,
    block: int,
    stage: int,
    offset: int,
    n_global: int,
    dist: DistInfo,
    on_step: Callable[[], None] | None = None,
) -> tuple[float, float, bool]:
    """Adam on `trainable` so that run(batch of local window indices) matches `target` (this rank's
    windows, global indices offset..offset+len): mean squared error over the batch, pruned weights'
    gradients zeroed (so Adam never moves them) and re-zeroed after every step. Returns the loss over
    all windows before and after, and whether the new weights were kept (the loss went down)."""
    n_local = target.shape[0]
    before = _full_loss(run, target, dist, n_global)
    if before == 0.0:  # already exact (e.g. nothing of it was pruned): nothing to fit
        return before, before, True
    saved = trainable.snapshot()
    for p in trainable.params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable.params, lr=settings.lr)
    per_window = target[0].numel()
    try:
        for batch in _batches(n_global, settings, block, stage):
            mine = batch[(batch >= offset) & (batch < offset + n_local)] - offset
            opt.zero_grad(set_to_none=False)
            for p in trainable.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            for j in mine.tolist():  # one window at a time: the blocks' recorded arguments are for one
                idx = torch.tensor([j])
                pred = run(target, idx).float()
                loss = (pred - target[idx].to(pred.device)).pow(2).sum() / (batch.numel() * per_window)
                loss.backward()
            for p in trainable.params:
                dist.all_reduce_(p.grad)  # type: ignore[arg-type]
            with torch.no_grad():
                for _, p, keep in trainable.items:
                    if keep is not None:
                        p.grad.mul_(keep)  # type: ignore[union-attr]
            opt.step()
            with torch.no_grad():
                for _, p, keep in trainable.items:
                    if keep is not None:
                        p.mul_(keep)
            if on_step is not None:
                on_step()
    finally:
        for p in trainable.params:
            p.requires_grad_(False)
            p.grad = None
    after = _full_loss(run, target, dist, n_global)
    kept = math.isfinite(after) and after < before
    if not kept:
        trainable.restore(saved)
    return before, after, kept


@torch.no_grad()
def _full_loss(run: Callable[[torch.Tensor, slice | torch.Tensor], torch.Tensor], target: torch.Tensor, dist: DistInfo, n_global: int) -> float:
    """Mean squared error over every window (all ranks)."""
    total: torch.Tensor | None = None
    for j in range(target.shape[0]):
        idx = torch.tensor([j])
        pred = run(target, idx).float()
        term = (pred - target[idx].to(pred.device)).pow(2).sum().double()
        total = term if total is None else total + term
    if total is None:
        total = torch.zeros((), dtype=torch.float64, device=_reduce_device(dist, target))
    dist.all_reduce_(total)
    return float(total) / (n_global * target[0].numel())


def _reduce_device(dist: DistInfo, t: torch.Tensor) -> torch.device:
    """Where a rank's all-reduced scalars live: its GPU under nccl, else the CPU."""
    return torch.device("cuda", dist.local_rank) if dist.local_rank is not None else t.device


def reconstruct_block(
    streamer: LayerStreamer, i: int, data: BlockData, settings: Settings, *, offset: int, n_global: int, dist: DistInfo, whole: bool = False, on_step=None
) -> list[tuple[StageResult, Trainable]]:
    """Reconstructs loaded block i of `streamer` (float32) on `data`; returns each stage's losses
    and parameters. `whole`: one stage for the whole block whatever the granularity."""
    block = streamer.blocks[i]
    prunable = [(name, mod) for name, mod, _ in streamer.prunable(i)]
    attn = None if whole or settings.granularity == "block" or data.mid is None else attention_module(block)
    results: list[tuple[StageResult, Trainable]] = []
    if attn is not None:
        attn_ids = {id(m) for m in attn.modules()}
        first = [(n, m) for n, m in prunable if id(m) in attn_ids]
        rest = [(n, m) for n, m in prunable if id(m) not in attn_ids]
        stages = [("attention", first), ("mlp", rest)]
    else:
        stages = [("block", prunable)]
    for k, (label, modules) in enumerate(stages):
        if not modules:
            continue
        trainable = stage_parameters(streamer, modules)
        if label == "attention":
            assert attn is not None and data.mid is not None
            run = _attention_runner(streamer, i, attn, data.inputs)
            target = data.mid
        else:
            run = _block_runner(streamer, i, data.inputs)
            target = data.out
        before, after, kept = fit_stage(run, target, trainable, settings, block=i, stage=k, offset=offset, n_global=n_global, dist=dist, on_step=on_step)
        results.append((StageResult(i, label, trainable.numel(), before, after, kept), trainable))
    return results


def _block_runner(streamer: LayerStreamer, i: int, inputs: torch.Tensor):
    def run(_target: torch.Tensor, idx) -> torch.Tensor:
        return streamer.run_block(i, inputs[idx].to(streamer.device))

    return run


def _attention_runner(streamer: LayerStreamer, i: int, attn: nn.Module, inputs: torch.Tensor):
    """The residual stream after block i's attention: its input + the attention's output (the rest
    of the block is not run)."""

    def run(_target: torch.Tensor, idx) -> torch.Tensor:
        x = inputs[idx].to(streamer.device)
        return x + attention_output(streamer, i, attn, x)

    return run


def attention_output(streamer: LayerStreamer, i: int, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of block i's attention module when the block runs on x (the block stops there)."""
    got: list[torch.Tensor] = []

    def hook(_m, _args, out):
        got.append(_first(out))
        raise _Stop

    h = attn.register_forward_hook(hook)
    try:
        streamer.run_block(i, x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError(f"block {i}'s attention module did not run")
    return got[0]


@torch.no_grad()
def dense_targets(
    dense: LayerStreamer, span: tuple[int, int], hidden: torch.Tensor, mid: torch.Tensor | None, on_window=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs dense blocks span[0]..span[1] over `hidden` [n, L, H] (float32, updated in place to their
    output, window by window on the dense model's device and dtype) and, given a `mid` buffer (a span of
    one block with an attention module), fills it with the residual stream after the attention.
    Returns (hidden, mid or None)."""
    first, last = span
    got: list[torch.Tensor] = []  # the attention's output of the window being run
    filled = None
    for d in range(first, last + 1):
        dense.load_block(d)
        attn = attention_module(dense.blocks[d]) if mid is not None and first == last else None
        handle = attn.register_forward_hook(lambda _m, _a, out: got.append(_first(out).detach())) if attn is not None else None
        filled = mid if attn is not None else None
        try:
            for j in range(hidden.shape[0]):
                x = hidden[j : j + 1].to(dense.device, dense.dtype)
                out = dense.run_block(d, x)
                if filled is not None:
                    filled[j] = (x[0] + got.pop()[0]).float().to(filled.device)
                hidden[j] = out[0].float().to(hidden.device)
                if on_window is not None:
                    on_window()
        finally:
            if handle is not None:
                handle.remove()
        dense.free_block(d)
    return hidden, filled


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """The pruned checkpoint (float32, trained) and the dense one, streamed, and the dense blocks
    each pruned block stands for."""

    pruned: LayerStreamer
    dense: LayerStreamer
    spans: list[tuple[int, int]]


def open_pair(pruned_dir: Path, dense_dir: Path, *, device: str = "auto", dtype: str = "auto", dist: DistInfo | None = None) -> Pair:
    """Both checkpoints, checked to be a pruned copy and its dense model (check_pair)."""
    local_rank = (dist or DistInfo()).local_rank
    pruned = LayerStreamer(pruned_dir, device=device, dtype="float32", local_rank=local_rank)
    dense = LayerStreamer(dense_dir, device=device, dtype=dtype, local_rank=local_rank)
    return Pair(pruned, dense, check_pair(pruned, dense))


def reconstruct(
    pair: Pair,
    samples: torch.Tensor,
    settings: Settings,
    spill: Callable[[int, dict[str, torch.Tensor]], None],
    *,
    dist: DistInfo | None = None,
    progress: bool = False,
) -> Result:
    """Reconstructs every block of the pair's pruned checkpoint against its dense one on `samples`
    [N, L]; the rewritten tensors of each block (float32, checkpoint names) go to spill(block, tensors)."""
    t0 = time.perf_counter()
    info = dist or DistInfo()
    if settings.granularity not in GRANULARITIES:
        raise UsageError(f"unknown granularity {settings.granularity!r}", hint="use sublayer or block")
    if settings.inputs not in INPUTS:
        raise UsageError(f"unknown inputs {settings.inputs!r}", hint="use pruned or dense")
    if samples.shape[0] < info.world_size:
        raise UsageError(f"{samples.shape[0]} samples cannot be shared among {info.world_size} processes", hint="raise --nsamples")
    pruned, dense, spans = pair.pruned, pair.dense, pair.spans
    ctx = dense.max_positions
    if ctx is not None and samples.shape[1] > ctx:
        raise UsageError(f"seqlen {samples.shape[1]} exceeds the model's context of {ctx} tokens", hint=f"pass --seqlen {ctx} or less")
    part = shard_samples(samples.shape[0], info)
    mine = samples[part]
    n, n_global, offset = mine.shape[0], samples.shape[0], int(part.start)
    result = Result(device=str(pruned.device), world_size=info.world_size)
    stages_per_block = 1 if settings.granularity == "block" else 2
    hidden_size = int(getattr(dense.config, "hidden_size", 0) or 0)
    acts = Activations((n, int(mine.shape[1]), hidden_size), 3, pruned.device, spill_env="LLMPRUNE_RECON_SPILL", prefix="llmprune-reconstruct-")
    result.activations = acts.where
    try:
        with BlockProgress(progress and info.rank == 0, pruned.num_blocks, "windows", n) as bar:
            bar.phase("embeddings")
            # x_dense: the dense model's hidden state (block inputs, then outputs); inputs: the pruned
            # model's (pruned) or a copy of the dense ones (dense); mid: the targets after the attention
            x_dense, inputs, mid_buf = acts.new(), acts.new(), acts.new()
            with torch.no_grad():
                x_dense.copy_(dense.capture(mine))
                captured = pruned.capture(mine)  # also records what the blocks are called with
                if settings.inputs == "pruned":
                    inputs.copy_(captured)
                del captured
            for k, span in enumerate(spans):
                whole = span[0] != span[1]  # several dense blocks: no attention output to match
                if settings.inputs == "dense":
                    inputs.copy_(x_dense)
                bar.phase(f"block {k}: dense" + (f" {span[0]}-{span[1]}" if whole else ""), total=n * (span[1] - span[0] + 1))
                want_mid = not whole and settings.granularity == "sublayer"
                _, mid = dense_targets(dense, span, x_dense, mid_buf if want_mid else None, on_window=bar.step)
                pruned.load_block(k)
                try:
                    bar.phase(f"block {k}: fitting", total=settings.steps * stages_per_block)
                    data = BlockData(inputs, x_dense, mid)
                    stages = reconstruct_block(pruned, k, data, settings, offset=offset, n_global=n_global, dist=info, whole=whole, on_step=bar.step)
                    result.stages.extend(st for st, _ in stages)
                    tensors = {name: p.detach().to("cpu", copy=True) for st, tr in stages if st.kept for name, p, _ in tr.items}
                    if tensors:
                        spill(k, tensors)
                        result.changed.extend(tensors)
                    if settings.inputs == "pruned":  # this block's outputs are the next one's inputs
                        bar.phase(f"block {k}: outputs")
                        with torch.no_grad():
                            for j in range(n):
                                inputs[j] = pruned.run_block(k, inputs[j : j + 1].to(pruned.device))[0].to(inputs.device)
                                bar.step()
                finally:
                    pruned.free_block(k)
                bar.block_done(k)
    finally:
        acts.close()
    result.seconds = time.perf_counter() - t0
    return result


class SpilledTensors(Mapping[str, torch.Tensor]):
    """The rewritten tensors, one safetensors file per block in a directory, read back on demand."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.where: dict[str, Path] = {}

    def add(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.dir / f"block-{block:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        for name in tensors:
            self.where[name] = path

    def __contains__(self, name: object) -> bool:
        return name in self.where

    def release(self, names: list[str]) -> None:
        """Forget `names` (written elsewhere), and delete each block file none of whose tensors is left."""
        files = {self.where.pop(n) for n in names if n in self.where}
        for path in files - set(self.where.values()):
            path.unlink(missing_ok=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt", device="cpu") as st:
            return st.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)
