"""The Python steps of benches/gpu_check.sh (run them through that script).

    python benches/gpu_check.py tokenizer MODEL
    python benches/gpu_check.py tiny-model OUT
    python benches/gpu_check.py cli RECORD -- ARGS...
    python benches/gpu_check.py baseline MODEL --device D --nsamples N --seqlen L --max-tokens T
                                         --eval-seqlen E --out JSON [--against SIDECAR]
    python benches/gpu_check.py compare A B --out JSON [--name NAME] [--min-cosine C]
    python benches/gpu_check.py summary WORK RESULTS

- tokenizer: a byte-level BPE tokenizer trained on the built-in calibration text (State of the Union
  addresses 1900-1949), saved into MODEL, its vocabulary no larger than the model's: what `stats` and
  `eval` need on a checkpoint of benches/make_checkpoint.py, made without the hub.
- tiny-model: a float32 LLaMA of 2 blocks (hidden 256) built by transformers from a config, with that
  tokenizer, for comparing statistics taken on two devices.
- cli: `llmprune ARGS` in this process, so that torch's peak GPU memory can be read when it ends;
  RECORD (JSON) gets the exit status, the wall time (the imports included) and the peaks; the
  command's own output goes where it always goes.
- baseline: what one writes without llmprune: the whole model loaded by transformers on the device,
  forward pre-hooks on every linear of the decoder blocks summing x and x*x per input channel in
  float64 (as `stats` does), run over the same windows as `stats --seed 0`; then a plain forward over
  the same evaluation windows as `eval`, the perplexity from the logits. Times, tokens/s and the peak
  GPU memory go to JSON; with --against, the cosine of its sums with a stats sidecar's.
- compare: two stats sidecars of one model, weight by weight: cosine of act_sum and act_sqsum, the
  token counts, the block-influence sums.
- summary: every record under WORK as one table, printed and written to RESULTS/gpu_check.md and
  RESULTS/gpu_check.json; exit status 1 when a step failed or a check missed its threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30
TOKENIZER_VOCAB = 32000


# --------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(model_dir: Path, vocab: int) -> int:
    """Save a byte-level BPE tokenizer of at most VOCAB entries, trained on the built-in calibration
    text, into MODEL_DIR; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmprune.data.sources import CALIB, load_corpus

    docs = list(load_corpus(None, CALIB).documents)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.model_max_length = 1_000_000
    fast.save_pretrained(str(model_dir))
    return tok.get_vocab_size()


def cmd_tokenizer(args: argparse.Namespace) -> None:
    config = json.loads((args.model / "config.json").read_text())
    size = train_tokenizer(args.model, min(TOKENIZER_VOCAB, int(config["vocab_size"])))
    print(f"tokenizer: {size:,} entries (model vocabulary {config['vocab_size']:,}) saved in {args.model}")


def cmd_tiny_model(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)  # float32, torch's default
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    size = train_tokenizer(args.out, config.vocab_size)
    print(f"tiny LLaMA (2 blocks, hidden 256, float32) and a tokenizer of {size:,} entries in {args.out}")


# --------------------------------------------------------------------------------------------
# The CLI, measured
# --------------------------------------------------------------------------------------------


def gpu_peaks() -> dict[str, float | None]:
    """torch's peak allocated and reserved GPU memory in this process (GiB), or None without CUDA."""
    try:
        import torch
    except ImportError:
        return {"peak_gpu_gib": None, "peak_gpu_reserved_gib": None}
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {"peak_gpu_gib": None, "peak_gpu_reserved_gib": None}
    return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / GIB, "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def cmd_cli(args: argparse.Namespace) -> None:
    argv = [a for a in args.argv if a != "--"] if args.argv[:1] == ["--"] else args.argv
    t0 = time.perf_counter()
    code: Any = 0
    try:
        from llmprune.cli import main

        sys.argv = ["llmprune", *argv]
        main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - recorded, then raised again
        code = 1
        raise
    finally:
        rc = code if isinstance(code, int) else (0 if code is None else 1)
        record = {"argv": argv, "rc": rc, "wall_s": time.perf_counter() - t0, **gpu_peaks()}
        args.record.write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(rc)


