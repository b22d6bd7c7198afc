"""Layer-streamed execution of a causal LM stored as safetensors: one decoder block in memory at a time.

The transformers model is built on the meta device from config.json, so its own code (attention masks,
rotary embeddings, positional embeddings, final norm, tied heads) runs unchanged, but no weight exists
until it is needed. Only the modules outside the decoder blocks (embeddings, final norm, optionally the
LM head) are loaded for the whole run; each block is loaded from the shards, run over every sample,
and dropped again. Peak memory is one block plus the activations of the samples, whatever the depth.

Used by the statistics pass (`calibration/activations.py`), gradients (`calibration/gradients.py`) and perplexity evaluation
(`evaluation.py`). The checkpoint view is `checkpoint.py`; devices and dtypes are `devices.py`; the
weightless model is `skeleton.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.model.checkpoint import Checkpoint
from llmprune.model.devices import resolve_device, resolve_dtype
from llmprune.model.moe_layout import disk_renames, unfuse_experts
from llmprune.model.skeleton import Linear, build_skeleton, find_blocks, linear_input_axis, load_config


def _tensor_slots(root: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """(qualified name, owning module, attribute, tensor, is_parameter) of every parameter and buffer."""
    for mname, mod in root.named_modules(remove_duplicate=False):
        qual = f"{prefix}.{mname}" if mname else prefix
        for attr, t in mod._parameters.items():
            if t is not None:
                yield f"{qual}.{attr}" if qual else attr, mod, attr, t, True
        for attr, t in mod._buffers.items():
            if t is not None:
                yield f"{qual}.{attr}" if qual else attr, mod, attr, t, False


def _set(mod: nn.Module, attr: str, value: torch.Tensor, is_param: bool) -> None:
    if is_param:
        mod._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


class _StopForward(Exception):
    """Raised by a recorder to end a model forward once the needed inputs are captured."""


class _StandIn(nn.Module):
    """Takes a decoder block's place; attributes the model's loop reads (e.g. attention_type) come
    from the block it replaces."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class _Recorder(_StandIn):
    def __init__(self, block: nn.Module, index: int, streamer: LayerStreamer, record_args: bool, last: bool):
        super().__init__(block)
        object.__setattr__(self, "_i", index)
        object.__setattr__(self, "_streamer", streamer)
        object.__setattr__(self, "_record_args", record_args)
        object.__setattr__(self, "_last", last)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if isinstance(hidden, tuple):  # the previous stand-in's output, in a tensor-returning loop
            hidden = hidden[0]
        s = self._streamer
        if self._i == 0:
            s._captured = hidden
        if self._record_args:
            s.block_args[self._i] = (rest, kwargs)
        if self._last or not self._record_args:
            raise _StopForward
        return (hidden,)


class _Passthrough(_StandIn):
    """Returns its input (or, for the last block, the given final hidden state) shaped like a block's output."""

    def __init__(self, block: nn.Module, fmt: int, final: torch.Tensor | None):
        super().__init__(block)
        object.__setattr__(self, "_fmt", fmt)
        object.__setattr__(self, "_final", final)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._final is not None:
            hidden = self._final
        if self._fmt == 0:
            return hidden
        return (hidden,) + (None,) * (self._fmt - 1)


def _is_router(block: nn.Module, mname: str) -> bool:
    """The router (`gate`) of an MoE module: it chooses experts and is never pruned."""
    parent, _, last = mname.rpartition(".")
    if last != "gate":
        return False
    owner = block.get_submodule(parent) if parent else block
    return isinstance(getattr(owner, "experts", None), nn.ModuleList)


