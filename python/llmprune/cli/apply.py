"""`llmprune apply` and `llmprune inspect`: thin wrappers over the Rust core."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmprune.cli.options import (
    THREADS_MAX,
    DsnotItersOpt,
    DsnotSameSignOpt,
    DsnotSkipOpt,
    DsnotThresholdOpt,
    JsonOpt,
    ModelArg,
    OwlLambdaOpt,
    OwlMOpt,
    PatternOpt,
    RefineOpt,
    SparsityOpt,
    check_int,
    check_real,
    check_sparsity,
    depth_schedule,
    given_options,
    parse_target,
    path_parser,
    searched_schedule,
    structured_schedule,
    target_label,
    unstructured_extras,
)
from llmprune.console import byte_progress, err, print_json, warn
from llmprune.errors import UsageError
from llmprune.methods import method_registry, methods

APPLY_EPILOG = """Examples:

\b
llmprune apply ./model --method wanda --sparsity 0.5
llmprune apply ./model --method stade --pattern 2:4 --out ./model-2of4
llmprune apply ./model --method magnitude --sparsity 0.5 --scope layer
llmprune apply ./model --method wanda --sparsity 0.7 --allocation owl
llmprune apply ./model --method stade --sparsity 0.6 --refine dsnot

\b
# structured: remove 20% of the decoder blocks' parameters
llmprune apply ./model --method flap --sparsity 0.2
llmprune apply ./model --method wanda-sp --sparsity 0.5 --allocation uniform

\b
# hywia needs gradient statistics: llmprune stats ./model --grad
llmprune apply ./model --method hywia --sparsity 0.2 --fusion adaptive
"""

INSPECT_EPILOG = """Example:

