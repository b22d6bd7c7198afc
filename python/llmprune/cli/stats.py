"""`llmprune stats MODEL ...` (the calibration pass) and `llmprune stats merge A B ... --out C`.

`stats` is a command group whose default command takes MODEL: any first argument other than a
subcommand name (`merge`) goes to the hidden default command, so both spellings parse cleanly and
`llmprune stats --help` shows the pass's own options.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from llmprune.cli.options import (
    SEED_MAX,
    CalibOpt,
    DeviceOpt,
    DsnotItersOpt,
    DsnotSameSignOpt,
    DsnotSkipOpt,
    DsnotThresholdOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OwlLambdaOpt,
    OwlMOpt,
    RefineOpt,
    announce,
    check_int,
    check_method,
    check_sparsity,
    parse_target,
    path_parser,
    unstructured_extras,
)
from llmprune.console import err, print_json, warn
from llmprune.errors import UsageError

DEFAULT_COMMAND = "compute"
DEFAULT_NSAMPLES = 128
SLOW_CPU_SECONDS = 300  # warn about the default protocol on a CPU beyond this estimate

STATS_EPILOG = """Examples:

\b
# 128 x 2048 tokens of the built-in text (hours on a CPU: see --nsamples)
llmprune stats ./model
llmprune stats ./model --nsamples 32 --seqlen 512 --device cpu
llmprune stats ./model --calib c4 --out ./model.stats.safetensors

\b
# sequential statistics, as the Wanda and STADE code take them
llmprune stats ./model --sequential --method wanda --sparsity 0.5

\b
# + gradient statistics for apply --method hywia
llmprune stats ./model --grad --nsamples 32 --seqlen 256

\b
# + input Gram matrices (MODEL/llmprune-gram.safetensors; large)
llmprune stats ./model --gram

\b
# data-parallel over 4 GPUs; then merge sidecars of disjoint sets
torchrun --nproc-per-node 4 -m llmprune stats ./model
llmprune stats merge a.safetensors b.safetensors --out ab.safetensors
"""

MERGE_EPILOG = """Example:

\b
llmprune stats merge part0.safetensors part1.safetensors \\
    --out model/llmprune-stats.safetensors
"""


class _StatsGroup(TyperGroup):
    """Dispatches to the default command unless the first argument names a subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


class _DefaultContext(TyperCommand.context_class):  # type: ignore[misc,valid-type]
    """Names the default command as `llmprune stats` in usage lines and hints."""

    @property
    def command_path(self) -> str:
        return self.parent.command_path if self.parent is not None else super().command_path


class _DefaultCommand(TyperCommand):
    context_class = _DefaultContext


def _default_out(model: Path, name: str | None = None, option: str = "--out") -> Path:
    from llmprune.calibration.sidecar import SIDECAR_NAME

    if not os.access(model, os.W_OK):
        hint = f"pass {option} PATH to write it elsewhere"
        if option == "--out":
            hint = "pass --out PATH to write the sidecar elsewhere (and --stats PATH to `llmprune apply`)"
        raise UsageError(f"cannot write the statistics into {model}: the directory is not writable", hint=hint)
    return model / (name or SIDECAR_NAME)


def _check_out(out: Path) -> None:
    """The core's rule for the sidecar's destination, checked before the pass rather than after."""
    from llmprune import _core

    _core.check_file_destination(str(out))


def _warn_if_slow_on_cpu(model: Path, device: str, nsamples: int, seqlen: int) -> None:
    """The default protocol (128 x 2048 tokens) can take hours on a CPU: say about how long, measured
    from this CPU's matrix-multiply speed and the model's size, and how to ask for less."""
    from llmprune.calibration.estimate import duration, pass_seconds
    from llmprune.model.devices import resolve_device

    if resolve_device(device).type != "cpu":
        return
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    seconds = pass_seconds(model, nsamples, seqlen) / world
    if seconds < SLOW_CPU_SECONDS:
        return
    quick = pass_seconds(model, 32, min(seqlen, 512)) / world
    warn(
        f"{nsamples} x {seqlen} calibration tokens (the default) take about {duration(seconds)} on this CPU; "
        f"for a first try pass fewer, e.g. --nsamples 32 --seqlen {min(seqlen, 512)} (about {duration(quick)})"
    )