# --------------------------------------------------------------------------------------------
# Plain transformers baseline
# --------------------------------------------------------------------------------------------


class Hooks:
    """Forward pre-hooks on every nn.Linear inside the decoder blocks: Σx and Σx² per input channel
    (float64) and the token count; linears fed the same tensor (q/k/v, gate/up) share one reduction."""

    def __init__(self, model: Any):
        import torch

        self.sums: dict[str, list[Any]] = {}
        self.handles = []
        self.last: tuple[Any, int, Any] | None = None
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}.":
                dev = mod.weight.device
                acc = [torch.zeros(mod.in_features, dtype=torch.float64, device=dev), torch.zeros(mod.in_features, dtype=torch.float64, device=dev), 0]
                self.sums[f"{name}.weight"] = acc
                self.handles.append(mod.register_forward_pre_hook(self.hook(acc, mod.in_features)))

    def hook(self, acc: list[Any], n_in: int):
        def run(_mod: Any, inputs: tuple) -> None:
            x = inputs[0]
            if self.last is not None and self.last[0] is x and self.last[1] == x._version:
                s, sq, n = self.last[2]
            else:
                x2 = x.detach().reshape(-1, n_in).double()
                s, sq, n = x2.sum(0), (x2 * x2).sum(0), x2.shape[0]
                self.last = (x, x._version, (s, sq, n))
            acc[0] += s
            acc[1] += sq
            acc[2] += n

        return run

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.last = None


def cosine(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def cmd_baseline(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import calibration_samples, eval_token_ids

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # what `stats` and `eval` choose by default
    tok = load_tokenizer(args.model)
    samples = calibration_samples(None, tok, args.nsamples, args.seqlen, 0)
    ids = eval_token_ids(None, tok, args.max_tokens).reshape(-1)
    windows = ids.numel() // args.eval_seqlen
    batches = ids[: windows * args.eval_seqlen].view(windows, args.eval_seqlen)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype, device_map=str(device) if cuda else None)
    model.eval()
    sync()
    load_s = time.perf_counter() - t0

    hooks = Hooks(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for j in range(samples.shape[0]):
            model.model(input_ids=samples[j : j + 1].to(device))  # the decoder blocks: no LM head, as `stats`
    sync()
    stats_s = time.perf_counter() - t0
    hooks.remove()
    sums = {k: (v[0].cpu().numpy(), v[1].cpu().numpy(), int(v[2])) for k, v in hooks.sums.items()}

    nll, predicted = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, windows, args.eval_batch):
            part = batches[start : start + args.eval_batch].to(device)
            logits = model(input_ids=part).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="sum"))
            predicted += part[:, 1:].numel()
            del logits
    sync()
    eval_s = time.perf_counter() - t0

    doc: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "load_s": load_s,
        "stats": {"tokens": int(samples.numel()), "seconds": stats_s, "linears": len(sums)},
        "eval": {
            "tokens": int(windows * args.eval_seqlen),
            "windows": windows,
            "seconds": eval_s,
            "perplexity": math.exp(nll / predicted) if predicted else None,
            "batch": args.eval_batch,
        },
        **gpu_peaks(),
    }
    if args.against:
        from llmprune.calibration import sidecar

        theirs = sidecar.read(args.against).layers
        common = sorted(set(theirs) & set(sums))
        doc["against"] = {
            "sidecar": str(args.against),
            "weights": len(common),
            "missing": sorted(set(theirs) ^ set(sums)),
            "min_cos_act_sum": min((cosine(sums[k][0], theirs[k].act_sum) for k in common), default=None),
            "min_cos_act_sqsum": min((cosine(sums[k][1], theirs[k].act_sqsum) for k in common), default=None),
            "counts_equal": all(sums[k][2] == theirs[k].act_count for k in common),
        }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


