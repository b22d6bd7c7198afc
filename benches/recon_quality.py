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
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import common as C
from common import err, fmt_ppl, llmprune

DEFAULT_RUNS = ",".join([
    "flap@0.2", "flap+reconstruct@0.2", "hywia@0.2", "hywia+reconstruct@0.2",
    "flap@0.5", "flap+reconstruct@0.5", "hywia@0.5", "hywia+reconstruct@0.5",
])
METHODS = ("flap", "hywia", "wanda-sp", "magnitude-sp")
GRAD_NAME = "stats-grad.safetensors"


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


def parse_row(item: str) -> Row:
    r = C.parse_run(item, "METHOD[/global|/uniform][+reconstruct]@SPARSITY", METHODS, flags=("reconstruct",), variants=("global", "uniform"))
    return Row(r.method, r.variant or None, bool(r.flags), r.sparsity)


def parse_runs(spec: str) -> list[Row]:
    return C.parse_runs(spec, parse_row)


def ensure_grad(model: Path, path: Path, args: argparse.Namespace, want: dict) -> dict:
    """A sidecar with gradient statistics (`llmprune stats MODEL --grad --out PATH`), reused when PATH
    already holds one with the same calibration."""
    meta = C.sidecar_meta(path)
    if C.calibration_matches(meta, want) and meta.get("grad"):
        err.print(f"reusing {path} (same calibration, gradient statistics)", markup=False)
        return {"reused": True, "path": str(path), "tokens": meta["calibration"].get("tokens")}
    res = llmprune("stats", str(model), "--grad", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--seed", "0", "--device", args.device, "--out", str(path))
    return {**res, "path": str(path)}


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "pruned checkpoints and the gradient sidecar [default: beside --model-dir]")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="METHOD[/ALLOCATION][+reconstruct]@SPARSITY,... in the order to run them")
    C.add_protocol_options(ap)
    ap.add_argument("--threads", type=int, default=None, help="threads of `llmprune apply`")
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the dense sidecars in --model-dir when their calibration matches")
    ap.add_argument("--grad-stats", type=Path, default=None,
                    help=f"the sidecar with gradient statistics for hywia [default: WORK_DIR/{GRAD_NAME}, computed unless there]")
    ap.add_argument("--no-dense-eval", action="store_true", help="skip the evaluation of the unpruned model")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    args = ap.parse_args(argv)
    rows = parse_runs(args.runs)
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    want = C.calibration(args)
    stats_info: dict[str, dict] = {}
    if any(r.method != "hywia" for r in rows) or any(r.reconstruct for r in rows):
        stats_info["dense"] = C.ensure_statistics(model, args)
    grad_path = (args.grad_stats or work / GRAD_NAME).resolve()
    if any(r.method == "hywia" for r in rows):
        stats_info["grad"] = ensure_grad(model, grad_path, args, want)

    dense = None
    eval_info: dict = {}
    if not args.no_dense_eval:
        res = session.eval(model)
        dense = res["perplexity"]
        eval_info = C.eval_summary(res)

    def save(partial: bool) -> None:
        session.save_json(dense=dense, evaluation=eval_info, statistics=stats_info, rows=[asdict(r) for r in rows], partial=partial)

    for k, row in enumerate(rows, 1):
        session.announce(k, len(rows), row.spec)
        out = work / f"{model.name}-{row.label}"
        apply_args = [str(model), "--method", row.method, "--sparsity", f"{row.sparsity:g}", "--out", str(out), "--force"]
        if row.allocation:
            apply_args += ["--allocation", row.allocation]
        if row.method == "hywia":
            apply_args += ["--stats", str(grad_path)]
        if row.reconstruct:
            apply_args.append("--reconstruct")
        res = session.apply(*apply_args)
        row.apply_seconds = res.get("seconds")
        if res.get("block_params_before"):
            row.removed = res["params_removed"] / res["block_params_before"]
        row.allocation_used, row.compensate = res.get("allocation"), res.get("compensate")
        res = session.eval(out)
        row.perplexity, row.eval_seconds = res["perplexity"], res.get("seconds")
        eval_info = eval_info or C.eval_summary(res)
        shutil.rmtree(out, ignore_errors=True)
        save(partial=k < len(rows))

    print(markdown_table(rows, dense, args, stats_info, eval_info, session.elapsed(), session.command, session.provenance,
                         session.load_start, os.getloadavg()))
    return 0


def markdown_table(rows: list[Row], dense: float | None, args: argparse.Namespace, stats_info: dict, eval_info: dict, total: float,
                   command: str, provenance: str, load_start, load_end) -> str:
    tokens = next((i.get("tokens") for i in stats_info.values() if i.get("tokens")), None)
    facts = C.protocol_facts(args, eval_info, tokens,
                             f"dense statistics and Gram matrices from one `llmprune stats --gram` pass ({C.pass_how(stats_info.get('dense'))}); "
                             f"hywia's gradient statistics from `llmprune stats --grad` ({C.pass_how(stats_info.get('grad'))})",
                             "--reconstruct: damp 0.01", provenance, total, load_start, load_end)
    table = []
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
        table.append([method, alloc, removed, fmt_ppl(p), fmt_ppl(q), ratio, vs_dense, secs])
    columns = ["method", "allocation", "removed", "plain", "`--reconstruct`", "ratio",
               f"ratio to dense ({fmt_ppl(dense)}): plain / refit", "apply s: plain / refit"]
    return C.markdown(command, facts, columns, "llrrrrrr", table, C.not_measured([r.spec for r in rows if r.perplexity is None]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
