"""`llmprune search MODEL --method M`: EvoPress's search for where to cut (llmprune/search.py): each
block's sparsity (unstructured), width (structured) or which blocks to remove (depth), written as a
schedule file that `apply --allocation FILE` takes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmprune.cli.options import (
    SEED_MAX,
    CalibOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    check_int,
    check_real,
    check_sparsity,
    given_options,
    path_parser,
    schedule_document,
)
from llmprune.cli.search_defaults import DEFAULT_LEVELS, DEFAULT_NSAMPLES, DEFAULT_SEQLEN, DEFAULT_TOPK, DEPTH_DEFAULTS, UNSTRUCTURED_DEFAULTS
from llmprune.console import count_progress, err, peak_rss_mib, print_json, warn
from llmprune.errors import InterruptedWithResult, UsageError

SCHEDULE_FORMAT = "llmprune-schedule"  # options.schedule_document reads it
SCHEDULE_VERSION = 1
SEARCH_EPILOG = """Examples:

\b
llmprune stats ./model
llmprune search ./model --method wanda --sparsity 0.7 --out wanda70.json
llmprune apply ./model --method wanda --sparsity 0.7 --allocation wanda70.json

\b
# each block's width (structured, 20% of the blocks' parameters)
llmprune search ./model --method flap --sparsity 0.2 --out flap20.json
llmprune apply ./model --method flap --allocation flap20.json

\b
# which 6 blocks to remove
llmprune search ./model --method block-influence --remove-blocks 6 \\
    --out drop6.json
llmprune apply ./model --method block-influence --allocation drop6.json

\b
# EvoPress's own settings for a 7B model on a GPU
llmprune search ./model --method wanda --sparsity 0.7 --generations 400 \\
    --offspring 64 --survivors 8,2,1 --tokens 2048,16384,65536 \\
    --nsamples 128 --seqlen 4096
"""


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of whole numbers", hint=f"e.g. {flag} 4,1") from None
    for v in values:
        check_int(flag, v)
    return values


def default_out(model: Path, method: str, target: str) -> Path:
    return model.resolve().parent / f"{model.resolve().name}-{method}-{target}-schedule.json"


def write_schedule(path: Path, doc: dict[str, Any]) -> None:
    """Atomically: a temporary file beside it, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _warn_if_slow_on_cpu(model: Path, device: str, settings: Any, nsamples: int, seqlen: int, kept_blocks: float) -> None:
    """A search runs thousands of forward passes of a few windows each: on a CPU say about how long,
    and that Ctrl-C keeps the best schedule so far."""
    from llmprune.calibration.estimate import duration, search_seconds
    from llmprune.cli.stats import SLOW_CPU_SECONDS
    from llmprune.model.devices import resolve_device

    if resolve_device(device).type != "cpu":
        return
    seconds = search_seconds(
        model,
        generations=settings.generations,
        offspring=settings.offspring,
        survivors=settings.survivors,
        tokens=settings.tokens,
        nsamples=nsamples,
        seqlen=seqlen,
        initial=settings.initial,
        initial_tokens=settings.initial_tokens,
        kept_blocks=kept_blocks,
    )
    if seconds >= SLOW_CPU_SECONDS:
        warn(
            f"{settings.generations} generations take about {duration(seconds)} on this CPU; Ctrl-C stops the search "
            "and writes the best schedule found so far, or pass fewer --generations"
        )


def structured_builder(streamer: Any, model: Path, method: str, stats: Path | None, width_multiple: int, space: Any, sparsity_of: Any) -> Any:
    """The builder of a structured search's candidates, its extreme levels checked on every block
    before the search starts (a level that would empty a block's attention or MLP is an error now,
    not in generation 40)."""
    from llmprune import _core
    from llmprune import search as sr

    planner = _core.StructuredPlanner(str(model), method, width_multiple=width_multiple, stats=str(stats) if stats is not None else None)
    for w in planner.warnings:
        warn(w)
    builder = sr.StructuredLevels(streamer, planner, sparsity_of)
    for i in range(space.blocks):
        for level in (space.lo[i], space.hi[i]):
            try:
                builder.plan(i, level)
            except _core.LlmpruneError as exc:
                raise UsageError(
                    f"level {level:+d} (sparsity {sparsity_of(level):g}) is out of reach for block {i}: {exc}",
                    hint="pass fewer --levels or a smaller --step",
                ) from None
    return builder


