"""End-to-end speed and memory of `llmprune apply` against `cp -r` and a plain-PyTorch implementation.

    python benches/apply_bench.py --shape 7b [--workdir bench-out] [--torch-cases wanda-50%]
                                  [--memlimit-gb 2] [--keep]

Prints one table whose ratios are measured in the same run. The input checkpoint is read once
before timing so every command sees it in the page cache (the machine's RAM must hold it; the note
says where it does not).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from measure import Measurement, memory_cgroup, peak_cgroup_usage, remove_cgroup, run

CASES = {
    "magnitude-50%": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda-50%": ["--method", "wanda", "--sparsity", "0.5"],
    "stade-50%": ["--method", "stade", "--sparsity", "0.5"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
}
GIB = 2**30


def warm(path: Path) -> int:
    total = 0
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


def shard_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def fmt_row(label: str, m: Measurement, cp: Measurement, torch_m: Measurement | None) -> str:
    vs_torch = f"{torch_m.wall / m.wall:6.1f}x" if torch_m else "      -"
    return (
        f"| {label:<26} | {m.wall:8.2f} | {m.durable:9.2f} | {m.cpu:8.2f} | {m.peak_rss / GIB:7.2f} | {m.peak_anon / GIB:8.3f} "
        f"| {m.wall / cp.wall:6.2f}x | {m.durable / cp.durable:6.2f}x | {vs_torch} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--torch-cases", default="wanda-50%,wanda-2:4", help="cases also run with plain PyTorch ('' for none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memlimit-gb", type=float, default=0, help="also run wanda-50%% inside a memory cgroup of this size")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint for the next run")
    a = ap.parse_args()

    py = sys.executable
    here = Path(__file__).resolve().parent
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = a.workdir / f"llama-{a.shape}{'-' + str(a.layers) + 'l' if a.layers else ''}"
    if not (model / "llmprune-stats.safetensors").exists():
        shutil.rmtree(model, ignore_errors=True)
        cmd = [py, str(here / "make_checkpoint.py"), str(model), "--shape", a.shape, "--stats"]
        if a.layers:
            cmd += ["--layers", str(a.layers)]
        subprocess.run(cmd, check=True)
    size = warm(model)
    print(f"checkpoint {model}: {size / GIB:.2f} GiB", file=sys.stderr)

    out = a.workdir / "out"
    results: list[tuple[str, Measurement, Measurement | None]] = []

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)

    fresh()
    cp = run(["cp", "-r", str(model), str(out)])
    fresh()
    threads = ["--threads", str(a.threads)] if a.threads else []
    torch_cases = {c for c in a.torch_cases.split(",") if c}
    digests = {}
    for case in a.cases.split(","):
        m = run([py, "-m", "llmprune", "apply", str(model), "--out", str(out), *CASES[case], *threads])
        digests[case] = shard_digest(out)
        fresh()
        t = None
        if case in torch_cases:
            args = CASES[case]
            t = run([py, str(here / "torch_prune.py"), str(model), str(out), *args])
            fresh()
        results.append((case, m, t))

    limited = None
    if a.memlimit_gb:
        group = memory_cgroup(int(a.memlimit_gb * GIB))
        if group is None:
            print("memory cgroups unavailable: limited run skipped", file=sys.stderr)
        else:
            try:
                limited = run([py, "-m", "llmprune", "apply", str(model), "--out", str(out), *CASES["wanda-50%"], *threads], cgroup=group)
                same = shard_digest(out) == digests.get("wanda-50%")
                limited_peak = peak_cgroup_usage(group)
            finally:
                fresh()
                remove_cgroup(group)

    load = os.getloadavg()[0]
    print(f"\n`apply` on {model.name} ({size / GIB:.2f} GiB bf16), input in the page cache, dirty pages "
          f"synced before each command, {a.threads or 'all'} threads, load average {load:.1f} at the end\n")
    print("| command                    |   wall s | +sync s   |    cpu s | RSS GiB | anon GiB | vs cp   | +sync vs cp | vs torch |")
    print("|----------------------------|----------|-----------|----------|---------|----------|---------|-------------|----------|")
    print(fmt_row("cp -r", cp, cp, None))
    for case, m, t in results:
        print(fmt_row(f"llmprune {case}", m, cp, t))
        if t:
            print(fmt_row(f"plain PyTorch {case}", t, cp, None))
    if limited:
        print(fmt_row(f"llmprune wanda-50% @{a.memlimit_gb:g}G", limited, cp, None))
        print(f"\nmemory-limited run ({a.memlimit_gb:g} GiB cgroup, peak cgroup usage "
              f"{limited_peak / GIB:.2f} GiB incl. page cache): output identical to unlimited run: {same}")
    if not a.keep:
        shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
