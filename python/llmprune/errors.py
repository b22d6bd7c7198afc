"""Errors the CLI turns into one `error:` line (and an optional `hint:` line) with exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input detected on the Python side: a message and an optional hint for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class CheckFailed(Exception):
    """A check the user asked for did not pass (exit code 1)."""


class InterruptedWithResult(Exception):
    """Ctrl-C stopped a command that still wrote a partial result (say `search`'s best schedule so
    far): the message says what was written; exit code 130 like any interruption."""
