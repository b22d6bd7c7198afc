"""`llmprune finetune MODEL`: LoRA recovery fine-tuning of a pruned checkpoint, merged into a new one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune.cli.options import SEED_MAX, DeviceOpt, JsonOpt, ModelArg, announce, check_int, check_real, given_options, path_parser
from llmprune.console import count_progress, peak_rss_mib, print_json
from llmprune.errors import UsageError

DEFAULT_SEQLEN = 256  # LLM-Pruner's cutoff length
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FINETUNE_EPILOG = """Examples:

\b
# built-in text: State of the Union addresses, 1900-1949
llmprune finetune ./model-flap-0.2
llmprune finetune ./model-wanda-sp-0.3 --data c4 --nsamples 1024 --epochs 2
llmprune finetune ./model --data notes.txt --steps 200 --rank 16 --alpha 32

\b
llmprune finetune ./model-flap-0.2 --out ./model-tuned --json
"""


def default_out(model: Path) -> Path:
    return model.resolve().parent / f"{model.resolve().name}-lora"


def finetune_cmd(
    ctx: typer.Context,
    model: ModelArg,
    data_src: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            metavar="SRC",
            help="Training text: sotu (built-in, offline; the 1900-1949 calibration split), c4, wikitext2, or a .txt / .jsonl path. Never the evaluation split.",
            show_default="sotu",
        ),
    ] = None,
    nsamples: Annotated[int, typer.Option("--nsamples", metavar="N", help="Random windows of text to train on.")] = 256,
    seqlen: Annotated[
        Optional[int], typer.Option("--seqlen", metavar="L", help="Tokens per window.", show_default=f"{DEFAULT_SEQLEN}, or the model's context if shorter")
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option("--steps", metavar="N", help="Optimizer steps (cycling through the windows); instead of --epochs.", show_default=False)
    ] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", metavar="N", help="Passes over the windows.", show_default="1")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", metavar="N", help="Windows per optimizer step.")] = 4,
    lr: Annotated[float, typer.Option("--lr", metavar="LR", help="AdamW learning rate (constant).")] = 1e-4,
    rank: Annotated[int, typer.Option("--rank", "-r", metavar="R", help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", metavar="A", help="LoRA alpha (the update is scaled by alpha / rank).")] = 16.0,
    dropout: Annotated[float, typer.Option("--dropout", metavar="P", help="Dropout on the LoRA input.")] = 0.05,
    targets: Annotated[
        Optional[str],
        typer.Option("--targets", metavar="NAMES", help="Comma-separated names of the block linears to adapt.", show_default=", ".join(DEFAULT_TARGETS)),
    ] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the text windows, the LoRA initialization and the batch order.")] = 0,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", metavar="DIR", parser=path_parser("--out"), help="Output directory.", show_default="MODEL-lora beside MODEL"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing non-empty output directory.")] = False,
    distill: Annotated[
        Optional[Path],
        typer.Option(
            "--distill",
            metavar="TEACHER",
            parser=path_parser("--distill"),
            help="Distil from a teacher-logit sidecar (llmprune stats DENSE --teacher-logits K): train on its windows, minimizing the KL divergence to the teacher's top-K distribution.",
            show_default=False,
        ),
    ] = None,
    distill_alpha: Annotated[
        float,
        typer.Option("--distill-alpha", metavar="A", help="--distill: the loss is A x KL + (1 - A) x next-token loss."),
    ] = 1.0,
    full: Annotated[
        bool,
        typer.Option("--full", help="Train the --targets weights themselves instead of LoRA adapters (every zero weight stays zero)."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Recover the quality of a pruned model: train LoRA adapters on calibration text (as LLM-Pruner's
    recovery stage does), merge them and write a checkpoint of the same tensors, shapes and dtypes.

    Trains in float32 on the CPU; on CUDA under bfloat16 autocast with float32 weights."""
    from llmprune import finetune as ft

    given = given_options(ctx, ("rank", "alpha", "dropout", "data_src", "nsamples", "seqlen", "distill_alpha"))
    if full and given & {"--rank", "--alpha", "--dropout"}:
        raise UsageError("--rank, --alpha and --dropout set LoRA adapters, which --full does not use", hint="drop them, or drop --full")
    if distill is None and "--distill-alpha" in given:
        raise UsageError("--distill-alpha applies with --distill only", hint="add --distill TEACHER")
    if distill is not None and given & {"--data-src", "--nsamples", "--seqlen"}:
        raise UsageError("with --distill the windows are the teacher sidecar's: --data, --nsamples and --seqlen do not apply", hint="drop them")
    check_real("--distill-alpha", distill_alpha, lo=0, hi=1)
    lora = _lora_settings(rank, alpha, dropout, targets)
    for flag, value in (("--nsamples", nsamples), ("--batch-size", batch_size), ("--steps", steps), ("--epochs", epochs)):
        check_int(flag, value)
    check_int("--seqlen", seqlen, 2)
    check_int("--seed", seed, 0, SEED_MAX)
    check_real("--lr", lr, lo=0, lo_open=True)
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if not full:
        ft.require_peft()
    announce(model, f"torch and transformers, the whole model and {'the teacher sidecar' if distill is not None else 'the training text'}")

    from llmprune import _core
    from llmprune.data.sources import CALIB, describe_source
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import calibration_samples
    from llmprune.model.checkpoint import Checkpoint
    from llmprune.model.devices import resolve_device, window_length
    from llmprune.model.skeleton import load_config

    t0 = time.perf_counter()
    ckpt = Checkpoint(model)
    dev = resolve_device(device)
    seqlen = window_length(load_config(ckpt.dir), seqlen, default=DEFAULT_SEQLEN)
    # the output location is checked (and its staging directory made) before the training starts
    with _core.StagingDir(str(model), str(out if out is not None else default_out(model)), force) as staging:
        teacher = _teacher(distill, ckpt, model) if distill is not None else None
        net, loader = ft.load_model(model)
        ft.target_modules(net, lora)  # a bad --targets is reported before the text is read
        if teacher is not None:
            samples = teacher.input_ids
            nsamples, seqlen = int(samples.shape[0]), int(samples.shape[1])
            source = f"teacher {distill} ({teacher.meta.get('calibration', {}).get('source', '?')})"
            if teacher.meta.get("vocab_size") != getattr(net.config, "vocab_size", None):
                raise UsageError(f"the teacher's vocabulary ({teacher.meta.get('vocab_size')}) is not the model's ({getattr(net.config, 'vocab_size', None)})")
        else:
            source = describe_source(data_src, CALIB)
            samples = calibration_samples(data_src, load_tokenizer(model), nsamples, seqlen, seed)
        total = steps if steps is not None else (epochs or 1) * -(-nsamples // batch_size)
        train = ft.TrainSettings(steps=total, batch_size=batch_size, lr=lr, seed=seed)

        with count_progress() as bar:
            task = bar.add_task("fine-tuning", total=total, detail="")
            merged, result = ft.train_lora(
                net,
                samples,
                None if full else lora,
                train,
                dev,
                on_step=lambda step, loss: bar.update(task, completed=step, detail=f"loss {loss:.4f}"),
                distill=ft.Distill(teacher, distill_alpha) if teacher is not None else None,
                full_targets=lora.targets,
            )
        method = "full" if full else "lora"
        provenance = {
            "llmprune_version": _core.__version__,
            "method": method,
            **({} if full else {"rank": rank, "alpha": alpha, "dropout": dropout}),
            "loss": "distill" if teacher is not None else "next-token",
            **(
                {"distill_alpha": distill_alpha, "teacher_k": teacher.k, "teacher_fingerprint": teacher.meta["model_fingerprint"]}
                if teacher is not None
                else {}
            ),
            "targets": list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in result.modules)),
            "steps": total,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "data": source,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "tokens": result.tokens,
            "final_loss": result.loss_last(),
            "source_fingerprint": ckpt.fingerprint,
        }
        changed = ft.changed_weights(merged, result.modules, ckpt)
        ft.check_weights(changed, ckpt, lr)
        ft.write_checkpoint(ckpt, changed, Path(staging.path), provenance)
        ft.check_same_layout(ckpt, Path(staging.path))
        out_dir = staging.commit()
    summary = {
        "method": method,
        "loss": provenance["loss"],
        "out": str(out_dir),
        "steps": total,
        "epochs": round(total * batch_size / nsamples, 4),
        "tokens": result.tokens,
        "loss_first": result.loss_first(),
        "loss_last": result.loss_last(),
        "seconds_training": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "device": str(dev),
        "precision": result.precision,
        "loader": loader,
        "data": source,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "batch_size": batch_size,
        "lr": lr,
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "targets": provenance["targets"],
        "modules": len(result.modules),
        "trainable_params": result.trainable_params,
        "seed": seed,
        "peak_rss_mib": peak_rss_mib(),
    }
    if json_out:
        print_json(summary)
        return
    window = result.window()
    typer.echo(
        f"{'full' if full else f'lora r={rank}'}{' distillation' if teacher is not None else ''} on {len(result.modules)} linears: {total} steps, {result.tokens:,} tokens of {source} on {dev}; "
        f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} (mean of the first / last {window} steps); "
        f"wrote {out_dir} in {summary['seconds']:.1f} s"
    )


