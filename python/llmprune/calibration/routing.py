"""Routing statistics of Mixture-of-Experts layers for expert pruning (`apply --method reap|frequency`).

For every MoE module of a block (a router `gate` — gpt-oss: `router` — whose weight has one row per
expert, the routed `experts`, and a top-k), the hooks record, per routed expert j and over the
calibration tokens routed to it: the count N_j, Σ g_j(t) and REAP's Σ g_j(t) · ‖f_j(t)‖₂, where g is
the router weight of the token's top-k experts renormalized to sum to 1 (as REAP's code does,
whatever the model's own `norm_topk_prob`) and f_j(t) the expert's output for the token.

Which experts a token goes to, and their weights, are the router's own: a router that returns only
logits (transformers 4's softmax routers) is read as softmax and top-k; one that returns its choice
(transformers 5's routers, DeepSeek-V3's sigmoid router with its score correction, gpt-oss's top-k
of the logits) is taken as it is.

Experts one module each (transformers 4, and transformers 5's fused modules put back into that form
by moe_layout.py when the checkpoint stores one tensor set per expert): each expert's inputs and
outputs come from a hook on the expert, as the model itself calls it — nothing is computed twice;
which token an expert row belongs to is found by matching the rows received against the tokens the
router sent (models gather them slot by slot, token by token, or sorted).
Experts stored fused on disk too (gpt-oss's [experts, ...] tensors): the module computes only the
weighted sum, so each expert's output is had by calling the module once more on that expert's
tokens alone at weight 1 (one extra pass over the routed tokens); its per-expert linears have no
activation statistics (nothing to prune them with).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.model.moe_layout import expert_count

ROUTERS = ("gate", "router")  # the router's attribute: most models `gate`, gpt-oss `router`


def router_of(mod: nn.Module) -> tuple[str, nn.Module] | None:
    for attr in ROUTERS:
        r = getattr(mod, attr, None)
        if isinstance(r, nn.Module):
            return attr, r
    return None


def _top_k(mod: nn.Module, router: nn.Module) -> int | None:
    """Experts per token: on the MoE module (transformers 4) or its router (transformers 5)."""
    for owner in (mod, router):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    return None


def moe_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(relative name, module) of every MoE module inside a decoder block."""
    out = []
    for name, mod in block.named_modules():
        e, router = expert_count(getattr(mod, "experts", None)), router_of(mod)
        if e is None or router is None or _top_k(mod, router[1]) is None:
            continue
        w = getattr(router[1], "weight", None)
        if w is None or w.shape[0] != e:
            raise UsageError(f"{name}: a router of this kind (no [experts, hidden] weight) is not supported for expert statistics")
        out.append((name, mod))
    return out