\b
llmprune inspect ./model-wanda-0.5 --json
"""


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


def default_out(model: Path, method: str, sparsity: float | None, pattern: tuple[int, int] | None, scope: str) -> Path:
    name = f"{model.resolve().name}-{method}-{target_label(sparsity, pattern)}"
    if scope != "row":
        name += f"-{scope}"
    return model.resolve().parent / name


def check_apply_method(method: str) -> None:
    if method not in methods() + methods("structured") + methods("depth") + methods("experts"):
        raise UsageError(
            f"unknown method {method!r}",
            f"choose one of: {', '.join(methods())} (unstructured); {', '.join(methods('structured'))} (structured); "
            f"{', '.join(methods('depth'))} (whole blocks); {', '.join(methods('experts'))} (MoE experts)",
        )


def apply_cmd(
    ctx: typer.Context,
    model: ModelArg,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            metavar="METHOD",
            help="magnitude, wanda, stade, stade-w or sparsegpt (unstructured or N:M); flap, magnitude-sp, wanda-sp or hywia (structured); block-influence (whole decoder blocks); reap or frequency (MoE experts).",
            show_default=False,
        ),
    ],
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = None,
    stats: Annotated[
        Optional[Path],
        typer.Option(
            "--stats",
            metavar="PATH",
            parser=path_parser("--stats"),
            help="Stats sidecar of MODEL (not needed by magnitude and magnitude-sp).",
            show_default="MODEL/llmprune-stats.safetensors",
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", metavar="DIR", parser=path_parser("--out"), help="Output directory.", show_default="MODEL-METHOD-TARGET beside MODEL"),
    ] = None,
    scope: Annotated[str, typer.Option("--scope", metavar="row|layer", help="Comparison group of unstructured sparsity: each row, or each matrix.")] = "row",
    threads: Annotated[
        Optional[int], typer.Option("--threads", "-j", metavar="N", help="Worker threads.", show_default="LLMPRUNE_NUM_THREADS, else all cores")
    ] = None,
    include: Annotated[
        Optional[list[str]], typer.Option("--include", metavar="GLOB", help="Only prune tensors matching this glob (repeatable).", show_default=False)
    ] = None,
    exclude: Annotated[
        Optional[list[str]], typer.Option("--exclude", metavar="GLOB", help="Never prune tensors matching this glob (repeatable).", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing non-empty output directory.")] = False,
    allocation: Annotated[
        Optional[str],
        typer.Option(
            "--allocation",
            metavar="MODE",
            help="Unstructured (--sparsity): uniform, owl (each block's sparsity from its share of outlier Wanda scores, mean S), or a JSON file of per-block sparsities (`llmprune search` writes one). Structured: uniform (the same widths in every layer; loads in stock transformers) or global (one threshold across layers and modules; layers differ in size, loads with llmprune.load_pruned). Depth: the schedule file of `llmprune search` naming the blocks to remove.",
            show_default="uniform",
        ),
    ] = None,
    width_multiple: Annotated[
        Optional[int],
        typer.Option(
            "--width-multiple",
            metavar="N",
            help="Structured, uniform allocation: round each layer's kept MLP width to a multiple of N (1: no rounding; layers N wide or narrower are not rounded).",
            show_default="128",
        ),
    ] = None,
    owl_m: OwlMOpt = None,
    owl_lambda: OwlLambdaOpt = None,
    compensate: Annotated[
        Optional[bool],
        typer.Option(
            "--compensate/--no-compensate",
            help="Fold the mean contribution of what was pruned into output biases (adding biases where the architecture allows). Unstructured: b += (W - W') mu; structured: of the removed channels.",
            show_default="on for flap where the architecture can load the biases, off for the others",
        ),
    ] = None,
    refine: RefineOpt = None,
    dsnot_iters: DsnotItersOpt = None,
    dsnot_threshold: DsnotThresholdOpt = None,
    dsnot_skip: DsnotSkipOpt = None,
    dsnot_same_sign: DsnotSameSignOpt = False,
    fusion: Annotated[
        Optional[str],
        typer.Option(
            "--fusion",
            metavar="fine|coarse|adaptive",
            help="hywia: per-weight estimate (fine), whole-group estimate (coarse), or both weighed by their split-half reliability (adaptive).",
            show_default="fine",
        ),
    ] = None,
    taylor: Annotated[
        Optional[str],
        typer.Option(
            "--taylor", metavar="first|mix", help="hywia: first-order Taylor (first), or minus half the diagonal Fisher term (mix).", show_default="first"
        ),
    ] = None,
    fusion_temperature: Annotated[
        Optional[float],
        typer.Option("--fusion-temperature", metavar="T", help="hywia: softmax temperature of the adaptive fusion weights.", show_default="0.1"),
    ] = None,
    skip_first: Annotated[
        Optional[int],
        typer.Option(
            "--skip-first",
            metavar="N",
            help="hywia: keep the first N decoder layers whole (0 with --skip-last 0: loads in stock transformers).",
            show_default="round(layers / 8)",
        ),
    ] = None,
    skip_last: Annotated[
        Optional[int], typer.Option("--skip-last", metavar="N", help="hywia: keep the last N decoder layers whole.", show_default="round(layers / 16)")
    ] = None,
    reconstruct: Annotated[
        bool,
        typer.Option(
            "--reconstruct",
            help="Structured methods: refit each output projection on its kept input channels by damped least squares on the Gram sidecar (with --compensate, centered, the bias absorbing the means).",
        ),
    ] = False,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Unstructured methods: after choosing the mask, update the kept weights to restore each layer's output (SparseGPT's sweep, on the Gram sidecar); sparsegpt always does.",
        ),
    ] = False,
    gram: Annotated[
        Optional[Path],
        typer.Option(
            "--gram",
            metavar="PATH",
            parser=path_parser("--gram"),
            help="Gram sidecar of MODEL, for sparsegpt, --update and --reconstruct (`llmprune stats MODEL --gram`).",
            show_default="MODEL/llmprune-gram.safetensors",
        ),
    ] = None,
    damp: Annotated[
        float,
        typer.Option("--damp", metavar="F", help="sparsegpt, --update, --reconstruct: damping added to the Gram matrix's diagonal, as a fraction of its mean."),
    ] = 0.01,
    blocksize: Annotated[int, typer.Option("--blocksize", metavar="N", help="sparsegpt / --update: columns per lazy update block.")] = 128,
    experts_keep: Annotated[
        Optional[int],
        typer.Option(
            "--experts-keep",
            metavar="K",
            help="reap, frequency: keep K routed experts per MoE layer (instead of --sparsity S, which removes floor(S x experts)).",
            show_default=False,
        ),
    ] = None,
    remove_blocks: Annotated[
        Optional[int],
        typer.Option(
            "--remove-blocks",
            metavar="N",
            help="block-influence: remove N decoder blocks (instead of --sparsity S, which removes floor(S x blocks)).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Prune a checkpoint into a new directory, streaming tensor by tensor.

    Unstructured and N:M methods zero weights in place; structured methods (flap, magnitude-sp,
    wanda-sp, hywia) remove whole attention groups and MLP channels and write a smaller checkpoint,
    where --sparsity is the fraction of the decoder blocks' parameters removed; block-influence
    removes whole decoder blocks."""
    from llmprune import _core

    check_apply_method(method)
    check_sparsity(sparsity)
    check_int("--threads", threads, 1, THREADS_MAX)
    for flag, n, lo in (("--blocksize", blocksize, 1), ("--skip-first", skip_first, 0), ("--skip-last", skip_last, 0), ("--width-multiple", width_multiple, 1)):
        check_int(flag, n, lo)
    for flag, n in (("--experts-keep", experts_keep), ("--remove-blocks", remove_blocks)):
        check_int(flag, n)
    check_real("--damp", damp, lo=0, lo_open=True)
    check_real("--fusion-temperature", fusion_temperature, lo=0, lo_open=True)
    if allocation == "":
        raise UsageError('--allocation "" is empty', "give uniform, owl or a schedule file (unstructured), global or uniform (structured)")
    for flag, path in (("--stats", stats), ("--gram", gram)):
        if path is not None and path.is_dir():
            raise UsageError(f"{flag} {path} is a directory, not a sidecar file", f"give the sidecar's path to {flag}")
    given = given_options(ctx, ("damp", "blocksize"))
    hywia = {"fusion": fusion, "taylor": taylor, "fusion_temperature": fusion_temperature, "skip_first": skip_first, "skip_last": skip_last}
    given_h = [f"--{k.replace('_', '-')}" for k, v in hywia.items() if v is not None]
    if given_h and method != "hywia":
        raise UsageError(f"{', '.join(given_h)} apply to --method hywia, not to {method}")
    if experts_keep is not None and method not in methods("experts"):
        raise UsageError(f"--experts-keep applies to {', '.join(methods('experts'))}, not to {method}")
    if remove_blocks is not None and method not in methods("depth"):
        raise UsageError(f"--remove-blocks applies to {', '.join(methods('depth'))}, not to {method}")
    if method in methods("depth") + methods("experts"):
        stats_arg = str(stats) if stats is not None else None
        others = {
            "--pattern": pattern is not None,
            "--scope": scope != "row",
            "--include": bool(include),
            "--exclude": bool(exclude),
            "--update": update,
            "--allocation": allocation is not None and method not in methods("depth"),
            "--compensate": compensate is not None,
            "--width-multiple": width_multiple is not None,
            "--refine": refine is not None,
            "--reconstruct": reconstruct,
            "--gram": gram is not None,
            "--damp": "--damp" in given,
            "--blocksize": "--blocksize" in given,
        }
        bad = [k for k, v in others.items() if v]
        if bad:
            raise UsageError(f"{', '.join(bad)} do not apply to {method}, which removes whole {'experts' if method in methods('experts') else 'blocks'}")
        if method in methods("experts"):
            if (sparsity is None) == (experts_keep is None):
                raise UsageError(f"{method} needs exactly one of --sparsity S (the fraction of routed experts removed per layer) or --experts-keep K")
            apply_whole(
                model,
                method,
                f"{sparsity:g}" if sparsity is not None else f"keep{experts_keep}",
                out,
                json_out,
                lambda out_dir, on_tensor: _core.apply_experts(
                    str(model), out_dir, method, sparsity=sparsity, experts_keep=experts_keep, stats=stats_arg, threads=threads, force=force, progress=on_tensor
                ),
                lambda s: f"kept {s['experts_after']} of {s['experts_before']} routed experts in each of {len(s['layers'])} MoE layers",
            )
            return
        blocks, provenance, label = None, None, f"{sparsity:g}" if sparsity is not None else f"{remove_blocks}blocks"
        if allocation is not None:
            if sparsity is not None or remove_blocks is not None:
                raise UsageError("--allocation FILE names the blocks to remove; drop --sparsity / --remove-blocks")
            blocks, doc = depth_schedule(Path(allocation), model)
            provenance, label = searched_provenance(allocation, doc), f"{len(blocks)}blocks-schedule"
        elif (sparsity is None) == (remove_blocks is None):
            raise UsageError(f"{method} needs exactly one of --sparsity S (the fraction of blocks), --remove-blocks N or --allocation FILE")
        apply_whole(
            model,
            method,
            label,
            out,
            json_out,
            lambda out_dir, on_tensor: _core.apply_depth(
                str(model),
                out_dir,
                sparsity=sparsity,
                remove_blocks=remove_blocks,
                blocks=blocks,
                stats=stats_arg,
                threads=threads,
                force=force,
                provenance=provenance,
                progress=on_tensor,
            ),
            lambda s: f"removed {len(s['removed_blocks'])} of {s['blocks_before']} decoder blocks ({', '.join(map(str, s['removed_blocks']))})",
        )
        return
    if method in methods("structured"):
        if pattern is not None:
            raise UsageError(f"--pattern applies to unstructured methods; structured method {method} takes --sparsity S")
        if sparsity is None and allocation in (None, "uniform", "global"):
            raise UsageError(f"structured method {method} needs --sparsity S, the fraction of decoder-block parameters to remove", "e.g. --sparsity 0.2")
        unstructured_only = {
            "--scope": scope != "row",
            "--include": bool(include),
            "--exclude": bool(exclude),
            "--update": update,
            "--owl-m": owl_m is not None,
            "--owl-lambda": owl_lambda is not None,
            "--refine": refine is not None,
            "--dsnot-iters": dsnot_iters is not None,
            "--dsnot-threshold": dsnot_threshold is not None,
            "--dsnot-skip": dsnot_skip is not None,
            "--dsnot-same-sign": dsnot_same_sign,
        }
        given_u = [k for k, v in unstructured_only.items() if v]
        if given_u:
            raise UsageError(f"{', '.join(given_u)} apply to unstructured methods, not to {method}")
        if gram is not None and not reconstruct:
            raise UsageError("--gram with a structured method goes with --reconstruct")
        if "--blocksize" in given:
            raise UsageError(f"--blocksize applies to sparsegpt and --update, not to structured method {method}", "drop --blocksize")
        if "--damp" in given and not reconstruct:
            raise UsageError(f"--damp with structured method {method} goes with --reconstruct", "add --reconstruct, or drop --damp")
        recon = {"reconstruct": reconstruct, "gram": str(gram) if gram is not None else None, "damp": damp}
        apply_structured(
            model, method, sparsity, allocation, compensate, stats, out, threads, force, json_out, {**hywia, **recon, "width_multiple": width_multiple}
        )
        return
    if width_multiple is not None:
        raise UsageError(f"--width-multiple applies to the structured methods' uniform allocation, not to {method}")
    if reconstruct:
        raise UsageError(f"--reconstruct applies to the structured methods; unstructured {method} updates weights with --update")
    if method != "sparsegpt" and not update:
        unused = [flag for flag in ("--gram", "--damp", "--blocksize") if flag in given or (flag == "--gram" and gram is not None)]
        if unused:
            raise UsageError(
                f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to sparsegpt and --update (the weight update), not to {method} alone",
                f"add --update, or drop {'it' if len(unused) == 1 else 'them'}",
            )
    sparsity_v, pattern_v = parse_target(sparsity, pattern)
    extras = unstructured_extras(allocation, owl_m, owl_lambda, refine, dsnot_iters, dsnot_threshold, dsnot_skip, pattern_v, dsnot_same_sign)
    searched = searched_schedule(Path(allocation), model, "unstructured") if extras["allocation"] == "schedule" and allocation is not None else None
    out_dir = out if out is not None else default_out(model, method, sparsity_v, pattern_v, scope)
    if out is None:
        suffixes = [
            (extras["allocation"] != "uniform", f"-{extras['allocation']}"),
            (refine is not None, "-dsnot"),
            (bool(compensate), "-compensate"),
            (update and method != "sparsegpt", "-update"),
        ]
        out_dir = out_dir.with_name(out_dir.name + "".join(sfx for on, sfx in suffixes if on))
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
            force=force,
            progress=on_tensor,
            update=update,
            gram=str(gram) if gram is not None else None,
            damp=damp,
            blocksize=blocksize,
            compensate=bool(compensate),
            provenance=searched_provenance(str(allocation), searched) if searched is not None else None,
            **extras,
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
    extra = []
    if summary.get("block_sparsity"):
        b = summary["block_sparsity"]
        extra.append(f"{summary['allocation']} allocation: block sparsity {min(b):.4f} to {max(b):.4f} (mean {sum(b) / len(b):.4f})")
    if summary.get("refine"):
        extra.append(f"DSnoT: {summary['dsnot_swaps']:,} swaps")
    if summary["compensate"]:
        extra.append(f"bias compensation: {summary['biases_compensated']} weights, {summary['bias_params_added']:,} bias parameters added")
    if extra:
        typer.echo("; ".join(extra))


