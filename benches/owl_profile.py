"""Why OWL allocates as it does on a model: each decoder block's outlier ratio D and, per linear, the
share of its Wanda scores above the block's threshold, computed here in numpy from the checkpoint and
its `llmprune stats` sidecar; then the block sparsities OWL derives from D, checked against those
`llmprune apply --allocation owl --json` reports.

D is the share of a block's Wanda scores |W_ij| * sqrt(sum x_j^2 / n), all its linears together,
above M times their mean (docs/refinements.md); OWL gives blocks with a larger D a lower sparsity.
On LLaMA-7B D falls with depth, so OWL prunes the first blocks least. The table shows which way it
goes on the model at hand, and which linears drive it:

    python benches/owl_profile.py [--model-dir demo-out/smollm2-135m] [--owl-m 5] [--sparsity 0.7]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from safetensors import safe_open

from common import llmprune

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def wanda_scores(model: Path, sidecar: Path) -> dict[int, dict[str, np.ndarray]]:
    """block -> linear -> f32 Wanda scores (flattened), for every weight the sidecar has statistics of."""
    blocks: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    weights = {}
    for shard in sorted(model.glob("*.safetensors")):
        if shard.name.startswith("llmprune-"):
            continue
        with safe_open(str(shard), "pt") as f:
            weights.update({k: shard for k in f.keys()})
    with safe_open(str(sidecar), "np") as st:
        names = sorted(k[: -len(".act_sqsum")] for k in st.keys() if k.endswith(".act_sqsum"))
        for name in names:
            b = BLOCK.search(name)
            if b is None or name not in weights:
                continue
            n = float(st.get_tensor(name + ".act_count").reshape(-1)[0])
            norm = np.sqrt(st.get_tensor(name + ".act_sqsum").astype(np.float64) / n).astype(np.float32)
            with safe_open(str(weights[name]), "pt") as f:
                w = f.get_tensor(name).float().numpy()
            blocks[int(b.group(1))][name] = (np.abs(w) * norm[None, :]).ravel()
    return dict(sorted(blocks.items()))


def owl_sparsities(d: list[float], sparsity: float, lam: float) -> list[float]:
    d = np.asarray(d)
    if d.max() == d.min():  # no ranking: uniform, as llmprune does
        return [sparsity] * len(d)
    r = (d - d.min()) / (d.max() - d.min()) * 2 * lam
    return list(sparsity - (r - r.mean()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "demo-out" / "smollm2-135m", help="checkpoint with its llmprune-stats.safetensors")
    ap.add_argument("--stats", type=Path, default=None, help="sidecar [default: MODEL/llmprune-stats.safetensors]")
    ap.add_argument("--owl-m", type=float, default=5.0, help="outlier threshold M [5]")
    ap.add_argument("--owl-lambda", type=float, default=0.08, help="lambda [0.08]")
    ap.add_argument("--sparsity", type=float, default=0.7, help="target sparsity S of the check against apply [0.7]")
    args = ap.parse_args(argv)
    model = args.model_dir.resolve()
    sidecar = (args.stats or model / "llmprune-stats.safetensors").resolve()
    blocks = wanda_scores(model, sidecar)
    kinds = sorted({BLOCK.split(n)[-1].removesuffix(".weight") for lin in blocks.values() for n in lin})

    d, shares = [], []
    for lin in blocks.values():
        scores = np.concatenate(list(lin.values()))
        threshold = scores.mean(dtype=np.float64) * args.owl_m
        d.append(float((scores > threshold).mean()))
        by_kind = {BLOCK.split(n)[-1].removesuffix(".weight"): float((s > threshold).mean()) for n, s in lin.items()}
        shares.append([by_kind.get(k) for k in kinds])
    mine = owl_sparsities(d, args.sparsity, args.owl_lambda)

    with tempfile.TemporaryDirectory(prefix="owl-profile-") as tmp:
        out = Path(tmp) / "out"
        res = llmprune("apply", str(model), "--method", "wanda", "--sparsity", str(args.sparsity), "--allocation", "owl",
                       "--owl-m", str(args.owl_m), "--owl-lambda", str(args.owl_lambda), "--stats", str(sidecar), "--out", str(out))
        shutil.rmtree(out, ignore_errors=True)
    theirs = res["block_sparsity"]
    worst = max(abs(a - b) for a, b in zip(mine, theirs))

    print(f"Outlier ratios of {model.name} (M = {args.owl_m:g}); OWL's block sparsities at S = {args.sparsity:g}, "
          f"lambda = {args.owl_lambda:g} (largest difference from `llmprune apply`'s: {worst:.1e})\n")
    print("| block | D | " + " | ".join(f"`{k}`" for k in kinds) + " | OWL sparsity |")
    print("|---:|---:|" + "---:|" * len(kinds) + "---:|")
    for (b, _), dv, sh, s in zip(blocks.items(), d, shares, theirs):
        cells = " | ".join("-" if x is None else f"{x:.2%}" for x in sh)
        print(f"| {b} | {dv:.2%} | {cells} | {s:.3f} |")
    if worst > 1e-6:
        print(f"error: these block sparsities differ from llmprune's by {worst:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