class _Layer:
    def __init__(self, mod: Any):  # a transformers MoE module: experts and router reached by name
        self.mod = mod
        found = router_of(mod)
        assert found is not None, "moe_modules() picks modules with a router"
        self.router_attr, router = found
        self.fused = not isinstance(mod.experts, nn.ModuleList)
        self.e = int(expert_count(mod.experts) or 0)
        self.top_k = int(_top_k(mod, router) or 0)
        self.count = np.zeros(self.e, dtype=np.int64)
        self.gate_sum = np.zeros(self.e)
        self.reap_sum = np.zeros(self.e)
        self.x: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None

    def add(self, j: int, tokens: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> None:
        """Expert j's outputs `out` [n, H] for `tokens` routed to it in top-k `slots`."""
        assert self.weights is not None
        g = self.weights[tokens, slots].double()
        norms = out.reshape(tokens.numel(), -1).float().norm(dim=-1).double()
        self.count[j] += tokens.numel()
        self.gate_sum[j] += float(g.sum())
        self.reap_sum[j] += float((g * norms).sum())


def _row_order(x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor | None:
    """The permutation p with x == routed[p] (the order in which the model gathered the routed tokens:
    slot by slot, token by token, or sorted), or None when x is not a reordering of `routed`."""
    if x.shape != routed.shape:
        return None
    p = torch.arange(x.shape[0], device=x.device)
    if torch.equal(x, routed):
        return p
    probe = torch.linspace(1.0, 2.0, x.shape[-1], dtype=torch.float64, device=x.device)
    a, b = torch.argsort(x.double() @ probe), torch.argsort(routed.double() @ probe)
    p[a] = b  # row a[i] of x is row b[i] of routed
    return p if torch.equal(x, routed[p]) else None


class ExpertHooks:
    """Hooks on the MoE modules of one decoder block; `results()` once the block has run."""

    def __init__(self, block: nn.Module, name_of: Callable[[str, str], str], device: torch.device):
        """`name_of(relative module name, router attribute)` gives the MoE module's checkpoint name."""
        self.layers: dict[str, _Layer] = {}
        self.handles: list[Any] = []
        self.device = device
        for rel, mod in moe_modules(block):
            layer = _Layer(mod)
            self.layers[name_of(rel, layer.router_attr)] = layer
            self.handles.append(mod.register_forward_pre_hook(self._enter(layer), with_kwargs=True))
            self.handles.append(getattr(mod, layer.router_attr).register_forward_hook(self._route(layer)))
            experts: Any = layer.mod.experts
            if layer.fused:
                self.handles.append(experts.register_forward_hook(self._probe(layer), with_kwargs=True))
            else:
                for j, expert in enumerate(experts):
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
            else:  # the router's own choice: (logits, weights, ids), (ids, weights) or (scores [T, E], ids)
                ids = [t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point()]
                floats = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()]
                if len(ids) != 1 or ids[0].shape[-1] != layer.top_k:
                    raise UsageError("this MoE router returns neither logits nor its top-k choice; its routing statistics are not supported")
                sel = ids[0].reshape(-1, layer.top_k)
                top = [t.reshape(sel.shape) for t in floats if t.numel() == sel.numel()]
                dense = [t.reshape(sel.shape[0], -1) for t in floats if t.numel() == sel.shape[0] * layer.e]
                if top:
                    w = top[-1].float()
                elif dense:  # [T, E] scores, zero off the top-k
                    w = dense[-1].float().gather(1, sel)
                else:
                    raise UsageError("this MoE router returns no weights for its top-k choice; its routing statistics are not supported")
            layer.weights, layer.selected = w / w.sum(-1, keepdim=True), sel

        return hook

    @staticmethod
    def _expert(layer: _Layer, j: int):
        def hook(_mod, args, out):
            assert layer.selected is not None and layer.weights is not None and layer.x is not None
            x = args[0].reshape(-1, args[0].shape[-1])
            slots, tokens = torch.where((layer.selected == j).t())
            if tokens.numel() == 0 and x.shape[0] > 0:  # some models call every expert, routed to or not
                return
            order = _row_order(x, layer.x[tokens].to(x.dtype))
            if order is None:
                raise UsageError("an MoE expert received rows that are not the tokens its router sent it; this MoE layer is not supported")
            if tokens.numel():
                layer.add(j, tokens[order], slots[order], out)

        return hook

    @staticmethod
    def _probe(layer: _Layer):
        """Fused experts (one module computing every expert's weighted sum): each expert's own output
        comes from calling the module again on that expert's tokens alone, at weight 1."""

        def hook(mod, args, kwargs, _out):
            assert layer.selected is not None and layer.x is not None
            given = list(args) + list(kwargs.values())
            dense = len(given) > 2 and isinstance(given[2], torch.Tensor) and given[2].shape[-1] == layer.e != layer.top_k
            for j in range(layer.e):
                slots, tokens = torch.where((layer.selected == j).t())
                if tokens.numel() == 0:
                    continue
                x = layer.x[tokens]
                ids = torch.full((tokens.numel(), 1), j, dtype=layer.selected.dtype, device=x.device)
                if dense:  # [T, E] routing weights (gpt-oss on transformers 4)
                    ones = torch.zeros(tokens.numel(), layer.e, dtype=x.dtype, device=x.device)
                    ones[:, j] = 1
                else:
                    ones = torch.ones(tokens.numel(), 1, dtype=x.dtype, device=x.device)
                layer.add(j, tokens, slots, mod.forward(x, ids, ones))

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
            name: {"count": [int(c) for c in layer.count], "gate_sum": layer.gate_sum.tolist(), "reap_sum": layer.reap_sum.tolist(), "top_k": layer.top_k}
            for name, layer in self.layers.items()
        }
