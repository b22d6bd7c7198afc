"""`llmprune apply` and `llmprune inspect`: thin wrappers over the Rust core."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmprune.console import byte_progress, err, print_json, warn
from llmprune.errors import UsageError
from llmprune.options import METHODS, JsonOpt, ModelArg, PatternOpt, SparsityOpt, parse_target, target_label

# Remove whole attention groups and MLP channels: a smaller dense checkpoint (rust/.../structured).
STRUCTURED_METHODS = ("flap", "magnitude-sp", "wanda-sp", "hywia")

# Core errors of hywia that a hint line helps with (docs/hywia.md).
HYWIA_HINTS = (
    ("needs gradient statistics", "run: llmprune stats MODEL --grad"),
    ("adaptive fusion compares two halves", "take the statistics with --nsamples 2 or more, or pass --fusion fine|coarse"),
)

APPLY_EPILOG = """Examples:

  llmprune apply ./model --method wanda --sparsity 0.5

  llmprune apply ./model --method stade --pattern 2:4 --out ./model-2of4

  llmprune apply ./model --method magnitude --sparsity 0.5 --scope layer --json

  llmprune apply ./model --method flap --sparsity 0.2                     # structured: 20% of block parameters

  llmprune apply ./model --method wanda-sp --sparsity 0.5 --allocation uniform

  llmprune apply ./model --method hywia --sparsity 0.2 --fusion adaptive   # needs `llmprune stats ./model --grad`
"""


@contextmanager
def hinted(hints: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """Turns a core InvalidArgumentError whose message contains one of the keys into a UsageError
    carrying that key's hint line."""
    from llmprune import _core

    try:
        yield
    except _core.InvalidArgumentError as exc:
        hint = next((h for key, h in hints if key in str(exc)), None)
        if hint is None:
            raise
        raise UsageError(str(exc), hint) from exc


def _with_progress(run: Callable[[Callable[..., None]], str]) -> dict:
    """Runs a core call that reports (name, bytes done, bytes total, tensors done, tensors total)
    under a byte progress bar; prints its warnings and returns its JSON summary parsed."""
    with byte_progress() as bar:
        task = bar.add_task("pruning", total=None, detail="")

        def on_tensor(name: str, done: int, total: int, n_done: int, n_total: int) -> None:
            bar.update(task, completed=done, total=total, detail=f"{n_done}/{n_total} tensors")

        summary = json.loads(run(on_tensor))
    for w in summary["warnings"]:
        warn(w)
    return summary


