"""Gradient statistics for HyWIA (`llmprune stats MODEL --grad`; docs/sidecar.md, docs/hywia.md).

For every prunable weight W and for three splits of the calibration samples (all, the even-indexed
ones "A", the odd-indexed ones "B"), with g = mean over the split's samples of ∇L_s (L_s: the mean
next-token cross-entropy of sample s) and F = mean of (∇L_s)² (the diagonal empirical Fisher):

    taylor_abs = Σ |w·g|    taylor_sum = Σ w·g    fisher = Σ w²·F    mix_abs = Σ |w·g − ½·w²·F|

each summed per output row (`W.grad_out` [3, 4, out]) and per input column (`W.grad_in` [3, 4, in]).
The structured engine adds rows and columns up into attention groups and MLP channels.

Streamed mode (the default) never holds more than one decoder block's weights: a forward pass block
by block keeps each block's inputs (the activation statistics are taken on the way), the LM head
gives each sample's loss gradient with respect to the last hidden state, then the blocks are visited
in reverse, each reloaded, its forward recomputed from the kept inputs and differentiated against
the upstream gradient, which yields the weight gradients of every sample and the gradient for the
block below. Memory: one block's weights and accumulators plus nsamples × seqlen × hidden floats per
block for the kept inputs (held on the CPU). Full mode loads every block at once and differentiates
the model's own loss; it is the fallback for architectures whose blocks cannot be run one by one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmprune.calibration.activations import StatsResult, collect_stats
from llmprune.calibration.sidecar import GradStats
from llmprune.console import BlockProgress
from llmprune.errors import UsageError
from llmprune.model.buffers import available_memory
from llmprune.model.stream import LayerStreamer

QUANTITIES = ("taylor_abs", "taylor_sum", "fisher", "mix_abs")
SPLITS = ("all", "a", "b")
MODES = ("streamed", "full")


@dataclass
class GradResult:
    layers: dict[str, GradStats]
    stats: StatsResult
    loss: float
    mode: str
    nsamples: int
    seconds: float
    spilled: bool = False  # the kept block inputs went to a temporary file

    def meta(self, seqlen: int) -> dict[str, Any]:
        return {
            "nsamples": self.nsamples,
            "seqlen": seqlen,
            "tokens": self.nsamples * (seqlen - 1),
            "loss": self.loss,
            "mode": self.mode,
            "dtype": self.stats.dtype,
        }


class _GradAccumulator:
    """Σ_s ∇L_s and Σ_s (∇L_s)² of one weight, for split A (even samples) and B (odd samples)."""

    def __init__(self, weight: torch.Tensor, input_axis: int):
        self.weight = weight
        self.input_axis = input_axis
        self.g = torch.zeros((2,) + tuple(weight.shape), dtype=torch.float32, device=weight.device)
        self.g2 = torch.zeros_like(self.g)
        self.n = [0, 0]

    def add(self, sample: int, grad: torch.Tensor) -> None:
        k = sample % 2
        grad = grad.detach().float()
        self.g[k] += grad
        self.g2[k].addcmul_(grad, grad)
        self.n[k] += 1

    def result(self) -> GradStats:
        w = self.weight.detach().float()
        # stored weights are [out, in] (axis 1 is the input) or GPT-2's [in, out]; per-row sums
        # reduce the input axis, per-column sums the other one
        a = self.input_axis
        outs, inps = [], []
        for g_sum, g2_sum, n in (
            (self.g[0] + self.g[1], self.g2[0] + self.g2[1], self.n[0] + self.n[1]),
            (self.g[0], self.g2[0], self.n[0]),
            (self.g[1], self.g2[1], self.n[1]),
        ):
            if n == 0:
                outs.append(torch.zeros((4, w.shape[1 - a]), dtype=torch.float64))
                inps.append(torch.zeros((4, w.shape[a]), dtype=torch.float64))
                continue
            s = w * (g_sum / n)
            h = w * w * (g2_sum / n)
            q = torch.stack([s.abs(), s, h, (s - 0.5 * h).abs()]).double()
            outs.append(q.sum(dim=1 + a).cpu())
            inps.append(q.sum(dim=2 - a).cpu())
        return GradStats(
            out=torch.stack(outs).numpy(),
            inp=torch.stack(inps).numpy(),
            count=np.array([self.n[0] + self.n[1], self.n[0], self.n[1]], dtype=np.int64),
        )


def _sample_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one sample: logits [1, L, V], ids [1, L]."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device))


def _check_samples(samples: torch.Tensor) -> None:
    if samples.dim() != 2 or samples.shape[0] < 1:
        raise UsageError("no calibration samples")
    if samples.shape[1] < 2:
        raise UsageError("gradient statistics need windows of at least 2 tokens", hint="raise --seqlen")


def collect_grad_stats(
    model_dir: str | Path,
    samples: torch.Tensor,
    *,
    device: str = "auto",
    dtype: str = "float32",
    mode: str = "streamed",
    progress: bool = False,
) -> GradResult:
    """Activation and gradient statistics of every prunable weight over `samples` [n, L]."""
    if mode not in MODES:
        raise UsageError(f"unknown gradient mode {mode!r}", hint="use streamed or full")
    _check_samples(samples)
    t0 = time.perf_counter()
    streamer = LayerStreamer(model_dir, device=device, dtype=dtype, with_head=True)
    n = samples.shape[0]
    streamed = mode == "streamed"
    with _InputStore(streamer.num_blocks + 1) as kept:
        on_hidden = kept.put if streamed else None
        stats = collect_stats(model_dir, samples, device=device, dtype=dtype, progress=progress, streamer=streamer, on_hidden=on_hidden)
        if streamed:
            layers, loss = _streamed_backward(streamer, samples, kept, progress)
        else:
            layers, loss = _full_backward(streamer, samples, progress)
    return GradResult(layers=layers, stats=stats, loss=loss, mode=mode, nsamples=n, seconds=time.perf_counter() - t0, spilled=kept.spilled)


class _InputStore:
    """The kept block inputs, in CPU memory, or in a file-backed map in a temporary directory
    ($TMPDIR) when they would take more than half the available memory (or LLMPRUNE_GRAD_SPILL=1)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.items: list[torch.Tensor | None] = [None] * slots
        self.tmp: str | None = None
        self.spilled = False

    def __enter__(self) -> "_InputStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.items = [None] * self.slots
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def put(self, i: int, h: torch.Tensor) -> None:
        if i == 0:
            total = h.numel() * h.element_size() * self.slots
            self.spilled = os.environ.get("LLMPRUNE_GRAD_SPILL") == "1" or total > available_memory() // 2
            if self.spilled:
                self.tmp = tempfile.mkdtemp(prefix="llmprune-grad-")
        if self.spilled:
            assert self.tmp is not None
            t = torch.from_file(os.path.join(self.tmp, f"block{i}.bin"), shared=True, size=h.numel(), dtype=h.dtype).view(h.shape)
            t.copy_(h)
            self.items[i] = t
        else:
            self.items[i] = h.to("cpu", copy=True)

    def take(self, i: int) -> torch.Tensor:
        t = self.items[i]
        assert t is not None, f"block {i} inputs were not kept"
        return t

    def drop(self, i: int) -> None:
        self.items[i] = None
        if self.spilled and self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.tmp, f"block{i}.bin"))


