"""Structured pruning on a real model: perplexity, parameters, size on disk and forward latency of
dense, magnitude-sp, wanda-sp and FLAP (global and uniform allocation) at several sparsities.

    python benches/structured_bench.py [--model demo-out/smollm2-135m] [--sparsities 0.2,0.5]
        [--variants magnitude-sp:uniform,wanda-sp:uniform,flap:global,flap:uniform]
        [--max-tokens 16384] [--seqlen 512] [--device auto] [--markdown FILE] [--json FILE]

Every step goes through the `llmprune` command line as a user would run it: `stats` once (dense
statistics on the built-in calibration text, State of the Union 1900-1949) unless the model already
has a sidecar or --stats names one, `apply` per variant, `eval` (built-in held-out text, 1950 onward)
per model. Latency: one forward of [batch, --latency-tokens] tokens through the model loaded with
`llmprune.load_pruned`, median of --latency-runs after a warm-up, float32 on the CPU (and bfloat16 on
the GPU when one is available), in this process. Ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = "magnitude-sp:uniform,wanda-sp:uniform,flap:global,flap:uniform"


def cli(*args: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmprune", *map(str, args), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout)


def disk_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors") if f.name != "llmprune-stats.safetensors")


def latency_ms(model_dir: Path, device: str, tokens: int, batch: int, runs: int) -> float:
    import torch

    import llmprune

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = llmprune.load_pruned(model_dir, dtype=dtype, device=device)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def once() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        if device != "cpu":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000

    once()
    times = [once() for _ in range(runs)]
    del model
    return statistics.median(times)


def param_count(model_dir: Path) -> int:
    from llmprune import _core

    desc = json.loads(_core.describe_model(str(model_dir)))["tensors"]
    total = 0
    for d in desc.values():
        dims = d[d.index("[") + 1 : -1]
        n = 1
        for x in filter(None, dims.split(",")):
            n *= int(x)
        total += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "demo-out" / "smollm2-135m")
    ap.add_argument("--stats", type=Path, default=None, help="stats sidecar [default: MODEL's, else computed into --workdir]")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "structured")
    ap.add_argument("--sparsities", default="0.2,0.5")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="METHOD:ALLOCATION,...")
    ap.add_argument("--calib-nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation window")
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens")
    ap.add_argument("--device", default="auto", help="device of stats and eval: auto, cuda or cpu")
    ap.add_argument("--latency-tokens", type=int, default=512)
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--latency-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for the latency runs")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    ap.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    ap.add_argument("--keep", action="store_true", help="keep the pruned checkpoints in --workdir")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if not (a.model / "config.json").is_file():
        sys.exit(f"{a.model} is not a model directory; `make demo` (or `llmprune demo-model`) creates demo-out/smollm2-135m")
    a.workdir.mkdir(parents=True, exist_ok=True)
    stats = a.stats or (a.model / "llmprune-stats.safetensors")
    if not stats.is_file():
        stats = a.workdir / "stats.safetensors"
        if not stats.is_file():
            print(f"computing statistics into {stats}", file=sys.stderr)
            cli("stats", a.model, "--nsamples", a.calib_nsamples, "--seqlen", a.calib_seqlen, "--device", a.device, "--out", stats)

    rows: list[dict[str, Any]] = []

    def measure(label: str, method: str, alloc: str, sparsity: float | None, path: Path, summary: dict[str, Any] | None) -> None:
        print(f"evaluating {label}", file=sys.stderr)
        ev = cli("eval", path, "--seqlen", a.seqlen, "--max-tokens", a.max_tokens, "--device", a.device)
        row = {
            "model": label,
            "method": method,
            "allocation": alloc,
            "sparsity": sparsity,
            "achieved": summary["achieved_sparsity"] if summary else 0.0,
            "params": param_count(path),
            "bytes": disk_bytes(path),
            "perplexity": ev["perplexity"],
            "eval_tokens": ev["tokens"],
            "apply_seconds": summary["seconds"] if summary else None,
            "loader": summary["loader"] if summary else "transformers",
            "cpu_ms": latency_ms(path, "cpu", a.latency_tokens, a.latency_batch, a.latency_runs),
            "gpu_ms": latency_ms(path, "cuda", a.latency_tokens, 8 * a.latency_batch, 3 * a.latency_runs) if torch.cuda.is_available() else None,
        }
        rows.append(row)

    measure("dense", "dense", "-", None, a.model, None)
    variants = [v.split(":") for v in a.variants.split(",") if v]
    for s in (float(x) for x in a.sparsities.split(",")):
        for method, alloc in variants:
            out = a.workdir / f"{a.model.name}-{method}-{s:g}-{alloc}"
            summary = cli("apply", a.model, "--method", method, "--sparsity", s, "--allocation", alloc, "--stats", stats, "--out", out, "--force")
            measure(f"{method} {alloc}", method, alloc, s, out, summary)
            if not a.keep:
                shutil.rmtree(out)

    dense = rows[0]
    gpu = any(r["gpu_ms"] is not None for r in rows)
    head = "| model | target | removed (blocks) | params | size MB | perplexity | CPU fwd ms | vs dense |" + (" GPU fwd ms | vs dense |" if gpu else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        target = "-" if r["sparsity"] is None else format(r["sparsity"], ".0%")
        line = f"| {r['model']} | {target} "
        line += (
            f"| {r['achieved']:.2%} | {r['params'] / 1e6:.1f} M | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.2f} "
            f"| {r['cpu_ms']:.1f} | {r['cpu_ms'] / dense['cpu_ms']:.2f}x |"
        )
        if gpu:
            line += f" {r['gpu_ms']:.2f} | {r['gpu_ms'] / dense['gpu_ms']:.2f}x |"
        lines.append(line)
    threads = torch.get_num_threads()
    note = (
        f"\n{a.model.name}; calibration {stats.name}; perplexity on {rows[0]['eval_tokens']:,} tokens of held-out text "
        f"in windows of {a.seqlen}; forward of {a.latency_batch}x{a.latency_tokens} tokens, float32, {threads} CPU threads"
        + (f"; GPU bfloat16 batch {8 * a.latency_batch}" if gpu else "")
        + ". magnitude-sp / wanda-sp without bias compensation, FLAP with it."
    )
    table = "\n".join(lines) + "\n" + note
    print(table)
    if a.markdown:
        a.markdown.write_text(table + "\n")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
