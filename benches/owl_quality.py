"""OWL, bias compensation and DSnoT on a real model: perplexity of SmolLM2-135M pruned by wanda,
stade, stade-w and sparsegpt at 50%, 60% and 70%, with the uniform and the OWL allocation, with
and without `--compensate`, with and without `--refine dsnot`, on docs/quality.md's protocol.

Steps, each through the `llmprune` command line:

1. `llmprune demo-model` (cached in demo-out/smollm2-135m, as `make demo` converts it);
2. `llmprune stats MODEL --gram`: the dense statistics and the Gram sidecar (sparsegpt), once;
3. per row, `llmprune apply` and `llmprune eval` (the pruned checkpoint is deleted after its evaluation).

--runs takes METHOD[+owl][+compensate][+dsnot]@SPARSITY,... in the order to run them; the default
runs the rows of the issue's goal first (wanda and OWL+wanda at 70%). Calibration 8 x 256 tokens of
the 1900-1949 addresses (seed 0), evaluation the first 4,096 tokens of the 1950+ addresses in
512-token windows, float32 on the CPU:

    python benches/owl_quality.py --device cpu --reuse-stats --markdown docs/quality.md
    python benches/owl_quality.py --runs wanda@0.7,wanda+owl@0.7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common as C
from common import err, fmt_ppl, llmprune, ratio

METHODS = ("wanda", "stade", "stade-w", "sparsegpt")
FLAGS = ("owl", "compensate", "dsnot")
MD_BEGIN = "<!-- owl_quality.py table: begin -->"
MD_END = "<!-- owl_quality.py table: end -->"


def default_runs() -> str:
    runs = []
    for s in ("0.7", "0.6", "0.5"):
        for m in METHODS:
            runs += [f"{m}@{s}", f"{m}+owl@{s}"]
    for flag in ("compensate", "dsnot"):
        for s in ("0.7", "0.6", "0.5"):
            runs += [f"wanda+{flag}@{s}", f"stade+{flag}@{s}"]
    runs += ["wanda+owl+dsnot@0.7", "wanda+owl+compensate@0.7", "sparsegpt+owl+compensate@0.7"]
    return ",".join(runs)


@dataclass
class Row:
    method: str
    sparsity: str
    flags: list[str] = field(default_factory=list)
    apply_seconds: float | None = None
    perplexity: float | None = None
    block_sparsity: list[float] | None = None
    dsnot_swaps: int | None = None
    bias_params_added: int | None = None

    @property
    def spec(self) -> str:
        return "+".join([self.method, *self.flags]) + f"@{self.sparsity}"

    def apply_args(self, owl: list[str]) -> list[str]:
        a = ["--method", self.method, "--sparsity", self.sparsity]
        if "owl" in self.flags:
            a += ["--allocation", "owl", *owl]
        if "compensate" in self.flags:
            a.append("--compensate")
        if "dsnot" in self.flags:
            a += ["--refine", "dsnot"]
        return a


def parse_row(item: str) -> Row:
    r = C.parse_run(item, "METHOD[+owl][+compensate][+dsnot]@SPARSITY", METHODS, flags=FLAGS)
    return Row(r.method, r.target, list(r.flags))


def parse_runs(spec: str) -> list[Row]:
    return C.parse_runs(spec, parse_row)


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "pruned checkpoints [default: beside --model-dir]")
    ap.add_argument("--runs", default=None, help="METHOD[+owl][+compensate][+dsnot]@SPARSITY,... [default: all the issue's rows]")
    C.add_protocol_options(ap)
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the sidecars in --model-dir when their calibration matches")
    ap.add_argument("--owl-m", type=float, default=None, help="--owl-m of the owl rows [llmprune's default]")
    ap.add_argument("--owl-lambda", type=float, default=None, help="--owl-lambda of the owl rows [llmprune's default]")
    ap.add_argument("--dsnot-skip", default=None, help="--dsnot-skip of the dsnot rows [llmprune's default]")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already measured in --json (same protocol) and run the others")
    ap.add_argument("--markdown", type=Path, default=None, help=f"also write the table between '{MD_BEGIN}' and '{MD_END}' in this file")
    args = ap.parse_args(argv)
    rows = parse_runs(args.runs or default_runs())
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    stats_info = C.ensure_statistics(model, args)
    dense = session.eval(model)["perplexity"]

    def save(partial: bool) -> None:
        session.save_json(dense=dense, statistics=stats_info, rows=[asdict(r) for r in rows], partial=partial)

    if args.resume and args.json and args.json.is_file():
        done = {r["method"] + "".join("+" + f for f in r["flags"]) + "@" + r["sparsity"]: r for r in json.loads(args.json.read_text())["rows"]}
        for row in rows:
            prev = done.get(row.spec)
            if prev and prev.get("perplexity") is not None:
                for k, v in prev.items():
                    setattr(row, k, v)
    for k, row in enumerate(rows, 1):
        if row.perplexity is not None:
            continue
        session.announce(k, len(rows), row.spec)
        out = work / f"{model.name}-{row.spec.replace('@', '-').replace('+', '-')}"
        owl = [*(["--owl-m", str(args.owl_m)] if args.owl_m is not None else []), *(["--owl-lambda", str(args.owl_lambda)] if args.owl_lambda is not None else [])]
        res = llmprune("apply", str(model), *row.apply_args(owl), *(["--dsnot-skip", args.dsnot_skip] if args.dsnot_skip and "dsnot" in row.flags else []),
                       "--out", str(out), "--force")
        row.apply_seconds, row.block_sparsity = res.get("seconds"), res.get("block_sparsity")
        row.dsnot_swaps = res.get("dsnot_swaps") if "dsnot" in row.flags else None
        row.bias_params_added = res.get("bias_params_added") if "compensate" in row.flags else None
        row.perplexity = session.eval(out)["perplexity"]
        shutil.rmtree(out, ignore_errors=True)
        save(partial=k < len(rows))

    table = markdown_table(rows, dense, args, session.command, session.provenance, session.elapsed(), session.load_start, os.getloadavg())
    print(table)
    if args.markdown:
        C.write_markdown(args.markdown, table, MD_BEGIN, MD_END)
        err.print(f"wrote {args.markdown}", markup=False)
    return 0


def markdown_table(rows: list[Row], dense: float, args: argparse.Namespace, command: str, provenance: str, total: float, load_start, load_end) -> str:
    ppl = {r.spec: r.perplexity for r in rows}
    facts = [
        f"calibration: nsamples {args.nsamples} x seqlen {args.seqlen}, seed 0 (dense statistics and Gram matrices, one `stats --gram` pass); "
        f"evaluation: the first {args.max_tokens:,} tokens in {args.eval_seqlen}-token windows; device {args.device}, float32",
        f"{provenance}; wall time {total / 60:.1f} min; load average {C.loads(load_start, load_end)}",
    ]
    table = []
    for r in sorted(rows, key=lambda r: (-float(r.sparsity), METHODS.index(r.method), len(r.flags), r.flags)):
        base = ppl.get(f"{r.method}@{r.sparsity}")
        wanda = ppl.get(f"wanda@{r.sparsity}")
        alloc = "owl" if "owl" in r.flags else "uniform"
        if r.block_sparsity:
            alloc += f" ({min(r.block_sparsity):.3f}-{max(r.block_sparsity):.3f})"
        table.append([r.method, f"{float(r.sparsity):.0%}", alloc, "yes" if "compensate" in r.flags else "", "yes" if "dsnot" in r.flags else "",
                      fmt_ppl(r.perplexity), ratio(r.perplexity, dense), ratio(r.perplexity, base), ratio(r.perplexity, wanda)])
    columns = ["method", "sparsity", "allocation", "`--compensate`", "`--refine dsnot`", "perplexity", f"ratio to dense ({dense:.2f})",
               "ratio to the same method, uniform", "ratio to wanda, uniform"]
    return C.markdown(command, facts, columns, "lrlllrrrr", table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
