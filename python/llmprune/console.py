"""Shared terminal plumbing: stderr console, progress bars, result printing."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# stdout carries results only; everything else goes to stderr.
err = Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    err.print(f"warning: {message}", markup=False, soft_wrap=True)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


class LogProgress(Progress):
    """Progress for a stderr that is not a terminal (a log, a pipe): no bar, no cursor movement and no
    trailing empty line. Once a run has lasted LOG_AFTER seconds it prints one plain line of all its
    tasks when a phase changes (at most every LOG_GAP seconds) and at least every LOG_EVERY seconds,
    so that a long run in a log shows where it is; a quick one prints nothing."""

    LOG_AFTER = 5.0
    LOG_GAP = 10.0
    LOG_EVERY = 30.0

    def __init__(self, *, bytes_: bool = False, **kwargs: Any):
        super().__init__(disable=True, **kwargs)
        self._bytes = bytes_
        self._t0 = time.monotonic()
        self._last = self._t0 - self.LOG_GAP
        self._last_phases: list[str] = []

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log()

    def reset(self, task_id: TaskID, **kwargs: Any) -> None:
        super().reset(task_id, **kwargs)
        self._log()

    def _count(self, n: float, total: float | None) -> str:
        if self._bytes:
            return f"{n / 1e6:,.0f}" + (f" of {total / 1e6:,.0f}" if total else "") + " MB"
        return f"{n:,.0f}" + (f"/{total:,.0f}" if total else "")

    def _log(self) -> None:
        now = time.monotonic()
        phases = [t.description for t in self.tasks]
        since = now - self._last
        if now - self._t0 < self.LOG_AFTER or since < self.LOG_GAP:
            return
        if phases == self._last_phases and since < self.LOG_EVERY:
            return
        self._last, self._last_phases = now, phases
        parts = []
        for t in self.tasks:
            detail = t.fields.get("detail") or ""
            parts.append(f"{t.description} {self._count(t.completed, t.total)}" + (f" ({detail})" if detail else ""))
        err.print(f"{', '.join(parts)}; {now - self._t0:,.0f} s", markup=False, highlight=False, soft_wrap=True)


def byte_progress() -> Progress:
    """A progress bar counting bytes (for streaming over shards)."""
    if not err.is_interactive:
        return LogProgress(console=err, bytes_=True)
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
    if not err.is_interactive:
        return LogProgress(console=err)
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

    def __exit__(self, *exc: Any) -> None:
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


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
