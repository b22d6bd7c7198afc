"""The set-up steps talk while they run and stay silent when there is nothing to do: `.ci/heartbeat.py`
(elapsed time and the log's latest line, the log when the step fails, the step's exit status) and the
Makefile's `develop` target around it, with a stand-in for maturin (no network, no real build)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = ROOT / ".ci" / "heartbeat.py"
BEAT = re.compile(r"^  step: \dm\d\ds(, .*)?$")


def heartbeat(tmp_path: Path, script: str, every: str = "0.4") -> subprocess.CompletedProcess:
    env = dict(os.environ, LLMPRUNE_HEARTBEAT_S=every)
    log = tmp_path / "step.log"
    return subprocess.run([sys.executable, str(HEARTBEAT), "step", str(log), "sh", "-c", script], capture_output=True, text=True, env=env, timeout=60)


def test_heartbeat_prints_elapsed_time_and_the_latest_log_line(tmp_path):
    proc = heartbeat(tmp_path, "echo '   Compiling serde v1.0.0' >&2; sleep 2; echo done")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    beats = [ln for ln in lines if BEAT.match(ln)]
    assert len(beats) >= 2, lines
    assert any(ln.endswith("s, Compiling serde v1.0.0") for ln in beats), beats
    assert re.fullmatch(r"step: done in 0m0[2-9]s", lines[-1]), lines
    assert "done" not in "\n".join(beats), "the command's own output stays in the log"
    assert (tmp_path / "step.log").read_text() == "   Compiling serde v1.0.0\ndone\n"


def test_heartbeat_shows_the_log_and_passes_on_a_failure(tmp_path):
    proc = heartbeat(tmp_path, "echo 'Collecting torch'; echo 'ERROR: no matching distribution' >&2; exit 3")
    assert proc.returncode == 3, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["Collecting torch", "ERROR: no matching distribution"], lines
    assert re.match(r"step: failed after 0m0\ds \(exit status 3; the whole log: .*step\.log\)$", lines[-1]), lines


def test_heartbeat_is_quiet_for_a_quick_step(tmp_path):
    proc = heartbeat(tmp_path, "true", every="30")
    assert proc.returncode == 0 and re.fullmatch(r"step: done in 0m0\ds\n", proc.stdout) and proc.stderr == "", proc


def test_heartbeat_reports_a_command_it_cannot_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(HEARTBEAT), "step", str(tmp_path / "log"), str(tmp_path / "missing")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 127 and proc.stdout.startswith("step: cannot run "), proc


def fake_venv(tmp_path: Path, maturin_exit: int) -> Path:
    """A virtualenv folder that `make` takes as set up (the requirements' stamp), whose maturin is a
    script printing cargo-like lines and exiting with `maturin_exit`."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    digest = subprocess.run(["sha256sum", "requirements-dev.txt"], cwd=ROOT, capture_output=True, text=True, check=True).stdout[:16]
    (venv / f".llmprune-deps-{digest}").touch()
    maturin = venv / "bin" / "maturin"
    maturin.write_text(f"#!/bin/sh\necho '   Compiling llmprune-core v0.1.0' >&2\nsleep 1\necho 'error: linking failed' >&2\nexit {maturin_exit}\n")
    maturin.chmod(0o755)
    return venv


def make_develop(tmp_path: Path, venv: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLMPRUNE_HEARTBEAT_S="0.3")
    env.pop("MAKEFLAGS", None)
    cmd = ["make", "--no-print-directory", "develop", f"VENV={venv}", f"BUILD_LOCK={tmp_path / 'lock'}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


needs_make = pytest.mark.skipif(shutil.which("make") is None or shutil.which("flock") is None, reason="needs make and flock")


@needs_make
def test_make_develop_fails_with_the_build_log_when_maturin_fails(tmp_path):
    venv = fake_venv(tmp_path, maturin_exit=3)
    proc = make_develop(tmp_path, venv)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("building the Rust extension into "), proc.stdout
    assert re.search(r"^  maturin develop: 0m0\ds, Compiling llmprune-core v0.1.0$", proc.stdout, re.M), proc.stdout
    assert "error: linking failed" in proc.stdout and "maturin develop: failed after" in proc.stdout, proc.stdout
    assert not (venv / ".llmprune-extension").exists(), "a failed build leaves no stamp"


@needs_make
def test_make_develop_builds_once_then_says_nothing(tmp_path):
    if not list((ROOT / "python" / "llmprune").glob("_core*.so")):
        pytest.skip("the extension is not built in this checkout")
    venv = fake_venv(tmp_path, maturin_exit=0)
    first = make_develop(tmp_path, venv)
    assert first.returncode == 0 and "maturin develop: done in " in first.stdout, first.stdout + first.stderr
    again = make_develop(tmp_path, venv)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == "", again
