"""`llmprune apply` and `llmprune inspect`: thin wrappers over the Rust core."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune.console import byte_progress, print_json, warn
from llmprune.options import JsonOpt, ModelArg, PatternOpt, SparsityOpt, check_method, parse_target, target_label

APPLY_EPILOG = """Examples:

  llmprune apply ./model --method wanda --sparsity 0.5

  llmprune apply ./model --method stade --pattern 2:4 --out ./model-2of4

  llmprune apply ./model --method magnitude --sparsity 0.5 --scope layer --json
"""


def default_input_axis(model: Path) -> int:
    """GPT-2-style checkpoints store Conv1D weights as [in, out]."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return 1  # the core reports a missing or broken config itself
    return 0 if config.get("model_type") in ("gpt2",) else 1


def default_out(model: Path, method: str, sparsity: float | None, pattern: tuple[int, int] | None, scope: str) -> Path:
    name = f"{model.resolve().name}-{method}-{target_label(sparsity, pattern)}"
    if scope == "layer":
        name += "-layer"
    return model.resolve().parent / name


def apply_cmd(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="magnitude, wanda, stade or stade-w.", show_default=False)],
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Stats sidecar [default: MODEL/llmprune-stats.safetensors].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory [default: MODEL-METHOD-SPARSITY beside MODEL].")] = None,
    scope: Annotated[str, typer.Option("--scope", help="Comparison group for unstructured sparsity: row or layer.")] = "row",
    threads: Annotated[Optional[int], typer.Option("--threads", "-j", help="Worker threads [default: LLMPRUNE_NUM_THREADS or all cores].")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only prune tensors matching this glob (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never prune tensors matching this glob (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing non-empty output directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Prune a checkpoint into a new directory, streaming tensor by tensor."""
    from llmprune import _core

    check_method(method)
    sparsity_v, pattern_v = parse_target(sparsity, pattern)
    if threads is not None and threads < 1:
        from llmprune.errors import UsageError

        raise UsageError("--threads must be at least 1")
    out_dir = out if out is not None else default_out(model, method, sparsity_v, pattern_v, scope)
    with byte_progress() as bar:
        task = bar.add_task("pruning", total=None, detail="")

        def on_tensor(name: str, done: int, total: int, n_done: int, n_total: int) -> None:
            bar.update(task, completed=done, total=total, detail=f"{n_done}/{n_total} tensors")

        summary = json.loads(
            _core.apply(
                str(model),
                str(out_dir),
                method,
                sparsity=sparsity_v,
                pattern=pattern_v,
                scope=scope,
                stats=str(stats) if stats is not None else None,
                threads=threads,
                include=include or [],
                exclude=exclude or [],
                input_axis=default_input_axis(model),
                force=force,
                progress=on_tensor,
            )
        )
    for w in summary["warnings"]:
        warn(w)
    if json_out:
        print_json(summary)
        return
    frac = summary["params_pruned"] / max(summary["params_prunable"], 1)
    target = summary.get("pattern") or summary.get("sparsity")
    typer.echo(
        f"{summary['method']} {target}: pruned {summary['params_pruned']:,} of {summary['params_prunable']:,} "
        f"prunable weights ({frac:.2%}) in {summary['tensors_pruned']} tensors; "
        f"wrote {summary['out']} in {summary['seconds']:.2f} s"
    )


def inspect_cmd(model: ModelArg, json_out: JsonOpt = False) -> None:
    """Per-tensor sparsity, N:M compliance and provenance of a checkpoint."""
    from rich.console import Console
    from rich.table import Table

    from llmprune import _core

    report = json.loads(_core.inspect(str(model), default_input_axis(model)))
    if json_out:
        print_json(report)
        return
    table = Table(title=f"{model} ({report['shards']} shard(s))")
    for col in ("tensor", "dtype", "shape", "sparsity", "2:4", "4:8"):
        table.add_column(col, justify="left" if col in ("tensor", "dtype", "shape") else "right")
    for t in report["tensors"]:
        nm = t["nm"]
        mark = lambda k: "" if k not in nm else ("yes" if nm[k] else "no")  # noqa: E731
        table.add_row(t["name"], t["dtype"], "x".join(map(str, t["shape"])), f"{t['sparsity']:.2%}", mark("2:4"), mark("4:8"))
    out = Console(highlight=False)
    out.print(table)
    out.print(f"prunable weights: {report['prunable']['sparsity']:.2%} zeros of {report['prunable']['numel']:,}")
    out.print(f"all tensors:      {report['total']['sparsity']:.2%} zeros of {report['total']['numel']:,}")
    prov = report.get("provenance")
    out.print(f"provenance: {json.dumps(prov) if prov else 'none (not written by llmprune)'}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("apply", epilog=APPLY_EPILOG, no_args_is_help=True)(apply_cmd)
    app.command("inspect", no_args_is_help=True, epilog="Example:\n\n  llmprune inspect ./model-wanda-0.5 --json")(inspect_cmd)