def searched_provenance(path: str, doc: dict[str, Any]) -> dict[str, str]:
    """What the output's provenance records of a schedule `llmprune search` found."""
    return {"schedule": str(path), "search": json.dumps(doc.get("search", {}), sort_keys=True)}


def apply_structured(
    model: Path,
    method: str,
    sparsity: float | None,
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

    default_allocation = next(m["allocation"] for m in method_registry()["structured"] if m["name"] == method)
    allocation = allocation or default_allocation
    provenance: dict[str, str] | None = None
    layer_sparsity: list[float] | None = None
    label = allocation if allocation != default_allocation else "row"
    if allocation not in ("global", "uniform"):
        layer_sparsity, doc = structured_schedule(Path(allocation), model, method)
        searched = float(doc.get("sparsity", -1))
        if sparsity is not None and abs(sparsity - searched) > 1e-9:
            raise UsageError(
                f"--allocation {allocation} was searched for sparsity {searched:g}, not {sparsity:g}", hint=f"drop --sparsity, or pass --sparsity {searched:g}"
            )
        sparsity = sum(layer_sparsity) / len(layer_sparsity)
        wm = doc.get("width_multiple", 1)
        if hywia.get("width_multiple") is not None and hywia["width_multiple"] != wm:
            raise UsageError(f"--allocation {allocation} was searched with width multiple {wm}, not {hywia['width_multiple']}", hint="drop --width-multiple")
        hywia = {**hywia, "width_multiple": wm}
        provenance, label, allocation = searched_provenance(allocation, doc), "schedule", "uniform"
    assert sparsity is not None
    out_dir = out if out is not None else default_out(model, method, sparsity, None, label)
    if out is None and hywia.get("reconstruct"):
        out_dir = out_dir.with_name(out_dir.name + "-reconstruct")
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
            provenance=provenance,
            layer_sparsity=layer_sparsity,
            **hywia,
        )
    )
    if summary["loader"] != "transformers":
        why = "layers differ in size" if len({tuple(sorted(x.items())) for x in summary["per_layer"]}) > 1 else "a stock config cannot describe its head count"
        if summary["allocation"] == "global":
            instead = "; drop --allocation global for an output they load"
        elif summary.get("skip_first") or summary.get("skip_last"):
            instead = "; --skip-first 0 --skip-last 0 gives one they load, at a cost in quality (docs/hywia.md)"
        else:
            instead = ""
        err.print(
            f"note: {why}; load {summary['out']} with llmprune.load_pruned(path) (llmprune eval reads it directly); "
            f"stock transformers, vLLM and llama.cpp cannot load it{instead}",
            markup=False,
            soft_wrap=True,
        )
    if json_out:
        print_json(summary)
        return
    s = summary
    typer.echo(
        f"{s['method']} {s['sparsity']:g} ({s['allocation']}{f', width multiple {wm}' if (wm := s.get('width_multiple')) else ''}"
        f"{', bias compensation' if s['compensate'] else ''}): "
        f"kept {s['heads_after']} of {s['heads_before']} attention heads and {s['mlp_channels_after']:,} of "
        f"{s['mlp_channels_before']:,} MLP channels; removed {s['params_removed']:,} of {s['block_params_before']:,} "
        f"decoder-block parameters ({s['achieved_sparsity']:.4%}); wrote {s['out']} "
        f"({s['bytes_written'] / 1e6:,.1f} MB, was {s['bytes_before'] / 1e6:,.1f} MB) in {s['seconds']:.2f} s"
    )
    if s.get("fusion") is not None:
        typer.echo(fusion_line(s))