class LayerStreamer:
    """A model whose decoder blocks are loaded one at a time from the checkpoint shards.

    Typical use::

        s = LayerStreamer(model_dir, device="cpu")
        hidden = s.capture(ids)                 # [N, L, H] inputs of block 0
        for i in range(s.num_blocks):
            s.load_block(i)
            for j in range(N):
                hidden[j] = s.run_block(i, hidden[j : j + 1])[0]
            s.free_block(i)
    """

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: str = "auto", with_head: bool = False, local_rank: int | None = None):
        self.ckpt = Checkpoint(model_dir)
        self.config = load_config(self.ckpt.dir)
        self.device = resolve_device(device, local_rank)
        self.dtype = resolve_dtype(dtype, self.ckpt.float_dtype(), self.device)
        self.model = build_skeleton(self.config)
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""
        self._renames = disk_renames(self.model)
        unfuse_experts(self.model, lambda qual: self.checkpoint_name(qual) is not None)
        self.blocks_path, self.blocks = find_blocks(self.model)
        self.num_blocks = len(self.blocks)
        self.block_args: list[tuple[tuple, dict] | None] = [None] * self.num_blocks
        self._out_format: int | None = None  # 0: blocks return a tensor; n: a tuple of n items
        self._captured: torch.Tensor | None = None
        self._saved: dict[int, list[tuple[nn.Module, str, torch.Tensor | None, bool]]] = {}
        self._share_block_buffers()
        self._load_outside_blocks(with_head)

    # ---- names -------------------------------------------------------------------------------

    @property
    def max_positions(self) -> int | None:
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def checkpoint_name(self, qual: str) -> str | None:
        """The checkpoint's name for a module tensor: as in memory, or with transformers 5's renamings
        undone (Mixtral's `mlp` is `block_sparse_moe` on disk)."""
        for mem, disk in [("", "")] + self._renames:
            name = self._stored_name(qual.replace(mem, disk) if mem else qual)
            if name is not None:
                return name
        return None

    def _stored_name(self, qual: str) -> str | None:
        """`qual` as the checkpoint stores it (checkpoints may omit or add the base prefix)."""
        if qual in self.ckpt:
            return qual
        p = self._prefix + "."
        if self._prefix and qual.startswith(p) and qual[len(p) :] in self.ckpt:
            return qual[len(p) :]
        if self._prefix and p + qual in self.ckpt:
            return p + qual
        return None

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def prunable(self, i: int) -> list[tuple[str, Linear, int]]:
        """(checkpoint weight name, module, input axis) of every linear layer in block i."""
        out = []
        block = self.blocks[i]
        for mname, mod in block.named_modules():
            axis = linear_input_axis(mod)
            if axis is None or _is_router(block, mname):
                continue
            qual = f"{self.block_prefix(i)}.{mname}.weight"
            name = self.checkpoint_name(qual)
            if name is None:
                raise UsageError(f"tensor {qual} is missing from the checkpoint in {self.ckpt.dir}")
            out.append((name, cast(Linear, mod), axis))
        return out

    # ---- loading -----------------------------------------------------------------------------

    def _share_block_buffers(self) -> None:
        """Blocks' non-persistent buffers (e.g. GPT-2's causal table) are equal: keep one copy."""
        first = {q: t for q, _, _, t, is_param in _tensor_slots(self.blocks[0], "") if not is_param}
        for blk in list(self.blocks)[1:]:
            for q, mod, attr, t, is_param in _tensor_slots(blk, ""):
                if is_param:
                    continue
                ref = first.get(q)
                if ref is not None and ref is not t and ref.shape == t.shape and ref.dtype == t.dtype and torch.equal(ref, t):
                    mod._buffers[attr] = ref

    def _load_outside_blocks(self, with_head: bool) -> None:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        block_ids = {id(m) for m in self.blocks.modules()}
        slots = []
        for mname, mod in self.model.named_modules(remove_duplicate=False):
            if id(mod) in block_ids:
                continue
            for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is None:
                    continue
                is_param = attr in mod._parameters
                qual = f"{mname}.{attr}" if mname else attr
                slots.append((qual, mod, attr, t, is_param))
        wanted: dict[str, str] = {}
        for qual, mod, _attr, _t, _is_param in slots:
            if mod is head and not with_head:
                continue
            name = self.checkpoint_name(qual)
            if name is not None:
                wanted[qual] = name
        loaded = self._load(wanted, {q for q, _, _, _, p in slots if p})
        by_old: dict[int, torch.Tensor] = {}
        pending = []
        for qual, mod, attr, t, is_param in slots:
            if qual in wanted:
                new = loaded[wanted[qual]]
                if is_param:
                    self._check_shape(wanted[qual], t, new)
                new = nn.Parameter(new, requires_grad=False) if is_param else new
                by_old[id(t)] = new
                _set(mod, attr, new, is_param)
            elif is_param:
                pending.append((qual, mod, attr, t))
            elif t.device.type != "meta":
                _set(mod, attr, t.to(self.device), False)
        for qual, mod, attr, t in pending:
            if mod is head and not with_head:
                continue
            tied = by_old.get(id(t))
            if tied is None and mod is head and attr == "weight":
                # a tied LM head (stored once, as the embedding): the skeleton lost the tie
                emb = self.model.get_input_embeddings()
                if emb is not None and emb.weight.device.type != "meta" and emb.weight.shape == t.shape:
                    tied = cast(torch.Tensor, emb.weight)
            if tied is None:
                raise UsageError(f"tensor {qual} is missing from the checkpoint in {self.ckpt.dir}")
            _set(mod, attr, tied, True)

    def _load(self, names: dict[str, str], params: set[str]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors by name: parameters in the compute dtype, buffers as stored."""
        out = self.ckpt.load({n for q, n in names.items() if q in params}, self.device, self.dtype)
        out.update(self.ckpt.load({n for q, n in names.items() if q not in params}, self.device, None))
        return out

    def _check_shape(self, name: str, expected: torch.Tensor, loaded: torch.Tensor) -> None:
        """A loaded parameter has the shape of the model built from config.json (the layer sizes a
        structurally pruned checkpoint records there included), as load_pruned requires."""
        if tuple(expected.shape) != tuple(loaded.shape):
            raise UsageError(
                f"tensor {name} in {self.ckpt.dir} has shape {tuple(loaded.shape)}, the model its config.json describes expects {tuple(expected.shape)}",
                "the checkpoint's config.json does not describe its tensors (altered or damaged)",
            )

    def load_block(self, i: int) -> None:
        """Materialize block i's weights on the compute device."""
        blk = self.blocks[i]
        slots = list(_tensor_slots(blk, self.block_prefix(i)))
        names = {}
        for qual, _, _, _, is_param in slots:
            name = self.checkpoint_name(qual)
            if name is None and is_param:
                raise UsageError(f"tensor {qual} is missing from the checkpoint in {self.ckpt.dir}")
            if name is not None:
                names[qual] = name
        loaded = self._load(names, {q for q, _, _, _, p in slots if p})
        saved: list[tuple[nn.Module, str, torch.Tensor | None, bool]] = []
        for qual, _, _, t, is_param in slots:  # every tensor checked before the block changes
            if qual in names and is_param:
                self._check_shape(names[qual], t, loaded[names[qual]])
        for qual, mod, attr, t, is_param in slots:
            saved.append((mod, attr, t, is_param))
            if qual in names:
                _set(mod, attr, loaded[names[qual]], is_param)
            elif not is_param:
                _set(mod, attr, t.to(self.device), False)
        self._saved[i] = saved

    def add_block_parameter(self, i: int, mod: nn.Module, attr: str, value: torch.Tensor) -> None:
        """Give a module of loaded block i a parameter it lacks (a compensation bias); free_block
        removes it again."""
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
        self._saved.setdefault(i, []).append((mod, attr, None, True))

    def free_block(self, i: int) -> None:
        """Drop block i's weights again (back to the meta device)."""
        for mod, attr, t, is_param in reversed(self._saved.pop(i, [])):
            if t is None:  # added by add_block_parameter
                mod._parameters[attr] = None
            else:
                _set(mod, attr, t, is_param)

    # ---- running -----------------------------------------------------------------------------

    def _swap_blocks(self, stand_ins: Sequence[nn.Module]) -> list[nn.Module]:
        originals = list(self.blocks)
        for k, m in enumerate(stand_ins):
            self.blocks[k] = m
        return originals

    def _restore_blocks(self, originals: list[nn.Module]) -> None:
        for k, m in enumerate(originals):
            self.blocks[k] = m

    def _forward_ids(self, ids: torch.Tensor) -> Any:
        return self.model(input_ids=ids.to(self.device), use_cache=False)

    @torch.no_grad()
    def capture(self, ids: torch.Tensor, on_sample=None) -> torch.Tensor:
        """Run the embeddings over every sample ([N, L] token ids); returns block 0's inputs [N, L, H].

        The first sample also records what the model passes each block besides the hidden state
        (attention mask, position ids, rotary cos/sin, cache position, ...); all samples share their
        length and carry no padding, so those arguments are the same for every sample.
        """
        if ids.dim() != 2 or ids.shape[0] < 1:
            raise ValueError("capture expects token ids of shape [nsamples, seqlen]")
        n = ids.shape[0]
        out: torch.Tensor | None = None
        for j in range(n):
            first = j == 0
            stand_ins = [_Recorder(b, k, self, record_args=first, last=(k == self.num_blocks - 1)) for k, b in enumerate(self.blocks)]
            originals = self._swap_blocks(stand_ins)
            try:
                self._forward_ids(ids[j : j + 1])
            except _StopForward:
                pass
            finally:
                self._restore_blocks(originals)
            h = self._captured
            self._captured = None
            if h is None:
                raise RuntimeError("the model never called its first decoder block")
            if out is None:
                out = torch.empty((n,) + tuple(h.shape[1:]), dtype=h.dtype, device=self.device)
            out[j] = h[0]
            if on_sample is not None:
                on_sample()
        assert out is not None
        return out

    def run_block(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block i (loaded) applied to hidden [b, L, H]; returns its output hidden state."""
        args, kwargs = self.block_args[i] or ((), {})
        out = self.blocks[i](hidden, *args, **kwargs)
        if isinstance(out, tuple):
            fmt, h = len(out), out[0]
        else:
            fmt, h = 0, out
        if self._out_format is None:
            self._out_format = fmt
        return h

    def logits(self, ids: torch.Tensor, final_hidden: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """The model's logits for ids [1, L] given the last block's output [1, L, H]: the model's own
        final norm / projection / LM head run on it (the LM head must have been loaded, with_head).
        With grad, the logits stay differentiable with respect to final_hidden."""
        if self._out_format is None:
            raise RuntimeError("run the blocks before asking for logits")
        n = self.num_blocks
        stand_ins = [_Passthrough(b, self._out_format, final_hidden if k == n - 1 else None) for k, b in enumerate(self.blocks)]
        originals = self._swap_blocks(stand_ins)
        try:
            with torch.set_grad_enabled(grad):
                out = self._forward_ids(ids)
        finally:
            self._restore_blocks(originals)
        return out.logits if hasattr(out, "logits") else out[0]
