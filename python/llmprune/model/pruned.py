"""Checkpoints written by structured pruning (`llmprune apply --method flap|magnitude-sp|wanda-sp`).

When every layer keeps the same number of heads and channels (LLaMA), the output's config.json
describes it and stock `AutoModelForCausalLM.from_pretrained` loads it. Otherwise (global
allocation, or OPT with heads removed) layers differ in size: config.json records each layer's sizes
under `llmprune.model.pruned.layers`, and `load_pruned` builds the stock model with every layer's
projections resized to them. The layer-streamed passes (`eval`, `stats`) resize the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.model.skeleton import structured_info

STOCK_LOADER = "transformers"


def needs_load_pruned(model_dir: str | Path) -> bool:
    """True when stock from_pretrained cannot build the checkpoint (its layers differ in size)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    info = structured_info(config)
    return info is not None and info.get("loader") != STOCK_LOADER


def checkpoint_names(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Model state key -> checkpoint tensor name (checkpoints may omit or add the base prefix)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for key in model.state_dict(keep_vars=True):
        for cand in (key, key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else None, f"{prefix}.{key}" if prefix else None):
            if cand is not None and cand in names:
                out[key] = cand
                break
    return out


def load_pruned(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A regular transformers causal LM for any llmprune output (or unpruned checkpoint), with each
    layer's modules sized as the checkpoint stores them. `dtype`: None (float32, like
    from_pretrained), "auto" (the checkpoint's) or a torch dtype."""
    from llmprune.model.checkpoint import Checkpoint
    from llmprune.model.skeleton import build_skeleton, load_config

    ckpt = Checkpoint(path)
    config = load_config(ckpt.dir)
    if dtype == "auto":
        dtype = ckpt.float_dtype()
    elif dtype is None:
        dtype = torch.float32
    elif not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype must be None, 'auto' or a torch dtype, not {dtype!r}")
    if not needs_load_pruned(ckpt.dir):
        # a checkpoint stock transformers describes (dense, unstructured, uniform structured, fewer
        # experts or blocks): its own loader, which also converts what transformers 5 holds in
        # another layout than the files (e.g. Mixtral's per-expert tensors into fused ones)
        from transformers import AutoModelForCausalLM

        stock = AutoModelForCausalLM.from_pretrained(str(ckpt.dir), dtype=dtype)
        return cast(Any, stock).to(device).eval()
    model = build_skeleton(config)  # resizes every layer (resize_modules)
    mapping = checkpoint_names(model, set(ckpt.entries))
    state = ckpt.load(mapping.values(), torch.device("cpu"), dtype)
    params = dict(model.named_parameters())
    for key, name in mapping.items():
        have = params.get(key)
        if have is not None and tuple(have.shape) != tuple(state[name].shape):
            raise UsageError(f"tensor {name} in {ckpt.dir} has shape {tuple(state[name].shape)}, the model expects {tuple(have.shape)}")
    model.load_state_dict({k: state[n] for k, n in mapping.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise UsageError(f"tensor {left[0]} is missing from the checkpoint in {ckpt.dir}")
    return cast(Any, model).to(device).eval()  # transformers' decorated .to() is mistyped