def apply_whole(
    model: Path, method: str, label: str, out: Path | None, json_out: bool, run: Callable[[str, Callable[..., None]], str], what: Callable[[dict], str]
) -> None:
    """Depth and expert pruning, which keep, drop or cut whole tensors: `run(out_dir, on_tensor)` is
    the core call, `what(summary)` says what was removed."""
    out_dir = out if out is not None else model.resolve().parent / f"{model.resolve().name}-{method}-{label}"
    s = _with_progress(lambda on_tensor: run(str(out_dir), on_tensor))
    if json_out:
        print_json(s)
        return
    typer.echo(
        f"{method}: {what(s)}; {s['params_after']:,} of {s['params_before']:,} parameters kept; wrote {s['out']} "
        f"({s['bytes_written'] / 1e6:,.1f} MB, was {s['bytes_before'] / 1e6:,.1f} MB) in {s['seconds']:.2f} s"
    )


def fusion_line(s: dict[str, Any]) -> str:
    """One line on hywia's fusion: mean weight of the fine estimate per module, layers kept whole."""
    layers = s["fusion"]
    mean = {k: sum(f[k]["alpha_fine"] for f in layers) / len(layers) for k in ("attn", "mlp")}
    kept = f"first {s['skip_first']} and last {s['skip_last']} layers kept whole" if s["skip_first"] or s["skip_last"] else "no layer kept whole"
    return (
        f"fusion {s['fusion_mode']} (taylor {s['taylor']}, temperature {s['fusion_temperature']:g}): mean alpha_fine "
        f"{(mean['attn'] + mean['mlp']) / 2:.3f} (attention {mean['attn']:.3f}, MLP {mean['mlp']:.3f}) over {len(layers)} "
        f"pruned layers; {kept}"
    )