def _prunable_weights(streamer: LayerStreamer, i: int) -> list[tuple[str, torch.Tensor, int]]:
    out = []
    for name, mod, axis in streamer.prunable(i):
        mod.weight.requires_grad_(True)
        out.append((name, mod.weight, axis))
    return out


def _streamed_backward(streamer: LayerStreamer, samples: torch.Tensor, kept: _InputStore, progress: bool) -> tuple[dict[str, GradStats], float]:
    n = samples.shape[0]
    nb = streamer.num_blocks
    dev = streamer.device
    final = kept.take(nb)
    upstream = torch.empty(final.shape, dtype=final.dtype)
    losses = []
    with BlockProgress(progress, nb, "samples", n) as bar:
        bar.phase("loss gradient")
        for j in range(n):
            h = final[j : j + 1].to(dev).requires_grad_(True)
            loss = _sample_loss(streamer.logits(samples[j : j + 1], h, grad=True), samples[j : j + 1])
            (gh,) = torch.autograd.grad(loss, h)
            upstream[j] = gh[0].to(upstream.dtype)
            losses.append(float(loss.detach()))
            bar.step()
        del final
        kept.drop(nb)
        layers: dict[str, GradStats] = {}
        for i in reversed(range(nb)):
            streamer.load_block(i)
            weights = _prunable_weights(streamer, i)
            accs = [_GradAccumulator(w, axis) for _, w, axis in weights]
            inputs = kept.take(i)
            bar.phase(f"block {i} backward")
            for j in range(n):
                h = inputs[j : j + 1].to(dev).requires_grad_(True)
                with torch.enable_grad():
                    out = streamer.run_block(i, h)
                grads = torch.autograd.grad(out, [h] + [w for _, w, _ in weights], grad_outputs=upstream[j : j + 1].to(dev, out.dtype))
                upstream[j] = grads[0][0].to(upstream.dtype)
                for acc, g in zip(accs, grads[1:]):
                    acc.add(j, g)
                bar.step()
            for (name, _, _), acc in zip(weights, accs):
                layers[name] = acc.result()
            del accs, weights, inputs
            kept.drop(i)
            streamer.free_block(i)
            bar.block_done(nb - 1 - i)
    return layers, float(np.mean(losses))


def _full_backward(streamer: LayerStreamer, samples: torch.Tensor, progress: bool) -> tuple[dict[str, GradStats], float]:
    """Every block loaded; the model's own loss (labels = inputs) differentiated per sample."""
    n = samples.shape[0]
    weights = []
    for i in range(streamer.num_blocks):
        streamer.load_block(i)
        weights.extend(_prunable_weights(streamer, i))
    accs = [_GradAccumulator(w, axis) for _, w, axis in weights]
    losses = []
    with BlockProgress(progress, 1, "samples", n) as bar:
        bar.phase("whole-model backward")
        for j in range(n):
            ids = samples[j : j + 1].to(streamer.device)
            with torch.enable_grad():
                out = streamer.model(input_ids=ids, labels=ids, use_cache=False)
            grads = torch.autograd.grad(out.loss, [w for _, w, _ in weights])
            for acc, g in zip(accs, grads):
                acc.add(j, g)
            losses.append(float(out.loss.detach()))
            bar.step()
    layers = {name: acc.result() for (name, _, _), acc in zip(weights, accs)}
    for i in range(streamer.num_blocks):
        streamer.free_block(i)
    return layers, float(np.mean(losses))
