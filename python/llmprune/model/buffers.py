"""Activation buffers for the layer-streamed passes: on the compute device, in CPU memory, or in
file-backed maps in a temporary directory when neither has room (block reconstruction, task
evaluation)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import torch


def available_memory() -> int:
    """Bytes of CPU memory available now (MemAvailable; unlimited where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class Activations:
    """`count` float32 activation buffers of `shape`: on the compute device when they fit in half
    of its free memory, else in CPU memory when they fit in half of what is available, else in
    file-backed maps in a temporary directory ($TMPDIR). An environment variable named by `spill_env`
    set to 1 forces the file-backed maps (LLMPRUNE_SPILL=1 always does)."""

    def __init__(self, shape: tuple[int, ...], count: int, device: torch.device, *, spill_env: str = "LLMPRUNE_SPILL", prefix: str = "llmprune-"):
        self.shape = shape
        self.tmp: str | None = None
        self._prefix = prefix
        total = count * math.prod(shape) * 4
        if os.environ.get(spill_env) == "1" or os.environ.get("LLMPRUNE_SPILL") == "1":
            self.where = "file"
        elif device.type == "cuda" and total < torch.cuda.mem_get_info(device)[0] // 2:
            self.where = "device"
        elif total < available_memory() // 2:
            self.where = "cpu" if device.type == "cuda" else "device"
        else:
            self.where = "file"
        self.device = device if self.where == "device" else torch.device("cpu")
        self._n = 0

    def new(self) -> torch.Tensor:
        if self.where != "file":
            return torch.empty(self.shape, dtype=torch.float32, device=self.device)
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix=self._prefix)
        self._n += 1
        path = os.path.join(self.tmp, f"buffer{self._n}.bin")
        return torch.from_file(path, shared=True, size=math.prod(self.shape), dtype=torch.float32).view(self.shape)

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