def inspect_cmd(
    model: ModelArg,
    summary_only: Annotated[bool, typer.Option("--summary", help="Print the summary only, not the per-tensor table.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """What a checkpoint is: a summary first (what llmprune did to it, and the share of zeros where
    zeros are the measure), then per-tensor sparsity and N:M compliance."""
    from rich.console import Console
    from rich.table import Table

    from llmprune import _core

    report = json.loads(_core.inspect(str(model)))
    if json_out:
        print_json(report)
        return
    dtypes = sorted({t["dtype"] for t in report["tensors"]})
    one_dtype = len(dtypes) == 1
    title = f"{model} ({report['shards']} shard(s){', ' + dtypes[0] if one_dtype else ''})"
    out = Console(highlight=False)
    prov = report.get("provenance")
    out.print(f"{title}: {report['total']['numel']:,} parameters", markup=False)
    lines, zeros_matter = describe_provenance(prov)
    for line in lines:
        out.print(line, markup=False)
    if zeros_matter:
        out.print(f"prunable weights: {report['prunable']['sparsity']:.2%} zeros of {report['prunable']['numel']:,}")
    out.print(f"all tensors:      {report['total']['sparsity']:.2%} zeros of {report['total']['numel']:,}")
    out.print(f"provenance: {json.dumps(prov) if prov else 'none (not written by llmprune)'}", markup=False)
    if summary_only:
        return
    # borderless, and the dtype in the title when all tensors share one: names fit 80 columns; a
    # longer name folds onto a second line rather than being cut
    table = Table(title=title, box=None, pad_edge=False)
    table.add_column("tensor", overflow="fold")
    if not one_dtype:
        table.add_column("dtype")
    table.add_column("shape", no_wrap=True)
    for col in ("sparsity", "2:4", "4:8"):
        table.add_column(col, justify="right", no_wrap=True)

    def mark(nm: dict[str, bool], k: str) -> str:
        return "" if k not in nm else ("yes" if nm[k] else "no")

    for t in report["tensors"]:
        nm = t["nm"]
        dtype = [] if one_dtype else [t["dtype"]]
        table.add_row(t["name"], *dtype, "x".join(map(str, t["shape"])), f"{t['sparsity']:.2%}", mark(nm, "2:4"), mark(nm, "4:8"))
    out.print()
    out.print(table)


def describe_provenance(prov: dict[str, Any] | None) -> tuple[list[str], bool]:
    """One line per llmprune step recorded in a shard's provenance (the latest first, then what it
    was made from), and whether zeros measure what was done (unstructured pruning, or no record)."""
    lines: list[str] = []
    zeros_matter = prov is None
    rec: Any = prov
    while isinstance(rec, dict):
        method = str(rec.get("method", "?"))
        if method in methods("unstructured"):
            target = rec.get("pattern") or rec.get("sparsity")
            extra = f", {rec['allocation']} allocation" if rec.get("allocation") not in (None, "uniform") else ""
            lines.append(f"unstructured pruning: {method} {target}{extra}; zeros are what it removed")
            zeros_matter = True
        elif method in methods("structured"):
            achieved = rec.get("achieved_sparsity")
            share = f"{achieved:.1%}" if isinstance(achieved, (int, float)) else str(rec.get("sparsity"))
            lines.append(
                f"structured pruning: {method}, {rec.get('allocation')} allocation: {share} of the decoder blocks' parameters removed "
                "(a smaller checkpoint; zeros do not measure it)"
            )
        elif method in methods("depth"):
            removed = rec.get("removed_blocks") or []
            lines.append(
                f"depth pruning: removed {len(removed)} of {rec.get('blocks_before')} blocks ({', '.join(map(str, removed))}; zeros do not measure it)"
            )
        elif method in methods("experts"):
            lines.append(f"expert pruning: {method}, {rec.get('experts_before')} routed experts per MoE layer before (zeros do not measure it)")
        else:
            lines.append(f"{method}" + (f" ({rec['steps']} steps, lr {rec['lr']})" if "steps" in rec and "lr" in rec else ""))
        rec = rec.get("input")
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except ValueError:
                break
        if isinstance(rec, dict):
            lines[-1] += ", from:"
    return lines, zeros_matter


def register(app: typer.Typer) -> None:
    app.command("apply", epilog=APPLY_EPILOG, no_args_is_help=True, short_help="Prune a checkpoint into a new directory, tensor by tensor.")(apply_cmd)
    app.command("inspect", no_args_is_help=True, epilog=INSPECT_EPILOG, short_help="Per-tensor sparsity, N:M compliance and provenance.")(inspect_cmd)
