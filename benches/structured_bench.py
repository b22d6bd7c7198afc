"""Structured pruning on a real model: perplexity, parameters, size on disk and forward latency of
dense, magnitude-sp, wanda-sp and FLAP (global and uniform allocation) at several sparsities.

    python benches/structured_bench.py [--model demo-out/smollm2-135m] [--sparsities 0.2,0.5]
        [--variants magnitude-sp:uniform,wanda-sp:uniform,flap:global,...]
        [--max-tokens 8192] [--seqlen 512] [--device auto] [--markdown FILE] [--json FILE]

Every step goes through the `llmprune` command line as a user would run it: `stats` once (dense
statistics on the built-in calibration text, State of the Union 1900-1949) unless the model already
has a sidecar or --stats names one, `apply` per variant, `eval` (built-in held-out text, 1950 onward)
per model. A variant is METHOD:ALLOCATION[:comp|:nocomp] (bias compensation forced on or off;
default: on for flap only); ALLOCATION is global, uniform (kept MLP widths rounded to the default
multiple, 128) or uniformN (rounded to multiples of N; uniform1: not rounded).

Latency: one forward of [batch, --latency-tokens] tokens through the model loaded with
`llmprune.load_pruned`, float32 on the CPU (and bfloat16 on the GPU when one is available), in this
process, after all evaluations. Every model is timed once per round, rounds interleave the models, and
each model's figure is its fastest run over --latency-rounds rounds: on a shared machine, load from
other processes only ever slows a run down, and interleaving spreads it over all models alike.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = "magnitude-sp:uniform,wanda-sp:uniform,wanda-sp:uniform:comp,flap:global,flap:uniform,flap:uniform:nocomp"


def cli(*args: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmprune", *map(str, args), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout)


def disk_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors") if f.name != "llmprune-stats.safetensors")


def latency_ms(model_dir: Path, device: str, tokens: int, batch: int, runs: int) -> float:
    """Fastest of `runs` forwards after one warm-up."""
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
    return min(times)


def calibration(sidecar: Path) -> str:
    """`source, N windows x L tokens` from the sidecar's metadata."""
    from safetensors import safe_open

    with safe_open(str(sidecar), framework="numpy") as f:
        cal = json.loads((f.metadata() or {}).get("llmprune", "{}")).get("calibration", {})
    return f"{cal.get('source', '?')}, {cal.get('nsamples', '?')} windows x {cal.get('seqlen', '?')} tokens"


def param_count(model_dir: Path) -> int:
    from llmprune import _core

    desc = json.loads(_core.open_checkpoint(str(model_dir)))["model_tensors"]
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
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="METHOD:ALLOCATION[:comp|:nocomp],...")
    ap.add_argument("--calib-nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation window")
    ap.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens")
    ap.add_argument("--device", default="auto", help="device of stats and eval: auto, cuda or cpu")
    ap.add_argument("--latency-tokens", type=int, default=512)
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--latency-runs", type=int, default=2, help="timed forwards per model and round")
    ap.add_argument("--latency-rounds", type=int, default=3)
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
    paths: list[Path] = []

    def measure(label: str, method: str, alloc: str, sparsity: float | None, path: Path, summary: dict[str, Any] | None) -> None:
        print(f"evaluating {label}" + (f" at {sparsity:g}" if sparsity is not None else ""), file=sys.stderr)
        ev = cli("eval", path, "--seqlen", a.seqlen, "--max-tokens", a.max_tokens, "--device", a.device)
        rows.append(
            {
                "model": label,
                "method": method,
                "allocation": alloc,
                "compensate": bool(summary and summary["compensate"]),
                "sparsity": sparsity,
                "achieved": summary["achieved_sparsity"] if summary else 0.0,
                "params": param_count(path),
                "bytes": disk_bytes(path),
                "perplexity": ev["perplexity"],
                "eval_tokens": ev["tokens"],
                "apply_seconds": summary["seconds"] if summary else None,
                "loader": summary["loader"] if summary else "transformers",
            }
        )
        paths.append(path)

    measure("dense", "dense", "-", None, a.model, None)
    variants = [v.split(":") for v in a.variants.split(",") if v]
    for s in (float(x) for x in a.sparsities.split(",")):
        for method, alloc, *comp in variants:
            flags = {"comp": ["--compensate"], "nocomp": ["--no-compensate"]}[comp[0]] if comp else []
            out = a.workdir / f"{a.model.name}-{method}-{s:g}-{alloc}{'-' + comp[0] if comp else ''}"
            # magnitude-sp reads statistics only to compensate
            reads_stats = method != "magnitude-sp" or flags == ["--compensate"]
            stats_args = ["--stats", stats] if reads_stats else []
            width = ["--width-multiple", alloc.removeprefix("uniform")] if alloc.startswith("uniform") and alloc != "uniform" else []
            alloc_args = ["--allocation", "uniform" if width else alloc, *width]
            summary = cli("apply", a.model, "--method", method, "--sparsity", s, *alloc_args, *flags, *stats_args, "--out", out, "--force")
            label = f"{method} {alloc}" + {"comp": ", compensated", "nocomp": ", no compensation"}.get(comp[0] if comp else "", "")
            measure(label, method, alloc, s, out, summary)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        best = [math.inf] * len(rows)
        for r in range(a.latency_rounds):
            print(f"latency on {dev}, round {r + 1} of {a.latency_rounds}", file=sys.stderr)
            for i, path in enumerate(paths):
                batch = a.latency_batch * (8 if dev == "cuda" else 1)
                best[i] = min(best[i], latency_ms(path, dev, a.latency_tokens, batch, a.latency_runs))
        for row, ms in zip(rows, best):
            row[f"{'cpu' if dev == 'cpu' else 'gpu'}_ms"] = ms
    for row in rows:
        row.setdefault("gpu_ms", None)
    if not a.keep:
        for path in paths[1:]:
            shutil.rmtree(path)

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
        f"\n{a.model.name}; calibration {calibration(stats)}; perplexity on {rows[0]['eval_tokens']:,} tokens of held-out text "
        f"in windows of {a.seqlen}; forward of {a.latency_batch}x{a.latency_tokens} tokens, float32, {threads} CPU threads"
        + (f"; GPU bfloat16 batch {8 * a.latency_batch}" if gpu else "")
        + f", fastest of {a.latency_rounds} interleaved rounds. magnitude-sp / wanda-sp without bias compensation, flap with it, unless noted."
    )
    table = "\n".join(lines) + "\n" + note
    print(table)
    if a.markdown:
        a.markdown.write_text(table + "\n")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
