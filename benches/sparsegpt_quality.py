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
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import _fmt_ppl, _provenance, err, llmprune, parse_target, sidecar_meta  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
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
SEQ_SUFFIX = "~seq"
METHODS = ("magnitude", "wanda", "stade", "stade-w", "sparsegpt")
MD_BEGIN = "<!-- sparsegpt_quality.py table: begin -->"
MD_END = "<!-- sparsegpt_quality.py table: end -->"
MD_SEQ_BEGIN = "<!-- sparsegpt_quality.py --sequential table: begin -->"
MD_SEQ_END = "<!-- sparsegpt_quality.py --sequential table: end -->"
STATS_NAME, GRAM_NAME = "llmprune-stats.safetensors", "llmprune-gram.safetensors"


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
    def shown_target(self) -> str:
        return self.target if ":" in self.target else f"{float(self.target):.0%}"

    def target_args(self) -> list[str]:
        return ["--pattern", self.target] if ":" in self.target else ["--sparsity", self.target]


def parse_runs(spec: str) -> list[Row]:
    rows: list[Row] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, target = item.partition("@")
        if not sep:
            raise SystemExit(f"error: {item!r} needs @TARGET (e.g. sparsegpt@2:4)")
        sequential = name.endswith(SEQ_SUFFIX)
        name = name.removesuffix(SEQ_SUFFIX)
        method, plus, flag = name.partition("+")
        if method not in METHODS or (plus and flag != "update") or (method == "sparsegpt" and plus):
            raise SystemExit(f"error: bad run {item!r}: METHOD[+update][~seq]@TARGET, METHOD one of {', '.join(METHODS)}")
        if sequential and method == "magnitude":
            raise SystemExit(f"error: {item!r}: magnitude reads no statistics, so it has no sequential form")
        sp, pat = parse_target(target, item)
        row = Row(method, bool(plus), pat or f"{sp:g}", sequential)
        if row.spec not in {r.spec for r in rows}:
            rows.append(row)
    if not rows:
        raise SystemExit("error: --runs names nothing")
    return rows


