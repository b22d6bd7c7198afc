"""Independent reference implementations for the llmprune tests.

Everything here is written from the formulas in docs/architecture.md, select.rs's header and docs/sidecar.md with plain numpy /
PyTorch / json; nothing calls into llmprune. Later test modules reuse these helpers:

- tiny checkpoints:       tiny_llama_dir
- calibration statistics: reference_stats, random_samples, load_f32_model
- the sidecar file:       write_sidecar, fingerprint_and_tensors
- masks:                  reference_scores, reference_mask, is_prunable_default, STADE_W_SUFFIXES
- checkpoint bytes:       read_header, read_checkpoint, write_safetensors, to_f32, bits, tensor_files
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SIDECAR_NAME = "llmprune-stats.safetensors"

# safetensors dtype name -> (numpy dtype used to hold the raw values, item size)
DTYPES: dict[str, tuple[Any, int]] = {
    "BF16": (np.uint16, 2),
    "F16": (np.float16, 2),
    "F32": (np.float32, 4),
    "F64": (np.float64, 8),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "I16": (np.int16, 2),
    "U16": (np.uint16, 2),
    "I32": (np.int32, 4),
    "U32": (np.uint32, 4),
    "I64": (np.int64, 8),
    "U64": (np.uint64, 8),
    "BOOL": (np.bool_, 1),
}
UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# Decoder-block component of a qualified module / tensor name (LLaMA/OPT `layers.N`, GPT-2 `h.N`).
BLOCK_RE = re.compile(r"(^|\.)(layers|h)\.\d+\.")

# Layers fed by the attention output and the MLP hidden state: `stade-w` uses STADE on these.
STADE_W_SUFFIXES = (
    "o_proj.weight",  # LLaMA
    "down_proj.weight",  # LLaMA
    "out_proj.weight",  # OPT
    "fc2.weight",  # OPT
    "c_proj.weight",  # GPT-2 (attn.c_proj and mlp.c_proj)
)


# --------------------------------------------------------------------------------------------
# safetensors files, parsed by hand
# --------------------------------------------------------------------------------------------


@dataclass
class RawTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    file: str  # shard file name (relative to the model dir)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(parsed JSON header, byte offset where the data buffer starts) of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n


def tensor_files(model_dir: str | Path) -> list[str]:
    """Shard file names of a checkpoint directory (from the index when there is one)."""
    model_dir = Path(model_dir)
    idx = model_dir / INDEX_NAME
    if idx.exists():
        weight_map = json.loads(idx.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    return [SINGLE_NAME]


def read_file_tensors(path: str | Path, file_label: str = "") -> tuple[dict[str, RawTensor], dict[str, str]]:
    """All tensors of one safetensors file (name -> RawTensor) and its __metadata__."""
    header, start = read_header(path)
    blob = Path(path).read_bytes()[start:]
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        out[name] = RawTensor(name, info["dtype"], tuple(info["shape"]), blob[a:b], file_label or Path(path).name)
    return out, meta


def read_checkpoint(model_dir: str | Path) -> tuple[dict[str, RawTensor], dict[str, dict[str, str]]]:
    """All tensors of a checkpoint dir (name -> RawTensor) and each shard's __metadata__."""
    model_dir = Path(model_dir)
    tensors: dict[str, RawTensor] = {}
    metas: dict[str, dict[str, str]] = {}
    for fname in tensor_files(model_dir):
        t, m = read_file_tensors(model_dir / fname, fname)
        tensors.update(t)
        metas[fname] = m
    return tensors, metas


