"""The transformers model of a checkpoint, built without weights: its configuration, the skeleton on
the meta device (at a structurally pruned checkpoint's per-layer sizes), and where its repeated
decoder blocks and prunable linear layers are."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from llmprune.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# A prunable linear layer: nn.Linear ([out, in]) or transformers' Conv1D ([in, out]), which has the
# same `weight` and `bias` attributes (linear_input_axis tells them apart).
Linear = nn.Linear


def load_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read the model configuration in {model_dir}: {exc}") from None


def build_skeleton(config: Any) -> PreTrainedModel:
    """The causal LM with every parameter on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UsageError(f"unsupported model architecture: {exc}") from None
    resize_modules(model, config)  # a structurally pruned checkpoint whose layers differ in size
    return model.eval()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the largest ModuleList whose children all have one class."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(m) for m in mod}
        if len(classes) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise UsageError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best[1], best[2]


def linear_input_axis(module: nn.Module) -> int | None:
    """1 for nn.Linear ([out, in]), 0 for GPT-2's Conv1D ([in, out]), None for other modules."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, Conv1D):
        return 0
    return None


def structured_info(config: Any) -> dict[str, Any] | None:
    """The `llmprune.model.pruned` record of a config (a transformers config or a dict), if any."""
    info = config.get("llmprune") if isinstance(config, dict) else getattr(config, "llmprune", None)
    if not isinstance(info, dict) or not isinstance(info.get("structured"), dict):
        return None
    return info


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (old.in_features, old.out_features) == (in_features, out_features):
        return old
    w = old.weight
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta", dtype=w.dtype)
    if w.device.type != "meta":
        new = new.to_empty(device=w.device)
    new.requires_grad_(w.requires_grad)
    return new


def _layer_size(size: Any, i: int, key: str) -> int:
    """One size of layer i's record in config.json: an integer of at least 0."""
    value = size.get(key) if isinstance(size, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"config.json records no valid {key} for layer {i} (got {value!r})", "the checkpoint's config.json was altered or damaged")
    return value


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
    _, blocks = find_blocks(model)
    if not isinstance(layers, list) or len(layers) != len(blocks) or not isinstance(head_dim, int):
        raise UsageError(f"config.json records {len(layers) if isinstance(layers, list) else 'no'} layer sizes for a model with {len(blocks)} layers")
    block: Any  # a transformers decoder layer: its submodules are reached by name
    for i, (block, size) in enumerate(zip(blocks, layers)):
        heads, kv, inter = (_layer_size(size, i, key) for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"))
        attn: Any = block.self_attn
        q_out, kv_out = heads * head_dim, kv * head_dim
        if family == "llama" and hasattr(attn, "qkv_proj"):  # Phi-3: fused qkv_proj and gate_up_proj
            hidden = attn.qkv_proj.in_features
            attn.qkv_proj = _resized(attn.qkv_proj, hidden, q_out + 2 * kv_out)
            attn.o_proj = _resized(attn.o_proj, q_out, attn.o_proj.out_features)
            # its forward splits qkv at config.num_attention_heads * head_dim: each layer its own config
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv
            attn.num_key_value_heads, attn.num_key_value_groups = kv, heads // kv
            mlp: Any = block.mlp
            mlp.gate_up_proj = _resized(mlp.gate_up_proj, hidden, 2 * inter)
            mlp.down_proj = _resized(mlp.down_proj, inter, mlp.down_proj.out_features)
        elif family == "llama":
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