# --------------------------------------------------------------------------------------------
# Two sidecars
# --------------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> None:
    import numpy as np

    from llmprune.calibration import sidecar

    a, b = sidecar.read(args.a), sidecar.read(args.b)
    common = sorted(set(a.layers) & set(b.layers))
    cos_sum = {k: cosine(a.layers[k].act_sum, b.layers[k].act_sum) for k in common}
    cos_sq = {k: cosine(a.layers[k].act_sqsum, b.layers[k].act_sqsum) for k in common}
    rel = {k: float(np.max(np.abs(a.layers[k].act_sqsum - b.layers[k].act_sqsum) / np.maximum(np.abs(b.layers[k].act_sqsum), 1e-30))) for k in common}
    blocks = None
    if a.blocks is not None and b.blocks is not None:
        blocks = float(np.max(np.abs(a.blocks.cos_sum - b.blocks.cos_sum) / np.maximum(b.blocks.count, 1)))
    worst = min(common, key=lambda k: min(cos_sum[k], cos_sq[k])) if common else None
    doc = {
        "name": args.name,
        "a": str(args.a),
        "b": str(args.b),
        "weights": len(common),
        "missing": sorted(set(a.layers) ^ set(b.layers)),
        "min_cos_act_sum": min(cos_sum.values(), default=None),
        "min_cos_act_sqsum": min(cos_sq.values(), default=None),
        "max_rel_act_sqsum": max(rel.values(), default=None),
        "worst_weight": worst,
        "counts_equal": all(a.layers[k].act_count == b.layers[k].act_count for k in common),
        "max_block_cos_diff": blocks,
        "min_cosine": args.min_cosine,
    }
    doc["ok"] = (
        bool(common)
        and not doc["missing"]
        and doc["counts_equal"]
        and (args.min_cosine is None or min(doc["min_cos_act_sum"], doc["min_cos_act_sqsum"]) >= args.min_cosine)
    )
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def size(g: float | None) -> str:
    """A size given in GiB, in MiB below 0.1 GiB."""
    if g is None:
        return "?"
    return f"{g:.2f} GiB" if g >= 0.1 else f"{g * 1024:.1f} MiB"


