"""Choose where to cut by search: EvoPress's evolutionary search over per-block compression levels
(docs/search.md), layer-streamed.

Every decoder block gets an integer level; a candidate is the tuple of levels. Unstructured methods:
block b is pruned at sparsity S + level_b * step, so the blocks' mean sparsity stays S as long as the
levels sum to zero. Structured: block b removes about S + level_b * step of its own parameters
(uniform allocation's rule at that sparsity), the mean again S. Depth: level 1 removes the block, level 0 keeps it; the levels sum to the number
of blocks removed. The search is EvoPress's (1 + λ) algorithm:

- mutation: a level switch, one block a level up and another a level down, repeated
  min(U(1, m), U(1, m)) times; the sum of the levels (the compression target) never changes;
- multi-step selection: λ offspring are scored on a few calibration tokens, the best survive to
  be scored on more tokens, and so on; the parent joins the last step (elitism);
- fitness: KL(dense || candidate) of the next-token distributions, on the dense model's top-K
  log-probabilities (with one bucket for the remaining mass), cached once before the search.

Candidates are evaluated layer-streamed (model/stream.py): each block is loaded once per selection
step and every candidate's activations pass through it; candidates that agree on the blocks before
block i share their activations up to it. A block at a level is built on the fly from the dense
weights: for mask-only methods with the core's own masks (`_core.compute_mask`, exactly as `apply`
computes them), cached packed (one bit per weight) within a memory budget; for structured methods
with the removed groups zeroed as the core's plan (`_core.StructuredPlanner`) removes them.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmprune.calibration.sidecar import LayerStats
from llmprune.calibration.teacher import TeacherCollector, kd_loss
from llmprune.errors import UsageError
from llmprune.model.stream import LayerStreamer

Candidate = tuple[int, ...]

# EvoPress's published settings for 7-8B models on a GPU (unstructured: 400 generations, 64 offspring,
# survivors 8/2/1 on 2,048/16,384/65,536 tokens; depth: 32 offspring, survivors 2/1 on 2,048/32,768
# tokens, k(n-k)/1.5 generations). llmprune keeps their shape and scales the tokens to windows of
# --seqlen; see docs/search.md for the CPU defaults.
MAX_MUTATIONS = 3


@dataclass
class Settings:
    generations: int
    offspring: int
    survivors: tuple[int, ...]
    tokens: tuple[int, ...]
    seed: int = 0
    max_mutations: int = MAX_MUTATIONS
    initial: int = 0  # random initial candidates (depth), scored on initial_tokens
    initial_tokens: int = 0
    batch_size: int = 8

    def check(self) -> None:
        if self.generations < 1:
            raise UsageError("--generations must be at least 1", hint="e.g. --generations 50")
        if self.offspring < 1:
            raise UsageError("--offspring must be at least 1")
        if not self.survivors or len(self.survivors) != len(self.tokens):
            raise UsageError("--survivors and --tokens need one value per selection step", hint="e.g. --survivors 4,1 --tokens 512,4096")
        if self.survivors[-1] != 1:
            raise UsageError("the last selection step keeps one survivor (the next parent)", hint="end --survivors with 1, e.g. 4,1")
        if any(b > a for a, b in zip(self.survivors, self.survivors[1:])) or self.survivors[0] > self.offspring:
            raise UsageError(f"--survivors {','.join(map(str, self.survivors))} must not grow from step to step nor exceed --offspring {self.offspring}")
        if any(t < 1 for t in self.tokens):
            raise UsageError("--tokens values must be positive")


# ------------------------------------------------------------------------------------------------
# Levels and mutation
# ------------------------------------------------------------------------------------------------


@dataclass
class Space:
    """Per-block levels in [lo[b], hi[b]]; level switches keep their sum."""

    lo: list[int]
    hi: list[int]

    @property
    def blocks(self) -> int:
        return len(self.lo)

    def mutate(self, parent: Candidate, rng: random.Random, max_mutations: int = MAX_MUTATIONS) -> Candidate:
        child = list(parent)
        flips = min(rng.randint(1, max_mutations), rng.randint(1, max_mutations))  # biased to few
        for _ in range(flips):
            down = [b for b in range(self.blocks) if child[b] - 1 >= self.lo[b]]
            up = [b for b in range(self.blocks) if child[b] + 1 <= self.hi[b]]
            if not down or not up:
                break
            d, u = rng.choice(down), rng.choice(up)  # independent draws, as EvoPress's (d == u: no change)
            child[d] -= 1
            child[u] += 1
        return tuple(child)

    def random(self, total: int, rng: random.Random) -> Candidate:
        """A uniformly drawn 0/1 candidate with `total` ones (depth's initial population)."""
        picked = set(rng.sample(range(self.blocks), total))
        return tuple(1 if b in picked else 0 for b in range(self.blocks))


def unstructured_levels(blocks: int, sparsity: float, levels: int, step: float) -> Space:
    """Levels l with 0 <= S + l*step < 1 and |l| <= levels, for every block."""
    lo = -min(levels, math.floor(sparsity / step + 1e-9))
    hi = 0
    while hi < levels and sparsity + (hi + 1) * step < 1 - 1e-9:
        hi += 1
    if lo == 0 and hi == 0:
        raise UsageError(f"no level besides {sparsity:g} fits in [0, 1) with --step {step:g}", hint="use a smaller --step")
    return Space([lo] * blocks, [hi] * blocks)


def level_sparsity(sparsity: float, step: float, level: int) -> float:
    return round(sparsity + level * step, 12)


def default_step(sparsity: float, levels: int) -> float:
    """min(S, 1 - S) / levels: the levels reach from the target to 0 or to 1 in `levels` steps."""
    return min(sparsity, 1 - sparsity) / levels


# ------------------------------------------------------------------------------------------------
# Blocks at a level
# ------------------------------------------------------------------------------------------------


class MaskLevels:
    """Block i at level l for a mask-only method: the dense weights zeroed by the core's mask at
    sparsity(l) (the masks `apply` writes, bit for bit). Masks are cached packed, least recently
    used first out, within `budget` bytes."""

    def __init__(self, streamer: LayerStreamer, method: str, stats: dict[str, LayerStats] | None, sparsity_of: Callable[[int], float], budget: int):
        self.streamer, self.method, self.stats, self.sparsity_of = streamer, method, stats, sparsity_of
        self.budget = budget
        self._cache: OrderedDict[tuple[int, int], dict[str, tuple[np.ndarray, tuple[int, int]]]] = OrderedDict()
        self._bytes = 0
        self._dense: dict[str, torch.Tensor] = {}
        self._dense_np: dict[str, np.ndarray] | None = None
        self._block = -1
        self.built = 0  # masks computed (not from the cache)

    def begin(self, i: int) -> None:
        """Block i was just loaded: remember its dense weights."""
        self._block = i
        self._dense = {name: mod.weight.detach().clone() for name, mod, _ in self.streamer.prunable(i)}
        self._dense_np = None

    def end(self, i: int) -> None:
        self._dense, self._dense_np = {}, None

    def masks(self, i: int, level: int) -> dict[str, np.ndarray]:
        """{weight name: bool mask [out, in], True = pruned} of block i at `level`."""
        key = (i, level)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return {name: np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool) for name, (bits, shape) in hit.items()}
        out = self._compute(i, self.sparsity_of(level))
        packed = {name: (np.packbits(m), m.shape) for name, m in out.items()}
        size = sum(b.nbytes for b, _ in packed.values())
        if size <= self.budget:
            while self._bytes + size > self.budget and self._cache:
                _, old = self._cache.popitem(last=False)
                self._bytes -= sum(b.nbytes for b, _ in old.values())
            self._cache[key] = packed
            self._bytes += size
        return out

    def _originals(self, i: int) -> dict[str, np.ndarray]:
        """Block i's prunable weights as the checkpoint stores them, upcast exactly, [out, in]."""
        if self._dense_np is None or self._block != i:
            items = self.streamer.prunable(i)
            loaded = self.streamer.ckpt.load([n for n, _, _ in items], torch.device("cpu"), torch.float32)
            self._dense_np = {n: np.ascontiguousarray((loaded[n].t() if axis == 0 else loaded[n]).numpy(), dtype=np.float32) for n, _, axis in items}
        return self._dense_np

    def _compute(self, i: int, sparsity: float) -> dict[str, np.ndarray]:
        self.built += 1
        out = {}
        for name, w in self._originals(i).items():
            m = self._mask_of(name, w, sparsity)
            if m is not None:
                out[name] = m
        return out

    def _mask_of(self, name: str, w: np.ndarray, sparsity: float) -> np.ndarray | None:
        """The core's mask of one weight [out, in]; None for a weight apply keeps (an expert no
        calibration token reached has no statistics)."""
        from llmprune.calibration.sequential import core_compute_mask

        s = self.stats.get(name) if self.stats is not None else None
        if self.stats is not None and s is None:
            return None
        kw: dict[str, Any] = {"act_sum": s.act_sum, "act_sqsum": s.act_sqsum, "act_count": s.act_count} if s is not None else {}
        return np.asarray(core_compute_mask(w, self.method, sparsity=sparsity, name=name, **kw), dtype=bool)

    def skips(self, level: int) -> bool:
        return False

    def set(self, i: int, level: int) -> None:
        """Put block i (loaded, begin() called) at `level`."""
        masks = self.masks(i, level)
        for name, mod, axis in self.streamer.prunable(i):
            dense = self._dense[name]
            m = masks.get(name)
            with torch.no_grad():
                if m is None:
                    mod.weight.copy_(dense)
                    continue
                mt = torch.from_numpy(m)
                mod.weight.copy_(dense.masked_fill((mt.t() if axis == 0 else mt).to(dense.device), 0))


