"""Shared terminal plumbing: stderr console, progress bars, result printing."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# stdout carries results only; everything else goes to stderr.
err = Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    err.print(f"warning: {message}", markup=False)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def byte_progress() -> Progress:
    """A progress bar counting bytes (for streaming over shards)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def count_progress() -> Progress:
    """A progress bar counting items (blocks, samples, windows)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
