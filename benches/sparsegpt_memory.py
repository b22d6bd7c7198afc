"""Wall time and peak memory of `llmprune apply --method sparsegpt` on a LLaMA-shaped checkpoint of random
weights with a synthetic Gram sidecar.

    python benches/sparsegpt_memory.py --shape 1b --workdir /tmp/sgmem
    python benches/sparsegpt_memory.py --shape 7b --layers 2 --workdir /tmp/sgmem   # 7B tensor shapes, 2 blocks

Steps: `benches/make_checkpoint.py` writes the checkpoint (bf16 shards); this script writes its Gram
sidecar through the core's writer (`_core.GramWriter`, the format `llmprune stats --gram` writes: one
packed float64 lower triangle per distinct input, q/k/v sharing one, gate/up one, o_proj and down_proj
alone). Every input of one width gets the same matrix, H = XᵀX of 2048 synthetic correlated tokens:
the values do not change what apply holds in memory. Then `llmprune apply MODEL --method sparsegpt`
runs under `/usr/bin/time -v` (its "Maximum resident set size" and wall clock are reported) while this
script polls the apply process's /proc status every 10 ms for its peak anonymous memory (`RssAnon`:
the mapped checkpoint and Gram pages count in RSS, but they are page cache and can be reclaimed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from make_checkpoint import SHAPES, all_tensors

ROOT = Path(__file__).resolve().parent.parent

TOKENS = 2048


def synthetic_gram(n: int, seed: int) -> np.ndarray:
    """XᵀX (float64) of TOKENS synthetic tokens with correlated channels of unequal scale."""
    rng = np.random.default_rng(seed)
    rank = min(256, n)
    X = (rng.standard_normal((TOKENS, rank), dtype=np.float32) @ (rng.standard_normal((rank, n), dtype=np.float32) / np.sqrt(rank))
         + 0.3 * rng.standard_normal((TOKENS, n), dtype=np.float32))
    X *= np.exp(rng.uniform(-2.3, 2.3, n)).astype(np.float32)[None, :]
    return (X.T @ X).astype(np.float64)


def pack_lower(H: np.ndarray) -> np.ndarray:
    """Entry (i, j), j <= i, at i(i+1)/2 + j: the Gram sidecar's packed lower triangle."""
    n = H.shape[0]
    out = np.empty(n * (n + 1) // 2, dtype=np.float64)
    for i in range(n):
        s = i * (i + 1) // 2
        out[s:s + i + 1] = H[i, :i + 1]
    return out


def write_gram(model: Path, shape: str, layers: int | None, seed: int) -> tuple[Path, int]:
    from llmprune import _core

    tensors, config = all_tensors(shape, layers)
    shapes = dict(tensors)
    layout = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        groups = [
            [p + "self_attn.k_proj.weight", p + "self_attn.q_proj.weight", p + "self_attn.v_proj.weight"],
            [p + "self_attn.o_proj.weight"],
            [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
            [p + "mlp.down_proj.weight"],
        ]
        for g in groups:
            layout.append((g[0], [(w, 1) for w in g], int(shapes[g[0]][1])))
    info = {"calibration": {"source": "synthetic", "nsamples": 1, "seqlen": TOKENS, "seed": seed, "tokens": TOKENS},
            "mode": "dense", "sequential": None}
    packed = {n: pack_lower(synthetic_gram(n, seed + n)) for n in sorted({n for _, _, n in layout})}
    path = model / _core.DEFAULT_GRAM
    with _core.GramWriter(str(path), str(model), layout, json.dumps(info)) as writer:
        for key, _, n in layout:
            writer.write(key, packed[n], TOKENS)
        writer.finish()
    return path, len(layout)


def run_measured(cmd: list[str]) -> dict:
    """`/usr/bin/time -v CMD`, polling CMD's (time's child's) RssAnon and VmHWM every 10 ms."""
    full = ["/usr/bin/time", "-v", *cmd]
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"anon_kb": 0, "hwm_kb": 0}
    done = threading.Event()

    def child_pid() -> int | None:
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            return int(kids[0]) if kids else None
        except (OSError, ValueError):
            return None

    def poll() -> None:
        pid = None
        while not done.is_set():
            pid = pid or child_pid()
            if pid:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        key, _, rest = line.partition(":")
                        if key == "RssAnon":
                            peaks["anon_kb"] = max(peaks["anon_kb"], int(rest.split()[0]))
                        elif key == "VmHWM":
                            peaks["hwm_kb"] = max(peaks["hwm_kb"], int(rest.split()[0]))
                except (OSError, ValueError):
                    pass
            time.sleep(0.01)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    tv = {}
    for line in err.splitlines():
        key, sep, val = line.strip().rpartition(": ")
        if sep:
            tv[key] = val
    return {
        "wall_s": wall,
        "time_v_wall": tv.get("Elapsed (wall clock) time (h:mm:ss or m:ss)"),
        "max_rss_gib": int(tv["Maximum resident set size (kbytes)"]) / 2**20,
        "user_s": float(tv["User time (seconds)"]),
        "sys_s": float(tv["System time (seconds)"]),
        "peak_anon_gib": peaks["anon_kb"] / 2**20,
        "apply_json": json.loads(out) if out.strip().startswith("{") else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers [the shape's]")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--target", default="0.5", help="sparsity or N:M [0.5]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint, Gram sidecar and output")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not Path("/usr/bin/time").exists():
        raise SystemExit("error: needs /usr/bin/time (apt-get install time)")

    args.workdir.mkdir(parents=True, exist_ok=True)
    name = f"llama-{args.shape}" + (f"-{args.layers}l" if args.layers else "")
    model, out = args.workdir / name, args.workdir / f"{name}-sparsegpt"
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        mk = [sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), str(model), "--shape", args.shape]
        if args.layers:
            mk += ["--layers", str(args.layers)]
        subprocess.run(mk, check=True)
        t1 = time.perf_counter()
        gram, inputs = write_gram(model, args.shape, args.layers, args.seed)
        t2 = time.perf_counter()
        ck_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors") if p != gram)
        print(f"checkpoint {model}: {ck_bytes / 2**30:.2f} GiB in {t1 - t0:.0f} s; Gram sidecar {gram.stat().st_size / 2**30:.2f} GiB "
              f"({inputs} inputs) in {t2 - t1:.0f} s", flush=True)
        target = ["--pattern", args.target] if ":" in args.target else ["--sparsity", args.target]
        cmd = [sys.executable, "-m", "llmprune", "apply", str(model), "--method", "sparsegpt", *target, "--out", str(out), "--json"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        load_start = os.getloadavg()
        r = run_measured(cmd)
        load_end = os.getloadavg()
        largest = max(int(np.prod(s)) for n, s in all_tensors(args.shape, args.layers)[0] if ".layers." in n and len(s) == 2)
        summary = (r["apply_json"] or {}).get("summary") or ""
        print(f"llmprune apply {model.name} --method sparsegpt {' '.join(target)}: wall {r['wall_s']:.1f} s "
              f"(/usr/bin/time: {r['time_v_wall']}), user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s, "
              f"max RSS {r['max_rss_gib']:.2f} GiB, peak anonymous {r['peak_anon_gib']:.3f} GiB; "
              f"largest prunable tensor {largest * 2 / 2**20:.1f} MiB bf16; load average {'/'.join(f'{x:.2f}' for x in load_start)} "
              f"at the start, {'/'.join(f'{x:.2f}' for x in load_end)} at the end; {os.cpu_count()} cores")
        if summary:
            print(summary)
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
