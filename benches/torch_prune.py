"""What a user would write without llmprune: plain PyTorch masking of a safetensors checkpoint.

Loads one shard's state dict at a time, scores each decoder-block weight, sorts each row stably,
scatters zeros, saves the shard. Same semantics as `llmprune apply` (used as the speed baseline).

    python benches/torch_prune.py MODEL OUT --method wanda (--sparsity 0.5 | --pattern 2:4)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

BLOCK = re.compile(r"\.(layers|h|blocks)\.\d+\..*\.weight$")


def factors(stats_file, name: str, method: str) -> torch.Tensor | None:
    if method == "magnitude":
        return None
    s = stats_file.get_tensor(name + ".act_sum")
    q = stats_file.get_tensor(name + ".act_sqsum")
    n = float(stats_file.get_tensor(name + ".act_count")[0])
    if method == "wanda":
        return (q / n).sqrt().float()
    mu = s / n
    return ((q - n * mu * mu) / (n - 1)).clamp_min(0).sqrt().float()


def prune(w: torch.Tensor, f: torch.Tensor | None, sparsity: float | None, pattern: tuple[int, int] | None) -> torch.Tensor:
    score = w.float().abs()
    if f is not None:
        score = score * f
    mask = torch.zeros_like(score, dtype=torch.bool)
    if pattern is None:
        k = int(score.shape[1] * sparsity)
        idx = torch.sort(score, dim=1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    else:
        n, m = pattern
        groups = score.reshape(score.shape[0], -1, m)
        idx = torch.sort(groups, dim=2, stable=True)[1][:, :, :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(score.shape)
    return w.masked_fill(mask, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--pattern")
    a = ap.parse_args()
    pattern = tuple(int(x) for x in a.pattern.split(":")) if a.pattern else None
    a.out.mkdir(parents=True)
    index_path = a.model / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values())) if index_path.exists() else ["model.safetensors"]
    stats = safe_open(a.model / "llmprune-stats.safetensors", "pt") if a.method != "magnitude" else None
    for shard in shards:
        sd = load_file(a.model / shard)
        for name, w in sd.items():
            if w.dim() == 2 and BLOCK.search(name):
                sd[name] = prune(w, factors(stats, name, a.method), a.sparsity, pattern)
        save_file(sd, a.out / shard, metadata={"format": "pt"})
        del sd
    for f in a.model.iterdir():
        if f.name not in shards and f.name != "llmprune-stats.safetensors":
            shutil.copy(f, a.out / f.name)


if __name__ == "__main__":
    main()