def default_input_axis(model: Path) -> int:
    """GPT-2-style checkpoints store Conv1D weights as [in, out]."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return 1  # the core reports a missing or broken config itself
    return 0 if config.get("model_type") in ("gpt2",) else 1


def default_out(model: Path, method: str, sparsity: float | None, pattern: tuple[int, int] | None, scope: str) -> Path:
    name = f"{model.resolve().name}-{method}-{target_label(sparsity, pattern)}"
    if scope != "row":
        name += f"-{scope}"
    return model.resolve().parent / name


def check_apply_method(method: str) -> None:
    if method not in METHODS + STRUCTURED_METHODS:
        raise UsageError(
            f"unknown method {method!r}",
            f"choose one of: {', '.join(METHODS)} (unstructured); {', '.join(STRUCTURED_METHODS)} (structured)",
        )


def apply_cmd(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="magnitude, wanda, stade or stade-w (unstructured); flap, magnitude-sp, wanda-sp or hywia (structured).", show_default=False)],
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Stats sidecar [default: MODEL/llmprune-stats.safetensors].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory [default: MODEL-METHOD-SPARSITY beside MODEL].")] = None,
    scope: Annotated[str, typer.Option("--scope", help="Comparison group for unstructured sparsity: row or layer.")] = "row",
    threads: Annotated[Optional[int], typer.Option("--threads", "-j", help="Worker threads [default: LLMPRUNE_NUM_THREADS or all cores].")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only prune tensors matching this glob (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never prune tensors matching this glob (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing non-empty output directory.")] = False,
    allocation: Annotated[Optional[str], typer.Option("--allocation", help="Structured methods: global (one threshold across layers and modules) or uniform (the same heads/channels kept in every layer).", show_default="global; uniform for hywia")] = None,
    compensate: Annotated[Optional[bool], typer.Option("--compensate/--no-compensate", help="Structured methods: fold the removed channels' mean contribution into output-projection biases.", show_default="on for flap")] = None,
    fusion: Annotated[Optional[str], typer.Option("--fusion", help="hywia: fine (per-weight estimate, the measured best), coarse (whole-group estimate) or adaptive (both, weighed by their split-half reliability).", show_default="fine")] = None,
    taylor: Annotated[Optional[str], typer.Option("--taylor", help="hywia: first (first-order Taylor) or mix (minus half the diagonal Fisher term).", show_default="first")] = None,
    fusion_temperature: Annotated[Optional[float], typer.Option("--fusion-temperature", help="hywia: softmax temperature of the adaptive fusion weights.", show_default="0.1")] = None,
    skip_first: Annotated[Optional[int], typer.Option("--skip-first", help="hywia: keep the first N decoder layers whole.", show_default="round(layers/8)")] = None,
    skip_last: Annotated[Optional[int], typer.Option("--skip-last", help="hywia: keep the last M decoder layers whole.", show_default="round(layers/16)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Prune a checkpoint into a new directory, streaming tensor by tensor.

    Unstructured and N:M methods zero weights in place; structured methods (flap, magnitude-sp,
    wanda-sp, hywia) remove whole attention groups and MLP channels and write a smaller checkpoint,
    where --sparsity is the fraction of the decoder blocks' parameters removed."""
    from llmprune import _core

    check_apply_method(method)
    if threads is not None and threads < 1:
        raise UsageError("--threads must be at least 1")
    hywia = {"fusion": fusion, "taylor": taylor, "fusion_temperature": fusion_temperature, "skip_first": skip_first, "skip_last": skip_last}
    given = [f"--{k.replace('_', '-')}" for k, v in hywia.items() if v is not None]
    if given and method != "hywia":
        raise UsageError(f"{', '.join(given)} apply to --method hywia, not to {method}")
    for flag, n in (("--skip-first", skip_first), ("--skip-last", skip_last)):
        if n is not None and n < 0:
            raise UsageError(f"{flag} must be 0 or more, got {n}")
    if method in STRUCTURED_METHODS:
        if pattern is not None:
            raise UsageError(f"--pattern applies to unstructured methods; structured method {method} takes --sparsity S")
        if sparsity is None:
            raise UsageError(f"structured method {method} needs --sparsity S, the fraction of decoder-block parameters to remove", "e.g. --sparsity 0.2")
        if scope != "row" or include or exclude:
            raise UsageError(f"--scope, --include and --exclude apply to unstructured methods, not to {method}")
        with hinted(HYWIA_HINTS):
            apply_structured(model, method, sparsity, allocation, compensate, stats, out, threads, force, json_out, hywia)
        return
    if allocation is not None or compensate is not None:
        raise UsageError(f"--allocation and --compensate apply to the structured methods ({', '.join(STRUCTURED_METHODS)}), not to {method}")
    sparsity_v, pattern_v = parse_target(sparsity, pattern)
    out_dir = out if out is not None else default_out(model, method, sparsity_v, pattern_v, scope)
    summary = _with_progress(
        lambda on_tensor: _core.apply(
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


def apply_structured(
    model: Path,
    method: str,
    sparsity: float,
    allocation: str | None,
    compensate: bool | None,
    stats: Path | None,
    out: Path | None,
    threads: int | None,
    force: bool,
    json_out: bool,
    hywia: dict[str, Any],
) -> None:
    from llmprune import _core

    default_allocation = "uniform" if method == "hywia" else "global"
    allocation = allocation or default_allocation
    if allocation not in ("global", "uniform"):
        raise UsageError(f"unknown --allocation {allocation!r}", "choose global or uniform")
    out_dir = out if out is not None else default_out(model, method, sparsity, None, allocation if allocation != default_allocation else "row")
    summary = _with_progress(
        lambda on_tensor: _core.apply_structured(
            str(model),
            str(out_dir),
            method,
            sparsity=sparsity,
            allocation=allocation,
            compensate=compensate,
            stats=str(stats) if stats is not None else None,
            threads=threads,
            force=force,
            progress=on_tensor,
            **hywia,
        )
    )
    if summary["loader"] != "transformers":
        err.print(
            f"note: layers differ in size; load {summary['out']} with llmprune.load_pruned(path) (llmprune eval reads it directly)",
            markup=False,
            soft_wrap=True,
        )
    if json_out:
        print_json(summary)
        return
    s = summary
    typer.echo(
        f"{s['method']} {s['sparsity']:g} ({s['allocation']}{', bias compensation' if s['compensate'] else ''}): "
        f"kept {s['heads_after']} of {s['heads_before']} attention heads and {s['mlp_channels_after']:,} of "
        f"{s['mlp_channels_before']:,} MLP channels; removed {s['params_removed']:,} of {s['block_params_before']:,} "
        f"decoder-block parameters ({s['achieved_sparsity']:.4%}); wrote {s['out']} "
        f"({s['bytes_written'] / 1e6:,.1f} MB, was {s['bytes_before'] / 1e6:,.1f} MB) in {s['seconds']:.2f} s"
    )
    if s.get("fusion") is not None:
        typer.echo(fusion_line(s))


def fusion_line(s: dict[str, Any]) -> str:
    """One line on hywia's fusion: mean weight of the fine estimate per module, layers kept whole."""
    layers = s["fusion"]
    mean = {k: sum(f[k]["alpha_fine"] for f in layers) / len(layers) for k in ("attn", "mlp")}
    return (
        f"fusion {s['fusion_mode']} (taylor {s['taylor']}, temperature {s['fusion_temperature']:g}): mean alpha_fine "
        f"{(mean['attn'] + mean['mlp']) / 2:.3f} (attention {mean['attn']:.3f}, MLP {mean['mlp']:.3f}) over {len(layers)} "
        f"pruned layers; first {s['skip_first']} and last {s['skip_last']} layers kept whole"
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
