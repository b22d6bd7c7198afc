"""Structured pruning with and without `--reconstruct` on a real model: perplexity of SmolLM2-135M pruned
by `llmprune apply --method flap|hywia --sparsity S [--reconstruct]`, on docs/quality.md's protocol.

Steps, each through the `llmprune` command line:

1. `llmprune demo-model` (cached in demo-out/smollm2-135m, as `make demo` converts it);
2. the statistics: the dense stats and Gram sidecars already in the model directory (`llmprune stats MODEL
   --gram`, the pass docs/quality.md's SparseGPT table uses; --reuse-stats, or they are computed), and for
   hywia a sidecar with gradient statistics (`llmprune stats MODEL --grad`, into --work-dir, reused when
   one with the same calibration is already there);
3. `llmprune eval` of the dense model (the reference every ratio reads against);
4. per row, `llmprune apply` and `llmprune eval` (the pruned checkpoint is deleted after its evaluation).

--runs takes METHOD[+reconstruct]@SPARSITY,... in the order to run them; each method runs with its own
default allocation and compensation (flap: global, bias compensation; hywia: uniform, none) unless
METHOD is written METHOD/uniform or METHOD/global. The table pairs each row with its `--reconstruct`
twin. The defaults are docs/quality.md's protocol: calibration 8 x 256 tokens of the 1900-1949 addresses
(seed 0), evaluation the first 4,096 tokens of the 1950+ addresses in 512-token windows, float32 on the CPU:

    python benches/recon_quality.py --reuse-stats --work-dir /tmp/recon --json recon.json   # docs/quality.md's table
    python benches/recon_quality.py --runs flap/uniform@0.2,flap/uniform+reconstruct@0.2     # two rows only
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

from demo import _fmt_ppl, _provenance, err, llmprune, sidecar_meta  # noqa: E402
from sparsegpt_quality import add_protocol_options  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = ",".join([
    "flap@0.2", "flap+reconstruct@0.2", "hywia@0.2", "hywia+reconstruct@0.2",
    "flap@0.5", "flap+reconstruct@0.5", "hywia@0.5", "hywia+reconstruct@0.5",
])
METHODS = ("flap", "hywia", "wanda-sp", "magnitude-sp")
STATS_NAME, GRAM_NAME, GRAD_NAME = "llmprune-stats.safetensors", "llmprune-gram.safetensors", "stats-grad.safetensors"


@dataclass
class Row:
    method: str
    allocation: str | None  # None: the method's default
    reconstruct: bool
    sparsity: float
    apply_seconds: float | None = None
    removed: float | None = None  # share of the decoder blocks' parameters removed, from apply's summary
    allocation_used: str | None = None
    compensate: bool | None = None
    perplexity: float | None = None
    eval_seconds: float | None = None

    @property
    def spec(self) -> str:
        alloc = f"/{self.allocation}" if self.allocation else ""
        return f"{self.method}{alloc}{'+reconstruct' if self.reconstruct else ''}@{self.sparsity:g}"

    @property
    def label(self) -> str:
        return self.spec.replace("/", "-").replace("+", "-").replace("@", "-")

    @property
    def pair_key(self) -> tuple:
        return (self.method, self.allocation, self.sparsity)


def parse_runs(spec: str) -> list[Row]:
    rows: list[Row] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, target = item.partition("@")
        if not sep:
            raise SystemExit(f"error: {item!r} needs @SPARSITY (e.g. flap@0.2)")
        name, plus, flag = name.partition("+")
        method, slash, allocation = name.partition("/")
        if method not in METHODS or (plus and flag != "reconstruct") or (slash and allocation not in ("global", "uniform")):
            raise SystemExit(f"error: bad run {item!r}: METHOD[/global|/uniform][+reconstruct]@SPARSITY, METHOD one of {', '.join(METHODS)}")
        try:
            sparsity = float(target)
        except ValueError:
            raise SystemExit(f"error: bad sparsity in {item!r}") from None
        if not 0 < sparsity < 1:
            raise SystemExit(f"error: sparsity of {item!r} must lie in (0, 1)")
        row = Row(method, allocation or None, bool(plus), sparsity)
        if row.spec not in {r.spec for r in rows}:
            rows.append(row)
    if not rows:
        raise SystemExit("error: --runs names nothing")
    return rows


def _calibration_matches(meta: dict | None, want: dict) -> bool:
    return bool(meta) and meta.get("mode", "dense") == "dense" and all((meta.get("calibration") or {}).get(k) == v for k, v in want.items())


def ensure_dense(model: Path, args: argparse.Namespace, want: dict) -> dict:
    """The dense stats and Gram sidecars in MODEL (`llmprune stats MODEL --gram`), reused with --reuse-stats
    when both carry the same calibration."""
    if args.reuse_stats:
        metas = [sidecar_meta(model / n) for n in (STATS_NAME, GRAM_NAME)]
        if all(_calibration_matches(m, want) for m in metas):
            err.print(f"reusing {model / STATS_NAME} and {model / GRAM_NAME} (same calibration)", markup=False)
            return {"reused": True, "tokens": metas[1]["calibration"].get("tokens")}
    return llmprune("stats", str(model), "--gram", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                    "--seed", "0", "--device", args.device)


def ensure_grad(model: Path, path: Path, args: argparse.Namespace, want: dict) -> dict:
    """A sidecar with gradient statistics (`llmprune stats MODEL --grad --out PATH`), reused when PATH
    already holds one with the same calibration."""
    meta = sidecar_meta(path)
    if _calibration_matches(meta, want) and meta.get("grad"):
        err.print(f"reusing {path} (same calibration, gradient statistics)", markup=False)
        return {"reused": True, "path": str(path), "tokens": meta["calibration"].get("tokens")}
    res = llmprune("stats", str(model), "--grad", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--seed", "0", "--device", args.device, "--out", str(path))
    return {**res, "path": str(path)}


def main(argv: list[str] | None = None) -> int:
    command = "python benches/recon_quality.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "demo-out" / "smollm2-135m", help="demo checkpoint (cached)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="pruned checkpoints and the gradient sidecar [default: beside --model-dir]")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="METHOD[/ALLOCATION][+reconstruct]@SPARSITY,... in the order to run them")
    add_protocol_options(ap)
    ap.add_argument("--threads", type=int, default=None, help="threads of `llmprune apply`")
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the dense sidecars in --model-dir when their calibration matches")
    ap.add_argument("--grad-stats", type=Path, default=None,
                    help=f"the sidecar with gradient statistics for hywia [default: WORK_DIR/{GRAD_NAME}, computed unless there]")
    ap.add_argument("--no-dense-eval", action="store_true", help="skip the evaluation of the unpruned model")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    args = ap.parse_args(argv)
    rows = parse_runs(args.runs)
    provenance = _provenance()
    model = args.model_dir.resolve()
    work = (args.work_dir or model.parent).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    from llmprune.model.demo import ensure_demo_model

    ensure_demo_model(model, log=lambda msg: err.print(msg, markup=False, soft_wrap=True))
    want = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    stats_info: dict[str, dict] = {}
    if any(r.method != "hywia" for r in rows) or any(r.reconstruct for r in rows):
        stats_info["dense"] = ensure_dense(model, args, want)
    grad_path = (args.grad_stats or work / GRAD_NAME).resolve()
    if any(r.method == "hywia" for r in rows):
        stats_info["grad"] = ensure_grad(model, grad_path, args, want)

    eval_args = ["--seqlen", str(args.eval_seqlen), "--device", args.device]
    if args.max_tokens:
        eval_args += ["--max-tokens", str(args.max_tokens)]
    dense = None
    eval_info: dict = {}
    if not args.no_dense_eval:
        res = llmprune("eval", str(model), *eval_args)
        dense = res["perplexity"]
        eval_info = {k: res.get(k) for k in ("tokens", "windows", "device", "dtype")}

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
        apply_args = ["apply", str(model), "--method", row.method, "--sparsity", f"{row.sparsity:g}", "--out", str(out), "--force"]
        if row.allocation:
            apply_args += ["--allocation", row.allocation]
        if row.method == "hywia":
            apply_args += ["--stats", str(grad_path)]
        if row.reconstruct:
            apply_args.append("--reconstruct")
        if args.threads:
            apply_args += ["--threads", str(args.threads)]
        res = llmprune(*apply_args)
        row.apply_seconds = res.get("seconds")
        if res.get("block_params_before"):
            row.removed = res["params_removed"] / res["block_params_before"]
        row.allocation_used, row.compensate = res.get("allocation"), res.get("compensate")
        res = llmprune("eval", str(out), *eval_args)
        row.perplexity, row.eval_seconds = res["perplexity"], res.get("seconds")
        if not eval_info:
            eval_info = {k: res.get(k) for k in ("tokens", "windows", "device", "dtype")}
        shutil.rmtree(out, ignore_errors=True)
        save(partial=k < len(rows))

    total = time.perf_counter() - t0
    print(markdown_table(rows, dense, args, stats_info, eval_info, total, command, provenance, load_start, os.getloadavg()))
    return 0


def markdown_table(rows: list[Row], dense: float | None, args: argparse.Namespace, stats_info: dict, eval_info: dict, total: float,
                   command: str, provenance: str, load_start, load_end) -> str:
    def how(info: dict | None) -> str:
        if not info:
            return "not used"
        return "reused from an earlier run" if info.get("reused") else f"{float(info.get('seconds') or 0):.0f} s"

    max_tokens = f"the first {args.max_tokens:,} tokens" if args.max_tokens else "all tokens"
    tokens = next((i.get("tokens") for i in stats_info.values() if i.get("tokens")), None)
    lines = [
        f"Command: `{command}`",
        "",
        f"- model: `{args.model_dir.name}` (SmolLM2-135M-Instruct, bfloat16 safetensors converted by `llmprune demo-model`)",
        f"- calibration: State of the Union addresses 1900-1949 (built-in); nsamples {args.nsamples} x seqlen {args.seqlen} = "
        f"{tokens or '?':,} tokens, seed 0; dense statistics and Gram matrices from one `llmprune stats --gram` pass "
        f"({how(stats_info.get('dense'))}); hywia's gradient statistics from `llmprune stats --grad` ({how(stats_info.get('grad'))})",
        f"- evaluation: State of the Union addresses 1950- (built-in); {max_tokens}: {eval_info.get('tokens', '?'):,} tokens scored, "
        f"eval seqlen {args.eval_seqlen}, {eval_info.get('windows', '?')} windows",
        f"- device: {eval_info.get('device')}, dtype {eval_info.get('dtype')} (stats and eval); --reconstruct: damp 0.01; {provenance}",
        f"- wall time: {total:,.0f} s ({total / 60:.1f} min); load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} at the end",
        "",
        f"| method | allocation | removed | plain | `--reconstruct` | ratio | ratio to dense ({_fmt_ppl(dense)}): plain / refit | apply s: plain / refit |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    pairs: dict[tuple, dict[bool, Row]] = {}
    for r in rows:
        pairs.setdefault(r.pair_key, {})[r.reconstruct] = r
    for (method, _, _), pair in pairs.items():
        plain, refit = pair.get(False), pair.get(True)
        any_row = plain or refit
        alloc = any_row.allocation_used or any_row.allocation or "default"
        removed = f"{any_row.removed:.1%}" if any_row.removed is not None else f"{any_row.sparsity:.0%}"
        p = plain.perplexity if plain else None
        q = refit.perplexity if refit else None
        ratio = f"{q / p:.2f}×" if p and q else "-"
        vs_dense = " / ".join(f"{x / dense:.2f}" if x and dense else "-" for x in (p, q))
        secs = " / ".join(f"{r.apply_seconds:.1f}" if r and r.apply_seconds is not None else "-" for r in (plain, refit))
        lines.append(f"| {method} | {alloc} | {removed} | {_fmt_ppl(p)} | {_fmt_ppl(q)} | {ratio} | {vs_dense} | {secs} |")
    missing = [r.spec for r in rows if r.perplexity is None]
    if missing:
        lines += ["", f"Not measured: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
