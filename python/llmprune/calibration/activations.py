"""The calibration pass: per-input-channel Σx and Σx² of every prunable linear, one block at a time.

Hooks on each nn.Linear / Conv1D inside the decoder block being run accumulate float64 sums on the
compute device. In sequential mode (Wanda / STADE's own algorithm) block i is pruned in memory right
after its statistics are complete, and its outputs are recomputed with the pruned weights before they
feed block i+1 (sequential.py). Under torchrun each rank runs a disjoint slice of the samples and the
sums are all-reduced block by block (distributed.py), so every rank prunes identically and rank 0
writes the result. With a GramTarget the same pass also sums each block's input Gram matrices
(gram.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmprune.calibration.distributed import DistInfo, shard_samples
from llmprune.calibration.gram import GramPass, GramSummary, GramTarget
from llmprune.calibration.routing import ExpertHooks
from llmprune.calibration.sequential import MaskFn, Sequential, core_compute_mask, prune_block
from llmprune.calibration.sidecar import BlockStats, LayerStats
from llmprune.console import BlockProgress
from llmprune.errors import UsageError
from llmprune.model.skeleton import Linear
from llmprune.model.stream import LayerStreamer


@dataclass
class StatsResult:
    layers: dict[str, LayerStats]
    tokens: int
    blocks: int
    seconds: float
    device: str
    dtype: str
    world_size: int = 1
    sequential: Sequential | None = None
    pruned: dict[str, int] = field(default_factory=dict)  # sequential mode: weights zeroed per tensor
    gram: GramSummary | None = None  # with a GramTarget: the Gram sidecar written
    block_cos: BlockStats | None = None  # Σ cos(block input, block output) per block (Block Influence)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)  # MoE routing statistics (routing.py)
    unreached: list[str] = field(default_factory=list)  # linears no calibration token reached (MoE experts)
    uncompensated: list[str] = field(default_factory=list)  # sequential --compensate: linears that cannot carry a bias

    @property
    def mode(self) -> str:
        return "dense" if self.sequential is None else "sequential"


# --------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------


class _Accumulator:
    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sqsum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)


class _BlockHooks:
    """Forward pre-hooks on a block's linears. Layers fed the same tensor (q/k/v, gate/up) share
    one reduction of it."""

    def __init__(self, prunable: list[tuple[str, Linear, int]], device: torch.device):
        self.accs: dict[str, _Accumulator] = {}
        self._handles = []
        self._last: tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor, int]] | None = None
        for name, mod, axis in prunable:
            in_features = int(mod.weight.shape[axis])
            acc = _Accumulator(in_features, device)
            self.accs[name] = acc
            self._handles.append(mod.register_forward_pre_hook(self._hook(acc, in_features)))

    def _reduce(self, x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        x2 = x.detach().reshape(-1, in_features).to(torch.float64)
        r = (x2.sum(dim=0), (x2 * x2).sum(dim=0), int(x2.shape[0]))
        self._last = (x, x._version, r)
        return r

    def _hook(self, acc: _Accumulator, in_features: int):
        def hook(_mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            s, sq, n = self._reduce(x, in_features)
            acc.sum += s
            acc.sqsum += sq
            acc.count += n

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def reduce_across(self, info: DistInfo) -> None:
        if not info.active or not self.accs:
            return
        accs = list(self.accs.values())
        flat = torch.cat([t for a in accs for t in (a.sum, a.sqsum)])
        counts = torch.cat([a.count for a in accs])
        info.all_reduce_(flat)
        info.all_reduce_(counts)
        off = 0
        for k, a in enumerate(accs):
            n = a.sum.numel()
            a.sum.copy_(flat[off : off + n])
            a.sqsum.copy_(flat[off + n : off + 2 * n])
            off += 2 * n
            a.count.copy_(counts[k : k + 1])

    def results(self, axes: dict[str, int]) -> dict[str, LayerStats]:
        """The statistics of every linear that saw at least one token (an MoE expert no calibration
        token was routed to has none, and is left out)."""
        return {
            name: LayerStats(
                act_sum=a.sum.cpu().numpy(),
                act_sqsum=a.sqsum.cpu().numpy(),
                act_count=int(a.count.item()),
                input_axis=axes[name],
            )
            for name, a in self.accs.items()
            if int(a.count.item()) > 0
        }


def _moe_name(streamer: LayerStreamer, i: int, rel: str, router: str) -> str:
    """The checkpoint's name of MoE module `rel` of block i (found through its router's weight)."""
    qual = f"{streamer.block_prefix(i)}.{rel}.{router}.weight"
    name = streamer.checkpoint_name(qual)
    if name is None:
        raise UsageError(f"tensor {qual} is missing from the checkpoint in {streamer.ckpt.dir}")
    return name.removesuffix(f".{router}.weight")


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ over the tokens of one window ([L, H] each) of cos(a_t, b_t): float32 cosines, a float64
    sum left on the device (no synchronization per window)."""
    a, b = a.float(), b.float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(torch.finfo(torch.float32).tiny)
    return cos.double().sum()


