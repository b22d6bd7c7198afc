"""`llmprune reconstruct PRUNED --dense MODEL`: block-by-block reconstruction of a pruned checkpoint
against the dense model it was pruned from (llmprune/reconstruct.py), written as a new checkpoint."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune.cli.options import SEED_MAX, CalibOpt, DeviceOpt, JsonOpt, ModelArg, announce, check_int, check_real, path_parser
from llmprune.console import peak_rss_mib, print_json, warn
from llmprune.errors import UsageError

DEFAULT_NSAMPLES = 16
DEFAULT_SEQLEN = 512

RECONSTRUCT_EPILOG = """Examples:

\b
llmprune apply ./model --method wanda --pattern 2:4 --out ./model-2of4
llmprune reconstruct ./model-2of4 --dense ./model
llmprune reconstruct ./model-flap-0.2 --dense ./model --steps 40 --lr 1e-3 \\
    --out ./model-flap-rec

\b
# data-parallel over 4 GPUs (each rank holds a share of the windows)
torchrun --nproc-per-node 4 -m llmprune reconstruct ./model-2of4 \\
    --dense ./model --nsamples 128
"""


def default_out(model: Path) -> Path:
    return model.resolve().parent / f"{model.resolve().name}-rec"


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def reconstruct_cmd(
    model: ModelArg,
    dense: Annotated[
        Path,
        typer.Option(
            "--dense", metavar="MODEL", parser=path_parser("--dense"), help="The dense checkpoint PRUNED was pruned from (the targets).", show_default=False
        ),
    ],
    calib: CalibOpt = None,
    nsamples: Annotated[int, typer.Option("--nsamples", "-n", metavar="N", help="Number of calibration windows.")] = DEFAULT_NSAMPLES,
    seqlen: Annotated[
        Optional[int],
        typer.Option("--seqlen", metavar="L", help="Tokens per window.", show_default=f"{DEFAULT_SEQLEN}, or the model's context if shorter"),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the window sampling and of the batch order.")] = 0,
    steps: Annotated[int, typer.Option("--steps", metavar="K", help="Adam steps per stage of each block (0: copy PRUNED unchanged).")] = 20,
    lr: Annotated[float, typer.Option("--lr", metavar="LR", help="Adam learning rate.")] = 2e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", metavar="N", help="Windows per step.")] = 4,
    granularity: Annotated[
        str,
        typer.Option(
            "--granularity",
            metavar="sublayer|block",
            help="sublayer: the attention (on the residual stream after it), then the MLP (on the block's output); block: all of a block's linears at once.",
        ),
    ] = "sublayer",
    inputs: Annotated[
        str,
        typer.Option(
            "--inputs",
            metavar="pruned|dense",
            help="Each block's inputs: the outputs of the blocks reconstructed so far (pruned), or the dense model's (dense).",
        ),
    ] = "pruned",
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", metavar="DTYPE", help="The dense model's compute dtype: auto (checkpoint dtype on GPU, float32 on CPU), float32, bfloat16 or float16."
        ),
    ] = "auto",
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", metavar="DIR", parser=path_parser("--out"), help="Output directory.", show_default="PRUNED-rec beside PRUNED"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing non-empty output directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Win back what pruning lost: fit each pruned block's kept weights to the dense block's outputs
    with Adam, one block at a time, every pruned weight staying zero (masks and N:M patterns kept,
    structured shapes unchanged). The pruned block's inputs are the reconstructed blocks' outputs.

    The weights are optimized in float32 (GPU when present, CPU otherwise); a block stage whose loss
    does not go down keeps its weights."""
    from llmprune import reconstruct as rc

    check_int("--nsamples", nsamples)
    check_int("--seqlen", seqlen, 2)
    check_int("--seed", seed, 0, SEED_MAX)
    check_int("--steps", steps, 0)
    check_int("--batch-size", batch_size)
    check_real("--lr", lr, lo=0, lo_open=True)
    if granularity not in rc.GRANULARITIES:
        raise UsageError(f"unknown --granularity {granularity!r}", hint="use sublayer or block")
    if inputs not in rc.INPUTS:
        raise UsageError(f"unknown --inputs {inputs!r}", hint="use pruned or dense")
    target = out if out is not None else default_out(model)
    if _inside(target, dense) or _inside(dense, target):
        raise UsageError(f"--out {target} and --dense {dense} overlap", hint="write the reconstructed checkpoint elsewhere")
    if dense.resolve() == model.resolve():
        raise UsageError("PRUNED and --dense name the same checkpoint", hint="--dense is the model PRUNED was pruned from")
    announce(model, "torch and transformers, the tokenizer and the calibration text, then the two models block by block")

    from llmprune import _core
    from llmprune import finetune as ft
    from llmprune.calibration.distributed import init_distributed, shutdown_distributed
    from llmprune.data.sources import CALIB, describe_source
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import calibration_samples
    from llmprune.model.checkpoint import Checkpoint
    from llmprune.model.devices import check_pass_inputs, resolve_device, window_length
    from llmprune.model.skeleton import load_config

    t0 = time.perf_counter()
    ckpt = Checkpoint(model)
    check_pass_inputs(dense, device, dtype, None)  # the dense checkpoint, --device and --dtype
    seqlen = window_length(load_config(dense), seqlen, default=DEFAULT_SEQLEN)
    settings = rc.Settings(steps=steps, lr=lr, batch_size=batch_size, granularity=granularity, inputs=inputs, seed=seed)
    source = describe_source(calib, CALIB)
    info = init_distributed(device)
    try:
        pair = rc.open_pair(model, dense, device=device, dtype=dtype, dist=info)  # a mismatched pair is refused first
        # the output location is checked (and its staging directory made) before the long pass
        staging = _core.StagingDir(str(model), str(target), force) if info.rank == 0 else None
        try:
            spill_dir = Path(staging.path) / ".llmprune-blocks" if staging is not None else None
            if spill_dir is not None:
                spill_dir.mkdir()
            spilled = rc.SpilledTensors(spill_dir) if spill_dir is not None else None
            samples = calibration_samples(calib, load_tokenizer(dense), nsamples, seqlen, seed)
            if steps == 0:
                result = rc.Result(device=str(resolve_device(device)))
            else:
                result = rc.reconstruct(
                    pair,
                    samples,
                    settings,
                    spill=(lambda k, t: spilled.add(k, t)) if spilled is not None else (lambda k, t: None),
                    dist=info,
                    progress=True,
                )
            info.barrier()
            if staging is None:
                return
            assert spilled is not None and spill_dir is not None
            tokens = int(samples.numel())
            kept = sum(st.kept for st in result.stages)
            provenance = {
                "llmprune_version": _core.__version__,
                "method": "reconstruct",
                "granularity": granularity,
                "inputs": inputs,
                "steps": steps,
                "lr": lr,
                "batch_size": batch_size,
                "seed": seed,
                "data": source,
                "nsamples": nsamples,
                "seqlen": seqlen,
                "tokens": tokens,
                "stages_kept": f"{kept}/{len(result.stages)}",
                "dense_fingerprint": pair.dense.ckpt.fingerprint,
                "source_fingerprint": ckpt.fingerprint,
            }
            ft.check_weights(spilled, ckpt, lr)
            ft.write_checkpoint(ckpt, spilled, Path(staging.path), provenance)
            shutil.rmtree(spill_dir)
            ft.check_same_layout(ckpt, Path(staging.path))
            out_dir = staging.commit()
        finally:
            if staging is not None:
                staging.close()
    finally:
        shutdown_distributed(info)
    not_kept = [st for st in result.stages if not st.kept]
    if not_kept:
        s = not_kept[0]
        warn(
            f"{len(not_kept)} of {len(result.stages)} block stages did not lower their loss and keep their weights "
            f"(e.g. block {s.block} {s.stage}: {s.before:.4g} -> {s.after:.4g}); a smaller --lr may help"
        )
    summary = {
        "method": "reconstruct",
        "out": str(out_dir),
        "dense": str(dense),
        "granularity": granularity,
        "inputs": inputs,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "tokens": tokens,
        "data": source,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "blocks": len({st.block for st in result.stages}),
        "stages": [st.as_dict() for st in result.stages],
        "stages_kept": kept,
        "tensors_rewritten": len(result.changed),
        "loss_before": _mean([st.before for st in result.stages]),
        "loss_after": _mean([st.after if st.kept else st.before for st in result.stages]),
        "seconds_reconstruct": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "device": result.device,
        "world_size": result.world_size,
        "activations": result.activations,
        "peak_rss_mib": peak_rss_mib(),
    }
    if json_out:
        print_json(summary)
        return
    typer.echo(
        f"reconstructed {summary['blocks']} blocks ({kept} of {len(result.stages)} stages improved; mean block loss "
        f"{summary['loss_before']:.4g} -> {summary['loss_after']:.4g}) on {tokens:,} tokens of {source} on {result.device}; "
        f"wrote {out_dir} in {summary['seconds']:.1f} s"
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def register(app: typer.Typer) -> None:
    app.command(
        "reconstruct", no_args_is_help=True, epilog=RECONSTRUCT_EPILOG, short_help="Reconstruct a pruned checkpoint block by block against the dense model."
    )(reconstruct_cmd)
