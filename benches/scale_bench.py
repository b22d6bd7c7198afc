"""The whole pipeline at a LLaMA shape's full width on this machine, extrapolated to 7B, 13B, 70B and 405B.

benches/make_checkpoint.py writes checkpoints of the shape (random bf16, a byte-level BPE tokenizer
trained on the built-in calibration text) cut to a few decoder blocks (--layers, at least two depths);
every step below runs as its own `llmprune` process at each depth, with its wall time, CPU time (user +
sys), peak RSS and peak anonymous RSS (benches/measure.py), and the disk it wrote: its own directory's
size when it ends, and the largest size seen while it ran (polled; the excess is scratch). Per step,
cost = fixed + per block x blocks is fitted to the depths (least squares), and extrapolated to other
shapes by scaling the per-block cost with the step's per-block work and the fixed part with vocabulary x
hidden (the embeddings and the LM head); the table's note says which work each step is scaled by.

Steps (--steps, comma-separated; by default all):
  stats               stats MODEL --nsamples N --seqlen L --device cpu
  stats-gram32        the same with --gram --gram-dtype float32
  stats-gram64        the same with --gram (float64)
  seq-sparsegpt       stats --sequential --method sparsegpt --sparsity 0.5 --gram --pruned-out OUT
  apply-wanda         apply --method wanda --sparsity 0.5
  apply-sparsegpt     apply --method sparsegpt --sparsity 0.5 (the float64 Gram file)
  apply-wanda-update  apply --method wanda --sparsity 0.5 --update
  apply-flap          apply --method flap --sparsity 0.2
  apply-block-influence  apply --method block-influence --remove-blocks 1 (depths of 2 blocks or more)
  eval                eval MODEL --seqlen E --max-tokens T --device cpu
Each apply is timed beside a `cp -r` of the checkpoint in the same run. The statistics an apply step
reads come from the stats steps run before it; when none of them was chosen, a stats pass (with --gram
where needed) runs first as a prerequisite, measured but kept out of the table.

    python benches/scale_bench.py --work-dir /tmp/scale --json /tmp/scale/scale.json --markdown docs/benchmarks.md
    python benches/scale_bench.py --shape tiny --layers 1,2 --work-dir /tmp/s --steps stats-gram64,apply-sparsegpt,eval
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common as C
from common import err
from gpu_check import train_tokenizer
from llmprune.calibration.estimate import duration
from make_checkpoint import SHAPES
from measure import memory_cgroup, peak_cgroup_usage, remove_cgroup, run
from task_speed import drop_from_page_cache

MD_BEGIN = "<!-- scale_bench.py table: begin -->"
MD_END = "<!-- scale_bench.py table: end -->"
ROOT = Path(__file__).resolve().parent.parent
GIB, MIB = 2**30, 2**20
TOKENIZER_VOCAB = 32000  # at most: the tokenizer's ids must fit the model's vocabulary

# hidden, intermediate, layers, heads, kv heads, vocab (make_checkpoint.SHAPES' layout)
TARGETS = {
    "7B": SHAPES["7b"],
    "13B": SHAPES["13b"],
    "70B": (8192, 28672, 80, 64, 8, 32000),
    "405B": (16384, 53248, 126, 128, 8, 128256),
}


# --------------------------------------------------------------------------------------------
# Per-block work of a shape
# --------------------------------------------------------------------------------------------


def linears(shape: tuple) -> list[tuple[int, int]]:
    """(rows, columns) of a block's q, k, v, o, gate, up and down projections."""
    h, inter, _, heads, kv, _ = shape
    kvd = kv * (h // heads)
    return [(h, h), (kvd, h), (kvd, h), (h, h), (inter, h), (inter, h), (h, inter)]


def work(shape: tuple) -> dict[str, float]:
    """A block's work measures (and the fixed part's): what the steps' costs are scaled by."""
    h, inter, _, _, _, vocab = shape
    inputs = [h, h, h, inter]  # distinct inputs: q/k/v's, o's, gate/up's, down's
    return {
        "P": sum(r * c for r, c in linears(shape)) + 2 * h,  # parameters
        "C": sum(c for _, c in linears(shape)),  # input columns of the stats sidecar
        "G": sum(n * (n + 1) // 2 for n in inputs),  # Gram entries stored
        "S": sum(r * c * c + c**3 for r, c in linears(shape)),  # SparseGPT: sweep rows x n^2, factorization n^3
        "E": vocab * h,  # embeddings and LM head (the fixed part)
    }


SCALES = {
    "P": "block parameters (x tokens, the same here)",
    "C": "the block's input columns",
    "G": "the block's Gram entries, sum of n(n+1)/2 over its distinct inputs",
    "S": "sum over the block's matrices of rows x n^2 + n^3 (n their inputs)",
}


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    shown: str  # the command, as the table shows it
    time_by: str  # SCALES key of its per-block time
    disk_by: str  # and of its per-block disk
    needs: tuple[str, ...] = ()  # "stats", "gram": sidecars it reads
    min_blocks: int = 1


STEPS = [
    Step("stats", "stats", "P", "C"),
    Step("stats-gram32", "stats --gram --gram-dtype float32", "G", "G"),
    Step("stats-gram64", "stats --gram", "G", "G"),
    Step("seq-sparsegpt", "stats --sequential --method sparsegpt --sparsity 0.5 --gram --pruned-out OUT", "S", "P"),
    Step("apply-wanda", "apply --method wanda --sparsity 0.5", "P", "P", ("stats",)),
    Step("apply-sparsegpt", "apply --method sparsegpt --sparsity 0.5", "S", "P", ("stats", "gram")),
    Step("apply-wanda-update", "apply --method wanda --sparsity 0.5 --update", "S", "P", ("stats", "gram")),
    Step("apply-flap", "apply --method flap --sparsity 0.2", "P", "P", ("stats",)),
    Step("apply-block-influence", "apply --method block-influence --remove-blocks 1", "P", "P", ("stats",), min_blocks=2),
    Step("eval", "eval", "P", "P"),
]
BY_NAME = {s.name: s for s in STEPS}
CP = Step("cp", "cp -r (the checkpoint; beside each apply)", "P", "P")


def step_command(step: Step, model: Path, d: Path, side: dict[str, Path], args) -> list[str]:
    """The command of STEP on MODEL, writing into D; SIDE: the sidecars made so far."""
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "-o", str(d / "stats.safetensors")]
    gram = ["--gram", "--gram-out", str(d / "gram.safetensors")]
    if step.name == "stats":
        return ["stats", str(model), *calib]
    if step.name == "stats-gram32":
        return ["stats", str(model), *calib, *gram, "--gram-dtype", "float32"]
    if step.name == "stats-gram64":
        return ["stats", str(model), *calib, *gram]
    if step.name == "seq-sparsegpt":
        return ["stats", str(model), *calib, "--sequential", "--method", "sparsegpt", "--sparsity", "0.5", "--gram", "--pruned-out", str(d / "out")]
    if step.name == "eval":
        return ["eval", str(model), "--seqlen", str(args.eval_seqlen), "--max-tokens", str(args.max_tokens), "--device", "cpu"]
    cmd = ["apply", str(model), *step.shown.split()[1:], "-o", str(d / "out"), "--stats", str(side["stats"])]
    return cmd + (["--gram", str(side["gram"])] if "gram" in step.needs else [])


def du(path: Path) -> int:
    """Bytes allocated under PATH (as du counts them); 0 while it does not exist."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def measured(cmd: list[str], d: Path, model: Path, args) -> dict:
    """Run CMD (in a fresh memory group with --memlimit-gb), D being where it writes: the measurement,
    D's size at the end and its largest size while it ran."""
    d.mkdir(parents=True, exist_ok=True)
    group = None
    if args.memlimit_gb:
        group = memory_cgroup(int(args.memlimit_gb * GIB))
        if group is None:
            raise SystemExit("error: --memlimit-gb needs a writable cgroup v1 memory controller (/sys/fs/cgroup/memory)")
        drop_from_page_cache(model)
    peak = {"disk": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak["disk"] = max(peak["disk"], du(d))
            time.sleep(0.25)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    err.print(f"$ {' '.join(cmd)}", style="dim", markup=False, soft_wrap=True)
    try:
        m = asdict(run(cmd, group))
    except RuntimeError as e:
        m = {"failed": str(e)[-1500:]}
        err.print(f"failed: {m['failed'][-500:]}", style="red", markup=False)
    finally:
        done.set()
        t.join()
        if group is not None:
            m["cgroup_peak"] = peak_cgroup_usage(group)
            remove_cgroup(group)
    if "failed" not in m:
        m["disk"] = du(d)
        m["scratch"] = max(0, peak["disk"] - m["disk"])
        err.print(f"  ({m['wall']:.1f} s, peak anon {m['peak_anon'] / MIB:,.0f} MiB, wrote {m['disk'] / MIB:,.1f} MiB)", style="dim", markup=False)
    return m


def llmprune_cmd(args_: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmprune", *args_]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint(work_dir: Path, shape: str, blocks: int, tokenizer: Path) -> Path:
    path = work_dir / f"llama-{shape}-{blocks}"
    if not (path / "tokenizer.json").is_file():
        if path.exists():
            shutil.rmtree(path)
        C.err.print(f"$ python benches/make_checkpoint.py {path} --shape {shape} --layers {blocks}", markup=False, soft_wrap=True)
        subprocess.run([sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), str(path), "--shape", shape, "--layers", str(blocks)], check=True)
        for f in tokenizer.iterdir():
            shutil.copy(f, path / f.name)
    return path


def tokenizer_dir(work_dir: Path, vocab: int) -> Path:
    path = work_dir / f"tokenizer-{vocab}"
    if not (path / "tokenizer.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        err.print(f"training a {vocab:,}-entry BPE tokenizer on the built-in calibration text", markup=False)
        train_tokenizer(path, vocab)
    return path


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_depth(model: Path, blocks: int, steps: list[Step], args) -> dict:
    """Every chosen step at one depth: {"steps": {name: measurement}, "cp": {apply step: the cp -r beside
    it}, "prerequisites": {name: measurement}}."""
    base = args.work_dir / f"runs-{args.shape}-{blocks}"
    if base.exists():
        shutil.rmtree(base)
    res: dict = {"steps": {}, "cp": {}, "prerequisites": {}}
    side: dict[str, Path] = {}  # "stats": a stats sidecar; "gram": the float64 Gram file

    def run_step(step: Step, d: Path) -> dict:
        m = measured(llmprune_cmd(step_command(step, model, d, side, args)), d, model, args)
        if "failed" not in m and step.name in ("stats", "stats-gram32", "stats-gram64"):
            side.setdefault("stats", d / "stats.safetensors")
            if step.name == "stats-gram64":
                side["gram"] = d / "gram.safetensors"
        return m

    for step in steps:
        if blocks < step.min_blocks:
            res["steps"][step.name] = {"skipped": f"needs {step.min_blocks} blocks or more"}
            continue
        missing = [n for n in step.needs if n not in side]
        if missing:  # measured, but kept out of the table
            pre = BY_NAME["stats-gram64" if "gram" in missing else "stats"]
            res["prerequisites"][pre.name] = run_step(pre, base / f"pre-{pre.name}")
        d = base / step.name
        if step.name.startswith("apply-"):
            cp_dir = base / f"cp-{step.name}"
            res["cp"][step.name] = measured(["cp", "-r", str(model), str(cp_dir / "copy")], cp_dir, model, args)
            if not args.keep:
                shutil.rmtree(cp_dir)
        res["steps"][step.name] = run_step(step, d)
        if step.name.startswith("apply-") and not args.keep:
            shutil.rmtree(d / "out", ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------
# Fitting and extrapolating
# --------------------------------------------------------------------------------------------


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (fixed, per block) of cost = fixed + per_block x blocks; None below two depths."""
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mb, mc = sum(b for b, _ in points) / n, sum(c for _, c in points) / n
    per = sum((b - mb) * (c - mc) for b, c in points) / sum((b - mb) ** 2 for b, _ in points)
    return mc - per * mb, per


def fits(depths: dict[int, dict], own_cp: dict[int, dict], all_cp: dict[int, dict]) -> dict:
    """A step's fitted costs, {metric: {"fixed", "per_block", "how"}}; a step measured at one depth
    alone takes the fit of cp -r (ALL_CP: one copy per depth), times its measured ratio to the copy
    beside it (OWN_CP)."""
    out = {}
    ok = {b: m for b, m in depths.items() if "wall" in m}
    for metric in ("wall", "cpu", "disk"):
        f = fit([(b, m[metric]) for b, m in ok.items()])
        if f is not None:
            out[metric] = {"fixed": f[0], "per_block": f[1], "how": f"fitted to {len(ok)} depths"}
            continue
        cp_fit = fit([(b, m[metric]) for b, m in all_cp.items() if metric in m])
        both = [b for b in ok if own_cp.get(b, {}).get(metric, 0) > 0]
        if cp_fit is not None and both:
            r = ok[both[0]][metric] / own_cp[both[0]][metric]
            out[metric] = {"fixed": cp_fit[0] * r, "per_block": cp_fit[1] * r, "how": f"cp -r's fit x {r:.2f}, the ratio measured at {both[0]} blocks"}
    return out


def extrapolate(f: dict, step: Step, shape: tuple) -> dict:
    """The fitted costs carried to the TARGETS: fixed x E ratio + per block x (the step's work ratio) x depth."""
    w0 = work(shape)
    out = {}
    for label, t in TARGETS.items():
        w = work(t)
        e = w["E"] / w0["E"]
        row = {"blocks": t[2]}
        for metric, key in (("wall", step.time_by), ("cpu", step.time_by), ("disk", step.disk_by)):
            if metric in f:
                row[metric] = f[metric]["fixed"] * e + f[metric]["per_block"] * w[key] / w0[key] * t[2]
        out[label] = row
    return out


def summarize(results: dict[int, dict], steps: list[Step], shape: tuple) -> dict:
    """One row per step (and one for cp -r, the first copy at each depth, when an apply step ran)."""
    all_cp = {b: next(iter(r["cp"].values())) for b, r in results.items() if r["cp"]}
    all_cp = {b: m for b, m in all_cp.items() if "wall" in m}
    rows = {}
    for step in [*steps, *([CP] if all_cp else [])]:
        depths = all_cp if step is CP else {b: r["steps"][step.name] for b, r in results.items()}
        own_cp = {} if step is CP else {b: r["cp"][step.name] for b, r in results.items() if "wall" in r["cp"].get(step.name, {})}
        f = fits(depths, own_cp, all_cp)
        rows[step.name] = {
            "shown": step.shown,
            "time_scaled_by": step.time_by,
            "disk_scaled_by": step.disk_by,
            "depths": depths,
            "cp": own_cp,
            "fit": f,
            "extrapolated": extrapolate(f, step, shape),
        }
    return rows


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def human_b(b: float) -> str:
    if b < 0.5 * MIB:
        return "0"
    return f"{b / MIB:.0f} MiB" if b < GIB else f"{b / GIB:.1f} GiB"


def per_depth(row: dict, depths: list[int], cell) -> str:
    out = []
    for b in depths:
        m = row["depths"].get(b, {})
        out.append("skipped" if "skipped" in m else "failed" if "failed" in m else cell(m) if m else "-")
    return " / ".join(out)


def markdown(doc: dict, args) -> str:
    depths = doc["layers"]
    shape = SHAPES[args.shape]
    rows = doc["rows"]
    dd = "/".join(str(b) for b in depths)
    cols = [
        "step",
        f"wall s ({dd} blocks)",
        "CPU s",
        "peak RSS MiB",
        "peak anon MiB",
        *(["group peak MiB"] if args.memlimit_gb else []),
        "disk written MiB",
        "scratch MiB",
        "wall vs cp -r",
        "fit: fixed + per block (s)",
        "per block scaled by",
        *(f"{k} ({t[2]} blocks): wall, disk" for k, t in TARGETS.items()),
    ]
    table = []
    for r in rows.values():
        f = r["fit"]
        ratio = (
            " / ".join(
                f"{r['depths'][b]['wall'] / r['cp'][b]['wall']:.2f}" if "wall" in r["depths"].get(b, {}) and "wall" in r["cp"].get(b, {}) else "-"
                for b in depths
            )
            if r["cp"]
            else "-"
        )
        table.append(
            [
                f"`{r['shown']}`",
                per_depth(r, depths, lambda m: f"{m['wall']:.1f}"),
                per_depth(r, depths, lambda m: f"{m['cpu']:.1f}"),
                per_depth(r, depths, lambda m: f"{m['peak_rss'] / MIB:,.0f}"),
                per_depth(r, depths, lambda m: f"{m['peak_anon'] / MIB:,.0f}"),
                *([per_depth(r, depths, lambda m: f"{m['cgroup_peak'] / MIB:,.0f}")] if args.memlimit_gb else []),
                per_depth(r, depths, lambda m: f"{m['disk'] / MIB:,.1f}"),
                per_depth(r, depths, lambda m: f"{m['scratch'] / MIB:,.1f}"),
                ratio,
                f"{f['wall']['fixed']:.1f} + {f['wall']['per_block']:.1f}" + ("" if f["wall"]["how"].startswith("fitted") else " (from cp -r)")
                if "wall" in f
                else "-",
                f"{r['time_scaled_by']} (disk: {r['disk_scaled_by']})",
                *(f"{duration(e['wall'])}, {human_b(e.get('disk', 0))}" if "wall" in e else "-" for e in r["extrapolated"].values()),
            ]
        )
    w0 = work(shape)
    ratios = "; ".join(f"{k}: " + ", ".join(f"{key} x{work(t)[key] / w0[key]:.2f}" for key in ("P", "G", "S", "C", "E")) for k, t in TARGETS.items())
    h, inter, _, heads, kv, vocab = shape
    skipped = [n for n, r in rows.items() if any("skipped" in m for m in r["depths"].values())]
    notes = [
        "",
        "Each step's cost (wall time, disk) is fitted as fixed + per block x blocks to the depths measured; extrapolated to a "
        "shape of B blocks as fixed x E' / E + per block x (work' / work) x B, primes the target's. Work per block: "
        + "; ".join(f"{k}: {v}" for k, v in SCALES.items())
        + "; E: vocabulary x hidden, the embeddings and the LM head, which the fixed part (also the process start-up, not "
        "scaled) is scaled by, over-counting the start-up. The calibration and evaluation tokens are the same for every shape. "
        f"Ratios to the measured shape ({args.shape}: hidden {h}, intermediate {inter}, {heads} heads, {kv} KV heads, vocabulary {vocab}): {ratios}.",
    ]
    if skipped:
        notes += [
            "",
            f"Skipped at one block ({', '.join(skipped)}): removing a block from one leaves none; its fit is cp -r's, times the "
            "ratio to the copy beside it where it ran.",
        ]
    facts = [
        f"checkpoints: `benches/make_checkpoint.py --shape {args.shape} --layers L` for L in {dd} (random bf16: "
        + ", ".join(f"{doc['checkpoint_bytes'][str(b)] / GIB:.2f} GiB at {b}" for b in depths)
        + f"), a {doc['tokenizer_vocab']:,}-entry BPE tokenizer trained on the built-in calibration text",
        f"protocol: stats --nsamples {args.nsamples} --seqlen {args.seqlen} ({args.nsamples * args.seqlen:,} tokens), float32 on the CPU; "
        f"eval --seqlen {args.eval_seqlen} --max-tokens {args.max_tokens}; apply with all cores",
        "each step a fresh `llmprune` process (start-up included), dirty pages synced before it (untimed); the checkpoint in the "
        "page cache unless in a memory group; peak RSS counts the checkpoint's mapped pages, peak anon (`RssAnon`) does not; "
        "disk written: the step's directory at the end (its outputs); scratch: the largest size seen while it ran (polled every "
        "0.25 s) beyond that; apply steps next to `cp -r` of the checkpoint, timed just before",
        *(
            [f"memory group: each step in a fresh cgroup v1 group of {args.memlimit_gb:g} GiB, the checkpoint dropped from the page cache first"]
            if args.memlimit_gb
            else []
        ),
        doc["provenance"],
        C.wall_fact(doc["seconds"], doc["loadavg_start"], doc["loadavg_end"]),
    ]
    return C.markdown(doc["command"], facts, cols, "l" + "r" * (8 + bool(args.memlimit_gb)) + "l" + "r" * len(TARGETS), table, notes)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES), help="make_checkpoint.py shape [7b]")
    ap.add_argument("--layers", default="1,2", help="the depths measured, comma-separated, at least two [1,2]")
    ap.add_argument("--work-dir", type=Path, required=True, help="where the checkpoints and the steps' outputs go")
    ap.add_argument("--steps", default=",".join(s.name for s in STEPS), help="the steps run, comma-separated [all]")
    ap.add_argument("--nsamples", type=int, default=4, help="stats: calibration windows [4]")
    ap.add_argument("--seqlen", type=int, default=128, help="stats: tokens per window [128]")
    ap.add_argument("--eval-seqlen", type=int, default=128, help="eval: tokens per window [128]")
    ap.add_argument("--max-tokens", type=int, default=512, help="eval: tokens evaluated [512]")
    ap.add_argument("--memlimit-gb", type=float, default=0, help="run each step in a fresh cgroup v1 memory group of G GiB")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help=f"also write the table into this file, between '{MD_BEGIN}' and '{MD_END}'")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and every step's outputs")
    args = ap.parse_args(argv)
    try:
        layers = sorted({int(x) for x in C.items(args.layers)})
    except ValueError:
        ap.error("--layers takes comma-separated block counts")
    if len(layers) < 2 or layers[0] < 1:
        ap.error("--layers needs at least two depths of 1 block or more")
    unknown = [s for s in C.items(args.steps) if s not in BY_NAME]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    chosen = set(C.items(args.steps))
    steps = [s for s in STEPS if s.name in chosen]
    if not steps:
        ap.error("--steps names nothing")
    if args.memlimit_gb < 0:
        ap.error("--memlimit-gb must be positive")
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    command, provenance = C.command_line(__file__, argv), C.provenance()
    t0, load_start = time.perf_counter(), os.getloadavg()
    err.print(f"load average (1/5/15 min) at the start: {'/'.join(f'{x:.1f}' for x in load_start)}", markup=False)

    shape = SHAPES[args.shape]
    vocab = min(TOKENIZER_VOCAB, shape[5])
    tok = tokenizer_dir(args.work_dir, vocab)
    results, sizes = {}, {}
    for b in layers:
        model = checkpoint(args.work_dir, args.shape, b, tok)
        sizes[str(b)] = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        err.print(f"[bold]{args.shape}, {b} block(s)[/bold] ({sizes[str(b)] / GIB:.2f} GiB)")
        results[b] = run_depth(model, b, steps, args)
        if not args.keep:
            shutil.rmtree(model)
            shutil.rmtree(args.work_dir / f"runs-{args.shape}-{b}", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(tok, ignore_errors=True)
    doc = {
        "command": command,
        "provenance": provenance,
        "shape": args.shape,
        "layers": layers,
        "tokenizer_vocab": vocab,
        "protocol": {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_seqlen": args.eval_seqlen, "max_tokens": args.max_tokens},
        "memlimit_gb": args.memlimit_gb or None,
        "checkpoint_bytes": sizes,
        "work": {k: work(t) for k, t in {args.shape: shape, **TARGETS}.items()},
        "rows": summarize(results, steps, shape),
        "prerequisites": {b: r["prerequisites"] for b, r in results.items() if r["prerequisites"]},
        "seconds": round(time.perf_counter() - t0, 1),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    err.print(f"load average (1/5/15 min): {C.loads(doc['loadavg_start'], doc['loadavg_end'])}", markup=False)
    if args.json:
        C.write_json(args.json, doc)
    table = markdown(doc, args)
    print(table)
    if args.markdown:
        C.write_markdown(args.markdown, table, MD_BEGIN, MD_END)
        err.print(f"wrote {args.markdown}", markup=False)
    failed = [n for n, r in doc["rows"].items() if any("failed" in m for m in r["depths"].values())]
    return 1 if failed or not all(math.isfinite(e.get("wall", 0)) for r in doc["rows"].values() for e in r["extrapolated"].values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
