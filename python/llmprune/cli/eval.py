"""`llmprune eval MODEL`: perplexity (Wanda's protocol, layer-streamed) and lm-evaluation-harness tasks
(layer-streamed too: harness.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmprune.cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelArg, announce, check_int
from llmprune.console import print_json, warn
from llmprune.errors import UsageError

QUICK_MAX_TOKENS = 4096  # the smaller protocol the CPU warning suggests

EVAL_EPILOG = """Examples:

\b
# the built-in held-out text: State of the Union addresses, 1950 onward
# (all 720 k tokens: hours on a CPU, see --max-tokens)
llmprune eval ./model-wanda-0.5
llmprune eval ./model --max-tokens 16384 --seqlen 512 --device cpu

\b
llmprune eval ./model --data wikitext2 --seqlen 2048 --json
llmprune eval ./model --data notes.txt --max-tokens 100000

\b
# lm-evaluation-harness tasks (pip install 'llmprune[eval]');
# offline: the packaged smoke tasks sotu_cloze and sotu_next
llmprune eval ./model --tasks offline --max-tokens 4096 --seqlen 512
llmprune eval ./model --tasks paper --tasks-only --batch-size 16
llmprune eval ./model --tasks my_task --include-path ./my-tasks --limit 100
"""


def _warn_if_slow_on_cpu(model: Path, device: str, tokens: int, seqlen: int, source: str) -> None:
    """The default protocol (every token of the evaluation text) can take hours on a CPU: say about
    how long, as `stats` does (this CPU's matrix-multiply speed and the model's size), and how to ask
    for less. The protocol itself is left as it is."""
    from llmprune.calibration.estimate import duration, pass_seconds
    from llmprune.cli.stats import SLOW_CPU_SECONDS
    from llmprune.model.devices import resolve_device

    if resolve_device(device).type != "cpu":
        return
    windows = tokens // seqlen
    seconds = pass_seconds(model, windows, seqlen)
    if seconds < SLOW_CPU_SECONDS:
        return
    quick = pass_seconds(model, min(tokens, QUICK_MAX_TOKENS) // seqlen, seqlen)
    warn(
        f"{windows} x {seqlen} evaluation tokens (the default: all of {source}) take about {duration(seconds)} on this CPU; "
        f"for a first try pass fewer, e.g. --max-tokens {QUICK_MAX_TOKENS} (about {duration(quick)})"
    )


def eval_cmd(
    model: ModelArg,
    data_src: Annotated[
        Optional[str],
        typer.Option("--data", metavar="SRC", help="Evaluation text: sotu (built-in, offline), c4, wikitext2, or a .txt / .jsonl path.", show_default="sotu"),
    ] = None,
    seqlen: Annotated[
        Optional[int], typer.Option("--seqlen", metavar="L", help="Tokens per window.", show_default="2048, or the model's context if shorter")
    ] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option("--max-tokens", metavar="N", help="Evaluate only the first N tokens of the text.", show_default="all")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    tasks: Annotated[
        Optional[str],
        typer.Option(
            "--tasks",
            metavar="TASKS",
            help="Also run these lm-evaluation-harness tasks, one decoder block in memory at a time (comma-separated names, globs or YAML files; `paper`: boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa; `offline`: sotu_cloze,sotu_next).",
            show_default=False,
        ),
    ] = None,
    num_fewshot: Annotated[
        Optional[int], typer.Option("--num-fewshot", metavar="K", help="Few-shot examples per task prompt.", show_default="each task's own, else 0")
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", metavar="N", help="Only the first N documents of each task.", show_default="all")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", metavar="B", help="Task sequences per batch (results do not depend on it).", show_default="8")
    ] = None,
    include_path: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--include-path", metavar="DIR", help="A folder of your own lm-eval task YAMLs (as lm-eval's --include_path); repeatable.", show_default=False
        ),
    ] = None,
    tasks_only: Annotated[bool, typer.Option("--tasks-only", help="Run the --tasks and skip the perplexity.")] = False,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Evaluate the tasks again instead of reading MODEL.llmprune-tasks.json (the result still replaces the cached one)."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity of a checkpoint on held-out text, one decoder block in memory at a time."""
    announce(
        model, "torch, transformers and lm-eval, the tokenizer and the tasks" if tasks_only else "torch and transformers, the tokenizer and the evaluation text"
    )
    from llmprune.data.sources import EVAL, describe_source
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import eval_token_ids
    from llmprune.evaluation import perplexity, require_lm_eval
    from llmprune.model.devices import check_pass_inputs

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    if tasks is not None and not task_list:
        raise UsageError("--tasks names no task", hint="e.g. --tasks offline, --tasks paper or --tasks boolq,piqa")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more, not {num_fewshot}", hint="--num-fewshot 0 is zero-shot; leave it out for each task's own setting")
    check_int("--num-fewshot", num_fewshot, 0)
    check_int("--limit", limit)
    check_int("--batch-size", batch_size)
    task_opts = {"--num-fewshot": num_fewshot, "--limit": limit, "--batch-size": batch_size, "--include-path": include_path, "--tasks-only": tasks_only or None}
    given = [flag for flag, value in task_opts.items() if value is not None]
    if given and not task_list:
        raise UsageError(f"{given[0]} applies to --tasks, which was not given", hint="e.g. --tasks offline")
    if task_list:
        require_lm_eval()
    if tasks_only and (data_src, seqlen, max_tokens) != (None, None, None):
        raise UsageError("--tasks-only skips the perplexity: --data, --seqlen and --max-tokens do not apply")
    summary: dict = {}
    if not tasks_only:
        check_int("--seqlen", seqlen, 2)
        check_int("--max-tokens", max_tokens)
        defaults = max_tokens is None and seqlen is None
        seqlen = check_pass_inputs(model, device, dtype, seqlen)
        source = describe_source(data_src, EVAL)
        ids = eval_token_ids(data_src, load_tokenizer(model), max_tokens)
        if defaults and int(os.environ.get("RANK", "0") or 0) == 0:
            _warn_if_slow_on_cpu(model, device, ids.numel(), seqlen, source)
    else:
        check_pass_inputs(model, device, dtype, None)
    run = None
    if task_list:
        from llmprune.harness import DEFAULT_BATCH_SIZE, run_tasks

        run = run_tasks(
            model,
            task_list,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            device=device,
            dtype=dtype,
            include_paths=include_path or [],
            use_cache=not no_cache,
            progress=True,
        )
    if not tasks_only:
        assert seqlen is not None
        result = perplexity(model, ids, seqlen, device=device, dtype=dtype, progress=True)
        summary = {
            "perplexity": result.perplexity,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 3),
            "windows": result.windows,
            "seqlen": result.seqlen,
            "nll": result.nll,
            "data": source,
            "device": result.device,
            "dtype": result.dtype,
        }
    if run is not None:
        summary["tasks"] = run.doc()
    if json_out:
        print_json(summary)
        return
    if not tasks_only:
        typer.echo(
            f"perplexity {result.perplexity:.4f} on {source} ({result.windows} windows x {result.seqlen} tokens, {result.seconds:.1f} s on {result.device})"
        )
    if run is not None:
        typer.echo(task_table(run))


def task_table(run: Any) -> str:
    """The task rows as an aligned table (task, metric, value, stderr), and a line saying how they were had."""
    head = ("task", "metric", "value", "stderr")
    rows = [(r.task, r.metric, f"{r.value:.4f}", "" if r.stderr is None else f"{r.stderr:.4f}") for r in run.rows]
    widths = [max(len(x[k]) for x in [head, *rows]) for k in range(4)]
    lines = ["  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))).rstrip() for row in [head, *rows]]
    shots = "each task's own few-shot setting" if run.num_fewshot is None else f"{run.num_fewshot}-shot"
    done = [f"{len(run.evaluated)} evaluated in {run.seconds:.1f} s"] if run.evaluated else []
    if run.cached:
        done.append(f"{len(run.cached)} from the cache {run.cache}")
    lines.append(f"({shots}{f', first {run.limit} documents' if run.limit else ''}; {', '.join(done)})")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("eval", no_args_is_help=True, epilog=EVAL_EPILOG, short_help="Perplexity on held-out text, one block in memory at a time.")(eval_cmd)