def collect_stats(
    model_dir: str | Path,
    samples: torch.Tensor,
    *,
    device: str = "auto",
    dtype: str = "auto",
    sequential: Sequential | None = None,
    dist: DistInfo | None = None,
    progress: bool = False,
    mask_fn: MaskFn | None = None,
    streamer: LayerStreamer | None = None,
    on_hidden: Callable[[int, torch.Tensor], None] | None = None,
    gram: GramTarget | None = None,
    on_pruned: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> StatsResult:
    """Statistics of every prunable weight over `samples` ([nsamples, seqlen] token ids).

    With `dist` active, `samples` are the full set: this rank takes its slice and the sums are
    all-reduced, so every rank returns the global statistics. `on_hidden(i, h)` sees the inputs of
    block i ([n, L, H], a buffer reused afterwards: copy what you keep) and, with i = number of
    blocks, the last block's outputs; the gradient pass keeps them. With `gram`, the Gram matrices of
    every block's inputs are written there as the blocks complete (gram.py). In sequential mode,
    `on_pruned(i, weights)` receives block i's pruned weights (float32, as the checkpoint lays them out).
    """
    t0 = time.perf_counter()
    info = dist or DistInfo()
    if samples.dim() != 2 or samples.shape[0] < 1 or samples.shape[1] < 1:
        raise UsageError("no calibration samples")
    if samples.shape[0] < info.world_size:
        raise UsageError(f"{samples.shape[0]} samples cannot be shared among {info.world_size} processes", hint="raise --nsamples")
    if streamer is None:
        streamer = LayerStreamer(model_dir, device=device, dtype=dtype, local_rank=info.local_rank)
    ctx = streamer.max_positions
    if ctx is not None and samples.shape[1] > ctx:
        raise UsageError(f"seqlen {samples.shape[1]} exceeds the model's context of {ctx} tokens", hint=f"pass --seqlen {ctx} or less")
    if sequential is not None and sequential.allocation == "schedule" and len(sequential.block_sparsity or []) != streamer.num_blocks:
        raise UsageError(f"the schedule has {len(sequential.block_sparsity or [])} sparsities, but {model_dir} has {streamer.num_blocks} decoder blocks")
    if sequential is not None and sequential.allocation == "owl" and sequential.block_sparsity is None:
        sequential.block_sparsity = owl_block_sparsity(model_dir, samples, sequential, info, progress, streamer)
    mine = samples[shard_samples(samples.shape[0], info)]
    n = mine.shape[0]
    mask_fn = mask_fn or core_compute_mask
    layers: dict[str, LayerStats] = {}
    experts: dict[str, dict[str, Any]] = {}
    unreached: list[str] = []
    uncompensated: list[str] = []
    pruned: dict[str, int] = {}
    grams = None
    if sequential is not None and sequential.reconstructs and gram is None:
        raise UsageError(
            f"sequential {sequential.method}{' with --update' if sequential.update else ''} updates weights from each block's Gram matrices", hint="add --gram"
        )
    if gram is not None:
        seq_meta = sequential.as_meta() if sequential is not None else None
        grams = GramPass(gram, streamer, info, tokens=int(samples.numel()), mode="dense" if sequential is None else "sequential", sequential=seq_meta)
    gram_summary = None
    # Block Influence: Σ over this rank's tokens of cos(block input, block output), per block
    cos_sum = torch.zeros(streamer.num_blocks, dtype=torch.float64, device=streamer.device)
    with BlockProgress(progress and info.rank == 0, streamer.num_blocks, "samples", n) as bar, torch.no_grad(), grams or nullcontext():
        bar.phase("embeddings")
        hidden = streamer.capture(mine, on_sample=bar.step)
        for i in range(streamer.num_blocks):
            if on_hidden is not None:
                on_hidden(i, hidden)
            streamer.load_block(i)
            prunable = streamer.prunable(i)
            # before the stats hooks: on block 0 it runs the first window once to see shared inputs
            gram_hooks = grams.block(i, hidden) if grams is not None else None
            hooks = _BlockHooks(prunable, streamer.device)
            moe_hooks = ExpertHooks(streamer.blocks[i], functools.partial(_moe_name, streamer, i), streamer.device)
            bar.phase(f"block {i}")
            try:
                for j in range(n):
                    out = streamer.run_block(i, hidden[j : j + 1])
                    if sequential is None:
                        cos_sum[i] += token_cosines(hidden[j], out[0])
                        hidden[j] = out[0]
                    bar.step()
            finally:
                hooks.remove()
                moe_hooks.remove()
                if gram_hooks is not None:
                    gram_hooks.remove()
            hooks.reduce_across(info)
            moe_hooks.reduce_across(info)
            experts.update(moe_hooks.results())
            block_grams = None
            if grams is not None:
                assert gram_hooks is not None
                grams.commit(gram_hooks)
                if sequential is not None and sequential.reconstructs:
                    block_grams = gram_hooks.full_matrices()
                del gram_hooks
            block_stats = hooks.results({name: axis for name, _, axis in prunable})
            layers.update(block_stats)
            unreached.extend(name for name, _, _ in prunable if name not in block_stats)
            del hooks
            if sequential is not None:
                kept: dict[str, torch.Tensor] | None = {} if on_pruned is not None else None
                zeroed, skipped = prune_block(streamer, i, block_stats, sequential, mask_fn, block_grams, keep=kept)
                if on_pruned is not None and kept is not None:
                    on_pruned(i, kept)
                del kept
                pruned.update(zeroed)
                uncompensated.extend(skipped)
                del block_grams
                bar.phase(f"block {i} (pruned)")
                for j in range(n):
                    out = streamer.run_block(i, hidden[j : j + 1])[0]
                    cos_sum[i] += token_cosines(hidden[j], out)
                    hidden[j] = out
                    bar.step()
            streamer.free_block(i)
            bar.block_done(i)
        if on_hidden is not None:
            on_hidden(streamer.num_blocks, hidden)
        if grams is not None:
            gram_summary = grams.finish()
    tokens = max((s.act_count for s in layers.values()), default=0)
    info.all_reduce_(cos_sum)
    cos_sum = cos_sum.cpu()
    total_tokens = int(samples.shape[0] * samples.shape[1])
    block_cos = BlockStats(cos_sum.numpy(), np.full(streamer.num_blocks, total_tokens, dtype=np.int64))
    return StatsResult(
        layers=layers,
        tokens=tokens,
        blocks=streamer.num_blocks,
        seconds=time.perf_counter() - t0,
        device=str(streamer.device),
        dtype=str(streamer.dtype).replace("torch.", ""),
        world_size=info.world_size,
        sequential=sequential,
        pruned=pruned,
        gram=gram_summary,
        block_cos=block_cos,
        experts=experts,
        unreached=unreached,
        uncompensated=uncompensated,
    )


def owl_block_sparsity(model_dir: str | Path, samples: torch.Tensor, seq: Sequential, info: DistInfo, progress: bool, streamer: LayerStreamer) -> list[float]:
    """OWL's per-block sparsities for a sequential run: a dense pass over the same samples first
    (OWL ranks blocks by the dense model's outliers), then the core's allocation, exactly what
    `apply --allocation owl` computes from a dense sidecar."""
    from llmprune import _core

    dense = collect_stats(model_dir, samples, sequential=None, dist=info, progress=progress, streamer=streamer)
    m, lam = seq.owl_params()
    assert seq.sparsity is not None, "an N:M pattern with an allocation is refused before the pass"
    layers = {k: (v.act_sum.tolist(), v.act_sqsum.tolist(), int(v.act_count), int(v.input_axis)) for k, v in dense.layers.items()}
    try:
        return list(_core.owl_allocation(str(model_dir), layers, sparsity=seq.sparsity, owl_m=m, owl_lambda=lam))
    except _core.LlmpruneError as exc:  # the core's errors become usage errors
        raise UsageError(str(exc), getattr(exc, "hint", None)) from None
