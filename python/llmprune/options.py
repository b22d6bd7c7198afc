"""Option declarations shared by several commands (one spelling, one help text)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune.errors import UsageError

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

def methods(kind: str = "unstructured") -> tuple[str, ...]:
    """The names of the core's methods of one kind (`unstructured` or `structured`)."""
    return tuple(m["name"] for m in method_registry()[kind])


@functools.cache
def method_registry() -> dict:
    """`_core.methods()`: every method with what it needs and its defaults."""
    from llmprune import _core

    return json.loads(_core.methods())


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