def ensure_statistics(model: Path, args: argparse.Namespace) -> dict:
    """`llmprune stats MODEL --gram` (both sidecars at their default places), or the ones already
    there when --reuse-stats and their calibration matches."""
    want = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    if args.reuse_stats:
        metas = [sidecar_meta(model / n) for n in (STATS_NAME, GRAM_NAME)]
        if all(m and m.get("mode", "dense") == "dense" and all((m.get("calibration") or {}).get(k) == v for k, v in want.items())
               for m in metas):
            err.print(f"reusing {model / STATS_NAME} and {model / GRAM_NAME} (same calibration)", markup=False)
            return {"reused": True, "tokens": metas[1]["calibration"].get("tokens")}
    stats_args = ["stats", str(model), "--gram", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    return llmprune(*stats_args)


def sequential_statistics(model: Path, work: Path, row: Row, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """`llmprune stats MODEL --sequential --method M --sparsity S|--pattern N:M [--gram [--update]]` into
    WORK (stats and, for sparsegpt and --update rows, Gram sidecars of their own), or the ones already
    there when --reuse-stats and they carry the same calibration and sequential settings."""
    reconstructs = row.update or row.method == "sparsegpt"
    stats_path = work / f"{model.name}-{row.label}-{STATS_NAME}"
    gram_path = work / f"{model.name}-{row.label}-{GRAM_NAME}"
    want = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    key = "pattern" if ":" in row.target else "sparsity"
    value = row.target if key == "pattern" else float(row.target)
    if args.reuse_stats:
        metas = [sidecar_meta(p) for p in (stats_path, gram_path)]

        def matches(m: dict | None) -> bool:
            seq = (m or {}).get("sequential") or {}
            return (bool(m) and m.get("mode") == "sequential" and all((m.get("calibration") or {}).get(k) == v for k, v in want.items())
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


def add_protocol_options(ap: argparse.ArgumentParser) -> None:
    """docs/quality.md's protocol as options: calibration and evaluation sizes, the device."""
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows [8]")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window [256]")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window [512]")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens, 0 for all [4096]")
    ap.add_argument("--device", default="cpu", help="auto, cpu or cuda (stats and eval) [cpu]")


def main(argv: list[str] | None = None) -> int:
    command = "python benches/sparsegpt_quality.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "demo-out" / "smollm2-135m", help="demo checkpoint (cached)")
    ap.add_argument("--work-dir", type=Path, default=None, help="pruned checkpoints [default: beside --model-dir]")
    ap.add_argument("--runs", default=None,
                    help="METHOD[+update][~seq]@TARGET,... in the order to run them [default: the issue's rows; with --sequential, the sequential rows]")
    ap.add_argument("--sequential", action="store_true",
                    help="default --runs: sparsegpt at 50%% and 2:4 and wanda --update at 2:4 with sequential statistics, each beside "
                         "its dense-statistics twin; --markdown writes between the sequential table's markers")
    ap.add_argument("--keep-gram", action="store_true", help="keep the sequential rows' Gram sidecars (deleted after their apply otherwise)")
    add_protocol_options(ap)
    ap.add_argument("--threads", type=int, default=None, help="threads of `llmprune apply`")
    ap.add_argument("--reuse-stats", action="store_true",
                    help="reuse the sidecars in --model-dir (and the sequential ones in --work-dir) when their calibration matches")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help=f"also write the table into this file, between its '{MD_BEGIN}' and '{MD_END}' lines "
                         f"(with --sequential, '{MD_SEQ_BEGIN}' and '{MD_SEQ_END}'; appended without them)")
    args = ap.parse_args(argv)
    rows = parse_runs(args.runs or (SEQUENTIAL_RUNS if args.sequential else DEFAULT_RUNS))
    provenance = _provenance()
    model = args.model_dir.resolve()
    work = (args.work_dir or model.parent).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    from llmprune.model.demo import ensure_demo_model

    ensure_demo_model(model, log=lambda msg: err.print(msg, markup=False, soft_wrap=True))
    stats_info = ensure_statistics(model, args) if any(not r.sequential for r in rows) else {}
    seq_info: dict[str, dict] = {}

    eval_args = ["--seqlen", str(args.eval_seqlen), "--device", args.device]
    if args.max_tokens:
        eval_args += ["--max-tokens", str(args.max_tokens)]
    dense_res = llmprune("eval", str(model), *eval_args)
    dense = dense_res["perplexity"]
    eval_info = {k: dense_res.get(k) for k in ("tokens", "windows", "device", "dtype")}

    def save(partial: bool) -> None:
        if args.json:
            doc = {"command": command, "provenance": provenance, "dense": dense, "evaluation": eval_info,
                   "statistics": stats_info, "sequential_statistics": seq_info, "rows": [asdict(r) for r in rows], "partial": partial,
                   "seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")

    for k, row in enumerate(rows, 1):
        err.print(f"[bold][{k}/{len(rows)}] {row.spec}[/bold] [dim]({time.perf_counter() - t0:.0f} s so far)[/dim]")
        out = work / f"{model.name}-{row.label}"
        apply_args = ["apply", str(model), "--method", row.method, *row.target_args(), "--out", str(out), "--force"]
        if row.sequential:
            stats_path, gram_path, info = sequential_statistics(model, work, row, args)
            seq_info[row.spec] = info
            row.stats_seconds = None if info.get("reused") else info.get("seconds")
            apply_args += ["--stats", str(stats_path)]
            if row.update or row.method == "sparsegpt":
                apply_args += ["--gram", str(gram_path)]
        if row.update:
            apply_args.append("--update")
        if args.threads:
            apply_args += ["--threads", str(args.threads)]
        res = llmprune(*apply_args)
        row.apply_seconds = res.get("seconds")
        if row.sequential and not args.keep_gram:
            gram_path.unlink(missing_ok=True)
        res = llmprune("eval", str(out), *eval_args)
        row.perplexity, row.eval_seconds = res["perplexity"], res.get("seconds")
        shutil.rmtree(out, ignore_errors=True)
        save(partial=k < len(rows))

    total = time.perf_counter() - t0
    table = markdown_table(rows, dense, args, stats_info, eval_info, total, command, provenance, load_start, os.getloadavg(), seq_info)
    print(table)
    if args.markdown:
        write_markdown(args.markdown, table, *((MD_SEQ_BEGIN, MD_SEQ_END) if args.sequential else (MD_BEGIN, MD_END)))
        err.print(f"wrote {args.markdown}", markup=False)
    return 0


