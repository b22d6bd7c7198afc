"""Speed and memory of `llmprune eval --tasks`'s layer-streamed lm-eval backend (harness.StreamedLM).

1. SmolLM2-135M (the demo checkpoint) on the offline tasks' loglikelihood requests: the streamed
   backend against lm-eval's own `hf` backend on the fully loaded model, at the same batch size, in
   one process, interleaved (streamed, hf, streamed, hf, ...), float32 on the CPU; the largest
   difference of any request's log-likelihood between the two is reported too.
2. A synthetic LLaMA-shaped checkpoint (benches/make_checkpoint.py, random bf16 weights, no tokenizer):
   the streamed backend's peak resident memory above where the pass began (VmHWM after resetting it,
   in a fresh process) and its time per 1,000 requests (random token requests of the given lengths),
   next to the size of the whole model in float32. The time spent from the first block's loading to
   the last block's release is measured apart, so that a checkpoint cut to fewer blocks than its shape
   has (--layers) also gives the time of the full depth: the rest + the blocks' time x depth / blocks.
   --memlimit-gb G runs each of these processes in a fresh cgroup v1 memory group limited to G GiB
   (page cache included; the checkpoint's pages are dropped from the page cache first, so that its
   reads are charged to the group) and reports the group's peak usage and whether the run completed:
   a run the kernel kills for memory is reported as failed, and the script exits with status 1.
   --only-synthetic runs part 2 alone (its table then goes between its own markers).

    python benches/task_speed.py --markdown docs/benchmarks.md
    python benches/task_speed.py --limit 20 --repeats 1 --synthetic-requests 20    # quick
    python benches/task_speed.py --only-synthetic --shape 7b --layers 16 --memlimit-gb 3 --work-dir /tmp/ts
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as C
from common import err
from make_checkpoint import SHAPES
from measure import memory_cgroup, peak_cgroup_usage, remove_cgroup

MD_BEGIN = "<!-- task_speed.py table: begin -->"
MD_END = "<!-- task_speed.py table: end -->"
SYN_BEGIN = "<!-- task_speed.py synthetic table: begin -->"  # --only-synthetic's table
SYN_END = "<!-- task_speed.py synthetic table: end -->"
ROOT = Path(__file__).resolve().parent.parent
GIB, MIB = 2**30, 2**20

SYNTHETIC = """
import json, random, sys, time
from llmprune.harness import StreamedLM, model_bytes

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

model, n, ctx, cont, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lm = StreamedLM(model, device="cpu", dtype="float32", batch_size=bs, tokenizer=object())
s = lm.streamer
last = s.num_blocks - 1
span = {{}}  # from block 0's loading to the last block's release

def timed(name, f):
    def g(i, *a, **k):
        if name == "load_block" and i == 0:
            span["start"] = time.perf_counter()
        try:
            return f(i, *a, **k)
        finally:
            if name == "free_block" and i == last:
                span["end"] = time.perf_counter()
    return g

for name in ("load_block", "free_block"):
    setattr(s, name, timed(name, getattr(s, name)))
