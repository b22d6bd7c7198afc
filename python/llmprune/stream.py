"""Layer-streamed execution of a causal LM stored as safetensors: one decoder block in memory at a time.

The transformers model is built on the meta device from config.json, so its own code (attention masks,
rotary embeddings, positional embeddings, final norm, tied heads) runs unchanged, but no weight exists
until it is needed. Only the modules outside the decoder blocks (embeddings, final norm, optionally the
LM head) are loaded for the whole run; each block is loaded from the shards, run over every sample,
and dropped again. Peak memory is one block plus the activations of the samples, whatever the depth.

Used by the statistics pass (`stats.py`) and by perplexity evaluation (`evaluate.py`).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.errors import UsageError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_TO_TORCH = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# The checkpoint on disk
# --------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (without reading any tensor data)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UsageError(f"{path} is not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise UsageError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a safetensors file: corrupt header ({exc})") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path} is not a safetensors file: header is not a JSON object")
    return header


class Checkpoint:
    """Names, dtypes and shapes of a checkpoint's tensors (from the headers) and per-tensor loading.

    The same files as the Rust core reads: `model.safetensors`, or the shards named by
    `model.safetensors.index.json` (a stats sidecar beside them is never part of the model).
    """

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        if not d.exists():
            raise UsageError(f"model directory not found: {d}", hint="MODEL is a local directory with config.json and safetensors weights")
        if not d.is_dir():
            raise UsageError(f"MODEL must be a directory: {d}")
        if not (d / "config.json").is_file():
            raise UsageError(f"no config.json in {d}", hint="MODEL is a Hugging Face checkpoint directory")
        self.dir = d
        index = d / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"cannot read {index}: {exc}") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if Path(f).is_absolute() or ".." in Path(f).parts:
                    raise UsageError(f"{index} names a shard outside the model directory: {f}")
        elif (d / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise UsageError(f"neither {SINGLE_FILE} nor {INDEX_FILE} found in {d}")
        self.files = files
        self.entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        for f in files:
            path = d / f
            if not path.is_file():
                raise UsageError(f"shard {f} named by {INDEX_FILE} is missing from {d}")
            for name, info in read_safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                self.entries[name] = (f, info["dtype"], tuple(int(x) for x in info["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def float_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: the floating dtype most of its tensors have."""
        counts = Counter(dt for _, dt, _ in self.entries.values() if dt in ("BF16", "F16", "F32"))
        if not counts:
            return torch.float32
        return _ST_TO_TORCH[counts.most_common(1)[0][0]]

    def load(self, names: Iterable[str], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The named tensors on `device`, floating ones cast to `dtype` (when given).

        Each shard is opened for the duration of one call only, so no mapping of the whole
        checkpoint stays resident.
        """
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.entries[n][0], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            with safe_open(str(self.dir / f), framework="pt", device="cpu") as st:
                for n in ns:
                    t = st.get_tensor(n).to(device)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[n] = t
        return out


# --------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The model skeleton
# --------------------------------------------------------------------------------------------


def load_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read the model configuration in {model_dir}: {exc}") from None


DEFAULT_SEQLEN = 2048


def check_pass_inputs(model_dir: Path, device: str, dtype: str, seqlen: int | None) -> int:
    """Validates MODEL, --device and --dtype before any text is loaded; returns the window length:
    --seqlen, else min(2048, the model's context). A --seqlen beyond the context is an error."""
    ckpt = Checkpoint(model_dir)  # a missing or broken checkpoint is reported before anything else
    resolve_dtype(dtype, ckpt.float_dtype(), resolve_device(device))
    ctx = getattr(load_config(model_dir), "max_position_embeddings", None)
    if seqlen is None:
        return min(DEFAULT_SEQLEN, ctx) if isinstance(ctx, int) and ctx > 0 else DEFAULT_SEQLEN
    if isinstance(ctx, int) and 0 < ctx < seqlen:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context of {ctx} tokens", hint=f"pass --seqlen {ctx} or less")
    return seqlen


def build_skeleton(config) -> nn.Module:
    """The causal LM with every parameter on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from llmprune.structured import resize_modules

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
        self.blocks_path, self.blocks = find_blocks(self.model)
        self.num_blocks = len(self.blocks)
        self.block_args: list[tuple[tuple, dict] | None] = [None] * self.num_blocks
        self._out_format: int | None = None  # 0: blocks return a tensor; n: a tuple of n items
        self._captured: torch.Tensor | None = None
        self._saved: dict[int, list[tuple[nn.Module, str, torch.Tensor, bool]]] = {}
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""
        self._share_block_buffers()
        self._load_outside_blocks(with_head)

    # ---- names -------------------------------------------------------------------------------

    @property
    def max_positions(self) -> int | None:
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def checkpoint_name(self, qual: str) -> str | None:
        """The checkpoint's name for a module tensor (checkpoints may omit or add the base prefix)."""
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

    def prunable(self, i: int) -> list[tuple[str, nn.Module, int]]:
        """(checkpoint weight name, module, input axis) of every linear layer in block i."""
        out = []
        for mname, mod in self.blocks[i].named_modules():
            axis = linear_input_axis(mod)
            if axis is None:
                continue
            qual = f"{self.block_prefix(i)}.{mname}.weight"
            name = self.checkpoint_name(qual)
            if name is None:
                raise UsageError(f"tensor {qual} is missing from the checkpoint in {self.ckpt.dir}")
            out.append((name, mod, axis))
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
        for qual, mod, attr, t, is_param in slots:
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
                    tied = emb.weight
            if tied is None:
                raise UsageError(f"tensor {qual} is missing from the checkpoint in {self.ckpt.dir}")
            _set(mod, attr, tied, True)

    def _load(self, names: dict[str, str], params: set[str]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors by name: parameters in the compute dtype, buffers as stored."""
        out = self.ckpt.load({n for q, n in names.items() if q in params}, self.device, self.dtype)
        out.update(self.ckpt.load({n for q, n in names.items() if q not in params}, self.device, None))
        return out

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
        saved = []
        for qual, mod, attr, t, is_param in slots:
            saved.append((mod, attr, t, is_param))
            if qual in names:
                _set(mod, attr, loaded[names[qual]], is_param)
            elif not is_param:
                _set(mod, attr, t.to(self.device), False)
        self._saved[i] = saved

    def free_block(self, i: int) -> None:
        """Drop block i's weights again (back to the meta device)."""
        for mod, attr, t, is_param in reversed(self._saved.pop(i, [])):
            _set(mod, attr, t, is_param)

    # ---- running -----------------------------------------------------------------------------

    def _swap_blocks(self, stand_ins: list[nn.Module]) -> list[nn.Module]:
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
            stand_ins = [
                _Recorder(b, k, self, record_args=first, last=(k == self.num_blocks - 1)) for k, b in enumerate(self.blocks)
            ]
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