def stats_cmd(
    ctx: typer.Context,
    model: ModelArg,
    calib: CalibOpt = None,
    nsamples: Annotated[int, typer.Option("--nsamples", "-n", metavar="N", help="Number of calibration windows.")] = DEFAULT_NSAMPLES,
    seqlen: Annotated[
        Optional[int], typer.Option("--seqlen", metavar="L", help="Tokens per window.", show_default="2048, or the model's context if shorter")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the window sampling.")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", metavar="PATH", parser=path_parser("--out"), help="Sidecar path.", show_default="MODEL/llmprune-stats.safetensors"),
    ] = None,
    json_out: JsonOpt = False,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential", help="Prune each block (--method with --sparsity or --pattern) before the next block's statistics, as the Wanda and STADE code do."
        ),
    ] = False,
    method: Annotated[
        Optional[str],
        typer.Option(
            "--method", "-m", metavar="METHOD", help="Method of --sequential: magnitude, wanda, stade, stade-w or sparsegpt (with --gram).", show_default=False
        ),
    ] = None,
    sparsity: Annotated[
        Optional[float], typer.Option("--sparsity", "-s", metavar="S", help="--sequential: fraction of each row to prune, in [0, 1).", show_default=False)
    ] = None,
    pattern: Annotated[
        Optional[str], typer.Option("--pattern", "-p", metavar="N:M", help="--sequential: prune N of every M consecutive inputs, e.g. 2:4.", show_default=False)
    ] = None,
    grad: Annotated[
        bool,
        typer.Option("--grad", help="Also collect gradient statistics of the language-model loss (for --method hywia), with a layer-streamed backward pass."),
    ] = False,
    grad_mode: Annotated[
        str,
        typer.Option(
            "--grad-mode",
            metavar="streamed|full",
            help="--grad: one block in memory (streamed), or every block loaded and one whole-model backward per sample (full).",
        ),
    ] = "streamed",
    gram: Annotated[
        bool,
        typer.Option(
            "--gram",
            help="Also sum the Gram matrix H = sum of x x^T of every distinct input of the prunable layers (for weight reconstruction), in a second sidecar: n(n+1)/2 float64 per input, gigabytes for a 7B model.",
        ),
    ] = False,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="--sequential with --gram: also update each block's kept weights with the SparseGPT sweep before the next block, as apply --update does.",
        ),
    ] = False,
    gram_out: Annotated[
        Optional[Path],
        typer.Option(
            "--gram-out",
            metavar="PATH",
            parser=path_parser("--gram-out"),
            help="--gram: the Gram sidecar's path.",
            show_default="MODEL/llmprune-gram.safetensors",
        ),
    ] = None,
    gram_dtype: Annotated[
        str,
        typer.Option(
            "--gram-dtype",
            metavar="DTYPE",
            help="--gram: how the matrices are stored, float64 or float32 (half the file; the sums are float64 either way, and SparseGPT computes in float32, so its masks and weights are the same bit for bit).",
        ),
    ] = "float64",
    allocation: Annotated[
        Optional[str],
        typer.Option(
            "--allocation",
            metavar="MODE",
            help="--sequential with --sparsity: uniform, owl (per-block sparsities from a dense pass first, as apply --allocation owl) or a JSON file of per-block sparsities.",
            show_default="uniform",
        ),
    ] = None,
    owl_m: OwlMOpt = None,
    owl_lambda: OwlLambdaOpt = None,
    refine: RefineOpt = None,
    dsnot_iters: DsnotItersOpt = None,
    dsnot_threshold: DsnotThresholdOpt = None,
    dsnot_skip: DsnotSkipOpt = None,
    dsnot_same_sign: DsnotSameSignOpt = False,
    compensate: Annotated[
        bool,
        typer.Option(
            "--compensate",
            help="--sequential: add each pruned linear's lost mean contribution to its bias, (W - W')·mean(x), before the next block, as apply --compensate does.",
        ),
    ] = False,
    teacher_logits: Annotated[
        Optional[int],
        typer.Option(
            "--teacher-logits",
            metavar="K",
            help="Also write the model's top-K next-token log-probabilities at every position of the windows, with their token ids (for finetune --distill).",
            show_default=False,
        ),
    ] = None,
    teacher_out: Annotated[
        Optional[Path],
        typer.Option(
            "--teacher-out",
            metavar="PATH",
            parser=path_parser("--teacher-out"),
            help="--teacher-logits: the teacher sidecar's path.",
            show_default="MODEL/llmprune-teacher.safetensors",
        ),
    ] = None,
    pruned_out: Annotated[
        Optional[Path],
        typer.Option(
            "--pruned-out",
            metavar="DIR",
            parser=path_parser("--pruned-out"),
            help="--sequential: also write the checkpoint this pass prunes to DIR, the same as `apply` with its statistics would; with --gram, each block's Gram matrices are used and dropped, and no Gram file is kept unless --gram-out names one.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Compute activation statistics (the stats sidecar), one decoder block in memory at a time.

    With --grad, also the per-row and per-column gradient estimates that --method hywia fuses
    (computed in float32 unless --dtype says otherwise). With --gram, also each input's Gram matrix.

    Merge sidecars of disjoint calibration sets with `llmprune stats merge A B ... --out C`.
    """
    check_sparsity(sparsity)
    check_int("--nsamples", nsamples)
    check_int("--seqlen", seqlen)
    check_int("--seed", seed, 0, SEED_MAX)
    if allocation == "":
        raise UsageError('--allocation "" is empty', "give uniform, owl or a schedule file")
    announce(model, "torch and transformers, the tokenizer and the calibration text")
    from llmprune.calibration import sidecar
    from llmprune.calibration.activations import collect_stats
    from llmprune.calibration.distributed import init_distributed, shutdown_distributed
    from llmprune.calibration.sequential import Sequential, validate_schedule, validate_sequential
    from llmprune.data.sources import CALIB, describe_source
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import calibration_samples
    from llmprune.model.devices import check_pass_inputs

    seq: Sequential | None = None
    if sequential:
        if method is None:
            raise UsageError("--sequential needs --method", hint="e.g. --sequential --method wanda --sparsity 0.5")
        check_method(method)
        sp, pat = parse_target(sparsity, pattern)
        extras = unstructured_extras(allocation, owl_m, owl_lambda, refine, dsnot_iters, dsnot_threshold, dsnot_skip, pat, dsnot_same_sign)
        refine_kw = {k: extras[k] for k in ("refine", "dsnot_iters", "dsnot_threshold", "dsnot_skip", "dsnot_same_sign")} if refine is not None else None
        if extras.get("block_sparsity") and sp is not None:
            from llmprune._core import schedule_mean_warning

            mean_warning = schedule_mean_warning(extras["block_sparsity"], sp)
            if mean_warning:
                warn(mean_warning)
        seq = Sequential(
            method,
            sp,
            pat,
            update=update,
            allocation=extras["allocation"],
            owl_m=owl_m,
            owl_lambda=owl_lambda,
            block_sparsity=extras.get("block_sparsity"),
            refine=refine_kw,
            compensate=compensate,
        )
        if seq.reconstructs and not gram:
            raise UsageError(f"--sequential {method}{' --update' if update else ''} updates weights from each block's Gram matrices", hint="add --gram")
    elif (
        any(v is not None for v in (method, sparsity, pattern, allocation, owl_m, owl_lambda, refine, dsnot_iters, dsnot_threshold, dsnot_skip))
        or update
        or compensate
        or dsnot_same_sign
    ):
        raise UsageError(
            "--method, --sparsity, --pattern, --update, --allocation, --owl-*, --refine, --dsnot-* and --compensate only apply with --sequential",
            hint="add --sequential, or drop them: dense statistics serve every method",
        )

    if grad:
        if seq is not None:
            raise UsageError("--grad and --sequential cannot be combined", hint="gradient statistics are taken on the dense model")
        if grad_mode not in ("streamed", "full"):
            raise UsageError(f"unknown --grad-mode {grad_mode!r}", hint="use streamed or full")
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise UsageError("--grad runs in one process", hint="launch it without torchrun")
        if dtype == "auto":
            dtype = "float32"
    elif grad_mode != "streamed":
        raise UsageError("--grad-mode applies with --grad only")
    if gram and grad:
        raise UsageError(
            "--gram and --grad cannot be combined",
            hint="take them in two passes: `llmprune stats MODEL --gram`, then `llmprune stats MODEL --grad` "
            "(the second keeps the Gram file and replaces the activation statistics with ones that carry gradients)",
        )
    if pruned_out is not None:
        if seq is None:
            raise UsageError("--pruned-out applies with --sequential only", hint="add --sequential --method M --sparsity S, or run llmprune apply")
        if compensate:
            raise UsageError("--pruned-out cannot write the biases --compensate adds", hint="drop --pruned-out and run llmprune apply after this pass")
        if int(os.environ.get("RANK", "0") or 0) == 0:
            from llmprune.calibration import pruned_out as po

            po.check(model, pruned_out)
    if gram_dtype not in ("float64", "float32"):
        raise UsageError(f"unknown --gram-dtype {gram_dtype!r}", hint="use float64 or float32")
    if gram_dtype != "float64" and not gram:
        raise UsageError("--gram-dtype applies with --gram only", hint="add --gram")
    if gram_out is not None and not gram:
        raise UsageError("--gram-out applies with --gram only", hint="add --gram")
    check_int("--teacher-logits", teacher_logits)
    if teacher_out is not None and teacher_logits is None:
        raise UsageError("--teacher-out applies with --teacher-logits only", hint="add --teacher-logits K")
    if teacher_logits is not None:
        if seq is not None or grad:
            raise UsageError("--teacher-logits are the dense model's: they cannot be combined with --sequential or --grad", hint="take them in a dense pass")
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise UsageError("--teacher-logits runs in one process", hint="launch it without torchrun")
    seqlen_given = seqlen is not None
    seqlen = check_pass_inputs(model, device, dtype, seqlen)
    out_path = Path(out) if out is not None else _default_out(model)
    _check_out(out_path)
    gram_target: Any = None
    if gram and pruned_out is not None and gram_out is None:  # the matrices live only in the pass
        from llmprune.calibration.gram import GramTarget

        gram_target = GramTarget(None)
    elif gram:
        gram_target = _gram_target(model, gram_out, out_path)
    if gram_target is not None:
        gram_target.storage = gram_dtype
    if gram_target is not None and gram_target.path is not None and out_path.is_file():
        err.print(
            f"note: the activation statistics in {out_path} are recomputed in the same pass and replaced "
            "(the Gram matrices need the pass anyway; it adds little to its time)",
            markup=False,
            soft_wrap=True,
        )
    teacher_path = None
    if teacher_logits is not None:
        from llmprune.calibration.teacher import TEACHER_NAME

        teacher_path = Path(teacher_out) if teacher_out is not None else _default_out(model, TEACHER_NAME, "--teacher-out")
        if teacher_path.resolve() in {out_path.resolve(), *([gram_target.path.resolve()] if gram_target is not None and gram_target.path is not None else [])}:
            raise UsageError(
                f"--teacher-out names {teacher_path}, which another output of this pass also names", hint="the teacher logits go into a file of their own"
            )
        _check_out(teacher_path)
    source = describe_source(calib, CALIB)
    if gram_target is not None:
        gram_target.calibration = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    if seq is not None:
        validate_sequential(seq.method, seq.sparsity, seq.pattern, refine=seq.refine)
        if seq.block_sparsity is not None:
            validate_schedule(seq.block_sparsity)
    nsamples_from = ctx.get_parameter_source("nsamples")
    defaults = (nsamples_from is None or nsamples_from.name == "DEFAULT") and not seqlen_given
    if defaults and int(os.environ.get("RANK", "0") or 0) == 0:
        _warn_if_slow_on_cpu(model, device, nsamples, seqlen)

    info = init_distributed(device)
    pruned_writer = None
    try:
        if pruned_out is not None and info.rank == 0:
            from llmprune.calibration.pruned_out import PrunedOutput

            pruned_writer = PrunedOutput(model, pruned_out)
        samples = calibration_samples(calib, load_tokenizer(model), nsamples, seqlen, seed)
        grad_result = None
        if grad:
            from llmprune.calibration.gradients import collect_grad_stats

            grad_result = collect_grad_stats(model, samples, device=device, dtype=dtype, mode=grad_mode, progress=True)
            result = grad_result.stats
        elif teacher_logits is not None:
            from llmprune.calibration.teacher import TeacherCollector
            from llmprune.model.stream import LayerStreamer

            streamer = LayerStreamer(model, device=device, dtype=dtype, with_head=True)
            collector = TeacherCollector(streamer, samples, teacher_logits)
            result = collect_stats(
                model, samples, device=device, dtype=dtype, dist=info, progress=True, gram=gram_target, streamer=streamer, on_hidden=collector
            )
        else:
            result = collect_stats(
                model,
                samples,
                device=device,
                dtype=dtype,
                sequential=seq,
                dist=info,
                progress=True,
                gram=gram_target,
                on_pruned=pruned_writer.add if pruned_writer is not None else None,
            )
        if info.rank == 0:
            sidecar.write(
                out_path,
                model,
                result.layers,
                calibration={"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "tokens": result.tokens},
                mode=result.mode,
                sequential=seq.as_meta() if seq is not None else None,
                grad=grad_result.layers if grad_result is not None else None,
                grad_meta=grad_result.meta(seqlen) if grad_result is not None else None,
                blocks=result.block_cos,
                experts=result.experts,
            )
        pruned_dir = None
        if pruned_writer is not None and seq is not None:
            pruned_dir = pruned_writer.commit(_pruned_provenance(model, seq, {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}))
        teacher_bytes = None
        if teacher_logits is not None and teacher_path is not None:
            from llmprune import _core
            from llmprune.calibration import teacher as T
            from llmprune.model.checkpoint import Checkpoint

            meta = {
                "llmprune_version": _core.__version__,
                "model_fingerprint": Checkpoint(model).fingerprint,
                "vocab_size": int(collector.streamer.config.vocab_size),
                "k": teacher_logits,
                "calibration": {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
            }
            teacher_bytes = T.write(teacher_path, collector.result(meta))
        info.barrier()
    finally:
        if pruned_writer is not None:
            pruned_writer.close()
        shutdown_distributed(info)
    if info.rank != 0:
        return
    if result.unreached:
        warn(
            f"{len(result.unreached)} linears saw no calibration token (e.g. {result.unreached[0]}: an expert nothing was routed to); "
            "they have no statistics, and unstructured methods leave them unpruned"
        )
    if result.uncompensated:
        warn(f"{len(result.uncompensated)} pruned linears have no bias their architecture can load (e.g. {result.uncompensated[0]}); they were not compensated")
    seconds = grad_result.seconds if grad_result is not None else result.seconds
    tps = result.tokens / seconds if seconds > 0 else 0.0
    summary = {
        "out": str(out_path),
        "tokens": result.tokens,
        "blocks": result.blocks,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tps, 1),
        "device": result.device,
    }
    if grad_result is not None:
        summary["grad"] = {"mode": grad_result.mode, "loss": round(grad_result.loss, 6), "nsamples": grad_result.nsamples}
    if result.gram is not None:
        summary["gram"] = {"out": str(result.gram.path), "inputs": result.gram.inputs, "bytes": result.gram.bytes}
    if teacher_bytes is not None:
        summary["teacher"] = {"out": str(teacher_path), "k": teacher_logits, "bytes": teacher_bytes}
    if pruned_dir is not None:
        summary["pruned"] = {"out": str(pruned_dir), "weights_pruned": sum(result.pruned.values())}
    if json_out:
        summary.update({"layers": len(result.layers), "dtype": result.dtype, "world_size": result.world_size, "mode": result.mode})
        print_json(summary)
        return
    procs = f" x {result.world_size} processes" if result.world_size > 1 else ""
    typer.echo(
        f"wrote {out_path}: statistics of {len(result.layers)} weights over {result.tokens:,} tokens "
        f"({result.blocks} blocks, {seconds:.1f} s, {tps:,.0f} tokens/s on {result.device}{procs})"
        + (f"; gradient statistics ({grad_result.mode} backward, mean loss {grad_result.loss:.4f})" if grad_result is not None else "")
        + (f"; Gram matrices of {result.gram.inputs} inputs ({_size(result.gram.bytes)}) in {result.gram.path}" if result.gram is not None else "")
        + (f"; teacher top-{teacher_logits} log-probabilities ({_size(teacher_bytes)}) in {teacher_path}" if teacher_bytes is not None else "")
    )
    if pruned_dir is not None:
        typer.echo(f"wrote {pruned_dir}: the checkpoint this pass pruned ({sum(result.pruned.values()):,} weights zeroed)")


def _pruned_provenance(model: Path, seq: Any, calibration: dict[str, Any]) -> dict[str, Any]:
    """What the output of --pruned-out records of how it was made (the shards' `llmprune` metadata)."""
    from llmprune import _core
    from llmprune.model.checkpoint import Checkpoint

    target = {"pattern": f"{seq.pattern[0]}:{seq.pattern[1]}"} if seq.pattern is not None else {"sparsity": seq.sparsity}
    return {
        "llmprune_version": _core.__version__,
        "method": seq.method,
        **target,
        "update": "sparsegpt" if seq.reconstructs else None,
        "sequential": seq.as_meta(),
        "calibration": calibration,
        "written_by": "stats --sequential --pruned-out",
        "source_fingerprint": Checkpoint(model).fingerprint,
    }


def _gram_target(model: Path, gram_out: Path | None, stats_out: Path) -> Any:
    """Where --gram writes (checked now, before the pass)."""
    from llmprune.calibration.gram import GramTarget, gram_name

    path = Path(gram_out) if gram_out is not None else _default_out(model, gram_name(), "--gram-out")
    if path.resolve() == stats_out.resolve():
        raise UsageError(f"--gram-out and --out both name {path}", hint="the Gram matrices go into a file of their own")
    _check_out(path)
    return GramTarget(path)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def merge_cmd(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="SIDECAR...", parser=path_parser("SIDECAR"), help="Sidecars of one model computed on disjoint calibration sets.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", parser=path_parser("--out"), help="The merged sidecar.", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Add up sidecars of one model computed on disjoint calibration sets."""
    from llmprune.calibration import sidecar

    t0 = time.perf_counter()
    summary = sidecar.merge(list(inputs), out)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    gram = summary["format"] == "llmprune-gram"  # Gram sidecars: `layers` counts their inputs
    if summary["mode"] != "dense":
        warn(
            "these statistics were taken in sequential mode, each run pruning with its own statistics; the sum only approximates one sequential run over all samples"
        )
    if json_out:
        print_json(summary)
        return
    what = ("Gram sidecars", "inputs") if gram else ("sidecars", "weights")
    typer.echo(f"merged {len(summary['inputs'])} {what[0]} into {summary['out']} ({summary['layers']} {what[1]}, {summary['tokens']:,} tokens)")


def register(app: typer.Typer) -> None:
    stats_app = typer.Typer(
        cls=_StatsGroup,
        name="stats",
        add_completion=False,
        rich_markup_mode=None,  # click's plain layout: nothing cut or swallowed at 80 columns
        context_settings={"help_option_names": ["-h", "--help"]},
        help="Compute activation statistics (the stats sidecar), or merge sidecars.",
        short_help="Compute activation statistics, or merge sidecars.",
    )
    stats_app.command(DEFAULT_COMMAND, cls=_DefaultCommand, hidden=True, no_args_is_help=True, epilog=STATS_EPILOG)(stats_cmd)
    stats_app.command("merge", no_args_is_help=True, epilog=MERGE_EPILOG)(merge_cmd)
    app.add_typer(stats_app, name="stats")
