"""Checkpoints written by structured pruning (`llmprune apply --method flap|magnitude-sp|wanda-sp`).

When every layer keeps the same number of heads and channels (LLaMA), the output's config.json
describes it and stock `AutoModelForCausalLM.from_pretrained` loads it. Otherwise (global
allocation, or OPT with heads removed) layers differ in size: config.json records each layer's sizes
under `llmprune.structured.layers`, and `load_pruned` builds the stock model with every layer's
projections resized to them. The layer-streamed passes (`eval`, `stats`) resize the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.errors import UsageError

STOCK_LOADER = "transformers"


def structured_info(config: Any) -> dict[str, Any] | None:
    """The `llmprune.structured` record of a config (a transformers config or a dict), if any."""
    info = config.get("llmprune") if isinstance(config, dict) else getattr(config, "llmprune", None)
    if not isinstance(info, dict) or not isinstance(info.get("structured"), dict):
        return None
    return info


def needs_load_pruned(model_dir: str | Path) -> bool:
    """True when stock from_pretrained cannot build the checkpoint (its layers differ in size)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    info = structured_info(config)
    return info is not None and info.get("loader") != STOCK_LOADER


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (old.in_features, old.out_features) == (in_features, out_features):
        return old
    w = old.weight
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta", dtype=w.dtype)
    if w.device.type != "meta":
        new = new.to_empty(device=w.device)
    new.requires_grad_(w.requires_grad)
    return new


def resize_modules(model: nn.Module, config: Any) -> None:
    """Give every decoder layer the projection sizes recorded in `config` (no-op without a record).

    New modules are created on the meta device (or left uninitialized on the originals' device):
    their weights are expected to be loaded from the checkpoint next.
    """
    info = structured_info(config)
    if info is None:
        return
    rec = info["structured"]
    layers, family, head_dim = rec.get("layers"), rec.get("family"), rec.get("head_dim")
    from llmprune.stream import find_blocks

    _, blocks = find_blocks(model)
    if not isinstance(layers, list) or len(layers) != len(blocks) or not isinstance(head_dim, int):
        raise UsageError(f"config.json records {len(layers) if isinstance(layers, list) else 'no'} layer sizes for a model with {len(blocks)} layers")
    for block, size in zip(blocks, layers):
        heads, kv, inter = size["num_attention_heads"], size["num_key_value_heads"], size["intermediate_size"]
        attn = block.self_attn
        q_out, kv_out = heads * head_dim, kv * head_dim
        if family == "llama":
            hidden = attn.q_proj.in_features
            attn.q_proj = _resized(attn.q_proj, hidden, q_out)
            attn.k_proj = _resized(attn.k_proj, hidden, kv_out)
            attn.v_proj = _resized(attn.v_proj, hidden, kv_out)
            attn.o_proj = _resized(attn.o_proj, q_out, attn.o_proj.out_features)
            mlp = block.mlp
            mlp.gate_proj = _resized(mlp.gate_proj, hidden, inter)
            mlp.up_proj = _resized(mlp.up_proj, hidden, inter)
            mlp.down_proj = _resized(mlp.down_proj, inter, mlp.down_proj.out_features)
            mlp.intermediate_size = inter
        elif family == "opt":
            hidden = attn.q_proj.in_features
            attn.q_proj = _resized(attn.q_proj, hidden, q_out)
            attn.k_proj = _resized(attn.k_proj, hidden, kv_out)
            attn.v_proj = _resized(attn.v_proj, hidden, kv_out)
            attn.out_proj = _resized(attn.out_proj, q_out, attn.out_proj.out_features)
            attn.num_heads = heads  # OPT reshapes with num_heads; head_dim and scaling stay
            block.fc1 = _resized(block.fc1, hidden, inter)
            block.fc2 = _resized(block.fc2, inter, block.fc2.out_features)
        else:
            raise UsageError(f"config.json records structured pruning of an unknown family {family!r}")


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
    from llmprune.stream import Checkpoint, build_skeleton, load_config

    ckpt = Checkpoint(path)
    config = load_config(ckpt.dir)
    if dtype == "auto":
        dtype = ckpt.float_dtype()
    elif dtype is None:
        dtype = torch.float32
    elif not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype must be None, 'auto' or a torch dtype, not {dtype!r}")
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
    return model.to(device).eval()