def _teacher(path: Path, ckpt, model: Path):
    """The teacher sidecar, checked to be of the model this checkpoint was pruned from (its
    fingerprint, or one its provenance records as a source)."""
    from llmprune.calibration import teacher as T
    from llmprune.reconstruct import provenance_chain

    t = T.read(path)
    fp = t.meta["model_fingerprint"]
    chain = provenance_chain(ckpt.dir, ckpt.files)
    sources = {ckpt.fingerprint} | {p.get(key) for p in chain for key in ("source_fingerprint", "dense_fingerprint")}
    if fp not in sources:
        raise UsageError(
            f"the teacher logits in {path} are of another model than {model} was pruned from (fingerprint {fp[:16]}…)",
            hint="take them from the dense model: llmprune stats DENSE --teacher-logits K",
        )
    return t


def _lora_settings(rank: int, alpha: float, dropout: float, targets: str | None):
    from llmprune.finetune import LoraSettings

    check_int("--rank", rank)
    check_real("--alpha", alpha, lo=0, lo_open=True)
    check_real("--dropout", dropout, lo=0, hi=1, hi_open=True)
    if targets is None:
        return LoraSettings(rank, alpha, dropout, DEFAULT_TARGETS, targets_given=False)
    names = tuple(dict.fromkeys(t.strip() for t in targets.split(",") if t.strip()))
    if not names:
        raise UsageError("--targets names no layer", hint=f"e.g. --targets {','.join(DEFAULT_TARGETS[:4])}")
    return LoraSettings(rank, alpha, dropout, names, targets_given=True)


def register(app: typer.Typer) -> None:
    app.command("finetune", no_args_is_help=True, epilog=FINETUNE_EPILOG, short_help="LoRA recovery fine-tuning of a pruned checkpoint.")(finetune_cmd)
