"""Routing statistics of Mixture-of-Experts layers for expert pruning (`apply --method reap|frequency`).

For every MoE module of a block (a module with a router `gate` whose weight has one row per expert,
a `ModuleList` of routed `experts` — transformers 5's fused experts are put back into that form by
moe_layout.py — and a top-k), the hooks record, per routed expert j and over the calibration tokens
routed to it: the count N_j, Σ g_j(t) and REAP's Σ g_j(t) · ‖f_j(t)‖₂, where g is the router weight
of the token's top-k experts renormalized to sum to 1 (as REAP's code does, whatever the model's own
`norm_topk_prob`) and f_j(t) the expert's output for the token. Which experts a token goes to, and
their weights, are the router's own: a router that returns only logits (transformers 4's softmax
routers) is read as softmax and top-k; one that returns its choice (transformers 5's routers,
DeepSeek-V3's sigmoid router with its score correction) is taken as it is. Nothing is computed twice:
each expert's inputs and outputs come from a hook on the expert, as the model itself calls it; which
token an expert row belongs to follows that routing (slot by slot as transformers' per-expert loops
gather tokens, or token by token as DeepSeek's does), checked against the rows the expert received.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from llmprune.errors import UsageError


def _top_k(mod: nn.Module) -> int | None:
    """Experts per token: on the MoE module (transformers 4) or its router (transformers 5)."""
    for owner in (mod, getattr(mod, "gate", None)):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    return None


def moe_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(relative name, module) of every MoE module inside a decoder block."""
    out = []
    for name, mod in block.named_modules():
        experts, gate = getattr(mod, "experts", None), getattr(mod, "gate", None)
        if isinstance(experts, nn.ModuleList) and gate is not None and _top_k(mod) is not None:
            w = getattr(gate, "weight", None)
            if w is None or w.shape[0] != len(experts):
                raise UsageError(f"{name}: a router of this kind (no [experts, hidden] weight) is not supported for expert statistics")
            out.append((name, mod))
    return out


class _Layer:
    def __init__(self, mod: nn.Module):
        self.mod = mod
        self.e = len(mod.experts)
        self.top_k = int(_top_k(mod) or 0)
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
        def hook(_mod, _args, out):
            if isinstance(out, torch.Tensor):  # router logits: softmax, top-k
                probs = torch.softmax(out.float(), dim=-1)
                w, sel = torch.topk(probs, layer.top_k, dim=-1)
            else:  # the router's own choice: (logits, weights, ids) or (ids, weights)
                ids = [t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point()]
                if len(ids) != 1:
                    raise UsageError("this MoE router returns neither logits nor its top-k choice; its routing statistics are not supported")
                sel = ids[0].reshape(-1, ids[0].shape[-1])
                floats = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == sel.numel()]
                if not floats or sel.shape[-1] != layer.top_k:
                    raise UsageError("this MoE router returns neither logits nor its top-k choice; its routing statistics are not supported")
                w = floats[-1].reshape(sel.shape).float()
            layer.weights, layer.selected = w / w.sum(-1, keepdim=True), sel

        return hook

    @staticmethod
    def _expert(layer: _Layer, j: int):
        def hook(_mod, args, out):
            assert layer.selected is not None and layer.weights is not None and layer.x is not None
            x = args[0].reshape(-1, args[0].shape[-1])
            routed = layer.selected == j
            for slots, tokens in (torch.where(routed.t()), torch.where(routed)[::-1]):  # slot-major, token-major
                if x.shape[0] == tokens.numel() and torch.equal(x, layer.x[tokens].to(x.dtype)):
                    break
            else:
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
