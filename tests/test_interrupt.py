"""Ctrl-C during `apply`: the interrupt raised in the progress callback (where the binding also
checks for signals) stops the Rust loop, and no output or temporary directory is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from llmprune import _core


def test_keyboard_interrupt_from_callback_leaves_nothing(model_copy):
    calls = []

    def progress(name, done, total, n_done, n_total):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt

    out = model_copy.parent / "out"
    with pytest.raises(KeyboardInterrupt):
        _core.apply(str(model_copy), str(out), "wanda", sparsity=0.5, progress=progress)
    assert len(calls) == 3
    assert sorted(p.name for p in model_copy.parent.iterdir()) == [model_copy.name]


def test_sigint_stops_the_cli(tmp_path):
    """A real SIGINT to the CLI process while it prunes a checkpoint big enough to take a while."""
    model = tmp_path / "ck"
    gen = os.path.join(os.path.dirname(__file__), "..", "benches", "make_checkpoint.py")
    subprocess.run([sys.executable, gen, str(model), "--shape", "1b", "--layers", "6"], check=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmprune", "apply", str(model), "--method", "magnitude", "--sparsity", "0.5", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell without job control starts background jobs with SIGINT ignored; undo that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # signal as soon as the staging directory exists: the Rust loop is then running
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".ck-") for p in tmp_path.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("apply finished before the signal arrived")
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["error: interrupted; no output was written"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "no output or temp dir left"
