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
        self.entries: dict[str, tuple[str, str, tuple[int, ...]]] = {
            name: (f, dtype, tuple(shape)) for name, (f, dtype, shape) in doc["tensors"].items()
        }

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
        checkpoint stays resident. The shards were validated by the core when this view was built.
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
