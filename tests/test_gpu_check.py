"""benches/gpu_check.sh: its syntax, its help, and its CPU fallback end to end (the GPU run itself is
documented in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benches" / "gpu_check.sh"
ROWS = (
    "make_checkpoint.py + tokenizer",
    "llmprune stats",
    "llmprune stats --gram",
    "llmprune eval",
    "transformers forward + hooks",
    "transformers forward (eval)",
    "GPU vs CPU statistics (float32)",
)


def test_gpu_check_syntax_and_help():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cpu" in proc.stdout and "RESULTS_DIR" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--layers", "x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--layers takes a positive integer" in proc.stderr, proc.stderr


def test_gpu_check_cpu_fallback(tmp_path):
    """--cpu: the tiny shape and protocols on the CPU, the GPU comparison skipped with a line, exit 0,
    the table in RESULTS_DIR (Markdown and JSON), the work folder removed."""
    results, work = tmp_path / "results", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--work-dir", str(work), str(results)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "skipped: the GPU-vs-CPU statistics comparison needs a CUDA device (--cpu given)" in proc.stdout, proc.stdout
    md = (results / "gpu_check.md").read_text()
    for row in ROWS:
        assert f"| {row} |" in md, md
    assert "every check passed" in md, md
    doc = json.loads((results / "gpu_check.json").read_text())
    assert doc["ok"] and doc["mode"] == "cpu" and doc["shape"] == "tiny", doc
    rows = {r["step"]: r for r in doc["rows"]}
    assert list(rows) == list(ROWS), list(rows)
    assert all(rows[r]["status"] == "ok" for r in ROWS[:-1]), rows
    assert rows["GPU vs CPU statistics (float32)"]["status"] == "skipped"
    for r in ROWS[1:6]:
        assert rows[r]["device"] == "cpu" and rows[r]["tokens"] > 0 and rows[r]["tokens_per_s"] > 0, rows[r]
    # the plain transformers hooks take the same statistics as `stats`, and its forward the same perplexity as `eval`
    against = rows["transformers forward + hooks"]["against"]
    assert against["counts_equal"] and min(against["min_cos_act_sum"], against["min_cos_act_sqsum"]) > 0.9999, against
    assert abs(rows["transformers forward (eval)"]["perplexity"] / rows["llmprune eval"]["perplexity"] - 1) < 1e-3, rows
    assert not work.exists() or not any(work.iterdir()), "the work folder is emptied"
