"""SparseGPT and `--update` on a real model: perplexity of SmolLM2-135M pruned by `llmprune apply
--method sparsegpt` and by wanda / stade with `--update`, next to plain wanda, on docs/quality.md's protocol.

Steps, each through the `llmprune` command line:

1. `llmprune demo-model` (cached in demo-out/smollm2-135m, as `make demo` converts it);
2. `llmprune stats MODEL --gram`: the dense statistics and the Gram sidecar, once for every row;
3. per row, `llmprune apply` and `llmprune eval` (the pruned checkpoint is deleted after its evaluation).

--runs takes METHOD[+update]@TARGET,... in the order to run them (the table is ordered by target);
the default puts the rows the issue's goals need first (sparsegpt and wanda at 2:4 and 50%, then 60%),
so a run cut short still answers them. The defaults are docs/quality.md's protocol: calibration
8 x 256 tokens of the 1900-1949 addresses (seed 0), evaluation the first 4,096 tokens of the 1950+
addresses in 512-token windows, float32 on the CPU:

    python benches/sparsegpt_quality.py --device cpu --markdown docs/quality.md   # docs/quality.md's SparseGPT table
    python benches/sparsegpt_quality.py --runs sparsegpt@2:4,wanda@2:4            # two rows only
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
METHODS = ("magnitude", "wanda", "stade", "stade-w", "sparsegpt")
MD_BEGIN = "<!-- sparsegpt_quality.py table: begin -->"
MD_END = "<!-- sparsegpt_quality.py table: end -->"
STATS_NAME, GRAM_NAME = "llmprune-stats.safetensors", "llmprune-gram.safetensors"


@dataclass
class Row:
    method: str
    update: bool
    target: str  # as written after @: 0.5 or 2:4
    apply_seconds: float | None = None
    perplexity: float | None = None
    eval_seconds: float | None = None

    @property
    def spec(self) -> str:
        return f"{self.method}{'+update' if self.update else ''}@{self.target}"

    @property
    def label(self) -> str:
        return f"{self.method}{'-update' if self.update else ''}-{self.target.replace(':', '_')}"

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
        method, plus, flag = name.partition("+")
        if method not in METHODS or (plus and flag != "update") or (method == "sparsegpt" and plus):
            raise SystemExit(f"error: bad run {item!r}: METHOD[+update]@TARGET, METHOD one of {', '.join(METHODS)}")
        sp, pat = parse_target(target, item)
        row = Row(method, bool(plus), pat or f"{sp:g}")
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


def main(argv: list[str] | None = None) -> int:
    command = "python benches/sparsegpt_quality.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "demo-out" / "smollm2-135m", help="demo checkpoint (cached)")
    ap.add_argument("--work-dir", type=Path, default=None, help="pruned checkpoints [default: beside --model-dir]")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="METHOD[+update]@TARGET,... in the order to run them")
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows [8]")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window [256]")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window [512]")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens, 0 for all [4096]")
    ap.add_argument("--device", default="cpu", help="auto, cpu or cuda (stats and eval) [cpu]")
    ap.add_argument("--threads", type=int, default=None, help="threads of `llmprune apply`")
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the sidecars in --model-dir when their calibration matches")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help=f"also write the table into this file, between its '{MD_BEGIN}' and '{MD_END}' lines (appended without them)")
    args = ap.parse_args(argv)
    rows = parse_runs(args.runs)
    provenance = _provenance()
    model = args.model_dir.resolve()
    work = (args.work_dir or model.parent).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    from llmprune.demo_model import ensure_demo_model

    ensure_demo_model(model, log=lambda msg: err.print(msg, markup=False, soft_wrap=True))
    stats_info = ensure_statistics(model, args)

    eval_args = ["--seqlen", str(args.eval_seqlen), "--device", args.device]
    if args.max_tokens:
        eval_args += ["--max-tokens", str(args.max_tokens)]
    dense_res = llmprune("eval", str(model), *eval_args)
    dense = dense_res["perplexity"]
    eval_info = {k: dense_res.get(k) for k in ("tokens", "windows", "device", "dtype")}

    def save(partial: bool) -> None:
        if args.json:
            doc = {"command": command, "provenance": provenance, "dense": dense, "evaluation": eval_info,
                   "statistics": stats_info, "rows": [asdict(r) for r in rows], "partial": partial,
                   "seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")

    for k, row in enumerate(rows, 1):
        err.print(f"[bold][{k}/{len(rows)}] {row.spec}[/bold] [dim]({time.perf_counter() - t0:.0f} s so far)[/dim]")
        out = work / f"{model.name}-{row.label}"
        apply_args = ["apply", str(model), "--method", row.method, *row.target_args(), "--out", str(out), "--force"]
        if row.update:
            apply_args.append("--update")
        if args.threads:
            apply_args += ["--threads", str(args.threads)]
        res = llmprune(*apply_args)
        row.apply_seconds = res.get("seconds")
        res = llmprune("eval", str(out), *eval_args)
        row.perplexity, row.eval_seconds = res["perplexity"], res.get("seconds")
        shutil.rmtree(out, ignore_errors=True)
        save(partial=k < len(rows))

    total = time.perf_counter() - t0
    table = markdown_table(rows, dense, args, stats_info, eval_info, total, command, provenance, load_start, os.getloadavg())
    print(table)
    if args.markdown:
        write_markdown(args.markdown, table)
        err.print(f"wrote {args.markdown}", markup=False)
    return 0


def markdown_table(rows: list[Row], dense: float, args: argparse.Namespace, stats_info: dict, eval_info: dict, total: float,
                   command: str, provenance: str, load_start, load_end) -> str:
    wanda = {r.target: r.perplexity for r in rows if r.method == "wanda" and not r.update and r.perplexity}
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


def write_markdown(path: Path, table: str) -> None:
    block = f"{MD_BEGIN}\n{table}{MD_END}\n"
    text = path.read_text() if path.is_file() else ""
    start, end = text.find(MD_BEGIN), text.find(MD_END)
    if start >= 0 and end > start:
        path.write_text(text[:start] + block + text[end + len(MD_END):].lstrip("\n"))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("\n" if text and not text.endswith("\n") else "") + block)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
