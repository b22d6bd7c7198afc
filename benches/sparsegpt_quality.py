"""SparseGPT and `--update` on a real model: perplexity of SmolLM2-135M pruned by `llmprune apply
--method sparsegpt` and by wanda / stade with `--update`, next to plain wanda, on docs/quality.md's protocol.

Steps, each through the `llmprune` command line:

1. `llmprune demo-model` (cached in demo-out/smollm2-135m, as `make demo` converts it);
2. `llmprune stats MODEL --gram`: the dense statistics and the Gram sidecar, once for every row;
3. per row, `llmprune apply` and `llmprune eval` (the pruned checkpoint is deleted after its evaluation).

--runs takes METHOD[+update][~seq]@TARGET,... in the order to run them (the table is ordered by target);
the default puts the rows the issue's goals need first (sparsegpt and wanda at 2:4 and 50%, then 60%),
so a run cut short still answers them. A row written with ~seq reads sequential statistics instead of
the dense ones: its own `llmprune stats MODEL --sequential --method METHOD --sparsity S|--pattern N:M
--gram [--update]` pass (same calibration), whose stats and Gram sidecars go into --work-dir and are
handed to `apply` with --stats and --gram. --sequential runs the default sequential rows (sparsegpt at
50% and 2:4, wanda --update at 2:4, each next to its dense-statistics twin) and writes the table between
its own markers. The defaults are docs/quality.md's protocol: calibration 8 x 256 tokens of the
1900-1949 addresses (seed 0), evaluation the first 4,096 tokens of the 1950+ addresses in 512-token
windows, float32 on the CPU:

    python benches/sparsegpt_quality.py --device cpu --markdown docs/quality.md   # docs/quality.md's SparseGPT table
    python benches/sparsegpt_quality.py --runs sparsegpt@2:4,wanda@2:4            # two rows only
    python benches/sparsegpt_quality.py --sequential --reuse-stats --work-dir /tmp/seq --markdown docs/quality.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import common as C
from common import SEQ_SUFFIX, err, fmt_ppl, llmprune

TARGET_ORDER = ("0.5", "0.6", "4:8", "2:4")
DEFAULT_RUNS = ",".join([
    "sparsegpt@2:4", "wanda@2:4", "sparsegpt@0.5", "wanda@0.5", "sparsegpt@0.6", "wanda@0.6",
    "wanda+update@2:4", "wanda+update@0.5", "wanda+update@0.6",
    "sparsegpt@4:8", "wanda@4:8", "wanda+update@4:8",
    "stade+update@2:4", "stade+update@0.5", "stade+update@0.6", "stade+update@4:8",
])
SEQUENTIAL_RUNS = ",".join([
    "sparsegpt~seq@0.5", "sparsegpt@0.5", "sparsegpt~seq@2:4", "sparsegpt@2:4", "wanda+update~seq@2:4", "wanda+update@2:4",
])
METHODS = ("magnitude", "wanda", "stade", "stade-w", "sparsegpt")
SYNTAX = "METHOD[+update][~seq]@TARGET"
APPLY_SETTINGS = "apply: damp 0.01, blocksize 128"
MD_BEGIN = "<!-- sparsegpt_quality.py table: begin -->"
MD_END = "<!-- sparsegpt_quality.py table: end -->"
MD_SEQ_BEGIN = "<!-- sparsegpt_quality.py --sequential table: begin -->"
MD_SEQ_END = "<!-- sparsegpt_quality.py --sequential table: end -->"


@dataclass
class Row:
    method: str
    update: bool
    target: str  # as written after @: 0.5 or 2:4
    sequential: bool = False
    apply_seconds: float | None = None
    perplexity: float | None = None
    eval_seconds: float | None = None
    stats_seconds: float | None = None  # sequential rows: their own statistics pass

    @property
    def spec(self) -> str:
        return f"{self.method}{'+update' if self.update else ''}{SEQ_SUFFIX if self.sequential else ''}@{self.target}"

    @property
    def label(self) -> str:
        return f"{self.method}{'-update' if self.update else ''}{'-seq' if self.sequential else ''}-{self.target.replace(':', '_')}"

    @property
    def twin(self) -> str:
        """The spec of the same row with the other kind of statistics."""
        return f"{self.method}{'+update' if self.update else ''}{'' if self.sequential else SEQ_SUFFIX}@{self.target}"

    @property
    def name(self) -> str:
        """The method as the table names it, with `--update` when the row updates."""
        return f"{self.method} `--update`" if self.update else self.method

    @property
    def shown_apply_seconds(self) -> str:
        return f"{self.apply_seconds:.2f}" if self.apply_seconds is not None else "-"

    @property
    def shown_target(self) -> str:
        return self.target if ":" in self.target else f"{float(self.target):.0%}"

    def target_args(self) -> list[str]:
        return ["--pattern", self.target] if ":" in self.target else ["--sparsity", self.target]


def parse_row(item: str) -> Row:
    r = C.parse_run(item, SYNTAX, METHODS, flags=("update",), sequential=True, patterns=True)
    if r.method == "sparsegpt" and r.flags:
        raise SystemExit(f"error: bad run {item!r}: {SYNTAX}, METHOD one of {', '.join(METHODS)}")
    if r.sequential and r.method == "magnitude":
        raise SystemExit(f"error: {item!r}: magnitude reads no statistics, so it has no sequential form")
    return Row(r.method, bool(r.flags), r.pattern or f"{r.sparsity:g}", r.sequential)


def parse_runs(spec: str) -> list[Row]:
    return C.parse_runs(spec, parse_row)


def sequential_statistics(model: Path, work: Path, row: Row, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """`llmprune stats MODEL --sequential --method M --sparsity S|--pattern N:M [--gram [--update]]` into
    WORK (stats and, for sparsegpt and --update rows, Gram sidecars of their own), or the ones already
    there when --reuse-stats and they carry the same calibration and sequential settings."""
    reconstructs = row.update or row.method == "sparsegpt"
    stats_name, gram_name = C.sidecar_names()
    stats_path = work / f"{model.name}-{row.label}-{stats_name}"
    gram_path = work / f"{model.name}-{row.label}-{gram_name}"
    key = "pattern" if ":" in row.target else "sparsity"
    value = row.target if key == "pattern" else float(row.target)
    if args.reuse_stats:
        metas = [C.sidecar_meta(p) for p in (stats_path, gram_path)]

        def matches(m: dict | None) -> bool:
            seq = (m or {}).get("sequential") or {}
            return (C.calibration_matches(m, C.calibration(args), "sequential")
                    and seq.get("method") == row.method and seq.get(key) == value and bool(seq.get("update")) == reconstructs)

        if all(matches(m) for m in (metas if reconstructs else metas[:1])):
            err.print(f"reusing {stats_path} and {gram_path} (same calibration and sequential settings)", markup=False)
            return stats_path, gram_path, {"reused": True, "tokens": metas[0]["calibration"].get("tokens")}
    stats_args = ["stats", str(model), "--sequential", "--method", row.method, *row.target_args(),
                  "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0", "--device", args.device,
                  "--out", str(stats_path)]
    if reconstructs:
        stats_args += ["--gram", "--gram-out", str(gram_path)]
    if row.update:
        stats_args.append("--update")
    return stats_path, gram_path, llmprune(*stats_args)


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "pruned checkpoints [default: beside --model-dir]")
    ap.add_argument("--runs", default=None,
                    help="METHOD[+update][~seq]@TARGET,... in the order to run them [default: the issue's rows; with --sequential, the sequential rows]")
    ap.add_argument("--sequential", action="store_true",
                    help="default --runs: sparsegpt at 50%% and 2:4 and wanda --update at 2:4 with sequential statistics, each beside "
                         "its dense-statistics twin; --markdown writes between the sequential table's markers")
    ap.add_argument("--keep-gram", action="store_true", help="keep the sequential rows' Gram sidecars (deleted after their apply otherwise)")
    C.add_protocol_options(ap)
    ap.add_argument("--threads", type=int, default=None, help="threads of `llmprune apply`")
    ap.add_argument("--reuse-stats", action="store_true",
                    help="reuse the sidecars in --model-dir (and the sequential ones in --work-dir) when their calibration matches")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help=f"also write the table into this file, between its '{MD_BEGIN}' and '{MD_END}' lines "
                         f"(with --sequential, '{MD_SEQ_BEGIN}' and '{MD_SEQ_END}'; appended without them)")
    args = ap.parse_args(argv)
    rows = parse_runs(args.runs or (SEQUENTIAL_RUNS if args.sequential else DEFAULT_RUNS))
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    stats_info = C.ensure_statistics(model, args) if any(not r.sequential for r in rows) else {}
    seq_info: dict[str, dict] = {}

    dense_res = session.eval(model)
    dense = dense_res["perplexity"]
    eval_info = C.eval_summary(dense_res)

    def save(partial: bool) -> None:
        session.save_json(dense=dense, evaluation=eval_info, statistics=stats_info, sequential_statistics=seq_info,
                          rows=[asdict(r) for r in rows], partial=partial)

    for k, row in enumerate(rows, 1):
        session.announce(k, len(rows), row.spec)
        out = work / f"{model.name}-{row.label}"
        apply_args = [str(model), "--method", row.method, *row.target_args(), "--out", str(out), "--force"]
        if row.sequential:
            stats_path, gram_path, info = sequential_statistics(model, work, row, args)
            seq_info[row.spec] = info
            row.stats_seconds = None if info.get("reused") else info.get("seconds")
            apply_args += ["--stats", str(stats_path)]
            if row.update or row.method == "sparsegpt":
                apply_args += ["--gram", str(gram_path)]
        if row.update:
            apply_args.append("--update")
        res = session.apply(*apply_args)
        row.apply_seconds = res.get("seconds")
        if row.sequential and not args.keep_gram:
            gram_path.unlink(missing_ok=True)
        res = session.eval(out)
        row.perplexity, row.eval_seconds = res["perplexity"], res.get("seconds")
        shutil.rmtree(out, ignore_errors=True)
        save(partial=k < len(rows))

    table = markdown_table(rows, dense, args, stats_info, eval_info, session.elapsed(), session.command, session.provenance,
                           session.load_start, os.getloadavg(), seq_info)
    print(table)
    if args.markdown:
        C.write_markdown(args.markdown, table, *((MD_SEQ_BEGIN, MD_SEQ_END) if args.sequential else (MD_BEGIN, MD_END)))
        err.print(f"wrote {args.markdown}", markup=False)
    return 0


def markdown_table(rows: list[Row], dense: float, args: argparse.Namespace, stats_info: dict, eval_info: dict, total: float,
                   command: str, provenance: str, load_start, load_end, seq_info: dict | None = None) -> str:
    if any(r.sequential for r in rows):
        return sequential_table(rows, dense, args, stats_info, eval_info, total, command, provenance, load_start, load_end, seq_info or {})
    wanda = {r.target: r.perplexity for r in rows if r.method == "wanda" and not r.update and r.perplexity and not r.sequential}
    facts = C.protocol_facts(args, eval_info, stats_info.get("tokens"),
                             f"dense statistics and Gram matrices from one `llmprune stats --gram` pass ({C.pass_how(stats_info)})",
                             APPLY_SETTINGS, provenance, total, load_start, load_end)
    ordered = sorted(rows, key=lambda r: (TARGET_ORDER.index(r.target) if r.target in TARGET_ORDER else 99,
                                         ("wanda", "sparsegpt").index(r.method) if r.method in ("wanda", "sparsegpt") and not r.update else 2,
                                         r.method))
    table = []
    for r in ordered:
        ppl = r.perplexity
        ratio = f"{ppl / dense:.2f}" if ppl else "-"
        vs_wanda = f"{ppl / wanda[r.target]:.2f}" if ppl and r.target in wanda else "-"
        table.append([r.name, r.shown_target, fmt_ppl(ppl), ratio, vs_wanda, r.shown_apply_seconds])
    columns = ["method", "target", "perplexity", f"ratio to dense ({fmt_ppl(dense)})", "ratio to wanda", "apply s"]
    return C.markdown(command, facts, columns, "lrrrrr", table, C.not_measured([r.spec for r in rows if r.perplexity is None]))


def sequential_table(rows: list[Row], dense: float, args: argparse.Namespace, stats_info: dict, eval_info: dict, total: float,
                     command: str, provenance: str, load_start, load_end, seq_info: dict) -> str:
    """The table of a run with sequential rows: a statistics column, each row's ratio to its twin with the
    other statistics when that ran too, and each sequential row's own statistics pass."""
    ppl = {r.spec: r.perplexity for r in rows}
    passes = ", ".join(
        f"{r.method}{' --update' if r.update else ''}@{r.shown_target} "
        + ("reused" if (seq_info.get(r.spec) or {}).get("reused") else f"{float((seq_info.get(r.spec) or {}).get('seconds') or 0):.0f} s")
        for r in rows if r.sequential and r.spec in seq_info)
    tokens = next((i.get("tokens") for i in [stats_info, *seq_info.values()] if i and i.get("tokens")), None)
    facts = C.protocol_facts(args, eval_info, tokens,
                             f"dense statistics and Gram matrices from one `llmprune stats --gram` pass ({C.pass_how(stats_info)}); "
                             f"sequential statistics and Gram matrices from one `llmprune stats --sequential --method M --sparsity S|--pattern N:M "
                             f"--gram [--update]` pass per row ({passes or 'none'})",
                             APPLY_SETTINGS, provenance, total, load_start, load_end)
    ordered = sorted(rows, key=lambda r: (TARGET_ORDER.index(r.target) if r.target in TARGET_ORDER else 99, r.method, r.update, r.sequential))
    table = []
    for r in ordered:
        p = r.perplexity
        ratio = f"{p / dense:.2f}" if p else "-"
        seq, den = (p, ppl.get(r.twin)) if r.sequential else (None, None)
        vs = f"{seq / den:.2f}" if seq and den else "-"
        table.append([r.name, "sequential" if r.sequential else "dense", r.shown_target, fmt_ppl(p), ratio, vs, r.shown_apply_seconds])
    columns = ["method", "statistics", "target", "perplexity", f"ratio to dense ({fmt_ppl(dense)})", "sequential / dense statistics", "apply s"]
    return C.markdown(command, facts, columns, "llrrrrr", table, C.not_measured([r.spec for r in rows if r.perplexity is None]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