rng = random.Random(0)
vocab = int(s.config.vocab_size)
pairs = [([rng.randrange(vocab) for _ in range(rng.randint(ctx // 2, ctx))], [rng.randrange(vocab) for _ in range(rng.randint(1, cont))]) for _ in range(n)]
lm.score(pairs[:2])  # warm
before = status("VmHWM:")  # start-up, loading and the warm-up pass
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
lm.score(pairs)
seconds = time.perf_counter() - t0
print(json.dumps({{"base": base, "peak": status("VmHWM:"), "peak_before": before, "seconds": seconds, "block_seconds": span["end"] - span["start"],
                  "tokens": sum(len(a) + len(b) - 1 for a, b in pairs), "model_bytes": model_bytes(s), "blocks": s.num_blocks}}))
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


def drop_from_page_cache(path: Path) -> None:
    """Write back and drop the checkpoint's cached pages, so that a run reads it from the disk and its
    reads are charged to the run's memory group (pages cached earlier stay charged to whoever read them)."""
    for f in sorted(path.iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def oom_kills(group: Path) -> int | None:
    """The OOM kills in a cgroup v1 memory group (memory.oom_control's `oom_kill`), None if not told."""
    try:
        for line in (group / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def run_scoring(cmd: list[str], env: dict[str, str], group: Path | None) -> dict:
    """Run the scoring script (in `group` when given): its JSON result, or what is known of a failure
    (exit status, the signal that killed it, the end of its stderr); `completed` says which, and the
    wall time from outside is kept either way."""

    def enter_group() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errs:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=errs, env=env, preexec_fn=enter_group)
        rc = proc.wait()
        wall = time.perf_counter() - t0
        out.seek(0)
        errs.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), errs.read().decode(errors="replace")
    res: dict = {"completed": False, "returncode": rc, "wall_seconds": wall}
    if rc == 0:
        try:
            res.update(json.loads(stdout.strip().splitlines()[-1]), completed=True)
        except (ValueError, IndexError):
            res["error"] = "no JSON result"
    if rc < 0:
        res["signal"] = signal.Signals(-rc).name
    if not res["completed"]:
        res["stderr_tail"] = stderr[-2000:]
    return res


def synthetic(args: argparse.Namespace) -> dict:
    path = args.work_dir / f"synthetic-{args.shape}-{args.layers}"
    if not (path / "config.json").is_file():
        C.err.print(f"$ python benches/make_checkpoint.py {path} --shape {args.shape} --layers {args.layers}", markup=False)
        subprocess.run(
            [sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), str(path), "--shape", args.shape, "--layers", str(args.layers)], check=True
        )
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    limit = int(args.memlimit_gb * GIB) if args.memlimit_gb else None
    script = SYNTHETIC.replace("{{", "{").replace("}}", "}")
    cmd = [sys.executable, "-c", script, str(path), str(args.synthetic_requests), str(args.context), str(args.continuation), str(args.batch_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    for label, e in (("fixed mmap threshold", env), ("glibc default", dict(os.environ))):
        where = f", in a {args.memlimit_gb:g} GiB memory group ({size / GIB:.2f} GiB checkpoint)" if limit else ""
        err.print(f"synthetic: {args.synthetic_requests} requests, {label}{where}", markup=False)
        group = None
        if limit:
            group = memory_cgroup(limit)
            if group is None:
                raise SystemExit("error: --memlimit-gb needs a writable cgroup v1 memory controller (/sys/fs/cgroup/memory)")
            drop_from_page_cache(path)
        try:
            r = run_scoring(cmd, e, group)
            if group is not None:
                r.update(cgroup_peak=peak_cgroup_usage(group), oom_kills=oom_kills(group))
        finally:
            if group is not None:
                remove_cgroup(group)
        if not r["completed"]:
            if not limit:
                raise SystemExit(r["stderr_tail"])
            err.print(
                f"failed ({r.get('signal') or 'exit status ' + str(r['returncode'])}, OOM kills in the group: {r.get('oom_kills')}): {r['stderr_tail'][-500:]}",
                style="red",
                markup=False,
            )
        out[label] = r
    return {"path": str(path), "checkpoint_bytes": size, "memlimit_bytes": limit, "runs": out}


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "the synthetic checkpoint [default: beside --model-dir]")
    ap.add_argument("--limit", type=int, default=None, help="documents per offline task [all: 100]")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per batch, both backends [8]")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each backend, interleaved [2]")
    ap.add_argument("--only-synthetic", action="store_true", help="run the synthetic checkpoint's part alone (no SmolLM2, no hf backend)")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES), help="make_checkpoint.py shape of the synthetic checkpoint [1b]")
    ap.add_argument("--layers", type=int, default=12, help="its decoder blocks [12]")
    ap.add_argument("--synthetic-requests", type=int, default=100, help="requests timed on it [100]")
    ap.add_argument("--context", type=int, default=24, help="context tokens per synthetic request, at most [24]")
    ap.add_argument("--continuation", type=int, default=4, help="continuation tokens per synthetic request, at most [4]")
    ap.add_argument("--memlimit-gb", type=float, default=0, help="run each synthetic scoring process in a fresh cgroup v1 memory group of G GiB")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help=f"also write the tables into this file, between '{MD_BEGIN}' and '{MD_END}' ('{SYN_BEGIN}' and '{SYN_END}' with --only-synthetic)",
    )
    args = ap.parse_args(argv)
    if args.memlimit_gb < 0:
        ap.error("--memlimit-gb must be positive")
    session = C.Session(__file__, args, argv)
    args.work_dir = session.work
    vs = None
    if not args.only_synthetic:
        session.prepare_model()
        vs = versus_hf(session.model, args)
    syn = synthetic(args)
    if args.json:
        C.write_json(
            args.json,
            {
                "command": session.command,
                "provenance": session.provenance,
                "versus_hf": vs,
                "synthetic": syn,
                "seconds": round(session.elapsed(), 1),
                "loadavg_start": session.load_start,
                "loadavg_end": os.getloadavg(),
            },
        )
    table = markdown(vs, syn, args, session)
    print(table)
    if args.markdown:
        begin, end = (SYN_BEGIN, SYN_END) if vs is None else (MD_BEGIN, MD_END)
        C.write_markdown(args.markdown, table, begin, end)
        err.print(f"wrote {args.markdown}", markup=False)
    return 0 if all(r["completed"] for r in syn["runs"].values()) else 1


def markdown(vs: dict | None, syn: dict, args: argparse.Namespace, session: C.Session) -> str:
    tail = [session.provenance, C.wall_fact(session.elapsed(), session.load_start, os.getloadavg())]
    first = f"Command: `{session.command}`\n"
    if vs is not None:
        med = {k: statistics.median(v) for k, v in vs["times"].items()}
        docs = f"the first {args.limit} documents of each" if args.limit else "all 100 documents of each"
        facts = [
            C.model_fact(args),
            f"requests: the loglikelihood requests of `--tasks offline` ({docs}: {vs['requests']} requests), zero-shot; float32 on the CPU, "
            f"batch size {args.batch_size} for both backends; {args.repeats} timed runs of each, interleaved in one process (median)",
            f"largest difference of a request's log-likelihood, streamed vs hf: {vs['max_abs_diff']:.2e}; greedy flags "
            f"{'all equal' if vs['greedy_equal'] else 'differ'}",
            *tail,
        ]
        rows = [
            [name, f"{med[key]:.1f}", " / ".join(f"{t:.1f}" for t in vs["times"][key]), f"{vs['requests'] / med[key]:.1f}"]
            for name, key in (("llmprune (layer-streamed)", "streamed"), ("lm-eval `hf` (whole model)", "hf"))
        ]
        first = C.markdown(session.command, facts, ["backend", "seconds (median)", "each run", "requests / s"], "lrrr", rows)
    return first + "\n" + synthetic_markdown(syn, args, [] if vs is not None else tail)


def synthetic_markdown(syn: dict, args: argparse.Namespace, extra_facts: list[str]) -> str:
    runs = syn["runs"]
    done = [r for r in runs.values() if r["completed"]]
    any_run = done[0] if done else {}
    limit = syn.get("memlimit_bytes")
    depth = SHAPES[args.shape][2]
    blocks = any_run.get("blocks", args.layers)
    scaled = blocks < depth
    n = args.synthetic_requests
    size = syn["checkpoint_bytes"]
    f32 = f"; the whole model in float32: {any_run['model_bytes'] / GIB:.2f} GiB" if any_run else ""
    tokens = f" ({any_run['tokens']:,} tokens)" if any_run else ""
    facts = [
        f"checkpoint: `benches/make_checkpoint.py --shape {args.shape} --layers {args.layers}` (random bf16, {size / GIB:.2f} GiB on disk, "
        f"{blocks} blocks){f32}",
        f"requests: {n} random ones, contexts of {args.context // 2}-{args.context} tokens, continuations of 1-{args.continuation}{tokens}; "
        f"batch size {args.batch_size}; float32 on the CPU, each run in a fresh process after a warm-up call (a pass of 2 requests)",
        "resident at start: the interpreter with torch, transformers and lm-eval, and the model's embeddings and LM head (loaded for the "
        "whole run); peak above start: VmHWM minus VmRSS when the pass began, i.e. the block, the pages read for it, the activations "
        "and a batch's logits; with glibc's default its mmap threshold grows as blocks are freed and the heap keeps them; process "
        "peak: the larger of that peak and VmHWM before the pass (start-up, loading, the warm-up pass)",
    ]
    if scaled:
        facts.append(
            f"blocks: the time from block 0's loading to block {blocks - 1}'s release (loading, converting to float32 and running each "
            f"block over every batch); at {depth} blocks, the shape's depth: (seconds - blocks' seconds + blocks' seconds x {depth} / {blocks}) "
            "per 1,000 requests, the rest (embeddings, final norm, LM head, log-softmax) being the same at any depth"
        )
    if limit:
        facts.append(
            f"memory limit: each run in a fresh cgroup v1 memory group with `memory.limit_in_bytes` {limit / GIB:g} GiB (page cache "
            f"included), the checkpoint {size / GIB:.2f} GiB = {size / limit:.2f} x the limit; its pages dropped from the page cache "
            "before each run (fsync, POSIX_FADV_DONTNEED), so the runs read it from the disk and their reads are charged to the group; "
            "group peak: `memory.max_usage_in_bytes` (the process peak also counts the pages of its shared libraries, torch's, which "
            "were cached before and stay charged to whoever read them first); a run killed for memory counts as failed"
        )
    facts += extra_facts
    cols = ["allocator", "resident at start (MiB)", "peak (MiB)", "peak above start (MiB)", "process peak (MiB)"]
    cols += ["group peak (MiB)"] if limit else []
    cols += ["seconds", "blocks' seconds", "seconds per 1,000 requests"]
    cols += [f"seconds per 1,000 requests at {depth} blocks"] if scaled else []
    cols += ["completed"] if limit else []
    rows = []
    for label, r in runs.items():
        group = [f"{r['cgroup_peak'] / MIB:,.0f}"] if limit else []
        if r["completed"]:
            full = r["seconds"] - r["block_seconds"] + r["block_seconds"] * depth / blocks
            row = [
                label,
                f"{r['base'] / MIB:,.0f}",
                f"{r['peak'] / MIB:,.0f}",
                f"{(r['peak'] - r['base']) / MIB:,.0f}",
                f"{max(r['peak'], r['peak_before']) / MIB:,.0f}",
                *group,
                f"{r['seconds']:.1f}",
                f"{r['block_seconds']:.1f}",
                f"{r['seconds'] * 1000 / n:,.0f}",
                *([f"{full * 1000 / n:,.0f}"] if scaled else []),
                *(["yes"] if limit else []),
            ]
        else:
            why = r.get("signal") or f"exit status {r['returncode']}"
            kills = f", {r['oom_kills']} OOM kill(s) in the group" if r.get("oom_kills") is not None else ""
            row = [
                label,
                "-",
                "-",
                "-",
                "-",
                *group,
                f"({r['wall_seconds']:.1f} until it ended)",
                "-",
                "-",
                *(["-"] if scaled else []),
                f"**no**: {why}{kills}",
            ]
        rows.append(row)
    return (
        "\n".join(f"- {f}" for f in facts)
        + "\n\n"
        + "\n".join(
            ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1 - bool(limit)) + ("---|" if limit else "")]
            + ["| " + " | ".join(r) + " |" for r in rows]
        )
        + "\n"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
