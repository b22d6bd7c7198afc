"""Mixture-of-Experts modules as the checkpoint stores them, whatever transformers holds in memory.

transformers 4.x builds one module per routed expert (`experts.<j>.w1`, ...), exactly the tensors a
hub checkpoint stores. transformers 5 fuses them in memory into 3-D parameters (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) and may rename the MoE module (Mixtral's
`block_sparse_moe` is `mlp`), converting the per-expert tensors when it loads. llmprune loads blocks
tensor by tensor from the shards and measures every expert's linears, so it puts the per-expert
layout back: each fused experts module becomes a `PerExpert` list of `ExpertMLP`s named as on disk,
computing what the fused module computes (same routing, same gathering order, same accumulation),
and the in-memory names map back to the checkpoint's through transformers' own renaming table.
"""

from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import nn

from llmprune.errors import UsageError

_META = re.compile(r"[\^$*+?()\[\]{}|\\]")


def _literal(pattern: str) -> str | None:
    """A renaming pattern as a plain string, or None when it is a real regular expression."""
    s = pattern.replace(r"\.", ".")
    return None if _META.search(s) else s


def _conversions(model: nn.Module) -> list[Any]:
    try:  # transformers >= 5
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    return list(get_model_conversion_mapping(cast(Any, model), add_legacy=False))


def disk_renames(model: nn.Module) -> list[tuple[str, str]]:
    """(in-memory substring, on-disk substring) for transformers 5's plain renamings of this model
    (e.g. Mixtral: (".mlp.", ".block_sparse_moe.")); empty on transformers 4."""
    conversions = _conversions(model)
    if not conversions:
        return []
    from transformers.core_model_loading import WeightRenaming

    out = []
    for t in conversions:
        if type(t) is not WeightRenaming or len(t.source_patterns) != len(t.target_patterns):
            continue
        for src, tgt in zip(t.source_patterns, t.target_patterns):
            disk, mem = _literal(src), _literal(tgt)
            if disk and mem:
                out.append((mem, disk))
    return out


class ExpertMLP(nn.Module):
    """One routed expert, a gated MLP: down(act(gate(x)) · up(x)), its linears named as on disk."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act: nn.Module):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            self.add_module(name, nn.Linear(i, o, bias=False, device="meta"))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class PerExpert(nn.ModuleList):
    """The routed experts one module each, called like transformers 5's fused experts module:
    (hidden [T, H], top-k expert ids [T, k], top-k weights [T, k]) → Σ_k weight · expert(hidden)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for j, expert in enumerate(self):
            slots, tokens = torch.where((top_k_index == j).t())  # slot-major, as transformers gathers
            if tokens.numel() == 0:
                continue
            y = expert(hidden_states[tokens]) * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _per_expert_names(conversions: list[Any]) -> tuple[str, str, str] | None:
    """(gate, up, down) names of one expert's linears on disk, from the converters that fuse them."""
    if not conversions:
        return None
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    gate_up = down = None
    pick = re.compile(r"experts\.\*\.(\w+)\.weight$")
    for t in conversions:
        if type(t) is not WeightConverter or len(t.target_patterns) != 1:
            continue
        ops = [(type(o), getattr(o, "dim", None)) for o in t.operations]
        found = [m.group(1) for m in (pick.search(s) for s in t.source_patterns) if m]
        if len(found) != len(t.source_patterns):
            continue
        target = t.target_patterns[0]
        if target.endswith("experts.gate_up_proj") and len(found) == 2 and ops == [(MergeModulelist, 0), (Concatenate, 1)]:
            gate_up = (found[0], found[1])
        elif target.endswith("experts.down_proj") and len(found) == 1 and ops == [(MergeModulelist, 0)]:
            down = found[0]
    return (gate_up[0], gate_up[1], down) if gate_up and down else None


def unfuse_experts(model: nn.Module, stored: Any) -> None:
    """Replace every fused experts module by a `PerExpert` list when the checkpoint stores one
    tensor set per expert. `stored(qual)` tells whether the in-memory tensor name `qual` (of the
    per-expert layout) exists in the checkpoint. Fused modules whose checkpoint stores the fused
    tensors themselves (gpt-oss) are left as they are."""
    fused = [(n, m) for n, m in model.named_modules() if fused_expert_count(getattr(m, "experts", None)) is not None]
    if not fused:
        return
    conversions = _conversions(model)
    names = _per_expert_names(conversions)
    for qual, moe in fused:
        experts = moe.experts
        e, two_i, h = experts.gate_up_proj.shape
        if stored(f"{qual}.experts.gate_up_proj"):
            continue
        if names is None or getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) or two_i % 2:
            raise UsageError(
                f"{qual}.experts: an MoE layout llmprune does not know ({type(experts).__name__} with no per-expert tensors on disk)",
                hint="supported: one tensor set per expert on disk (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3) or fused [experts, ...] tensors (gpt-oss)",
            )
        if not stored(f"{qual}.experts.0.{names[0]}.weight"):
            raise UsageError(f"tensor {qual}.experts.0.{names[0]}.weight is missing from the checkpoint")
        moe.experts = PerExpert([ExpertMLP(names, h, two_i // 2, experts.act_fn) for _ in range(e)])


def fused_expert_count(experts: nn.Module | None) -> int | None:
    """E for an experts module that holds every expert in 3-D tensors ([E, ...] gate_up_proj), else None."""
    w = getattr(experts, "gate_up_proj", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 3 else None


def expert_count(experts: nn.Module | None) -> int | None:
    """How many routed experts a module holds: one module each, or fused; None for neither."""
    return len(experts) if isinstance(experts, nn.ModuleList) else fused_expert_count(experts)
