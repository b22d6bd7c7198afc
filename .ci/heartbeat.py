#!/usr/bin/env python3
"""Runs a long, quiet set-up step with its output in a log, and says that it is alive.

    python3 .ci/heartbeat.py LABEL LOG COMMAND [ARG...]

COMMAND's stdout and stderr go to LOG. While it runs, one line every LLMPRUNE_HEARTBEAT_S seconds
(default 30) gives the elapsed time and the log's latest line (`Collecting torch==...`, `Compiling
serde v1...`); when it ends, one line gives the total time. When it fails, the last lines of the log
follow, with the log's path, and the exit status is COMMAND's (130 on Ctrl-C). Standard library only:
the Makefile runs it with the system python3 before the virtualenv exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

TAIL_LINES = 80  # of the log, shown when the command fails
LATEST_MAX = 100  # characters of the log's latest line in a heartbeat


def elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def latest_line(log: str) -> str:
    """The log's last line that starts with a letter or digit (not a progress bar or an emoji)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(text.replace("\r", "\n").splitlines()):
        line = line.strip()
        if line[:1].isalnum():
            return line if len(line) <= LATEST_MAX else line[: LATEST_MAX - 3] + "..."
    return ""


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write(__doc__ or "")
        return 2
    label, log, cmd = argv[0], argv[1], argv[2:]
    every = float(os.environ.get("LLMPRUNE_HEARTBEAT_S", "30"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # pip's lines reach the log as they happen
    t0 = time.monotonic()
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            say(f"{label}: cannot run {cmd[0]}: {exc}")
            return 127
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            next_beat = t0 + every
            while True:
                try:
                    rc = proc.wait(timeout=max(0.05, next_beat - time.monotonic()))
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    latest = latest_line(log)
                    say(f"  {label}: {elapsed(now - t0)}" + (f", {latest}" if latest else ""))
                    next_beat = now + every
        except KeyboardInterrupt:
            proc.wait()  # the terminal's Ctrl-C reached the command too
            say(f"{label}: interrupted after {elapsed(time.monotonic() - t0)} (log: {log})")
            return 130
    if rc != 0:
        with open(log, "rb") as f:
            tail = f.read().decode("utf-8", "replace").splitlines()[-TAIL_LINES:]
        say("\n".join(tail))
        say(f"{label}: failed after {elapsed(time.monotonic() - t0)} (exit status {rc}; the whole log: {log})")
        return rc if rc > 0 else 128 - rc  # killed by a signal: 128 + its number, as a shell says
    say(f"{label}: done in {elapsed(time.monotonic() - t0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
