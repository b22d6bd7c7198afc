"""Where and in what precision a torch pass runs, and how long its windows are: resolved once, from
the flags and the checkpoint, before any text is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmprune.errors import UsageError
from llmprune.model.checkpoint import Checkpoint
from llmprune.model.skeleton import load_config

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    device = (device or "auto").lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu (or auto)")
        if device == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device {device!r}", hint="use auto, cuda or cpu")


def resolve_dtype(dtype: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: the checkpoint's dtype on a GPU, float32 on the CPU (bf16 matmuls are slow there)."""
    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        return checkpoint_dtype if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


DEFAULT_SEQLEN = 2048


def check_pass_inputs(model_dir: Path, device: str, dtype: str, seqlen: int | None) -> int:
    """Validates MODEL, --device and --dtype before any text is loaded; returns the window length:
    --seqlen, else min(2048, the model's context). A --seqlen beyond the context is an error."""
    ckpt = Checkpoint(model_dir)  # a missing or broken checkpoint is reported before anything else
    resolve_dtype(dtype, ckpt.float_dtype(), resolve_device(device))
    return window_length(load_config(model_dir), seqlen)


def window_length(config: Any, seqlen: int | None, default: int = DEFAULT_SEQLEN) -> int:
    """The one rule for the tokens per window of every torch pass: --seqlen, else min(default, the
    model's context); a --seqlen beyond the context is an error."""
    ctx = getattr(config, "max_position_embeddings", None)
    if seqlen is None:
        return min(default, ctx) if isinstance(ctx, int) and ctx > 0 else default
    if isinstance(ctx, int) and 0 < ctx < seqlen:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context of {ctx} tokens", hint=f"pass --seqlen {ctx} or less")
    return seqlen
