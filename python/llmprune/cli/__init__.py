"""The `llmprune` command line: argument parsing, error reporting and wiring to the engines.

Heavy imports (torch, transformers, the Rust core) happen inside the commands so that `--help` and
argument errors are instant.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Optional

import typer

from llmprune.cli.hints import sized
from llmprune.console import err
from llmprune.errors import CheckFailed, InterruptedWithResult, UsageError

app = typer.Typer(
    name="llmprune",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain layout: nothing cut or swallowed at 80 columns
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Prune large language models stored as safetensors checkpoints, streaming, in little memory.",
)


def _version_callback(value: bool) -> None:
    if value:
        from llmprune import __version__

        typer.echo(f"llmprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """Prune large language models stored as safetensors checkpoints, streaming, in little memory."""


def _register_commands() -> None:
    from llmprune.cli import apply

    apply.register(app)
    for module in ("stats", "eval", "finetune", "reconstruct", "search", "demo"):
        try:
            mod = __import__(f"llmprune.cli.{module}", fromlist=["register"])
        except ModuleNotFoundError as exc:  # a command module not present in this build
            if exc.name != f"llmprune.cli.{module}":
                raise
            continue
        mod.register(app)


_register_commands()


INTERRUPTED = 130


def _error(message: str, hint: str | None = None) -> None:
    first = str(message).strip().splitlines() or ["unknown error"]
    err.print(f"error: {' '.join(line.strip() for line in first)}", markup=False, soft_wrap=True)
    if hint:
        err.print(f"hint: {hint}", markup=False, soft_wrap=True)


def _is_core_error(exc: BaseException) -> bool:
    try:
        from llmprune import _core
    except ImportError:
        return False
    return isinstance(exc, _core.LlmpruneError)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (timeout, kill, schedulers) stops a run like Ctrl-C: partial output is removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code. SIGTERM is handled like
    Ctrl-C while a command runs, and the caller's handler is put back afterwards."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    debug = os.environ.get("LLMPRUNE_DEBUG", "") not in ("", "0")
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="llmprune")
        if rv == INTERRUPTED:  # typer turns Ctrl-C inside a command into this exit code
            _error("interrupted; no output was written")
        return rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except InterruptedWithResult as exc:
        err.print(str(exc), markup=False, soft_wrap=True)
        return INTERRUPTED
    except (typer.Abort, KeyboardInterrupt):
        _error("interrupted; no output was written")
        return INTERRUPTED
    except typer.TyperException as exc:  # argument parsing (typer's usage errors)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            err.print(ctx.get_help(), markup=False)
            return 2
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _error(message, f"see `{ctx.command_path if ctx else 'llmprune'} --help`")
        return getattr(exc, "exit_code", 2) or 2
    except CheckFailed as exc:
        _error(str(exc))
        return 1
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc), sized(exc.hint, argv if argv is not None else sys.argv[1:]))
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        return 2
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        if debug:
            traceback.print_exc()
        if _is_core_error(exc):
            _error(str(exc), sized(getattr(exc, "hint", None), argv if argv is not None else sys.argv[1:]))
        else:
            _error(f"internal error: {type(exc).__name__}: {exc}", "rerun with LLMPRUNE_DEBUG=1 for a traceback")
        return 2


if __name__ == "__main__":
    sys.exit(main())
