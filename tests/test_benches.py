"""Smoke runs of the benchmarks at tiny sizes, so they cannot rot (the real figures are in docs/results.md and docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_apply_bench_tiny(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "benches" / "apply_bench.py"), "--shape", "tiny", "--workdir", str(tmp_path),
        "--torch-cases", "wanda-50%", "--memlimit-gb", "0.5",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    for row in ("cp -r", "llmprune magnitude-50%", "llmprune wanda-50%", "llmprune stade-50%", "llmprune wanda-2:4", "plain PyTorch wanda-50%"):
        assert f"| {row}" in table, table
    if "memory-limited run" in table:  # needs a cgroup v1 memory controller
        assert "identical to unlimited run: True" in table, table
    assert not any(p.name.startswith("llama-") for p in tmp_path.iterdir()), "the generated checkpoint is removed"


def test_make_checkpoint_is_loadable(tmp_path):
    out = tmp_path / "ck"
    subprocess.run([sys.executable, str(ROOT / "benches" / "make_checkpoint.py"), str(out), "--shape", "tiny", "--stats", "--shard-gb", "0.001"], check=True)
    import json

    from llmprune import _core

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    desc = json.loads(_core.open_checkpoint(str(out)))
    assert desc["model_tensors"]["model.layers.0.mlp.down_proj.weight"] == "BF16[256,688]"
    report = json.loads(_core.inspect(str(out)))
    assert report["prunable"]["zeros"] == 0


def _cgroup_v1_writable() -> bool:
    root = Path("/sys/fs/cgroup/memory")
    return (root / "cgroup.procs").exists() and os.access(root, os.W_OK)


@pytest.mark.slow
def test_task_speed_synthetic_tiny(tmp_path):
    """task_speed.py --only-synthetic on the tiny shape cut to 1 of its 2 blocks: both allocators' rows and the
    time scaled to the shape's depth; with cgroup v1, inside a memory limit, and a limit too small for the
    process is reported as a failure (exit status 1), not hidden."""
    import json

    opts = "--only-synthetic --shape tiny --layers 1 --synthetic-requests 3".split()
    base = [sys.executable, str(ROOT / "benches" / "task_speed.py"), *opts, "--work-dir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    limited = _cgroup_v1_writable()
    proc = subprocess.run(base + (["--memlimit-gb", "2"] if limited else []), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| fixed mmap threshold |" in proc.stdout and "| glibc default |" in proc.stdout, proc.stdout
    assert "seconds per 1,000 requests at 2 blocks" in proc.stdout, proc.stdout
    runs = json.loads((tmp_path / "r.json").read_text())["synthetic"]["runs"]
    assert all(r["completed"] and r["blocks"] == 1 and 0 < r["block_seconds"] <= r["seconds"] for r in runs.values()), runs
    if not limited:
        pytest.skip("no writable cgroup v1 memory controller: the memory-limited runs were not tried")
    assert "memory limit: each run in a fresh cgroup v1 memory group" in proc.stdout, proc.stdout
    assert all(0 < r["cgroup_peak"] <= 2 * 2**30 for r in runs.values()), runs
    bench = subprocess.Popen(base + ["--memlimit-gb", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = bench.communicate(timeout=600)
    assert bench.returncode == 1, err
    assert out.count("| **no**: SIGKILL") == 2, out
    assert not Path(f"/sys/fs/cgroup/memory/llmprune-bench-{bench.pid}").exists(), "the group is removed"


@pytest.mark.slow
def test_hywia_bench_tiny(tmp_path):
    """stats --grad, apply (hywia, flap), eval, finetune and eval again through the CLI, on a tiny LLaMA."""
    import reference as R
    import stats_helpers as H

    model = R.tiny_llama_dir(tmp_path / "tiny", num_hidden_layers=4)
    H.add_tokenizer(model)
    cmd = [
        sys.executable, str(ROOT / "benches" / "hywia_bench.py"), "--model", str(model), "--workdir", str(tmp_path / "w"),
        "--sparsities", "0.2", "--variants", "hywia-adaptive,flap", "--ablations", "hywia-fine-mix",
        "--grad-nsamples", "2", "--grad-seqlen", "16", "--lora-steps", "2", "--lora-batch", "1", "--lora-seqlen", "16",
        "--seqlen", "32", "--max-tokens", "256", "--device", "cpu", "--json", str(tmp_path / "r.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    for row in ("| dense |", "| hywia-adaptive |", "| flap |", "| hywia-fine-mix |"):
        assert row in proc.stdout, proc.stdout
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [("ppl_lora" in r) for r in rows] == [True, True, False]
    assert all(r["ppl"] > 1 for r in rows)


@pytest.mark.slow
def test_sparsegpt_bench_small():
    """The kernel speed bench at 1024-wide shapes: both sides run, and agree on the layer-output error."""
    cmd = [sys.executable, str(ROOT / "benches" / "sparsegpt_bench.py"), "--small"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1024x") or line.startswith("| 2048x")]
    assert len(rows) == 6, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0.9 < float(cells[5]) < 1.1, row  # err ratio, Rust over PyTorch
        assert cells[6] == "0.5000 / 0.5000", row
    assert "load average" in proc.stdout


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time (apt-get install time)")
@pytest.mark.slow
def test_sparsegpt_memory_tiny(tmp_path):
    """The apply memory bench on the tiny shape: checkpoint, synthetic Gram sidecar, measured apply."""
    cmd = [sys.executable, str(ROOT / "benches" / "sparsegpt_memory.py"), "--shape", "tiny", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "max RSS" in proc.stdout and "peak anonymous" in proc.stdout, proc.stdout
    assert not any(tmp_path.iterdir()), "the checkpoint and the output are removed"


@pytest.mark.slow
def test_scale_bench_tiny(tmp_path):
    """scale_bench.py on the tiny shape at 1 and 2 blocks, a few steps: each measured at both depths (block-influence
    at 2 alone), fitted and extrapolated to finite figures, the table written between its markers, nothing left behind."""
    import json
    import math

    steps = ["stats-gram64", "apply-wanda", "apply-sparsegpt", "apply-block-influence", "eval"]
    md = tmp_path / "doc.md"
    md.write_text("before\n<!-- scale_bench.py table: begin -->\nold\n<!-- scale_bench.py table: end -->\nafter\n")
    work = tmp_path / "w"
    cmd = [
        sys.executable, str(ROOT / "benches" / "scale_bench.py"), "--shape", "tiny", "--layers", "1,2", "--work-dir", str(work),
        "--steps", ",".join(steps), "--json", str(tmp_path / "r.json"), "--markdown", str(md),
    ]
    proc = subprocess.run(cmd + (["--memlimit-gb", "2"] if _cgroup_v1_writable() else []), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert list(doc["rows"]) == [*steps, "cp"], doc["rows"].keys()
    for name, row in doc["rows"].items():
        for b in ("1", "2"):
            m = row["depths"][b]
            if name == "apply-block-influence" and b == "1":
                assert "skipped" in m, m
                continue
            assert m["wall"] > 0 and m["cpu"] > 0 and m["peak_rss"] > 0 and m["disk"] >= 0, (name, m)
            if name.startswith("apply-"):
                assert row["cp"][b]["wall"] > 0, (name, row["cp"])
        assert all(math.isfinite(row["fit"][k][v]) for k in ("wall", "disk") for v in ("fixed", "per_block")), (name, row["fit"])
        assert list(row["extrapolated"]) == ["7B", "13B", "70B", "405B"], row["extrapolated"]
        assert all(math.isfinite(e["wall"]) and math.isfinite(e["disk"]) for e in row["extrapolated"].values()), (name, row["extrapolated"])
    assert doc["rows"]["stats-gram64"]["depths"]["2"]["disk"] > doc["rows"]["stats-gram64"]["depths"]["1"]["disk"]
    text = md.read_text()
    assert text.startswith("before\n<!-- scale_bench.py table: begin -->\nCommand: `python benches/scale_bench.py") and text.endswith("after\n"), text
    assert "| `apply --method sparsegpt --sparsity 0.5` |" in text and "70B (80 blocks): wall, disk" in text and "\nold\n" not in text, text
    assert "load average" in text
    assert not list(work.iterdir()), "the checkpoints and outputs are removed"