def markdown_table(rows: list[Row], dense: float, args: argparse.Namespace, stats_info: dict, eval_info: dict, total: float,
                   command: str, provenance: str, load_start, load_end, seq_info: dict | None = None) -> str:
    if any(r.sequential for r in rows):
        return sequential_table(rows, dense, args, stats_info, eval_info, total, command, provenance, load_start, load_end, seq_info or {})
    wanda = {r.target: r.perplexity for r in rows if r.method == "wanda" and not r.update and r.perplexity and not r.sequential}
    stats_how = "reused from an earlier run" if stats_info.get("reused") else f"{float(stats_info.get('seconds') or 0):.0f} s"
    max_tokens = f"the first {args.max_tokens:,} tokens" if args.max_tokens else "all tokens"
    lines = [
        f"Command: `{command}`",
        "",
        f"- model: `{args.model_dir.name}` (SmolLM2-135M-Instruct, bfloat16 safetensors converted by `llmprune demo-model`)",
        f"- calibration: State of the Union addresses 1900-1949 (built-in); nsamples {args.nsamples} x seqlen {args.seqlen} = "
        f"{stats_info.get('tokens', '?'):,} tokens, seed 0; dense statistics and Gram matrices from one "
        f"`llmprune stats --gram` pass ({stats_how})",
        f"- evaluation: State of the Union addresses 1950- (built-in); {max_tokens}: {eval_info.get('tokens', '?'):,} tokens scored, "
        f"eval seqlen {args.eval_seqlen}, {eval_info.get('windows', '?')} windows",
        f"- device: {eval_info.get('device')}, dtype {eval_info.get('dtype')} (stats and eval); apply: damp 0.01, blocksize 128; {provenance}",
        f"- wall time: {total:,.0f} s ({total / 60:.1f} min); load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} at the end",
        "",
        f"| method | target | perplexity | ratio to dense ({_fmt_ppl(dense)}) | ratio to wanda | apply s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(rows, key=lambda r: (TARGET_ORDER.index(r.target) if r.target in TARGET_ORDER else 99,
                                         ("wanda", "sparsegpt").index(r.method) if r.method in ("wanda", "sparsegpt") and not r.update else 2,
                                         r.method))
    for r in ordered:
        name = f"{r.method} `--update`" if r.update else r.method
        ppl = r.perplexity
        ratio = f"{ppl / dense:.2f}" if ppl else "-"
        vs_wanda = f"{ppl / wanda[r.target]:.2f}" if ppl and r.target in wanda else "-"
        apply_s = f"{r.apply_seconds:.2f}" if r.apply_seconds is not None else "-"
        lines.append(f"| {name} | {r.shown_target} | {_fmt_ppl(ppl)} | {ratio} | {vs_wanda} | {apply_s} |")
    missing = [r.spec for r in rows if r.perplexity is None]
    if missing:
        lines += ["", f"Not measured: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def sequential_table(rows: list[Row], dense: float, args: argparse.Namespace, stats_info: dict, eval_info: dict, total: float,
                     command: str, provenance: str, load_start, load_end, seq_info: dict) -> str:
    """The table of a run with sequential rows: a statistics column, each row's ratio to its twin with the
    other statistics when that ran too, and each sequential row's own statistics pass."""
    ppl = {r.spec: r.perplexity for r in rows}
    max_tokens = f"the first {args.max_tokens:,} tokens" if args.max_tokens else "all tokens"
    passes = ", ".join(
        f"{r.method}{' --update' if r.update else ''}@{r.shown_target} "
        + ("reused" if (seq_info.get(r.spec) or {}).get("reused") else f"{float((seq_info.get(r.spec) or {}).get('seconds') or 0):.0f} s")
        for r in rows if r.sequential and r.spec in seq_info)
    tokens = next((i.get("tokens") for i in [stats_info, *seq_info.values()] if i and i.get("tokens")), None)
    dense_how = ("reused from an earlier run" if stats_info.get("reused") else f"{float(stats_info.get('seconds') or 0):.0f} s") if stats_info else "not used"
    lines = [
        f"Command: `{command}`",
        "",
        f"- model: `{args.model_dir.name}` (SmolLM2-135M-Instruct, bfloat16 safetensors converted by `llmprune demo-model`)",
        f"- calibration: State of the Union addresses 1900-1949 (built-in); nsamples {args.nsamples} x seqlen {args.seqlen} = "
        f"{tokens or '?':,} tokens, seed 0; dense statistics and Gram matrices from one `llmprune stats --gram` pass ({dense_how}); "
        f"sequential statistics and Gram matrices from one `llmprune stats --sequential --method M --sparsity S|--pattern N:M --gram "
        f"[--update]` pass per row ({passes or 'none'})",
        f"- evaluation: State of the Union addresses 1950- (built-in); {max_tokens}: {eval_info.get('tokens', '?'):,} tokens scored, "
        f"eval seqlen {args.eval_seqlen}, {eval_info.get('windows', '?')} windows",
        f"- device: {eval_info.get('device')}, dtype {eval_info.get('dtype')} (stats and eval); apply: damp 0.01, blocksize 128; {provenance}",
        f"- wall time: {total:,.0f} s ({total / 60:.1f} min); load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} at the end",
        "",
        f"| method | statistics | target | perplexity | ratio to dense ({_fmt_ppl(dense)}) | sequential / dense statistics | apply s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(rows, key=lambda r: (TARGET_ORDER.index(r.target) if r.target in TARGET_ORDER else 99, r.method, r.update, r.sequential))
    for r in ordered:
        name = f"{r.method} `--update`" if r.update else r.method
        p = r.perplexity
        ratio = f"{p / dense:.2f}" if p else "-"
        seq, den = (p, ppl.get(r.twin)) if r.sequential else (None, None)
        vs = f"{seq / den:.2f}" if seq and den else "-"
        apply_s = f"{r.apply_seconds:.2f}" if r.apply_seconds is not None else "-"
        lines.append(f"| {name} | {'sequential' if r.sequential else 'dense'} | {r.shown_target} | {_fmt_ppl(p)} | {ratio} | {vs} | {apply_s} |")
    missing = [r.spec for r in rows if r.perplexity is None]
    if missing:
        lines += ["", f"Not measured: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, table: str, begin: str = MD_BEGIN, end_marker: str = MD_END) -> None:
    block = f"{begin}\n{table}{end_marker}\n"
    text = path.read_text() if path.is_file() else ""
    start, end = text.find(begin), text.find(end_marker)
    if start >= 0 and end > start:
        rest = text[end + len(end_marker):].lstrip("\n")
        path.write_text(text[:start] + block + ("\n" + rest if rest else ""))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("\n" if text and not text.endswith("\n") else "") + block)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
