"""How long a layer-streamed pass (stats, eval) will take on this machine, before it starts: the
model's matrix-multiply work per token, over the speed this CPU multiplies float32 matrices at."""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

# Repeated decoder blocks (the core's default rule for prunable tensors).
BLOCK_RE = re.compile(r"(^|\.)(layers|h|blocks)\.\d+\.")
# Share of the measured matmul speed a whole pass reaches (block loading, hooks, float64 sums, norms,
# softmax): `stats --nsamples 4 --seqlen 512` of SmolLM2-135M took 52 s on two CPU threads that
# multiply at 45 GFLOP/s, for 471 GFLOP of work.
PASS_EFFICIENCY = 0.2


def pass_flops(model: Path, tokens: int, seqlen: int) -> float:
    """Multiply-add work of a forward pass over `tokens` tokens in windows of `seqlen`: 2 flops per
    block weight per token, plus causal attention (scores and weighted sum, on average over half the
    window)."""
    from llmprune.model.checkpoint import Checkpoint

    ckpt = Checkpoint(model)
    weights = 0
    layers: set[str] = set()
    hidden = 0
    for name in ckpt.entries:
        shape = ckpt.shape(name)
        m = BLOCK_RE.search(name)
        if m is None or len(shape) != 2:
            continue
        layers.add(name[: m.end()])
        weights += shape[0] * shape[1]
        hidden = max(hidden, min(shape))
    attention = 2 * 2 * (seqlen / 2) * hidden * len(layers)
    return tokens * (2 * weights + attention)


@functools.cache
def matmul_flops_per_second(seconds: float = 0.2) -> float:
    """float32 matrix-multiply speed of this CPU with torch's current threads."""
    import torch

    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        n += 1
    return n * 2 * 512 * 1024 * 1024 / elapsed


def pass_seconds(model: Path, nsamples: int, seqlen: int) -> float:
    """Estimated seconds of a stats or eval pass of nsamples windows of seqlen tokens on the CPU."""
    return pass_flops(model, nsamples * seqlen, seqlen) / (matmul_flops_per_second() * PASS_EFFICIENCY)


def duration(seconds: float) -> str:
    """An estimate for a warning: seconds below 90, minutes below 90, hours beyond."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# Share of a search's block work that is not shared between candidates: the evaluator runs blocks
# 0..i-1 once for every candidate with the same levels there, and a level switch moves two random
# blocks, the first of which sits on average a third of the way in.
SEARCH_UNSHARED = 2 / 3
# Share of the matmul speed a search's no-grad evaluation reaches (no statistics to gather): on SmolLM2-135M
# `search --method wanda --sparsity 0.7 --generations 3` took 98 s and a 15-generation depth search
# removing 6 blocks 185 s, on two idle CPU threads, against 99 s and 257 s estimated with this share.
SEARCH_EFFICIENCY = 0.6


def search_seconds(
    model: Path,
    *,
    generations: int,
    offspring: int,
    survivors: tuple[int, ...],
    tokens: tuple[int, ...],
    nsamples: int,
    seqlen: int,
    initial: int = 0,
    initial_tokens: int = 0,
    kept_blocks: float = 1.0,
) -> float:
    """Estimated seconds of `llmprune search` on the CPU: the dense scoring of all windows, then per
    generation the offspring on the first step's windows and each step's survivors (and the parent) on
    the next step's, every candidate through the blocks it keeps (`kept_blocks`, a fraction) and the
    head."""
    import json

    def windows(t: int) -> int:  # whole windows of the step, as the search picks them
        return max(1, min(nsamples, -(-t // seqlen)))

    per_generation = offspring * windows(tokens[0])
    for step in range(1, len(tokens)):
        per_generation += (survivors[step - 1] + (step == len(tokens) - 1)) * windows(tokens[step])
    candidate_windows = generations * per_generation + initial * windows(initial_tokens)
    try:
        config = json.loads((model / "config.json").read_text())
        config = config.get("text_config", config)
        head = 2.0 * int(config.get("vocab_size") or 0) * int(config.get("hidden_size") or 0)
    except (OSError, ValueError, AttributeError):
        head = 0.0
    block = pass_flops(model, seqlen, seqlen)  # one window through every block
    flops = 3 * nsamples * (block + head * seqlen)  # the dense teacher; the start and the best on every window
    flops += candidate_windows * (SEARCH_UNSHARED * kept_blocks * block + head * seqlen)
    return flops / (matmul_flops_per_second() * SEARCH_EFFICIENCY)