def unpack_lower(packed: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose lower triangle is `packed` (row-major, as the Gram sidecar stores it)."""
    n = int((math.isqrt(8 * packed.shape[0] + 1) - 1) // 2)
    full = np.zeros((n, n), dtype=np.float64)
    rows, cols = np.tril_indices(n)
    full[rows, cols] = packed
    full[cols, rows] = packed
    return full


class SweepLevels(MaskLevels):
    """Block i at level l for methods that update the kept weights (sparsegpt, or --update on a mask
    method): the core's SparseGPT sweep on the Gram sidecar's matrices (`_core.sparsegpt`, as apply
    runs it), computed once per (block, level) and kept on disk in the checkpoint's dtype, one file
    per block and level, in a temporary directory removed with the builder (or `close()`)."""

    def __init__(
        self,
        streamer: LayerStreamer,
        method: str,
        stats: dict[str, LayerStats] | None,
        sparsity_of: Callable[[int], float],
        gram_path: Any,
        *,
        damp: float,
        blocksize: int,
    ):
        super().__init__(streamer, method, stats, sparsity_of, 0)
        import shutil
        import tempfile
        import weakref

        from llmprune import _core

        _, self._gram = _core.read_gram(str(gram_path))
        self._by_weight = {w: key for key, (weights, _, _) in self._gram.items() for w in weights}
        self.damp, self.blocksize = damp, blocksize
        self.dtype = streamer.ckpt.float_dtype()
        self.tmp = Path(tempfile.mkdtemp(prefix="llmprune-search-"))
        self.bytes_on_disk = 0
        # removed when the builder goes, or at exit (an error or Ctrl-C included)
        self.close = weakref.finalize(self, shutil.rmtree, str(self.tmp), True)

    def _weights(self, i: int, level: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        from llmprune.calibration.sequential import core_sparsegpt

        path = self.tmp / f"block{i}-level{level}.safetensors"
        if path.is_file():
            return load_file(str(path))
        sparsity = self.sparsity_of(level)
        out = {}
        for name, w in self._originals(i).items():
            key = self._by_weight.get(name)
            if key is None:  # no Gram matrix (an expert no token reached): apply keeps it
                continue
            target: dict[str, Any] = {"sparsity": sparsity}
            if self.method != "sparsegpt":
                mask = self._mask_of(name, w, sparsity)
                if mask is None:
                    continue
                target = {"mask": np.ascontiguousarray(mask, dtype=np.bool_)}
            h = unpack_lower(self._gram[key][1])
            new_w, _, _ = core_sparsegpt(w, h, damp=self.damp, blocksize=self.blocksize, **target)
            out[name] = torch.from_numpy(np.ascontiguousarray(new_w)).to(self.dtype)
        save_file(out, str(path))
        self.bytes_on_disk += path.stat().st_size
        self.built += 1
        return out

    def set(self, i: int, level: int) -> None:
        new = self._weights(i, level)
        for name, mod, axis in self.streamer.prunable(i):
            w = new.get(name)
            with torch.no_grad():
                if w is None:
                    mod.weight.copy_(self._dense[name])
                else:
                    mod.weight.copy_((w.t() if axis == 0 else w).to(mod.weight.device, mod.weight.dtype))


def _keep_mask(ranges: list[tuple[int, int]] | None, n: int) -> torch.Tensor | None:
    """A bool vector of length n, True on the kept ranges; None when the whole axis is kept."""
    if ranges is None:
        return None
    keep = torch.zeros(n, dtype=torch.bool)
    for a, b in ranges:
        keep[a:b] = True
    return keep


class StructuredLevels:
    """Block i at level l for a structured method: the groups `apply --allocation FILE` removes from
    that block at sparsity(l) (the core's own plan, `_core.StructuredPlanner`) zeroed in the dense
    weights, with the compensated biases it writes. A zeroed attention group or MLP channel adds
    nothing to the block's output, so the block computes what the physically smaller one does. The
    plans (kept ranges and biases, no weights) are cached for every (block, level)."""

    def __init__(self, streamer: LayerStreamer, planner: Any, sparsity_of: Callable[[int], float]):
        self.streamer, self.planner, self.sparsity_of = streamer, planner, sparsity_of
        self._cache: dict[tuple[int, int], dict[str, Any]] = {}
        self._dense: dict[str, tuple[Any, torch.Tensor, torch.Tensor | None]] = {}
        self.built = 0

    def plan(self, i: int, level: int) -> dict[str, Any]:
        key = (i, level)
        if key not in self._cache:
            self._cache[key] = self.planner.layer(i, self.sparsity_of(level))
            self.built += 1
        return self._cache[key]

    def begin(self, i: int) -> None:
        self._dense = {}
        for name, mod, _ in self.streamer.prunable(i):
            bias = mod.bias.detach().clone() if getattr(mod, "bias", None) is not None else None
            self._dense[name] = (mod, mod.weight.detach().clone(), bias)

    def end(self, i: int) -> None:
        self._dense = {}

    def skips(self, level: int) -> bool:
        return False

    def set(self, i: int, level: int) -> None:
        p = self.plan(i, level)
        slices, tensors = p["slices"], p["tensors"]
        for name, (mod, dense, dense_bias) in self._dense.items():
            w = dense
            cut = slices.get(name)
            if cut is not None:
                rows, cols = _keep_mask(cut[0], dense.shape[0]), _keep_mask(cut[1], dense.shape[1])
                w = dense.clone()
                if rows is not None:
                    w[~rows.to(w.device)] = 0
                if cols is not None:
                    w[:, ~cols.to(w.device)] = 0
            bname = name[: -len(".weight")] + ".bias" if name.endswith(".weight") else name + ".bias"
            b = dense_bias
            if bname in tensors:
                b = torch.from_numpy(np.asarray(tensors[bname][1])).to(dense.device, dense.dtype)
                if b.shape[0] != dense.shape[0]:  # an added bias of an input projection: its kept rows
                    keep = _keep_mask(cut[0] if cut is not None else None, dense.shape[0])
                    full = torch.zeros(dense.shape[0], dtype=dense.dtype, device=dense.device)
                    full[keep.to(full.device) if keep is not None else slice(None)] = b
                    b = full
            elif dense_bias is not None and bname in slices:
                keep = _keep_mask(slices[bname][0], dense_bias.shape[0])
                b = dense_bias.clone()
                if keep is not None:
                    b[~keep.to(b.device)] = 0
            with torch.no_grad():
                mod.weight.copy_(w)
                if b is not None:
                    if getattr(mod, "bias", None) is None:
                        self.streamer.add_block_parameter(i, mod, "bias", b.clone())
                    else:
                        mod.bias.copy_(b)
                elif getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()  # added for another level of this block


class DepthLevels:
    """Level 1 removes block i (its input passes through unchanged), level 0 keeps it."""

    def begin(self, i: int) -> None:
        pass

    def end(self, i: int) -> None:
        pass

    def skips(self, level: int) -> bool:
        return level == 1

    def set(self, i: int, level: int) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# Fitness, layer-streamed
# ------------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    """The dense model's top-K next-token log-probabilities on the calibration windows."""

    topk_ids: torch.Tensor  # [N, L, K]
    topk_logprobs: torch.Tensor
    rest_logprob: torch.Tensor  # [N, L]


class Evaluator:
    """Scores candidates by KL(dense || candidate) on chosen windows, streaming the blocks: each block
    is loaded once per call, and candidates with the same levels on blocks 0..i-1 share activations."""

    def __init__(self, streamer: LayerStreamer, samples: torch.Tensor, builder: Any, *, topk: int, batch_size: int = 8, progress: Any = None):
        self.streamer, self.samples, self.builder, self.batch = streamer, samples, builder, batch_size
        self.progress = progress
        self.inputs = streamer.capture(samples)  # block 0's inputs of every window
        self.teacher = self._dense_teacher(topk)
        self.tokens_scored = 0

    def _run(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(h)
        for a in range(0, h.shape[0], self.batch):
            out[a : a + self.batch] = self.streamer.run_block(i, h[a : a + self.batch])
        return out

    @torch.no_grad()
    def _dense_teacher(self, k: int) -> Teacher:
        s = self.streamer
        h = self.inputs.clone()
        for i in range(s.num_blocks):
            s.load_block(i)
            try:
                h = self._run(i, h)
            finally:
                s.free_block(i)
        collect = TeacherCollector(s, self.samples, k)
        collect(s.num_blocks, h)
        return Teacher(collect.topk_ids, collect.topk_logprobs, collect.rest)

    @torch.no_grad()
    def fitness(self, candidates: Sequence[Candidate], windows: Sequence[int]) -> list[float]:
        s = self.streamer
        idx = torch.as_tensor(list(windows), dtype=torch.long)
        groups: dict[Candidate, torch.Tensor] = {(): self.inputs[idx.to(self.inputs.device)]}
        for i in range(s.num_blocks):
            wanted: dict[int, set[Candidate]] = {}
            for c in candidates:
                wanted.setdefault(c[i], set()).add(c[:i])
            loaded = False
            new: dict[Candidate, torch.Tensor] = {}
            try:
                for level in sorted(wanted):
                    run = not self.builder.skips(level)
                    if run:
                        if not loaded:
                            s.load_block(i)
                            self.builder.begin(i)
                            loaded = True
                        self.builder.set(i, level)
                    for prefix in sorted(wanted[level]):
                        h = groups[prefix]
                        new[prefix + (level,)] = self._run(i, h) if run else h
            finally:
                if loaded:
                    self.builder.end(i)
                    s.free_block(i)
            groups = new
            if self.progress is not None:
                self.progress(i)
        out = []
        for c in candidates:
            h = groups[c]
            total = 0.0
            for j, w in enumerate(idx.tolist()):
                logits = s.logits(self.samples[w : w + 1], h[j : j + 1])[0]
                t = self.teacher
                total += float(kd_loss(logits, t.topk_ids[w].to(logits.device), t.topk_logprobs[w].to(logits.device), t.rest_logprob[w].to(logits.device)))
            out.append(total / len(idx))
        self.tokens_scored += len(candidates) * len(idx) * self.samples.shape[1]
        return out


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    best: Candidate
    fitness: float  # the best candidate's fitness on the last selection step's windows
    history: list[float] = field(default_factory=list)  # per generation
    generations_done: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    start: Candidate | None = None


def windows_for(tokens: int, seqlen: int, n: int) -> int:
    """Whole windows that hold at least `tokens` tokens (at most all n)."""
    return max(1, min(n, math.ceil(tokens / seqlen)))


def evolve(
    evaluate: Callable[[Sequence[Candidate], Sequence[int]], list[float]],
    space: Space,
    settings: Settings,
    *,
    nwindows: int,
    seqlen: int,
    start: Candidate | None = None,
    depth_total: int | None = None,
    extra_initial: Sequence[Candidate] = (),
    on_generation: Callable[[int, float, Candidate], None] | None = None,
) -> Result:
    """EvoPress's (1 + λ) search with level-switch mutation and multi-step selection; deterministic
    for a seed. Ctrl-C ends it with the best candidate so far (`interrupted`)."""
    rng = random.Random(settings.seed)
    t0 = time.perf_counter()

    def pick(tokens: int) -> list[int]:
        return sorted(rng.sample(range(nwindows), windows_for(tokens, seqlen, nwindows)))

    result = Result(best=start if start is not None else tuple([0] * space.blocks), fitness=math.inf)
    try:
        if depth_total is not None and settings.initial > 0:
            pool: list[Candidate] = list(dict.fromkeys(extra_initial))
            tries = 0
            while len(pool) < settings.initial + len(extra_initial) and tries < 100 * settings.initial:
                tries += 1
                c = space.random(depth_total, rng)
                if c not in pool:
                    pool.append(c)
            scores = evaluate(pool, pick(settings.initial_tokens))
            j = int(np.argmin(scores))
            result.best, result.fitness = pool[j], scores[j]
        result.start = result.best
        for g in range(settings.generations):
            parent = result.best
            offspring: list[Candidate] = []
            tries = 0
            while len(offspring) < settings.offspring and tries < 100 * settings.offspring:
                tries += 1
                child = space.mutate(parent, rng, settings.max_mutations)
                if child != parent and child not in offspring:
                    offspring.append(child)
            if not offspring:
                break
            cands = offspring
            for k, (keep, tokens) in enumerate(zip(settings.survivors, settings.tokens)):
                if k == len(settings.survivors) - 1 and parent not in cands:
                    cands = cands + [parent]
                fits = evaluate(cands, pick(tokens))
                order = sorted(range(len(cands)), key=lambda j: (fits[j], j))[:keep]
                cands, fits = [cands[j] for j in order], [fits[j] for j in order]
            result.best, result.fitness = cands[0], fits[0]
            result.history.append(result.fitness)
            result.generations_done = g + 1
            if on_generation is not None:
                on_generation(g, result.fitness, result.best)
    except KeyboardInterrupt:
        result.interrupted = True
    result.seconds = time.perf_counter() - t0
    return result