def write_safetensors(path: str | Path, tensors: list[RawTensor] | list[tuple], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from raw tensors (name, dtype, shape, data), in the given order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    blobs = []
    for t in tensors:
        name, dtype, shape, data = (t.name, t.dtype, t.shape, t.data) if isinstance(t, RawTensor) else t[:4]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((-len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def bits(t: RawTensor) -> np.ndarray:
    """The raw bit patterns of a tensor's elements, as unsigned integers of its item size."""
    size = DTYPES[t.dtype][1]
    return np.frombuffer(t.data, dtype=UINT_OF_SIZE[size]).reshape(t.shape)


def to_f32(t: RawTensor) -> np.ndarray:
    """A BF16 / F16 / F32 tensor upcast (exactly) to float32."""
    if t.dtype == "BF16":
        u = np.frombuffer(t.data, dtype=np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(t.shape)
    if t.dtype == "F16":
        return np.frombuffer(t.data, dtype=np.float16).astype(np.float32).reshape(t.shape)
    if t.dtype == "F32":
        return np.frombuffer(t.data, dtype=np.float32).reshape(t.shape).copy()
    raise ValueError(f"to_f32: unsupported dtype {t.dtype} of {t.name}")


def from_f32(x: np.ndarray, dtype: str) -> bytes:
    """float32 values to the raw bytes of `dtype` (BF16 by round-to-nearest-even; exact inputs expected)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "BF16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype(np.uint16).tobytes()
    if dtype == "F16":
        return x.astype(np.float16).tobytes()
    if dtype == "F32":
        return x.tobytes()
    if dtype == "F64":
        return x.astype(np.float64).tobytes()
    if dtype == "I32":
        return x.astype(np.int32).tobytes()
    raise ValueError(dtype)


def is_prunable_default(name: str, shape: tuple[int, ...]) -> bool:
    """The rule without a sidecar (rust/llmprune-core/src/prunable.rs): 2-D weights under `*.layers.N.*` / `*.h.N.*`."""
    return len(shape) == 2 and name.endswith(".weight") and BLOCK_RE.search(name) is not None


# --------------------------------------------------------------------------------------------
# Tiny checkpoints
# --------------------------------------------------------------------------------------------

TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def tiny_llama_config(**overrides: Any):
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama_dir(
    path: str | Path,
    dtype: str = "bfloat16",
    sharded: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random LLaMA checkpoint (config.json + safetensors, no tokenizer) into `path`.

    Some rows of every block linear are made to hold few distinct values (exact in every dtype),
    exact zeros and negative zeros, so the tie rule and the +0.0 rule are exercised for every
    method (a row with more -0.0 than entries to prune reveals the tie order through sign bits).
    """
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(**config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and BLOCK_RE.search(name + "."):
                w = mod.weight
                # rows 0..3: multiples of 1/64 -> many equal magnitudes and exact zeros
                w[0:4] = torch.round(w[0:4] * 64) / 64
                # row 4: all equal magnitudes with mixed signs
                signs = torch.where(torch.rand(w.shape[1], generator=gen) < 0.5, -1.0, 1.0)
                w[4] = 0.03125 * signs
                # row 5: a negative zero and a few exact zeros
                w[5, 3] = -0.0
                w[5, 10:13] = 0.0
                # row 6: a duplicated block of values (ties between different columns)
                half = w.shape[1] // 2
                w[6, half:] = w[6, :half]
                # row 7: three quarters negative zeros: more zero scores than k, so which of them
                # are pruned (become +0.0) shows the tie rule whatever the activation factors
                w[7, : 3 * w.shape[1] // 4] = -0.0
        model = model.to(getattr(torch, dtype))
        # torch casting keeps -0.0; make sure it survives in every dtype
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if sharded:
        kwargs["max_shard_size"] = "100KB"
    model.save_pretrained(path, **kwargs)
    if sharded:
        assert (path / INDEX_NAME).exists(), "expected a sharded checkpoint"
        assert len(tensor_files(path)) >= 2
    return path


def load_f32_model(model_dir: str | Path):
    """The checkpoint as a float32 CPU transformers model in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def random_samples(nsamples: int = 4, seqlen: int = 32, vocab: int = 256, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (nsamples, seqlen), generator=gen)


# --------------------------------------------------------------------------------------------
# Calibration statistics
# --------------------------------------------------------------------------------------------


def reference_stats(model, samples, per_expert: bool = True) -> dict[str, dict[str, Any]]:
    """Σx and Σx² (float64) of the input of every linear inside the decoder blocks; with
    `per_expert`, also of each expert's linears inside fused experts modules (transformers 5's
    in-memory form of a checkpoint that stores one tensor set per expert).

    `samples`: a LongTensor [nsamples, seqlen] of token ids (or an iterable of [1, L] / [L] tensors).
    Returns {"<module>.weight": {"act_sum", "act_sqsum", "act_count", "input_axis"}}.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    model = model.float().eval()
    stats: dict[str, dict[str, Any]] = {}
    hooks = []

    def make_hook(key: str, in_features: int, axis: int):
        stats[key] = {
            "act_sum": np.zeros(in_features, dtype=np.float64),
            "act_sqsum": np.zeros(in_features, dtype=np.float64),
            "act_count": 0,
            "input_axis": axis,
        }

        def hook(_mod, inputs, _output):
            x = inputs[0].detach().to(torch.float64).reshape(-1, in_features).cpu().numpy()
            s = stats[key]
            s["act_sum"] += x.sum(axis=0)
            s["act_sqsum"] += (x * x).sum(axis=0)
            s["act_count"] += int(x.shape[0])

        return hook

    for name, mod in model.named_modules():
        if not BLOCK_RE.search(name + "."):
            continue
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(make_hook(f"{name}.weight", mod.in_features, 1)))
        elif isinstance(mod, Conv1D):
            hooks.append(mod.register_forward_hook(make_hook(f"{name}.weight", mod.weight.shape[0], 0)))
        elif per_expert and isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor) and mod.gate_up_proj.dim() == 3:
            hooks.append(fused_expert_hook(model, name, mod, make_hook))
    try:
        with torch.no_grad():
            if isinstance(samples, torch.Tensor) and samples.dim() == 2:
                samples = list(samples)
            for s in samples:
                ids = s if s.dim() == 2 else s.unsqueeze(0)
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return stats


# transformers 5 fuses MoE experts in memory; on disk (and in the sidecar) each expert keeps its
# linears, under the MoE module's hub name
EXPERT_LINEARS = {"mixtral": ("w1", "w3", "w2")}  # (gate, up, down); others: gate_proj, up_proj, down_proj
MOE_DISK_NAME = {"mixtral": (".mlp.", ".block_sparse_moe.")}


def fused_expert_hook(model, name: str, mod, make_hook):
    """Per-expert input statistics of a fused experts module ([E, 2I, H] gate_up_proj, [E, H, I]
    down_proj, called with (hidden [T, H], top-k ids [T, k], top-k weights)), keyed by the
    checkpoint's per-expert linear names, over the tokens routed to each expert."""
    import torch

    mtype = model.config.model_type
    gate_n, up_n, down_n = EXPERT_LINEARS.get(mtype, ("gate_proj", "up_proj", "down_proj"))
    mem, disk = MOE_DISK_NAME.get(mtype, ("", ""))
    prefix = (name + ".").replace(mem, disk) if mem else name + "."
    e, two_i, h = mod.gate_up_proj.shape
    calls = {}
    for j in range(e):
        for lin, width in ((gate_n, h), (up_n, h), (down_n, two_i // 2)):
            calls[(j, lin)] = make_hook(f"{prefix}{j}.{lin}.weight", width, 1)

    def hook(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
        for j in range(e):
            rows = (ids == j).any(-1)
            if not rows.any():
                continue
            xj = x[rows]
            g, u = torch.nn.functional.linear(xj, mod.gate_up_proj[j]).chunk(2, dim=-1)
            calls[(j, gate_n)](None, (xj,), None)
            calls[(j, up_n)](None, (xj,), None)
            calls[(j, down_n)](None, (mod.act_fn(g) * u,), None)

    return mod.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------------------------
# The sidecar
# --------------------------------------------------------------------------------------------


def fingerprint_and_tensors(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """(model_fingerprint, model_tensors) exactly as docs/sidecar.md defines them."""
    model_dir = Path(model_dir)
    facts: dict[str, tuple[str, list[int]]] = {}
    for fname in tensor_files(model_dir):
        header, _ = read_header(model_dir / fname)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            facts[name] = (info["dtype"], list(info["shape"]))
    lines = []
    described = {}
    for name in sorted(facts):
        dtype, shape = facts[name]
        dims = ",".join(str(d) for d in shape)
        lines.append(f"{name}\t{dtype}\t{dims}\n")
        described[name] = f"{dtype}[{dims}]"
    fp = hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
    return fp, described


def write_sidecar(
    model_dir: str | Path,
    stats: dict[str, dict[str, Any]],
    path: str | Path | None = None,
    mode: str = "dense",
    sequential: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    *,
    fingerprint: str | None = None,
    model_tensors: dict[str, str] | None = None,
) -> Path:
    """Write a v1 stats sidecar for `model_dir` (default path: MODEL/llmprune-stats.safetensors)."""
    from safetensors.numpy import save_file

    model_dir = Path(model_dir)
    path = Path(path) if path is not None else model_dir / SIDECAR_NAME
    fp, described = fingerprint_and_tensors(model_dir)
    if fingerprint is not None:
        fp = fingerprint
    if model_tensors is not None:
        described = model_tensors
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, dict[str, int]] = {}
    count_total = 0
    for name in sorted(stats):
        s = stats[name]
        tensors[f"{name}.act_sum"] = np.ascontiguousarray(s["act_sum"], dtype=np.float64)
        tensors[f"{name}.act_sqsum"] = np.ascontiguousarray(s["act_sqsum"], dtype=np.float64)
        tensors[f"{name}.act_count"] = np.array([int(s["act_count"])], dtype=np.int64)
        layers[name] = {"input_axis": int(s.get("input_axis", 1))}
        count_total = max(count_total, int(s["act_count"]))
    if calibration is None:
        calibration = {"source": "random-ids", "nsamples": 0, "seqlen": 0, "seed": 0, "tokens": count_total}
    meta = {
        "format": "llmprune-stats",
        "format_version": 1,
        "llmprune_version": "0.1.0",
        "model_fingerprint": fp,
        "model_tensors": described,
        "calibration": calibration,
        "mode": mode,
        "sequential": sequential,
        "layers": layers,
    }
    save_file(tensors, str(path), metadata={"llmprune": json.dumps(meta)})
    return path


def read_sidecar_stats(path: str | Path) -> dict[str, dict[str, Any]]:
    """Load a sidecar back into the reference_stats layout (independent of llmprune)."""
    from safetensors.numpy import load_file

    header, _ = read_header(path)
    meta = json.loads(header["__metadata__"]["llmprune"])
    arrays = load_file(str(path))
    out = {}
    for name, info in meta["layers"].items():
        out[name] = {
            "act_sum": arrays[f"{name}.act_sum"],
            "act_sqsum": arrays[f"{name}.act_sqsum"],
            "act_count": int(arrays[f"{name}.act_count"][0]),
            "input_axis": int(info.get("input_axis", 1)),
        }
    return out


# --------------------------------------------------------------------------------------------
# Scores and masks
# --------------------------------------------------------------------------------------------


def _col_factor(method: str, stats: dict[str, Any]) -> np.ndarray:
    """Per-input-column factor (float32), computed in f64 and rounded once."""
    n = float(stats["act_count"])
    s = np.asarray(stats["act_sum"], dtype=np.float64)
    sq = np.asarray(stats["act_sqsum"], dtype=np.float64)
    if method == "wanda":
        return np.sqrt(sq / n).astype(np.float32)
    if method == "stade":
        mu = s / n
        var = (sq - n * (mu * mu)) / (n - 1.0)
        var = np.maximum(var, 0.0)
        return np.sqrt(var).astype(np.float32)
    raise ValueError(method)


def base_method(method: str, name: str) -> str:
    """The metric actually used for a weight: stade-w resolves per layer."""
    if method == "stade-w":
        return "stade" if name.endswith(STADE_W_SUFFIXES) else "wanda"
    return method


def reference_scores(w_f32: np.ndarray, method: str, stats: dict[str, Any] | None = None, name: str = "") -> np.ndarray:
    """float32 scores of an [out, in] weight."""
    w = np.abs(np.asarray(w_f32, dtype=np.float32))
    m = base_method(method, name)
    if m == "magnitude":
        return w
    if stats is None:
        raise ValueError(f"{method} needs stats")
    if name and name in stats and isinstance(stats[name], dict):
        stats = stats[name]
    f = _col_factor(m, stats)
    assert f.shape == (w.shape[1],), (f.shape, w.shape)
    return (w * f[None, :]).astype(np.float32)


def parse_pattern(pattern: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(pattern, str):
        a, b = pattern.split(":")
        return int(a), int(b)
    return int(pattern[0]), int(pattern[1])


def select_mask(
    scores: np.ndarray,
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | None = None,
    scope: str = "row",
) -> np.ndarray:
    """Mask (True = pruned) from scores, with the stable-ascending tie rule."""
    rows, cols = scores.shape
    mask = np.zeros(scores.shape, dtype=bool)
    if pattern is not None:
        n, m = parse_pattern(pattern)
        assert cols % m == 0
        g = scores.reshape(rows, cols // m, m)
        order = np.argsort(g, axis=-1, kind="stable")[..., :n]
        gm = np.zeros(g.shape, dtype=bool)
        np.put_along_axis(gm, order, True, axis=-1)
        return gm.reshape(rows, cols)
    assert sparsity is not None
    if scope == "layer":
        flat = scores.reshape(-1)
        k = int(flat.size * sparsity)
        order = np.argsort(flat, kind="stable")[:k]
        fm = np.zeros(flat.size, dtype=bool)
        fm[order] = True
        return fm.reshape(rows, cols)
    if scope != "row":
        raise ValueError(scope)
    k = int(cols * sparsity)
    order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def reference_mask(
    w_f32: np.ndarray,
    method: str,
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | None = None,
    scope: str = "row",
    stats: dict[str, Any] | None = None,
    name: str = "",
) -> np.ndarray:
    """The pruning mask (True = pruned) of an [out, in] weight, per the semantics in docs/architecture.md.

    `stats` is either this weight's {"act_sum", "act_sqsum", "act_count"} or the whole
    reference_stats dict (then `name` selects the entry).
    """
    scores = reference_scores(w_f32, method, stats, name)
    return select_mask(scores, sparsity=sparsity, pattern=pattern, scope=scope)


def nm_compliant(x: np.ndarray, n: int, m: int) -> bool:
    """True when every run of m consecutive input columns of every row holds at least n zeros."""
    if x.ndim != 2 or x.shape[1] % m:
        return False
    z = (x == 0).reshape(x.shape[0], x.shape[1] // m, m).sum(axis=-1)
    return bool((z >= n).all())
