"""A checkpoint directory as the Rust core validates it, and per-tensor loading for the torch passes.

The core (rust/llmprune-core/src/checkpoint.rs) is the one owner of the format: it checks the index
(relative paths, every tensor in exactly one shard, the shard the index names), every shard header,
and the symbolic-link policy. `stats`, `eval` and `finetune` read through this view, so they accept
exactly the checkpoints `apply` and `inspect` accept, with the same messages.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

_ST_TO_TORCH = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class Checkpoint:
    """Names, dtypes and shapes of a checkpoint's tensors, and loading of named tensors."""

    def __init__(self, model_dir: str | Path):
        from llmprune import _core

        doc = json.loads(_core.open_checkpoint(str(model_dir)))
        self.dir = Path(model_dir)
        self.files: list[str] = doc["files"]
        self.fingerprint: str = doc["fingerprint"]
        # name -> "DTYPE[d0,d1]", as recorded in stats sidecars
        self.model_tensors: dict[str, str] = doc["model_tensors"]
        self.entries: dict[str, tuple[str, str, tuple[int, ...]]] = {name: (f, dtype, tuple(shape)) for name, (f, dtype, shape) in doc["tensors"].items()}
        # MXFP4 pairs (gpt-oss's experts): X_blocks U8 [E, R, G, 16] and X_scales U8 [E, R, G] are read as
        # the dequantized X [E, G·32, R], the layout the model holds in memory
        self.mxfp4: dict[str, tuple[str, str]] = {}
        for name, (_, dtype, shape) in self.entries.items():
            base = name.removesuffix("_blocks")
            scales = self.entries.get(base + "_scales")
            if base != name and dtype == "U8" and len(shape) == 4 and scales is not None and scales[2] == shape[:3] and base not in self.entries:
                self.mxfp4[base] = (name, base + "_scales")

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.mxfp4

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.mxfp4:
            e, r, g, b = self.entries[self.mxfp4[name][0]][2]
            return (e, g * b * 2, r)
        return self.entries[name][2]

    def float_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: the floating dtype most of its tensors have."""
        counts = Counter(dt for _, dt, _ in self.entries.values() if dt in ("BF16", "F16", "F32"))
        if not counts:
            return torch.float32
        return _ST_TO_TORCH[counts.most_common(1)[0][0]]

    def content_digest(self) -> str:
        """SHA-256 of the bytes of the first two matrices in name order (e.g. the LM head and the
        token embeddings): tells apart two checkpoints of one architecture (same fingerprint) that
        hold different weights, without reading the whole model."""
        import hashlib

        names = [n for n in sorted(self.entries) if len(self.entries[n][2]) >= 2][:2]
        h = hashlib.sha256()
        for name, t in sorted(self.load(names, torch.device("cpu"), None).items()):
            h.update(name.encode() + b"\0")
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def load(self, names: Iterable[str], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The named tensors on `device`, floating ones cast to `dtype` (when given).

        Each shard is opened for the duration of one call only, so no mapping of the whole
        checkpoint stays resident. The shards were validated by the core when this view was built.
        """
        from safetensors import safe_open

        names = list(names)
        packed = {n: self.mxfp4[n] for n in names if n in self.mxfp4}
        by_file: dict[str, list[str]] = {}
        for n in [n for n in names if n not in packed] + [p for pair in packed.values() for p in pair]:
            by_file.setdefault(self.entries[n][0], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            with safe_open(str(self.dir / f), framework="pt", device="cpu") as st:
                for n in ns:
                    t = st.get_tensor(n).to(device)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[n] = t
        for n, (blocks, scales) in packed.items():
            out[n] = dequantize_mxfp4(out.pop(blocks), out.pop(scales), dtype or torch.bfloat16)
        return out


# the 16 values of an FP4 (E2M1) code, low nibble first in each byte
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """OCP MXFP4: blocks U8 [E, R, G, 16] hold 32 FP4 codes per group (two per byte, low nibble
    first), scales U8 [E, R, G] the group's power of two (E8M0, bias 127). Returns [E, G·32, R], one
    expert at a time (never the whole float tensor's intermediates at once)."""
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    e, r, g, b = blocks.shape
    out = torch.empty(e, g * b * 2, r, dtype=dtype, device=blocks.device)
    for j in range(e):
        codes = torch.stack((blocks[j] & 0x0F, blocks[j] >> 4), dim=-1).long()  # [R, G, 16, 2]
        values = lut[codes].reshape(r, g, b * 2)
        values = torch.ldexp(values, (scales[j].to(torch.int32) - 127).unsqueeze(-1))
        out[j] = values.reshape(r, g * b * 2).t().to(dtype)
    return out
