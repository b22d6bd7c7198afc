"""Perplexity with Wanda's protocol, layer-streamed (lm-evaluation-harness tasks: harness.py).

Perplexity: the evaluation text tokenized once, cut into non-overlapping windows of `seqlen` tokens
(the incomplete tail window dropped), every window run through the model from its first token;
ppl = exp(mean NLL over all predicted tokens), the loss computed in float32. The model runs one
decoder block at a time (stream.py); windows are processed in chunks so that their activations stay
within a memory budget.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.console import BlockProgress
from llmprune.errors import UsageError
from llmprune.model.stream import LayerStreamer

# Bytes of window activations held at once; more windows are processed in further chunks.
ACTIVATION_BUDGET = 2 << 30


@dataclass
class EvalResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float
    device: str
    dtype: str


def perplexity(
    model_dir: str | Path,
    ids: torch.Tensor,
    seqlen: int,
    *,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    activation_budget: int = ACTIVATION_BUDGET,
) -> EvalResult:
    """Perplexity of the checkpoint on token ids [1, N] (or [N]) in windows of `seqlen`."""
    t0 = time.perf_counter()
    flat = ids.reshape(-1)
    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2 to predict any token, not {seqlen}")
    windows = flat.numel() // seqlen
    if windows < 1:
        raise UsageError(
            f"--seqlen {seqlen} is longer than the evaluation text ({flat.numel()} tokens)",
            hint="pass a smaller --seqlen, a larger --max-tokens, or a longer --data source",
        )
    streamer = LayerStreamer(model_dir, device=device, dtype=dtype, with_head=True)
    ctx = streamer.max_positions
    if ctx is not None and seqlen > ctx:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context of {ctx} tokens", hint=f"pass --seqlen {ctx} or less")
    batches = flat[: windows * seqlen].view(windows, seqlen)
    hidden_size = int(getattr(streamer.config, "hidden_size", 0) or 4096)
    per_window = seqlen * hidden_size * torch.empty((), dtype=streamer.dtype).element_size()
    chunk = max(1, min(windows, activation_budget // max(per_window, 1)))
    total_nll = 0.0
    bar = BlockProgress(progress, streamer.num_blocks, "windows", windows)
    with bar, torch.no_grad():
        for start in range(0, windows, chunk):
            part = batches[start : start + chunk]
            total_nll += _chunk_nll(streamer, part, bar, start, windows)
    predicted = windows * (seqlen - 1)
    nll = total_nll / predicted
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=windows * seqlen,
        windows=windows,
        seqlen=seqlen,
        seconds=time.perf_counter() - t0,
        device=str(streamer.device),
        dtype=str(streamer.dtype).replace("torch.", ""),
    )


def _chunk_nll(streamer: LayerStreamer, part: torch.Tensor, bar: BlockProgress, first: int, windows: int) -> float:
    n = part.shape[0]
    tag = f"windows {first + 1}-{first + n} of {windows}: " if n < windows else ""
    bar.phase(f"{tag}embeddings", n)
    hidden = streamer.capture(part, on_sample=bar.step)
    for i in range(streamer.num_blocks):
        bar.phase(f"{tag}block {i}", n)
        streamer.load_block(i)
        for j in range(n):
            hidden[j] = streamer.run_block(i, hidden[j : j + 1])[0]
            bar.step()
        streamer.free_block(i)
        bar.block_done(i)
    bar.phase(f"{tag}loss", n)
    total = 0.0
    for j in range(n):
        x = part[j : j + 1].to(streamer.device)
        logits = streamer.logits(x, hidden[j : j + 1]).float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += float(nll)
        bar.step()
    return total


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness
# --------------------------------------------------------------------------------------------


def require_lm_eval() -> None:
    """lm-evaluation-harness is an optional dependency (the `eval` extra); the tasks themselves run in
    harness.py, layer-streamed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("lm_eval is not installed", hint="pip install 'llmprune[eval]' (or lm_eval==0.4.13)")
