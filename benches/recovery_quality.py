"""Recovery after pruning on a real model: perplexity of SmolLM2-135M pruned by `llmprune apply` and then
recovered by block reconstruction (`llmprune reconstruct`), LoRA on the next-token loss (`llmprune
finetune`) or distillation from the dense model (`llmprune finetune --distill`), on docs/quality.md's
protocol.

Steps, each through the `llmprune` command line:

1. `llmprune demo-model` (cached in demo-out/smollm2-135m, as `make demo` converts it);
2. the pruning statistics: the dense stats and Gram sidecars in the model directory (docs/quality.md's
   8 x 256 tokens; --reuse-stats, or they are computed);
3. for distillation rows, the teacher: `llmprune stats MODEL --teacher-logits K` on the recovery
   windows (--rec-nsamples x --rec-seqlen), into --work-dir, reused when already there;
4. `llmprune eval` of the dense model;
5. per row, `llmprune apply`, the recovery, and `llmprune eval` (checkpoints are deleted afterwards).

--runs takes METHOD@TARGET[+RECOVERY],... in the order to run them: METHOD an unstructured method
(TARGET a sparsity or N:M), a structured one (a sparsity) or block-influence (TARGET the blocks removed);
RECOVERY `rec` (reconstruct), `lora` or `distill`. Every recovery sees the same windows: the first
--rec-nsamples windows of --rec-seqlen tokens of the calibration text (seed 0); LoRA and distillation
take --ft-steps steps of --ft-batch windows, so their training tokens are given in the table next to
the reconstruction's (its steps x batch x windows' tokens per block stage).

    python benches/recovery_quality.py --reuse-stats --work-dir /tmp/rq --json rq.json --markdown docs/quality.md
    python benches/recovery_quality.py --runs wanda@2:4,wanda@2:4+rec,sparsegpt@2:4
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
    "wanda@2:4", "wanda@2:4+rec", "sparsegpt@2:4", "wanda@0.6", "wanda@0.6+rec", "sparsegpt@0.6",
    "flap@0.2", "flap@0.2+lora", "flap@0.2+distill", "flap@0.2+rec",
])
METHODS = ("magnitude", "wanda", "stade", "stade-w", "sparsegpt", "flap", "wanda-sp", "magnitude-sp", "block-influence")
STRUCTURED = ("flap", "wanda-sp", "magnitude-sp")
RECOVERIES = ("rec", "lora", "distill")
MD_BEGIN = "<!-- recovery_quality.py table: begin -->"
MD_END = "<!-- recovery_quality.py table: end -->"


@dataclass
class Row:
    method: str
    target: str
    recovery: str | None
    perplexity: float | None = None
    apply_seconds: float | None = None
    recovery_seconds: float | None = None
    recovery_tokens: int | None = None
    recovery_peak_mib: float | None = None  # the recovery command's peak resident memory
    stages_kept: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.method}@{self.target}" + (f"+{self.recovery}" if self.recovery else "")

    @property
    def label(self) -> str:
        return self.spec.replace("@", "-").replace("+", "-").replace(":", "of")


def parse_row(item: str) -> Row:
    spec, _, recovery = item.partition("+")
    method, at, target = spec.partition("@")
    if method not in METHODS or not at or not target:
        raise SystemExit(f"error: {item!r}: expected METHOD@TARGET[+RECOVERY], METHOD one of {', '.join(METHODS)}")
    if recovery and recovery not in RECOVERIES:
        raise SystemExit(f"error: {item!r}: the recovery is one of {', '.join(RECOVERIES)}")
    return Row(method, target, recovery or None)


def apply_args(row: Row) -> list[str]:
    if row.method == "block-influence":
        return ["--method", row.method, "--remove-blocks", row.target]
    if ":" in row.target:
        return ["--method", row.method, "--pattern", row.target]
    # uniform widths, not rounded: the protocol of docs/quality.md's tables
    extra = ["--allocation", "uniform", "--width-multiple", "1"] if row.method in STRUCTURED else []
    return ["--method", row.method, "--sparsity", row.target, *extra]


def ensure_teacher(model: Path, path: Path, args: argparse.Namespace) -> dict:
    """The teacher-logit sidecar of the recovery windows, reused when PATH already holds one."""
    from llmprune.calibration import teacher as T

    if path.is_file():
        try:
            t = T.read(path)
        except Exception:  # noqa: BLE001 - any unreadable file is recomputed
            t = None
        cal = t.meta.get("calibration", {}) if t is not None else {}
        if t is not None and t.k == args.teacher_k and cal.get("nsamples") == args.rec_nsamples and cal.get("seqlen") == args.rec_seqlen:
            err.print(f"reusing {path}", markup=False)
            return {"reused": True, "path": str(path)}
    res = llmprune("stats", str(model), "--nsamples", str(args.rec_nsamples), "--seqlen", str(args.rec_seqlen), "--seed", "0",
                   "--device", args.device, "--out", str(path.with_name("teacher-pass-stats.safetensors")),
                   "--teacher-logits", str(args.teacher_k), "--teacher-out", str(path))
    return {**res, "path": str(path)}


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "checkpoints and the teacher sidecar [default: beside --model-dir]")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="METHOD@TARGET[+rec|+lora|+distill],... in the order to run them")
    C.add_protocol_options(ap)
    ap.add_argument("--rec-nsamples", type=int, default=16, help="recovery windows (every recovery sees the same ones)")
    ap.add_argument("--rec-seqlen", type=int, default=512, help="tokens per recovery window")
    ap.add_argument("--rec-steps", type=int, default=None, help="reconstruct --steps [default: its own]")
    ap.add_argument("--rec-lr", type=float, default=None, help="reconstruct --lr [default: its own]")
    ap.add_argument("--ft-steps", type=int, default=16, help="finetune --steps of LoRA and distillation rows")
    ap.add_argument("--ft-batch", type=int, default=4, help="finetune --batch-size")
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="finetune --lr")
    ap.add_argument("--teacher-k", type=int, default=64, help="stats --teacher-logits K")
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the dense sidecars in --model-dir when their calibration matches")
    ap.add_argument("--no-dense-eval", action="store_true", help="skip the evaluation of the unpruned model")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    ap.add_argument("--markdown", type=Path, default=None, help=f"replace the table between {MD_BEGIN} and {MD_END} in this file")
    args = ap.parse_args(argv)
    rows = C.parse_runs(args.runs, parse_row)
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    stats_info = {"dense": C.ensure_statistics(model, args)}
    teacher = (work / "teacher.safetensors").resolve()
    if any(r.recovery == "distill" for r in rows):
        stats_info["teacher"] = ensure_teacher(model, teacher, args)
    dense = None
    eval_info: dict = {}
    if not args.no_dense_eval:
        res = session.eval(model)
        dense, eval_info = res["perplexity"], C.eval_summary(res)

    def save(partial: bool) -> None:
        session.save_json(dense=dense, evaluation=eval_info, statistics=stats_info, rows=[asdict(r) for r in rows], partial=partial)

    for k, row in enumerate(rows, 1):
        session.announce(k, len(rows), row.spec)
        pruned = work / f"{model.name}-{row.method}-{row.target.replace(':', 'of')}"
        res = session.apply(str(model), *apply_args(row), "--out", str(pruned), "--force")
        row.apply_seconds = res.get("seconds")
        target = pruned
        if row.recovery is not None:
            target = work / f"{model.name}-{row.label}"
            window = ["--seed", "0", "--device", args.device, "--out", str(target), "--force"]
            if row.recovery == "rec":
                extra = [*(["--steps", str(args.rec_steps)] if args.rec_steps else []), *(["--lr", str(args.rec_lr)] if args.rec_lr else [])]
                res = llmprune("reconstruct", str(pruned), "--dense", str(model), "--nsamples", str(args.rec_nsamples),
                               "--seqlen", str(args.rec_seqlen), *extra, *window)
                row.recovery_tokens = res["steps"] * min(res["batch_size"], res["nsamples"]) * res["seqlen"]
                row.stages_kept = f"{res['stages_kept']}/{len(res['stages'])}"
                row.recovery_seconds = res["seconds"]
                row.recovery_peak_mib = res.get("peak_rss_mib")
            else:
                ft = ["--steps", str(args.ft_steps), "--batch-size", str(args.ft_batch), "--lr", str(args.ft_lr)]
                if row.recovery == "distill":
                    ft += ["--distill", str(teacher)]
                else:
                    ft += ["--nsamples", str(args.rec_nsamples), "--seqlen", str(args.rec_seqlen)]
                res = llmprune("finetune", str(pruned), *ft, *window)
                row.recovery_tokens, row.recovery_seconds = res["tokens"], res["seconds"]
                row.recovery_peak_mib = res.get("peak_rss_mib")
            shutil.rmtree(pruned, ignore_errors=True)
        res = session.eval(target)
        row.perplexity = res["perplexity"]
        eval_info = eval_info or C.eval_summary(res)
        shutil.rmtree(target, ignore_errors=True)
        save(partial=k < len(rows))

    table = markdown_table(rows, dense, args, stats_info, eval_info, session)
    print(table)
    if args.markdown:
        C.write_markdown(args.markdown, table, MD_BEGIN, MD_END)
    return 0


def markdown_table(rows: list[Row], dense: float | None, args: argparse.Namespace, stats_info: dict, eval_info: dict, session: C.Session) -> str:
    facts = C.protocol_facts(
        args, eval_info, stats_info["dense"].get("tokens"),
        f"pruning statistics from one `llmprune stats --gram` pass ({C.pass_how(stats_info.get('dense'))})",
        f"recovery windows: {args.rec_nsamples} x {args.rec_seqlen} tokens of the calibration text (seed 0) for every recovery; "
        f"reconstruct with its defaults{' but --steps ' + str(args.rec_steps) if args.rec_steps else ''}{' --lr ' + str(args.rec_lr) if args.rec_lr else ''}; "
        f"LoRA and distillation {args.ft_steps} steps of {args.ft_batch} windows at lr {args.ft_lr:g} (distillation: top-{args.teacher_k} teacher logits)",
        session.provenance, session.elapsed(), session.load_start, os.getloadavg())
    base = {(r.method, r.target): r.perplexity for r in rows if r.recovery is None}
    table = []
    for r in rows:
        plain = base.get((r.method, r.target))
        vs_plain = f"{r.perplexity / plain:.2f}" if r.recovery and r.perplexity and plain else "-"
        table.append([r.method, r.target, r.recovery or "none", fmt_ppl(r.perplexity), C.ratio(r.perplexity, dense), vs_plain,
                      f"{r.recovery_tokens:,}" if r.recovery_tokens else "-",
                      f"{r.recovery_seconds:.0f}" if r.recovery_seconds is not None else "-",
                      f"{r.recovery_peak_mib / 1024:.2f}" if r.recovery_peak_mib is not None else "-", r.stages_kept or "-"])
    columns = ["method", "target", "recovery", "perplexity", f"ratio to dense ({fmt_ppl(dense)})", "ratio to no recovery",
               "training tokens", "recovery s", "recovery peak GiB", "stages improved"]
    return C.markdown(session.command, facts, columns, "lllrrrrrrr", table, C.not_measured([r.spec for r in rows if r.perplexity is None]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
