"""Speed and memory of `llmprune eval --tasks`'s layer-streamed lm-eval backend (harness.StreamedLM).

1. SmolLM2-135M (the demo checkpoint) on the offline tasks' loglikelihood requests: the streamed
   backend against lm-eval's own `hf` backend on the fully loaded model, at the same batch size, in
   one process, interleaved (streamed, hf, streamed, hf, ...), float32 on the CPU; the largest
   difference of any request's log-likelihood between the two is reported too.
2. A synthetic LLaMA-shaped checkpoint (benches/make_checkpoint.py, random bf16 weights, no tokenizer):
   the streamed backend's peak resident memory above where the pass began (VmHWM after resetting it,
   in a fresh process) and its time per 1,000 requests (random token requests of the given lengths),
   next to the size of the whole model in float32.

    python benches/task_speed.py --markdown docs/benchmarks.md
    python benches/task_speed.py --limit 20 --repeats 1 --synthetic-requests 20    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common as C
from common import err

MD_BEGIN = "<!-- task_speed.py table: begin -->"
MD_END = "<!-- task_speed.py table: end -->"
ROOT = Path(__file__).resolve().parent.parent

SYNTHETIC = """
import json, random, sys, time
from llmprune.harness import StreamedLM, model_bytes

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

model, n, ctx, cont, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lm = StreamedLM(model, device="cpu", dtype="float32", batch_size=bs, tokenizer=object())
rng = random.Random(0)
vocab = int(lm.streamer.config.vocab_size)
pairs = [([rng.randrange(vocab) for _ in range(rng.randint(ctx // 2, ctx))], [rng.randrange(vocab) for _ in range(rng.randint(1, cont))]) for _ in range(n)]
lm.score(pairs[:2])  # warm
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
lm.score(pairs)
seconds = time.perf_counter() - t0
print(json.dumps({{"base": base, "peak": status("VmHWM:"), "seconds": seconds, "tokens": sum(len(a) + len(b) - 1 for a, b in pairs),
                  "model_bytes": model_bytes(lm.streamer), "blocks": lm.streamer.num_blocks}}))
"""


def offline_requests(limit: int | None) -> list:
    from lm_eval.tasks import TaskManager

    from llmprune.tasks import OFFLINE_TASKS, TASKS_DIR

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = []
    for task in tm.load(list(OFFLINE_TASKS))["tasks"].values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out.extend(task.instances)
    return out


def versus_hf(model: Path, args: argparse.Namespace) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    from llmprune.harness import StreamedLM, load_whole_model

    torch.manual_seed(0)
    reqs = offline_requests(args.limit)
    streamed = StreamedLM(model, device="cpu", dtype="float32", batch_size=args.batch_size)
    hf = HFLM(pretrained=load_whole_model(model, torch.float32, torch.device("cpu")), tokenizer=streamed.tokenizer, batch_size=args.batch_size, device="cpu")
    for lm in (streamed, hf):  # warm: first calls' one-time costs (allocator, lazy imports)
        lm.loglikelihood(reqs[:2], disable_tqdm=True)
    times: dict[str, list[float]] = {"streamed": [], "hf": []}
    answers: dict[str, list] = {}
    for k in range(args.repeats):
        for name, lm in (("streamed", streamed), ("hf", hf)) if k % 2 == 0 else (("hf", hf), ("streamed", streamed)):
            err.print(f"[{k + 1}/{args.repeats}] {name}: {len(reqs)} requests", markup=False)
            t0 = time.perf_counter()
            answers[name] = lm.loglikelihood(reqs, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
    diff = max(abs(a[0] - b[0]) for a, b in zip(answers["streamed"], answers["hf"]))
    return {"requests": len(reqs), "times": times, "max_abs_diff": diff, "greedy_equal": [a[1] for a in answers["streamed"]] == [b[1] for b in answers["hf"]]}


def synthetic(args: argparse.Namespace) -> dict:
    path = args.work_dir / f"synthetic-{args.shape}-{args.layers}"
    if not (path / "config.json").is_file():
        C.err.print(f"$ python benches/make_checkpoint.py {path} --shape {args.shape} --layers {args.layers}", markup=False)
        subprocess.run([sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), str(path), "--shape", args.shape, "--layers", str(args.layers)], check=True)
    script = SYNTHETIC.replace("{{", "{").replace("}}", "}")
    cmd = [sys.executable, "-c", script, str(path), str(args.synthetic_requests), str(args.context), str(args.continuation), str(args.batch_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    for label, e in (("fixed mmap threshold", env), ("glibc default", dict(os.environ))):
        err.print(f"synthetic: {args.synthetic_requests} requests, {label}", markup=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=e)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"path": str(path), "checkpoint_bytes": size, "runs": out}


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "the synthetic checkpoint [default: beside --model-dir]")
    ap.add_argument("--limit", type=int, default=None, help="documents per offline task [all: 100]")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per batch, both backends [8]")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each backend, interleaved [2]")
    ap.add_argument("--shape", default="1b", help="make_checkpoint.py shape of the synthetic checkpoint [1b]")
    ap.add_argument("--layers", type=int, default=12, help="its decoder blocks [12]")
    ap.add_argument("--synthetic-requests", type=int, default=100, help="requests timed on it [100]")
    ap.add_argument("--context", type=int, default=24, help="context tokens per synthetic request, at most [24]")
    ap.add_argument("--continuation", type=int, default=4, help="continuation tokens per synthetic request, at most [4]")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help=f"also write the tables into this file, between '{MD_BEGIN}' and '{MD_END}'")
    args = ap.parse_args(argv)
    session = C.Session(__file__, args, argv)
    args.work_dir = session.work
    session.prepare_model()
    vs = versus_hf(session.model, args)
    syn = synthetic(args)
    if args.json:
        C.write_json(args.json, {"command": session.command, "provenance": session.provenance, "versus_hf": vs, "synthetic": syn})
    table = markdown(vs, syn, args, session)
    print(table)
    if args.markdown:
        C.write_markdown(args.markdown, table, MD_BEGIN, MD_END)
        err.print(f"wrote {args.markdown}", markup=False)
    return 0


def markdown(vs: dict, syn: dict, args: argparse.Namespace, session: C.Session) -> str:
    med = {k: statistics.median(v) for k, v in vs["times"].items()}
    docs = f"the first {args.limit} documents of each" if args.limit else "all 100 documents of each"
    facts = [
        C.model_fact(args),
        f"requests: the loglikelihood requests of `--tasks offline` ({docs}: {vs['requests']} requests), zero-shot; float32 on the CPU, "
        f"batch size {args.batch_size} for both backends; {args.repeats} timed runs of each, interleaved in one process (median)",
        f"largest difference of a request's log-likelihood, streamed vs hf: {vs['max_abs_diff']:.2e}; greedy flags "
        f"{'all equal' if vs['greedy_equal'] else 'differ'}",
        session.provenance,
        C.wall_fact(session.elapsed(), session.load_start, os.getloadavg()),
    ]
    rows = [
        [name, f"{med[key]:.1f}", " / ".join(f"{t:.1f}" for t in vs["times"][key]), f"{vs['requests'] / med[key]:.1f}"]
        for name, key in (("llmprune (layer-streamed)", "streamed"), ("lm-eval `hf` (whole model)", "hf"))
    ]
    first = C.markdown(session.command, facts, ["backend", "seconds (median)", "each run", "requests / s"], "lrrr", rows)
    runs = syn["runs"]
    any_run = next(iter(runs.values()))
    gib = 2**30
    syn_facts = [
        f"checkpoint: `benches/make_checkpoint.py --shape {args.shape} --layers {args.layers}` (random bf16, {syn['checkpoint_bytes'] / gib:.2f} GiB on disk, "
        f"{any_run['blocks']} blocks); the whole model in float32: {any_run['model_bytes'] / gib:.2f} GiB",
        f"requests: {args.synthetic_requests} random ones, contexts of {args.context // 2}-{args.context} tokens, continuations of 1-{args.continuation} "
        f"({any_run['tokens']:,} tokens); batch size {args.batch_size}; float32 on the CPU, each run in a fresh process after a warm-up call",
        "resident at start: the interpreter with torch, transformers and lm-eval, and the model's embeddings and LM head (loaded for the "
        "whole run); peak above start: VmHWM minus VmRSS when the pass began, i.e. the block, the pages read for it, the activations "
        "and a batch's logits; with glibc's default its mmap threshold grows as blocks are freed and the heap keeps them",
    ]
    syn_rows = [
        [
            label,
            f"{r['base'] / 2**20:,.0f}",
            f"{r['peak'] / 2**20:,.0f}",
            f"{(r['peak'] - r['base']) / 2**20:,.0f}",
            f"{r['seconds']:.1f}",
            f"{r['seconds'] * 1000 / args.synthetic_requests:,.0f}",
        ]
        for label, r in runs.items()
    ]
    second = "\n".join(f"- {f}" for f in syn_facts) + "\n\n" + "\n".join(
        [
            "| allocator | resident at start (MiB) | peak (MiB) | peak above start (MiB) | seconds | seconds per 1,000 requests |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        + ["| " + " | ".join(r) + " |" for r in syn_rows]
    )
    return first + "\n" + second + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
