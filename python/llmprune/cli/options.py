"""Option declarations shared by several commands (one spelling, one help text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune.errors import UsageError
from llmprune.methods import methods

ModelArg = Annotated[
    Path,
    typer.Argument(metavar="MODEL", help="Model directory (config.json + model.safetensors or shards + index).", show_default=False),
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
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--allocation {path}: no such file", "give uniform, owl, or a JSON file of per-block sparsities") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--allocation {path}: cannot read it: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--allocation {path} is not valid JSON: {exc}") from None
    values = data.get("block_sparsity") if isinstance(data, dict) else data
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"--allocation {path} must hold a list of per-block sparsities", 'e.g. [0.45, 0.5, 0.55] or {"block_sparsity": [...]}')
    return [float(v) for v in values]


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
    kw.update(owl_m=owl_m, owl_lambda=owl_lambda)
    if refine is not None and refine != "dsnot":
        raise UsageError(f"unknown --refine {refine!r}", "the one refinement is dsnot")
    kw.update(refine=refine, dsnot_iters=dsnot_iters, dsnot_threshold=dsnot_threshold, dsnot_skip=dsnot_skip, dsnot_same_sign=dsnot_same_sign or None)
    if dsnot_iters is not None and dsnot_iters < 1:
        raise UsageError(f"--dsnot-iters must be at least 1, got {dsnot_iters}")
    return kw
