"""Layer-wise sparsity schedules on a real model: perplexity of SmolLM2-135M pruned at a mean sparsity
S whose blocks get their sparsities from a schedule, against the uniform allocation, on docs/quality.md's
protocol (8 x 256 calibration tokens, dense statistics; the first 4,096 evaluation tokens in 512-token
windows; float32 on the CPU).

A run is METHOD@S/SCHEDULE; a SCHEDULE is one of these, or several joined with '+' and applied in turn:

  uniform       every block at S (`--allocation uniform`)
  owl           OWL (`--allocation owl`, with --owl-m / --owl-lambda when given)
  reverse-owl   2S minus OWL's block sparsities: OWL's ranking of the blocks turned around
  ramp:D        rising linearly with depth, from S - D (first block) to S + D (last block)
  first:V       block 0 at V, the other blocks scaled by one factor so that the mean is S again

Every schedule but plain `uniform` and `owl` reaches `llmprune apply` as a schedule file
(`--allocation FILE`, docs/refinements.md); OWL's block sparsities for the composed ones are read
from `llmprune apply --allocation owl --json`. Without --runs, every method of --methods at every
sparsity of --sparsities with every schedule of --schedules:

    python benches/allocation_quality.py --reuse-stats --methods wanda,stade --schedules uniform,ramp:0.08
    python benches/allocation_quality.py --reuse-stats --runs 'wanda@0.7/uniform,wanda@0.7/ramp:0.08+first:0.7'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import _fmt_ppl, _provenance, err, llmprune  # noqa: E402
from sparsegpt_quality import add_protocol_options, ensure_statistics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("wanda", "stade", "stade-w", "sparsegpt")


@dataclass
class Run:
    method: str
    sparsity: str
    schedule: str
    apply_seconds: float | None = None
    perplexity: float | None = None
    block_sparsity: list[float] | None = None

    @property
    def spec(self) -> str:
        return f"{self.method}@{self.sparsity}/{self.schedule}"


def parse_runs(spec: str) -> list[Run]:
    runs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        head, _, schedule = item.partition("/")
        method, _, s = head.partition("@")
        if method not in METHODS or not s or not schedule:
            raise SystemExit(f"error: bad run {item!r}; expected METHOD@SPARSITY/SCHEDULE with METHOD in {', '.join(METHODS)}")
        float(s)
        for step in schedule.split("+"):
            check_step(step)
        runs.append(Run(method, s, schedule))
    return runs


def check_step(step: str) -> None:
    name, _, value = step.partition(":")
    if name in ("uniform", "owl", "reverse-owl") and not value:
        return
    if name in ("ramp", "first") and value:
        float(value)
        return
    raise SystemExit(f"error: bad schedule step {step!r}; expected uniform, owl, reverse-owl, ramp:D or first:V")


def compose(schedule: str, sparsity: float, blocks: int, owl: list[float] | None) -> list[float]:
    """The block sparsities of SCHEDULE (steps applied left to right), mean `sparsity`."""
    v = [sparsity] * blocks
    for step in schedule.split("+"):
        name, _, value = step.partition(":")
        if name == "uniform":
            v = [sparsity] * blocks
        elif name == "owl":
            v = list(owl)
        elif name == "reverse-owl":
            v = [2 * sparsity - x for x in owl]
        elif name == "ramp":
            d = float(value)
            v = [sparsity + d * (2 * i / (blocks - 1) - 1) for i in range(blocks)] if blocks > 1 else [sparsity]
        elif name == "first":
            rest = sum(v[1:])
            scale = (sparsity * blocks - float(value)) / rest if rest else 1.0
            v = [float(value)] + [x * scale for x in v[1:]]
    if any(not 0 <= x < 1 for x in v):
        raise SystemExit(f"error: schedule {schedule!r} at {sparsity} gives block sparsities outside [0, 1): {min(v):.3f}-{max(v):.3f}")
    return v


def main(argv: list[str] | None = None) -> int:
    command = "python benches/allocation_quality.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "demo-out" / "smollm2-135m", help="demo checkpoint (cached)")
    ap.add_argument("--work-dir", type=Path, default=None, help="pruned checkpoints and schedule files [default: beside --model-dir]")
    ap.add_argument("--runs", default=None, help="METHOD@SPARSITY/SCHEDULE,... (overrides the grid below)")
    ap.add_argument("--methods", default="wanda", help="grid: methods [wanda]")
    ap.add_argument("--sparsities", default="0.7", help="grid: mean sparsities [0.7]")
    ap.add_argument("--schedules", default="uniform,owl,ramp:0.08", help="grid: schedules [uniform,owl,ramp:0.08]")
    add_protocol_options(ap)
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the sidecars in --model-dir when their calibration matches")
    ap.add_argument("--owl-m", type=float, default=None, help="--owl-m of the owl steps [llmprune's default]")
    ap.add_argument("--owl-lambda", type=float, default=None, help="--owl-lambda of the owl steps [llmprune's default]")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every run)")
    args = ap.parse_args(argv)
    grid = ",".join(f"{m}@{s}/{c}" for s in args.sparsities.split(",") for m in args.methods.split(",") for c in args.schedules.split(","))
    runs = parse_runs(args.runs or grid)
    provenance = _provenance()
    model = args.model_dir.resolve()
    work = (args.work_dir or model.parent).resolve()
    work.mkdir(parents=True, exist_ok=True)
    blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    t0, load_start = time.perf_counter(), os.getloadavg()

    from llmprune.model.demo import ensure_demo_model

    ensure_demo_model(model, log=lambda msg: err.print(msg, markup=False, soft_wrap=True))
    stats_info = ensure_statistics(model, args)
    eval_args = ["--seqlen", str(args.eval_seqlen), "--device", args.device, *(["--max-tokens", str(args.max_tokens)] if args.max_tokens else [])]
    dense = llmprune("eval", str(model), *eval_args)["perplexity"]
    owl_args = [*(["--owl-m", str(args.owl_m)] if args.owl_m is not None else []), *(["--owl-lambda", str(args.owl_lambda)] if args.owl_lambda is not None else [])]
    owl_cache: dict[str, list[float]] = {}

    for k, run in enumerate(runs, 1):
        err.print(f"[bold][{k}/{len(runs)}] {run.spec}[/bold] [dim]({time.perf_counter() - t0:.0f} s so far)[/dim]")
        out = work / f"{model.name}-allocation-{k}"
        if run.schedule in ("uniform", "owl"):
            alloc = [run.schedule, *(owl_args if run.schedule == "owl" else [])]
        else:
            owl = None
            if "owl" in run.schedule:  # reverse-owl too
                if run.sparsity not in owl_cache:
                    res = llmprune("apply", str(model), "--method", "wanda", "--sparsity", run.sparsity, "--allocation", "owl", *owl_args, "--out", str(out), "--force")
                    owl_cache[run.sparsity] = res["block_sparsity"]
                owl = owl_cache[run.sparsity]
            path = work / f"{model.name}-schedule-{k}.json"
            path.write_text(json.dumps(compose(run.schedule, float(run.sparsity), blocks, owl)) + "\n")
            alloc = [str(path)]
        res = llmprune("apply", str(model), "--method", run.method, "--sparsity", run.sparsity, "--allocation", *alloc, "--out", str(out), "--force")
        run.apply_seconds = res.get("seconds")
        run.block_sparsity = res.get("block_sparsity") or [float(run.sparsity)] * blocks
        run.perplexity = llmprune("eval", str(out), *eval_args)["perplexity"]
        shutil.rmtree(out, ignore_errors=True)
        if args.json:
            doc = {"command": command, "provenance": provenance, "dense": dense, "statistics": stats_info, "runs": [asdict(r) for r in runs],
                   "seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")

    load_end = os.getloadavg()
    base = {(r.method, r.sparsity): r.perplexity for r in runs if r.schedule == "uniform"}
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
    print(f"Command: `{command}`\n")
    print(f"- calibration: nsamples {args.nsamples} x seqlen {args.seqlen}, seed 0 (dense statistics); evaluation: the first "
          f"{args.max_tokens:,} tokens in {args.eval_seqlen}-token windows; device {args.device}, float32")
    print(f"- {provenance}; wall time {(time.perf_counter() - t0) / 60:.1f} min; load average {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} "
          f"at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end\n")
    print(f"| method | sparsity | schedule | block 0 | blocks 1-{blocks - 1} | perplexity | ratio to dense ({dense:.2f}) | ratio to the same method, uniform |")
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for r in runs:
        rest = r.block_sparsity[1:]
        print(f"| {r.method} | {float(r.sparsity):.0%} | `{r.schedule}` | {r.block_sparsity[0]:.3f} | {min(rest):.3f}-{max(rest):.3f} | "
              f"{_fmt_ppl(r.perplexity)} | {ratio(r.perplexity, dense)} | {ratio(r.perplexity, base.get((r.method, r.sparsity)))} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
