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


class BlockProgress:
    """Two bars for a layer-streamed pass: decoder blocks done, and items (samples, windows) within
    the current phase. A no-op when disabled (e.g. on ranks other than 0)."""

    def __init__(self, enabled: bool, nblocks: int, item_label: str, nitems: int):
        self.nitems = nitems
        self._p = None
        if enabled:
            self._p = count_progress()
            self._blocks = self._p.add_task("blocks", total=nblocks, detail="")
            self._items = self._p.add_task(item_label, total=nitems, detail="")

    def __enter__(self) -> "BlockProgress":
        if self._p is not None:
            self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def phase(self, text: str, total: int | None = None) -> None:
        if self._p is not None:
            self._p.reset(self._items, total=total or self.nitems, description=text)

    def step(self) -> None:
        if self._p is not None:
            self._p.advance(self._items)

    def block_done(self, i: int) -> None:
        if self._p is not None:
            self._p.update(self._blocks, completed=i + 1)
