"""Routing statistics of Mixture-of-Experts layers for expert pruning (`apply --method reap|frequency`).

For every MoE module of a block (a module with a router `gate` whose weight has one row per expert,
a `ModuleList` of routed `experts`, and `top_k`), the hooks record, per routed expert j and over the
calibration tokens routed to it: the count N_j, Σ g_j(t) and REAP's Σ g_j(t) · ‖f_j(t)‖₂, where g are
the softmax router probabilities of the token's top-k experts renormalized to sum to 1 (as REAP's
code does, whatever the model's own `norm_topk_prob`) and f_j(t) the expert's output for the token.
Nothing is computed twice: the router's logits come from a hook on the router, each expert's inputs
and outputs from a hook on the expert, as the model itself calls them; which token an expert row
belongs to follows the routing the model computes (slot by slot, tokens in order, as transformers'
per-expert loop gathers them), and is checked against the rows the expert actually received.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from llmprune.errors import UsageError


def moe_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(relative name, module) of every MoE module inside a decoder block."""
    out = []
    for name, mod in block.named_modules():
        experts, gate = getattr(mod, "experts", None), getattr(mod, "gate", None)
        if isinstance(experts, nn.ModuleList) and gate is not None and hasattr(mod, "top_k"):
            w = getattr(gate, "weight", None)
            if w is None or w.shape[0] != len(experts):
                raise UsageError(f"{name}: a router of this kind (no [experts, hidden] weight) is not supported for expert statistics")
            out.append((name, mod))
    return out


class _Layer:
    def __init__(self, mod: nn.Module):
        self.mod = mod
        self.e = len(mod.experts)
        self.top_k = int(mod.top_k)
        self.count = np.zeros(self.e, dtype=np.int64)
        self.gate_sum = np.zeros(self.e)
        self.reap_sum = np.zeros(self.e)
        self.x: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None


class ExpertHooks:
    """Hooks on the MoE modules of one decoder block; `results()` once the block has run."""

    def __init__(self, block: nn.Module, name_of: Callable[[str], str], device: torch.device):
        """`name_of(relative module name)` gives the MoE module's checkpoint name."""
        self.layers: dict[str, _Layer] = {}
        self.handles: list[Any] = []
        self.device = device
        for rel, mod in moe_modules(block):
            layer = _Layer(mod)
            self.layers[name_of(rel)] = layer
            self.handles.append(mod.register_forward_pre_hook(self._enter(layer), with_kwargs=True))
            self.handles.append(mod.gate.register_forward_hook(self._route(layer)))
            for j, expert in enumerate(mod.experts):
                self.handles.append(expert.register_forward_hook(self._expert(layer, j)))

    @staticmethod
    def _enter(layer: _Layer):
        def hook(_mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            layer.x = h.reshape(-1, h.shape[-1])

        return hook

    @staticmethod
    def _route(layer: _Layer):
        def hook(_mod, _args, logits):
            if not isinstance(logits, torch.Tensor):
                raise UsageError("this MoE router does not return logits; its routing statistics are not supported")
            probs = torch.softmax(logits.float(), dim=-1)
            w, sel = torch.topk(probs, layer.top_k, dim=-1)
            layer.weights, layer.selected = w / w.sum(-1, keepdim=True), sel

        return hook

    @staticmethod
    def _expert(layer: _Layer, j: int):
        def hook(_mod, args, out):
            assert layer.selected is not None and layer.weights is not None and layer.x is not None
            slots, tokens = torch.where((layer.selected == j).t())  # slot-major, tokens ascending
            x = args[0].reshape(-1, args[0].shape[-1])
            if x.shape[0] != tokens.numel() or not torch.equal(x, layer.x[tokens].to(x.dtype)):
                raise UsageError("this MoE layer gathers its experts' tokens in an order llmprune does not know")
            if tokens.numel() == 0:  # some models call every expert, routed to or not
                return
            g = layer.weights[tokens, slots]
            norms = out.reshape(x.shape[0], -1).float().norm(dim=-1)
            layer.count[j] += tokens.numel()
            layer.gate_sum[j] += float(g.double().sum())
            layer.reap_sum[j] += float((g.double() * norms.double()).sum())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer in self.layers.values():
            layer.x = layer.weights = layer.selected = None

    def reduce_across(self, info: Any) -> None:
        """Sum the statistics over torchrun ranks."""
        if not info.active:
            return
        for layer in self.layers.values():
            for attr in ("count", "gate_sum", "reap_sum"):
                t = torch.from_numpy(getattr(layer, attr).astype(np.float64)).to(self.device)
                info.all_reduce_(t)
                setattr(layer, attr, t.cpu().numpy().astype(getattr(layer, attr).dtype))

    def results(self) -> dict[str, dict[str, Any]]:
        """{moe module name: {count, gate_sum, reap_sum, top_k}}, as the sidecar stores them."""
        return {
            name: {"count": [int(c) for c in l.count], "gate_sum": l.gate_sum.tolist(), "reap_sum": l.reap_sum.tolist(), "top_k": l.top_k}
            for name, l in self.layers.items()
        }