def num(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def cli_row(work: Path, name: str, label: str, key: str) -> tuple[dict, list[str]]:
    """One CLI step's record, its JSON output and nvidia-smi's samples as a row."""
    rec, out = load(work / f"{name}.record.json"), load(work / f"{name}.out.json") or {}
    smi = smi_peak(work / f"{name}.smi", work / "smi-idle.txt")
    row: dict[str, Any] = {"step": label, "status": "not run"}
    if rec is not None:
        row.update(status="ok" if rec["rc"] == 0 else f"failed (exit {rec['rc']})", wall_s=rec["wall_s"], peak_gpu_gib=rec.get("peak_gpu_gib"), smi_gib=smi)
    tokens, secs = out.get("tokens"), out.get("seconds")
    row.update(
        device=out.get("device"),
        dtype=out.get("dtype"),
        tokens=tokens,
        pass_s=secs,
        tokens_per_s=tokens / secs if tokens and secs else None,
        tokens_per_wall_s=tokens / row["wall_s"] if tokens and row.get("wall_s") else None,
    )
    note = []
    if key == "eval" and out.get("perplexity") is not None:
        row["perplexity"] = out["perplexity"]
        note.append(f"perplexity {out['perplexity']:,.2f}")
    if key == "gram" and out.get("gram"):
        row["gram_bytes"] = out["gram"]["bytes"]
        note.append(f"Gram sidecar {out['gram']['bytes'] / GIB:.2f} GiB ({out['gram']['inputs']} inputs)")
    return row, note


def smi_peak(path: Path, idle: Path) -> float | None:
    """nvidia-smi's largest memory.used sample (MiB lines) minus the idle reading, in GiB."""
    try:
        used = [float(x) for x in path.read_text().split() if x.replace(".", "", 1).isdigit()]
        base = [float(x) for x in idle.read_text().split() if x.replace(".", "", 1).isdigit()]
    except OSError:
        return None
    return (max(used) - (min(base) if base else 0.0)) / 1024 if used else None


def cmd_summary(args: argparse.Namespace) -> None:
    work, results = args.work, args.results
    meta = load(work / "meta.json") or {}
    rows: list[dict] = []
    md_rows: list[list[str]] = []

    def add(row: dict, note: list[str]) -> None:
        row["note"] = "; ".join(note)
        rows.append(row)
        md_rows.append(
            [
                row["step"],
                row.get("status", "-"),
                f"{row.get('device') or '-'} {row.get('dtype') or ''}".strip(),
                num(row.get("tokens"), "{:,}"),
                num(row.get("wall_s")),
                num(row.get("pass_s"), "{:,.2f}"),
                num(row.get("tokens_per_s"), "{:,.0f}"),
                gib(row.get("peak_gpu_gib")),
                gib(row.get("smi_gib")),
                row["note"],
            ]
        )

    mk = load(work / "make_checkpoint.json")
    if mk is not None:
        add(
            {"step": "make_checkpoint.py + tokenizer", "status": "ok" if mk["rc"] == 0 else f"failed (exit {mk['rc']})", "wall_s": mk["wall_s"]},
            [f"{size(meta.get('checkpoint_gib'))} of random bf16 ({meta.get('shape')}, {meta.get('layers')} blocks)"],
        )
    for name, label, key in (("stats", "llmprune stats", "stats"), ("gram", "llmprune stats --gram", "gram"), ("eval", "llmprune eval", "eval")):
        add(*cli_row(work, name, label, key))

    base = load(work / "baseline.json")
    brc = load(work / "baseline.rc.json") or {}
    bstatus = "ok" if base is not None and brc.get("rc", 0) == 0 else ("not run" if not brc else f"failed (exit {brc.get('rc')})")
    if base is not None:
        s, e = base["stats"], base["eval"]
        against = base.get("against") or {}
        note = [f"load {base['load_s']:.1f} s (in wall s, not in pass s)"]
        if against:
            note.append(
                f"vs `stats` sidecar: min cosine act_sum {num(against.get('min_cos_act_sum'), '{:.6f}')}, "
                f"act_sqsum {num(against.get('min_cos_act_sqsum'), '{:.6f}')}"
            )
        add(
            {
                "step": "transformers forward + hooks",
                "status": bstatus,
                "device": base["device"],
                "dtype": base["dtype"],
                "tokens": s["tokens"],
                "wall_s": base["load_s"] + s["seconds"],
                "pass_s": s["seconds"],
                "tokens_per_s": s["tokens"] / s["seconds"] if s["seconds"] else None,
                "peak_gpu_gib": base.get("peak_gpu_gib"),
                "against": against,
            },
            note,
        )
        add(
            {
                "step": "transformers forward (eval)",
                "status": bstatus,
                "device": base["device"],
                "dtype": base["dtype"],
                "tokens": e["tokens"],
                "wall_s": base["load_s"] + e["seconds"],
                "pass_s": e["seconds"],
                "tokens_per_s": e["tokens"] / e["seconds"] if e["seconds"] else None,
                "peak_gpu_gib": base.get("peak_gpu_gib"),
                "perplexity": e["perplexity"],
            },
            [f"perplexity {e['perplexity']:,.2f}" if e["perplexity"] is not None else "", f"batches of {e['batch']} windows"],
        )
    else:
        add({"step": "transformers forward + hooks", "status": bstatus}, [])
        add({"step": "transformers forward (eval)", "status": bstatus}, [])

    checks: list[dict] = []
    compared = (
        ("compare-fp32", "GPU vs CPU statistics (float32)", "cuda vs cpu, float32"),
        ("compare-bf16", "GPU bf16 vs CPU float32 statistics", "cuda bfloat16 vs cpu float32"),
    )
    for name, label, devices in compared:
        cmp = load(work / f"{name}.json")
        if meta.get("mode") != "gpu":
            if name == "compare-fp32":
                add({"step": label, "status": "skipped"}, [f"skipped: {meta.get('no_gpu_reason', 'no CUDA device')}"])
            continue
        if cmp is None:
            add({"step": label, "status": "failed (not compared)"}, [])
            checks.append({"name": label, "ok": name != "compare-fp32"})
            continue
        enforced = cmp.get("min_cosine") is not None
        status = ("ok" if cmp["ok"] else "FAILED") if enforced else "reported"
        note = [
            f"{cmp['weights']} weights: min cosine act_sum {num(cmp['min_cos_act_sum'], '{:.7f}')}, "
            f"act_sqsum {num(cmp['min_cos_act_sqsum'], '{:.7f}')}; max rel. diff act_sqsum {num(cmp['max_rel_act_sqsum'], '{:.1e}')}; "
            f"counts equal: {cmp['counts_equal']}"
        ]
        if enforced:
            note.append(f"threshold {cmp['min_cosine']}")
        add({"step": label, "status": status, "device": devices, "compare": cmp}, note)
        checks.append({"name": label, "ok": bool(cmp["ok"]) or not enforced})

    failed = [r["step"] for r in rows if str(r.get("status", "")).startswith(("failed", "FAILED", "not run"))]
    ok = not failed
    doc = {"ok": ok, "failed": failed, **meta, "rows": rows, "checks": checks}
    facts = [
        f"mode: {meta.get('mode')} ({meta.get('device_name')}); checkpoint: benches/make_checkpoint.py --shape {meta.get('shape')}"
        f" ({meta.get('layers')} blocks, {size(meta.get('checkpoint_gib'))} bf16, random weights), a BPE tokenizer trained on the built-in calibration text",
        f"stats: {meta.get('nsamples')} x {meta.get('seqlen')} tokens, seed 0 (`stats` and `stats --gram`); eval: the first "
        f"{meta.get('max_tokens'):,} tokens of the built-in evaluation text in windows of {meta.get('eval_seqlen')}",
        "wall s: the whole step (a fresh process; imports, text and tokenizer included; for transformers, loading the whole model "
        "plus the pass); pass s: the pass alone (the CLI's own `seconds`: layer-streamed, reading every block; transformers: the "
        "forward on the loaded model); tokens/s: tokens over pass s",
        "peak GPU GiB: torch.cuda.max_memory_allocated in the process; nvidia-smi GiB: the largest memory.used sample "
        "(every 100 ms) above the idle reading, the CUDA context included",
        f"{meta.get('provenance', '')}; total wall time {meta.get('total_s', 0):,.0f} s",
    ]
    cols = ["step", "status", "device", "tokens", "wall s", "pass s", "tokens/s", "peak GPU GiB", "nvidia-smi GiB", "note"]
    md = "\n".join(
        [
            f"Command: `{meta.get('command', 'bash benches/gpu_check.sh')}`",
            "",
            *(f"- {f}" for f in facts),
            "",
            "| " + " | ".join(cols) + " |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
            *("| " + " | ".join(r) + " |" for r in md_rows),
            "",
            f"Result: {'all steps ran, every check passed' if ok else 'FAILED: ' + ', '.join(failed)}.",
            "",
        ]
    )
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_check.md").write_text(md)
    (results / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(md, end="")
    print(f"written: {results / 'gpu_check.md'} and {results / 'gpu_check.json'}")
    sys.exit(0 if ok else 1)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tokenizer")
    p.add_argument("model", type=Path)
    p.set_defaults(fn=cmd_tokenizer)
    p = sub.add_parser("tiny-model")
    p.add_argument("out", type=Path)
    p.set_defaults(fn=cmd_tiny_model)
    p = sub.add_parser("cli")
    p.add_argument("record", type=Path)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_cli)
    p = sub.add_parser("baseline")
    p.add_argument("model", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--nsamples", type=int, required=True)
    p.add_argument("--seqlen", type=int, required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--eval-seqlen", type=int, required=True)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--against", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_baseline)
    p = sub.add_parser("compare")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--name", default="")
    p.add_argument("--min-cosine", type=float)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("summary")
    p.add_argument("work", type=Path)
    p.add_argument("results", type=Path)
    p.set_defaults(fn=cmd_summary)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
