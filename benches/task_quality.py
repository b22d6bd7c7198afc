"""Task accuracy of pruned models: SmolLM2-135M dense and pruned by wanda, stade and sparsegpt at 50 %,
2:4 and 70 %, scored on the offline smoke tasks (sotu_cloze, sotu_next) by `llmprune eval --tasks`
(layer-streamed lm-evaluation-harness) beside the perplexity of docs/quality.md's protocol.

Steps, each through the `llmprune` command line:

1. `llmprune demo-model` (cached in demo-out/smollm2-135m, as `make demo` converts it);
2. `llmprune stats MODEL --gram`: the dense statistics and the Gram sidecar (8 x 256 tokens), once;
3. the dense model, then per row `llmprune apply` and `llmprune eval OUT --tasks offline` (perplexity on
   the first 4,096 tokens of the 1950+ addresses in 512-token windows, and the tasks); the pruned
   checkpoint and its task cache are deleted after its evaluation.

The tasks are a smoke test that the pruned model still predicts real English text, not a benchmark:
100 items each, from the 1790-1899 addresses (python/llmprune/tasks/build.py):

    python benches/task_quality.py --markdown docs/quality.md      # docs/quality.md's task table
    python benches/task_quality.py --runs wanda@0.5 --limit 20     # one row, 20 documents per task
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common as C
from common import err, fmt_ppl, llmprune
from llmprune.tasks import cache_path

DEFAULT_RUNS = "wanda@0.5,stade@0.5,sparsegpt@0.5,wanda@2:4,stade@2:4,sparsegpt@2:4,wanda@0.7,stade@0.7,sparsegpt@0.7"
METHODS = ("magnitude", "wanda", "stade", "stade-w", "sparsegpt")
SYNTAX = "METHOD@TARGET"
TASKS = "offline"
# (task, metric) columns of the table
COLUMNS = (("sotu_cloze", "acc"), ("sotu_cloze", "perplexity"), ("sotu_next", "acc"), ("sotu_next", "acc_norm"))
MD_BEGIN = "<!-- task_quality.py table: begin -->"
MD_END = "<!-- task_quality.py table: end -->"


@dataclass
class Row:
    method: str
    target: str
    perplexity: float | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # "task metric" -> {value, stderr}
    eval_seconds: float | None = None

    @property
    def spec(self) -> str:
        return f"{self.method}@{self.target}"

    @property
    def label(self) -> str:
        return f"{self.method}-{self.target.replace(':', '_')}"

    @property
    def shown_target(self) -> str:
        return "-" if not self.target else self.target if ":" in self.target else f"{float(self.target):.0%}"

    def target_args(self) -> list[str]:
        return ["--pattern", self.target] if ":" in self.target else ["--sparsity", self.target]


def parse_row(item: str) -> Row:
    r = C.parse_run(item, SYNTAX, METHODS, patterns=True)
    return Row(r.method, r.pattern or f"{r.sparsity:g}")


def evaluate(row: Row, path: Path, args: argparse.Namespace) -> None:
    """`llmprune eval PATH --tasks offline` under the protocol, into the row."""
    extra = ["--tasks", TASKS, "--batch-size", str(args.batch_size)] + (["--limit", str(args.limit)] if args.limit else [])
    res = llmprune("eval", str(path), *C.eval_args(args), *extra)
    row.perplexity, row.eval_seconds = res["perplexity"], res.get("seconds")
    row.tasks = {f"{r['task']} {r['metric']}": {"value": r["value"], "stderr": r["stderr"]} for r in res["tasks"]["results"]}
    row.eval_seconds = (row.eval_seconds or 0) + res["tasks"]["seconds"]


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "pruned checkpoints [default: beside --model-dir]")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"{SYNTAX},... in the order to run them [default: {DEFAULT_RUNS}]")
    C.add_protocol_options(ap)
    ap.add_argument("--limit", type=int, default=None, help="documents per task [all: 100]")
    ap.add_argument("--batch-size", type=int, default=8, help="task sequences per batch [8]")
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the sidecars in --model-dir when their calibration matches")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    ap.add_argument("--markdown", type=Path, default=None, help=f"also write the table into this file, between '{MD_BEGIN}' and '{MD_END}'")
    args = ap.parse_args(argv)
    rows = C.parse_runs(args.runs, parse_row)
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    stats_info = C.ensure_statistics(model, args)
    dense = Row("dense", "")
    session.announce(0, len(rows), "dense")
    evaluate(dense, model, args)

    def save(partial: bool) -> None:
        session.save_json(statistics=stats_info, rows=[asdict(r) for r in [dense, *rows]], partial=partial)

    save(partial=True)
    for k, row in enumerate(rows, 1):
        session.announce(k, len(rows), row.spec)
        out = work / f"{model.name}-{row.label}"
        session.apply(str(model), "--method", row.method, *row.target_args(), "--out", str(out), "--force")
        evaluate(row, out, args)
        shutil.rmtree(out, ignore_errors=True)
        cache_path(out).unlink(missing_ok=True)
        save(partial=k < len(rows))
    table = markdown_table([dense, *rows], args, stats_info, session)
    print(table)
    if args.markdown:
        C.write_markdown(args.markdown, table, MD_BEGIN, MD_END)
        err.print(f"wrote {args.markdown}", markup=False)
    return 0


def cell(row: Row, task: str, metric: str) -> str:
    m = row.tasks.get(f"{task} {metric}")
    if not m:
        return "-"
    if metric == "perplexity":
        return f"{m['value']:.1f}"
    se = f" ± {m['stderr']:.3f}" if m.get("stderr") is not None else ""
    return f"{m['value']:.3f}{se}"


def markdown_table(rows: list[Row], args: argparse.Namespace, stats_info: dict, session: C.Session) -> str:
    docs = f"the first {args.limit} documents of each task" if args.limit else "all 100 documents of each task"
    facts = [
        C.model_fact(args),
        f"calibration: {C.CALIB_SOURCE}; nsamples {args.nsamples} x seqlen {args.seqlen}, seed 0; dense statistics and Gram "
        f"matrices from one `llmprune stats --gram` pass ({C.pass_how(stats_info)})",
        f"perplexity: {C.EVAL_SOURCE}; the first {args.max_tokens:,} tokens in windows of {args.eval_seqlen}",
        f"tasks: `--tasks {TASKS}` (sotu_cloze: the last word of a passage, acc = greedy and its perplexity; sotu_next: "
        f"the next sentence among 4, acc and acc_norm), zero-shot, {docs}, layer-streamed, batch size {args.batch_size}; "
        "± is lm-eval's standard error",
        f"device: {args.device}, float32; {session.provenance}",
        C.wall_fact(session.elapsed(), session.load_start, os.getloadavg()),
    ]
    table = []
    for r in rows:
        table.append([r.method, r.shown_target, fmt_ppl(r.perplexity), *(cell(r, t, m) for t, m in COLUMNS)])
    columns = ["method", "target", "perplexity", "sotu_cloze acc", "sotu_cloze word ppl", "sotu_next acc", "sotu_next acc_norm"]
    return C.markdown(session.command, facts, columns, "llrrrrr", table, C.not_measured([r.spec for r in rows if not r.tasks]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
