"""Errors the CLI turns into one `error:` line (and an optional `hint:` line) with exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input detected on the Python side: a message and an optional hint for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class CheckFailed(Exception):
    """A check the user asked for did not pass (exit code 1)."""
