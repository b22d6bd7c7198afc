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
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import common as C
from common import fmt_ppl, llmprune, ratio

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


def parse_run(item: str) -> Run:
    r = C.parse_run(item, "METHOD@SPARSITY/SCHEDULE", METHODS, tail=True)
    for step in r.tail.split("+"):
        check_step(step)
    return Run(r.method, r.target, r.tail)


def parse_runs(spec: str) -> list[Run]:
    return C.parse_runs(spec, parse_run)


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
    ap = C.parser(__doc__)
    C.add_model_options(ap, "pruned checkpoints and schedule files [default: beside --model-dir]")
    ap.add_argument("--runs", default=None, help="METHOD@SPARSITY/SCHEDULE,... (overrides the grid below)")
    ap.add_argument("--methods", default="wanda", help="grid: methods [wanda]")
    ap.add_argument("--sparsities", default="0.7", help="grid: mean sparsities [0.7]")
    ap.add_argument("--schedules", default="uniform,owl,ramp:0.08", help="grid: schedules [uniform,owl,ramp:0.08]")
    C.add_protocol_options(ap)
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the sidecars in --model-dir when their calibration matches")
    ap.add_argument("--owl-m", type=float, default=None, help="--owl-m of the owl steps [llmprune's default]")
    ap.add_argument("--owl-lambda", type=float, default=None, help="--owl-lambda of the owl steps [llmprune's default]")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every run)")
    args = ap.parse_args(argv)
    grid = ",".join(f"{m}@{s}/{c}" for s in args.sparsities.split(",") for m in args.methods.split(",") for c in args.schedules.split(","))
    runs = parse_runs(args.runs or grid)
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    stats_info = C.ensure_statistics(model, args)
    dense = session.eval(model)["perplexity"]
    owl_args = [*(["--owl-m", str(args.owl_m)] if args.owl_m is not None else []), *(["--owl-lambda", str(args.owl_lambda)] if args.owl_lambda is not None else [])]
    owl_cache: dict[str, list[float]] = {}

    for k, run in enumerate(runs, 1):
        session.announce(k, len(runs), run.spec)
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
        run.perplexity = session.eval(out)["perplexity"]
        shutil.rmtree(out, ignore_errors=True)
        session.save_json(dense=dense, statistics=stats_info, runs=[asdict(r) for r in runs])

    print(markdown_table(runs, dense, blocks, args, session.command, session.provenance, session.elapsed(), session.load_start, os.getloadavg()),
          end="")
    return 0


def markdown_table(runs: list[Run], dense: float, blocks: int, args: argparse.Namespace, command: str, provenance: str, total: float,
                   load_start, load_end) -> str:
    base = {(r.method, r.sparsity): r.perplexity for r in runs if r.schedule == "uniform"}
    facts = [
        f"calibration: nsamples {args.nsamples} x seqlen {args.seqlen}, seed 0 (dense statistics); evaluation: the first "
        f"{args.max_tokens:,} tokens in {args.eval_seqlen}-token windows; device {args.device}, float32",
        f"{provenance}; wall time {total / 60:.1f} min; load average {C.loads(load_start, load_end)}",
    ]
    table = []
    for r in runs:
        rest = r.block_sparsity[1:]
        table.append([r.method, f"{float(r.sparsity):.0%}", f"`{r.schedule}`", f"{r.block_sparsity[0]:.3f}", f"{min(rest):.3f}-{max(rest):.3f}",
                      fmt_ppl(r.perplexity), ratio(r.perplexity, dense), ratio(r.perplexity, base.get((r.method, r.sparsity)))])
    columns = ["method", "sparsity", "schedule", "block 0", f"blocks 1-{blocks - 1}", "perplexity", f"ratio to dense ({dense:.2f})",
               "ratio to the same method, uniform"]
    return C.markdown(command, facts, columns, "lrlrlrrr", table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
