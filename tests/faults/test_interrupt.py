"""Ctrl-C during `apply`: the interrupt raised in the progress callback (where the binding also
checks for signals) stops the Rust loop, and no output or temporary directory is left behind. Real
SIGINT and SIGTERM to the CLI are in test_fault_corpus.py."""

from __future__ import annotations

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