def search_cmd(
    ctx: typer.Context,
    model: ModelArg,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            metavar="METHOD",
            help="An unstructured method (magnitude, wanda, stade, stade-w, sparsegpt), a structured one (flap, wanda-sp, magnitude-sp, hywia) or block-influence (depth).",
            show_default=False,
        ),
    ],
    sparsity: Annotated[
        Optional[float],
        typer.Option(
            "--sparsity",
            "-s",
            metavar="S",
            help="Unstructured: the mean sparsity of the blocks. Structured: the share of the decoder blocks' parameters removed. Depth: the fraction of blocks removed.",
            show_default=False,
        ),
    ] = None,
    remove_blocks: Annotated[
        Optional[int], typer.Option("--remove-blocks", metavar="N", help="Depth: the number of blocks to remove.", show_default=False)
    ] = None,
    calib: CalibOpt = None,
    nsamples: Annotated[
        int, typer.Option("--nsamples", "-n", metavar="N", help="Calibration windows (the pool each selection step draws from).")
    ] = DEFAULT_NSAMPLES,
    seqlen: Annotated[
        Optional[int], typer.Option("--seqlen", metavar="L", help="Tokens per window.", show_default=f"{DEFAULT_SEQLEN}, or the model's context if shorter")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the window sampling and of the search.")] = 0,
    generations: Annotated[
        Optional[int], typer.Option("--generations", metavar="N", help="Generations of the search.", show_default="50; depth: k(n-k)/1.5 for k of n blocks")
    ] = None,
    offspring: Annotated[Optional[int], typer.Option("--offspring", metavar="N", help="Offspring per generation.", show_default="16")] = None,
    survivors: Annotated[
        Optional[str], typer.Option("--survivors", metavar="N,..", help="Survivors of each selection step (the last is 1).", show_default="4,1; depth 2,1")
    ] = None,
    tokens: Annotated[
        Optional[str],
        typer.Option("--tokens", metavar="T,..", help="Calibration tokens of each selection step (whole windows).", show_default="256,1024"),
    ] = None,
    levels: Annotated[
        int, typer.Option("--levels", metavar="N", help="Unstructured and structured: levels on each side of the target sparsity.")
    ] = DEFAULT_LEVELS,
    step: Annotated[
        Optional[float],
        typer.Option("--step", metavar="F", help="Unstructured and structured: sparsity between two levels.", show_default="min(S, 1-S) / --levels"),
    ] = None,
    width_multiple: Annotated[
        Optional[int],
        typer.Option(
            "--width-multiple", metavar="N", help="Structured: round each block's kept MLP width to a multiple of N, as apply does.", show_default="1"
        ),
    ] = None,
    topk: Annotated[
        Optional[int],
        typer.Option(
            "--topk",
            metavar="K",
            help="The dense model's top-K log-probabilities the fitness (KL divergence) compares with.",
            show_default=f"{DEFAULT_TOPK}, or the vocabulary if smaller",
        ),
    ] = None,
    stats: Annotated[
        Optional[Path],
        typer.Option("--stats", metavar="PATH", parser=path_parser("--stats"), help="Stats sidecar.", show_default="MODEL/llmprune-stats.safetensors"),
    ] = None,
    update: Annotated[
        bool, typer.Option("--update", help="Score each level with the kept weights updated by the SparseGPT sweep, as apply --update (needs --gram).")
    ] = False,
    gram: Annotated[
        Optional[Path],
        typer.Option(
            "--gram",
            metavar="PATH",
            parser=path_parser("--gram"),
            help="sparsegpt and --update: the Gram sidecar.",
            show_default="MODEL/llmprune-gram.safetensors",
        ),
    ] = None,
    damp: Annotated[float, typer.Option("--damp", metavar="F", help="sparsegpt and --update: dampening, a multiple of the Gram diagonal's mean.")] = 0.01,
    blocksize: Annotated[int, typer.Option("--blocksize", metavar="N", help="sparsegpt and --update: columns per block of the sweep.")] = 128,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            parser=path_parser("--out"),
            help="Schedule file to write.",
            show_default="MODEL-METHOD-TARGET-schedule.json beside MODEL",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing schedule file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Choose where to cut by search: EvoPress's evolutionary search for each decoder block's
    sparsity (unstructured methods, mean sparsity S), each block's width (structured methods, mean
    share S of the blocks' parameters) or for which blocks to remove (depth), scored by
    the KL divergence of the pruned model's next-token distribution from the dense model's, layer
    streamed. Writes a schedule file for `apply --allocation FILE`. Ctrl-C writes the best schedule
    found so far."""
    from llmprune import _core
    from llmprune import search as sr
    from llmprune.methods import method_registry, methods

    unstructured, depth, structured = methods("unstructured"), methods("depth"), methods("structured")
    if method not in unstructured + depth + structured:
        if method in methods("experts"):
            raise UsageError(f"search does not cover {method} yet", hint=f"search with {', '.join(unstructured + structured + depth)}")
        raise UsageError(f"unknown --method {method!r}", hint=f"choose one of {', '.join(unstructured + structured + depth)}")
    is_structured = method in structured
    if width_multiple is not None and not is_structured:
        raise UsageError(f"--width-multiple applies to the structured methods ({', '.join(structured)}), not to {method}")
    sweep = method == "sparsegpt" or update
    if update and method not in unstructured:
        raise UsageError(f"--update applies to unstructured methods, not to {method}")
    if not sweep:
        unused = [f for f in ("--gram", "--damp", "--blocksize") if f in given_options(ctx, ("gram", "damp", "blocksize"))]
        if unused:
            raise UsageError(f"{', '.join(unused)} apply to sparsegpt and --update, not to {method} alone", hint="add --update, or drop them")
    check_real("--damp", damp, lo=0, hi=10, lo_open=True)
    check_int("--blocksize", blocksize)
    check_sparsity(sparsity)
    check_int("--remove-blocks", remove_blocks)
    check_int("--nsamples", nsamples)
    check_int("--seqlen", seqlen, 2)
    check_int("--seed", seed, 0, SEED_MAX)
    check_int("--generations", generations)
    check_int("--offspring", offspring)
    check_int("--levels", levels)
    check_int("--topk", topk)
    check_int("--width-multiple", width_multiple)
    check_real("--step", step, lo=0, hi=1, lo_open=True, hi_open=True)
    is_depth = method in depth
    if is_depth:
        if (sparsity is None) == (remove_blocks is None):
            raise UsageError(f"{method} needs exactly one of --sparsity S (the fraction of blocks) or --remove-blocks N")
        if step is not None or levels != DEFAULT_LEVELS:
            raise UsageError("--levels and --step apply to unstructured methods; depth search keeps or removes each block")
    else:
        if remove_blocks is not None:
            raise UsageError(f"--remove-blocks applies to {', '.join(depth)}, not to {method}")
        if sparsity is None or sparsity == 0:
            raise UsageError(f"search with {method} needs --sparsity S, the blocks' mean sparsity", hint="e.g. --sparsity 0.7")
    defaults = DEPTH_DEFAULTS if is_depth else UNSTRUCTURED_DEFAULTS
    surv = _int_list("--survivors", survivors or str(defaults["survivors"]))
    toks = _int_list("--tokens", tokens or str(defaults["tokens"]))
    if stats is not None and stats.is_dir():
        raise UsageError(f"--stats {stats} is a directory, not a sidecar file", "give the sidecar's path to --stats")

    from llmprune.calibration import sidecar as sc_mod
    from llmprune.data.sources import CALIB, describe_source
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import calibration_samples
    from llmprune.model.checkpoint import Checkpoint
    from llmprune.model.devices import check_pass_inputs, window_length
    from llmprune.model.skeleton import load_config

    t0 = time.perf_counter()
    ckpt = Checkpoint(model)
    check_pass_inputs(model, device, dtype, None)
    seqlen = window_length(load_config(model), seqlen, default=DEFAULT_SEQLEN)
    kind = "depth" if is_depth else "structured" if is_structured else "unstructured"
    needs = next(m for m in method_registry()[kind] if m["name"] == method).get("needs_stats", True)
    stats_path = stats if stats is not None else model / sc_mod.SIDECAR_NAME
    sidecar = None
    # structured: the core's planner finds, reads and checks the sidecar itself
    if not is_structured and (stats is not None or (needs and not is_depth) or stats_path.is_file()):
        if not stats_path.is_file():
            raise UsageError(f"method {method} needs activation statistics, and {model} has no {sc_mod.SIDECAR_NAME}", hint="run llmprune stats MODEL first")
        sidecar = sc_mod.read(stats_path)
        if sidecar.meta.get("model_fingerprint") != ckpt.fingerprint:
            raise UsageError(f"{stats_path} was computed for another model (its fingerprint differs)", hint="rerun llmprune stats MODEL")

    from llmprune.model.stream import LayerStreamer

    streamer = LayerStreamer(model, device=device, dtype=dtype, with_head=True)
    nb = streamer.num_blocks
    vocab = int(getattr(streamer.config, "vocab_size", 0) or 0)
    if topk is not None and vocab and topk > vocab:
        raise UsageError(f"--topk {topk} exceeds the model's vocabulary of {vocab} tokens", hint=f"pass --topk {vocab} or less")
    topk = topk if topk is not None else min(DEFAULT_TOPK, vocab or DEFAULT_TOPK)
    if is_depth:
        k = remove_blocks if remove_blocks is not None else int(sparsity * nb)  # type: ignore[operator]
        if k < 1 or k >= nb:
            raise UsageError(f"removing {k} of {nb} blocks leaves {'every block' if k < 1 else 'none'}", hint=f"remove 1 to {nb - 1} blocks")
        space = sr.Space([0] * nb, [1] * nb)
        gens = generations if generations is not None else max(1, round(k * (nb - k) / 1.5))
        settings = sr.Settings(
            generations=gens,
            offspring=offspring or int(defaults["offspring"]),
            survivors=surv,
            tokens=toks,
            seed=seed,
            initial=int(DEPTH_DEFAULTS["initial"]),
            initial_tokens=int(DEPTH_DEFAULTS["initial_tokens"]),
        )
        target = f"{k}blocks"
    else:
        assert sparsity is not None
        step_v = step if step is not None else sr.default_step(sparsity, levels)
        space = sr.unstructured_levels(nb, sparsity, levels, step_v)
        settings = sr.Settings(
            generations=generations or int(defaults["generations"]), offspring=offspring or int(defaults["offspring"]), survivors=surv, tokens=toks, seed=seed
        )
        target = f"{sparsity:g}"
    settings.check()
    _warn_if_slow_on_cpu(model, device, settings, nsamples, seqlen, (nb - k) / nb if is_depth else 1.0)
    target_path = out if out is not None else default_out(model, method, target)
    if target_path.is_dir():
        raise UsageError(f"--out {target_path} is a directory", hint="give a file name, e.g. --out schedule.json")
    if target_path.exists():
        if not force:
            raise UsageError(f"{target_path} exists", hint="pass --force to replace it, or another --out")
        if schedule_document(target_path) is None:
            raise UsageError(f"{target_path} is not a schedule file; search replaces only one it wrote", hint="choose another --out")
    else:
        _core.check_file_destination(str(target_path))

    gram_path = gram if gram is not None else model / _core.DEFAULT_GRAM
    if sweep and not gram_path.is_file():
        raise UsageError(
            f"{method}{' --update' if method != 'sparsegpt' else ''} needs input Gram statistics, and there is no {gram_path}",
            hint="run llmprune stats MODEL --gram (or pass --gram PATH)",
        )
    samples = calibration_samples(calib, load_tokenizer(model), nsamples, seqlen, seed)
    source = describe_source(calib, CALIB)
    builder: Any = sr.DepthLevels()
    if not is_depth:
        from llmprune.model.buffers import available_memory

        assert sparsity is not None
        sp, layer_stats = sparsity, (sidecar.layers if sidecar is not None and needs else None)

        def sparsity_of(lv: int) -> float:
            return sr.level_sparsity(sp, step_v, lv)

        if is_structured:
            builder = structured_builder(streamer, model, method, stats, width_multiple or 1, space, sparsity_of)
        elif sweep:
            builder = sr.SweepLevels(streamer, method, layer_stats, sparsity_of, gram_path, damp=damp, blocksize=blocksize)
        else:
            builder = sr.MaskLevels(streamer, method, layer_stats, sparsity_of, available_memory() // 4)
    err.print(
        f"scoring the dense model on {nsamples} x {seqlen} calibration tokens of {source} (top {topk} log-probabilities) ...", markup=False, highlight=False
    )
    evaluator = sr.Evaluator(streamer, samples, builder, topk=topk)
    extra_initial: list[tuple[int, ...]] = []
    if is_depth and sidecar is not None and sidecar.blocks is not None:
        bi = sidecar.blocks.influence()
        chosen = sorted(sorted(range(nb), key=lambda b: (bi[b], b))[:k])
        extra_initial.append(tuple(1 if b in chosen else 0 for b in range(nb)))
    progress = count_progress()
    with progress:
        task = progress.add_task("search", total=settings.generations, detail="")

        def on_generation(g: int, fit: float, best: tuple[int, ...]) -> None:
            progress.update(task, completed=g + 1, detail=f"best KL {fit:.4f}")

        result = sr.evolve(
            evaluator.fitness,
            space,
            settings,
            nwindows=nsamples,
            seqlen=seqlen,
            depth_total=k if is_depth else None,
            extra_initial=extra_initial,
            on_generation=on_generation,
        )
    start = result.start if result.start is not None else tuple([0] * nb)
    everything = list(range(nsamples))
    final = [float("nan"), float("nan")]
    if not result.interrupted:
        try:
            final = evaluator.fitness([start, result.best], everything)
        except KeyboardInterrupt:
            result.interrupted = True
    if isinstance(builder, sr.SweepLevels):
        builder.close()
    search_doc = {
        "algorithm": "evopress",
        "fitness": f"KL(dense || pruned), top-{topk} log-probabilities",
        "generations": settings.generations,
        "generations_done": result.generations_done,
        "offspring": settings.offspring,
        "survivors": list(settings.survivors),
        "tokens": list(settings.tokens),
        "max_mutations": settings.max_mutations,
        "seed": seed,
        "calibration": {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
        "fitness_history": [round(f, 6) for f in result.history],
        "start_fitness_all_windows": final[0],
        "best_fitness_all_windows": final[1],
        "interrupted": result.interrupted,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    doc: dict[str, Any] = {
        "format": SCHEDULE_FORMAT,
        "format_version": SCHEDULE_VERSION,
        "model_fingerprint": ckpt.fingerprint,
        "model_content_sha256": ckpt.content_digest(),
        "method": method,
    }
    if is_depth:
        removed = [b for b, lv in enumerate(result.best) if lv == 1]
        doc.update(kind="depth", blocks=nb, removed_blocks=removed)
        search_doc["start"] = "the best of random initial candidates" + (" and Block Influence's choice" if extra_initial else "")
        search_doc["start_removed_blocks"] = [b for b, lv in enumerate(start) if lv == 1]
    else:
        assert sparsity is not None
        doc.update(kind=kind, sparsity=sparsity, block_sparsity=[sr.level_sparsity(sparsity, step_v, lv) for lv in result.best])
        search_doc.update(levels=levels, step=step_v, block_levels=list(result.best), start="uniform")
        if is_structured:
            doc.update(width_multiple=width_multiple or 1, compensate=builder.planner.compensate)
            search_doc["plans_built"] = builder.built
        else:
            search_doc["update"] = update
        if sweep:
            search_doc.update(damp=damp, blocksize=blocksize, level_files_bytes=builder.bytes_on_disk, levels_built=builder.built)
    doc["search"] = search_doc
    write_schedule(target_path, doc)
    summary = {"out": str(target_path), **{k: v for k, v in doc.items() if k != "search"}, "search": search_doc, "peak_rss_mib": peak_rss_mib()}
    if result.interrupted:
        raise InterruptedWithResult(f"interrupted after {result.generations_done} generations; wrote the best schedule so far to {target_path}")
    if json_out:
        print_json(summary)
        return
    what = (
        f"remove blocks {', '.join(map(str, doc['removed_blocks']))}"
        if is_depth
        else f"block sparsity {min(doc['block_sparsity']):.4f} to {max(doc['block_sparsity']):.4f} (mean {sparsity:g})"
    )
    typer.echo(
        f"searched {result.generations_done} generations in {search_doc['seconds']:.0f} s: {what}; KL on all {nsamples} windows "
        f"{final[0]:.4f} ({search_doc['start']}) -> {final[1]:.4f}; wrote {target_path}"
    )
    cmd = f"llmprune apply {model} --method {method} " + ("" if is_depth or is_structured else f"--sparsity {sparsity:g} ") + f"--allocation {target_path}"
    typer.echo(f"next: {cmd}")


def register(app: typer.Typer) -> None:
    app.command("search", no_args_is_help=True, epilog=SEARCH_EPILOG, short_help="Choose each block's sparsity or width, or the blocks to remove, by search.")(
        search_cmd
    )
