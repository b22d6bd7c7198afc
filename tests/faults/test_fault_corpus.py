"""A corpus of bad inputs and faults across `apply`, `inspect`, `stats`, `eval` and `stats merge`.

Every case runs the real CLI in a subprocess on a private copy of a tiny checkpoint and asserts the
same contract: exit code 2 (130 for signals), one `error:` line (and at most one `hint:`), no
traceback, every input byte unchanged, nothing at the output path and no temporary directory left.
The checkpoint faults run through every command that reads checkpoints: since the Rust core is the
one reader, `stats` and `eval` refuse exactly what `apply` and `inspect` refuse.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import reference as R
from conftest import assert_clean_error, cli_env, copy_model, slow_except, tree_hashes

Q0 = "model.layers.0.self_attn.q_proj.weight"
K1 = "model.layers.1.self_attn.k_proj.weight"

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def index_of(model: Path) -> dict[str, Any]:
    return json.loads((model / R.INDEX_NAME).read_text())


def shard_of(model: Path, name: str) -> Path:
    return model / index_of(model)["weight_map"][name]


def write_shard(path: Path, header: dict[str, Any], data: bytes) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * ((-len(hb)) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def rewrite_header(path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    header, start = R.read_header(path)
    data = path.read_bytes()[start:]
    mutate(header)
    write_shard(path, header, data)


def entries(header: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])


# --------------------------------------------------------------------------------------------
# Checkpoint faults: each mutates a private copy of the sharded tiny model in place
# --------------------------------------------------------------------------------------------


def no_config(m: Path) -> None:
    (m / "config.json").unlink()


def no_weights(m: Path) -> None:
    for f in R.tensor_files(m):
        (m / f).unlink()
    (m / R.INDEX_NAME).unlink()


def missing_shard(m: Path) -> None:
    shard_of(m, Q0).unlink()


def truncated_shard(m: Path) -> None:
    p = shard_of(m, Q0)
    p.write_bytes(p.read_bytes()[:-100])


def header_longer_than_file(m: Path) -> None:
    p = shard_of(m, Q0)
    b = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(b) * 4) + b[8:])


def corrupt_json(m: Path) -> None:
    p = shard_of(m, Q0)
    header, start = R.read_header(p)
    b = bytearray(p.read_bytes())
    b[8:12] = b"}}}}"
    p.write_bytes(bytes(b))


def overlapping_offsets(m: Path) -> None:
    def mutate(h):
        (n0, e0), (n1, e1) = entries(h)[:2]
        e1["data_offsets"] = [e0["data_offsets"][0], e0["data_offsets"][0] + (e1["data_offsets"][1] - e1["data_offsets"][0])]

    rewrite_header(shard_of(m, Q0), mutate)


def shape_disagrees(m: Path) -> None:
    rewrite_header(shard_of(m, Q0), lambda h: h[Q0].update(shape=[h[Q0]["shape"][0] + 1, h[Q0]["shape"][1]]))


def overflowing_shape(m: Path) -> None:
    # found by fuzzing: a shape whose byte size overflows 64 bits, after a valid tensor
    def mutate(h):
        name, e = entries(h)[-1]
        e["shape"] = [4294967296, 4294967296]

    rewrite_header(shard_of(m, Q0), mutate)


def index_names_wrong_shard(m: Path) -> None:
    idx = index_of(m)
    files = sorted(set(idx["weight_map"].values()))
    here = idx["weight_map"][Q0]
    idx["weight_map"][Q0] = next(f for f in files if f != here)
    (m / R.INDEX_NAME).write_text(json.dumps(idx))


def tensor_in_two_shards(m: Path) -> None:
    idx = index_of(m)
    files = sorted(set(idx["weight_map"].values()))
    src, dst = m / idx["weight_map"][Q0], next(m / f for f in files if f != idx["weight_map"][Q0])
    raw, _ = R.read_file_tensors(src)
    header, start = R.read_header(dst)
    data = dst.read_bytes()[start:]
    t = raw[Q0]
    header[Q0] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(t.data)]}
    write_shard(dst, header, data + t.data)


def index_outside(m: Path) -> None:
    idx = index_of(m)
    idx["weight_map"][Q0] = "../" + idx["weight_map"][Q0]
    (m / R.INDEX_NAME).write_text(json.dumps(idx))


def index_corrupt(m: Path) -> None:
    (m / R.INDEX_NAME).write_text("{not json")


def shard_links_outside(m: Path) -> None:
    p = shard_of(m, Q0)
    outside = m.parent / "elsewhere.safetensors"
    p.rename(outside)
    p.symlink_to(outside)


CHECKPOINT_FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-config": (no_config, "config.json"),
    "no-weights": (no_weights, "model.safetensors"),
    "missing-shard": (missing_shard, "missing"),
    "truncated-shard": (truncated_shard, "invalid checkpoint"),
    "header-longer-than-file": (header_longer_than_file, "header length"),
    "corrupt-json": (corrupt_json, "corrupt JSON"),
    "overlapping-offsets": (overlapping_offsets, "offsets"),
    "shape-disagrees": (shape_disagrees, Q0),
    "overflowing-shape": (overflowing_shape, "invalid checkpoint"),
    "index-wrong-shard": (index_names_wrong_shard, Q0),
    "tensor-in-two-shards": (tensor_in_two_shards, "stored in both"),
    "index-outside": (index_outside, "outside the model directory"),
    "index-corrupt": (index_corrupt, "corrupt JSON"),
    "shard-link-outside": (shard_links_outside, "outside the model directory"),
}

# stats and eval import torch (seconds per run): they get the faults that took the old Python
# reader's own path, the core's checks of the others are shared with apply and inspect.
TORCH_FAULTS = ["truncated-shard", "corrupt-json", "shape-disagrees", "index-wrong-shard", "tensor-in-two-shards", "shard-link-outside"]

COMMANDS: dict[str, list[str]] = {
    "apply": ["apply", "{m}", "--method", "magnitude", "--sparsity", "0.5"],
    "inspect": ["inspect", "{m}"],
    "stats": ["stats", "{m}", "--nsamples", "1", "--seqlen", "8", "--device", "cpu"],
    "eval": ["eval", "{m}", "--max-tokens", "16", "--seqlen", "8", "--device", "cpu"],
}

# inspect reads checkpoints with apply's reader, and stats and eval load torch first (seconds a case):
# the fast lane runs every apply case and the first case of each other command
FAST_CASE = {"inspect": next(iter(CHECKPOINT_FAULTS)), "stats": TORCH_FAULTS[0], "eval": TORCH_FAULTS[0]}
CASES = [
    pytest.param(cmd, fault, id=f"{cmd}-{fault}", marks=() if cmd == "apply" or FAST_CASE[cmd] == fault else pytest.mark.slow)
    for cmd, faults in (("apply", CHECKPOINT_FAULTS), ("inspect", CHECKPOINT_FAULTS), ("stats", TORCH_FAULTS), ("eval", TORCH_FAULTS))
    for fault in faults
]


@pytest.fixture
def workdir(tiny_models, tmp_path) -> Path:
    """tmp_path/w holding a private copy of the sharded tiny model (no sidecar) at w/tiny."""
    copy_model(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "w")
    return tmp_path / "w"


def run_expecting_failure(run_cli, args: list[Any], watch: Path, code: int = 2, env: dict[str, str] | None = None, **kw) -> str:
    """Run the CLI; the clean failure, and every file under `watch` unchanged (inputs intact,
    nothing at the output path, no temporary directory)."""
    before = tree_hashes(watch)
    rc, out, err = run_cli(args, env=env)
    assert "Traceback" not in err, err
    if code == 2:
        msg = assert_clean_error(rc, out, err, **kw)
    else:
        assert rc == code, err
        msg = err
    assert tree_hashes(watch) == before, f"files changed under {watch}:\n{err}"
    return msg


@pytest.mark.parametrize("command,fault", CASES)
def test_checkpoint_fault(run_cli, workdir, command, fault):
    model = workdir / "tiny"
    mutate, expected = CHECKPOINT_FAULTS[fault]
    mutate(model)
    args = [a.format(m=model) for a in COMMANDS[command]]
    run_expecting_failure(run_cli, args, workdir, contains=expected)


def test_inspect_of_huge_empty_tensor_returns(run_cli, workdir):
    """A [2^45, 0] tensor holds nothing; inspect used to walk its 2^45 empty rows forever."""
    model = workdir / "tiny"

    def mutate(h):
        name, e = entries(h)[-1]
        end = e["data_offsets"][1]
        h["huge.empty.weight"] = {"dtype": "BF16", "shape": [2**45, 0], "data_offsets": [end, end]}

    p = shard_of(model, Q0)
    rewrite_header(p, mutate)
    idx = index_of(model)
    idx["weight_map"]["huge.empty.weight"] = p.name
    (model / R.INDEX_NAME).write_text(json.dumps(idx))
    t0 = time.monotonic()
    code, out, err = run_cli(["inspect", model, "--json"])
    assert code == 0, err
    report = json.loads(out)
    huge = next(t for t in report["tensors"] if t["name"] == "huge.empty.weight")
    assert huge["numel"] == 0 and huge["shape"] == [2**45, 0]
    assert time.monotonic() - t0 < 120


# --------------------------------------------------------------------------------------------
# Impossible statistics: refused by apply (any method) and by merge, naming the tensor
# --------------------------------------------------------------------------------------------


def bad_stats(stats: dict[str, dict[str, Any]], what: str) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in stats.items()}
    s = out[K1]
    s["act_sum"], s["act_sqsum"] = np.array(s["act_sum"], dtype=np.float64), np.array(s["act_sqsum"], dtype=np.float64)
    if what == "nan-sum":
        s["act_sum"][3] = np.nan
    elif what == "inf-sqsum":
        s["act_sqsum"][0] = np.inf
    elif what == "negative-sqsum":
        s["act_sqsum"][5] = -1.0
    elif what == "zero-count":
        s["act_count"] = 0
    elif what == "negative-count":
        s["act_count"] = -5
    elif what == "negative-variance":
        s["act_sum"][2] = np.sqrt(s["act_sqsum"][2] * s["act_count"]) * 2 + 1.0
    return out


STATS_FAULTS = ["nan-sum", "inf-sqsum", "negative-sqsum", "zero-count", "negative-count", "negative-variance"]


@pytest.fixture
def stats_workdir(tiny_models, tmp_path):
    tm = tiny_models("bfloat16", sharded=True, stats=True)
    copy_model(tm, tmp_path / "w", sidecar=False)
    return tmp_path / "w", tm.stats


@pytest.mark.parametrize("what", STATS_FAULTS)
@pytest.mark.parametrize("method", slow_except(["wanda", "stade", "flap"], "wanda"))
def test_apply_refuses_impossible_statistics(run_cli, stats_workdir, what, method):
    work, stats = stats_workdir
    model = work / "tiny"
    side = R.write_sidecar(model, bad_stats(stats, what), work / "bad.safetensors")
    msg = run_expecting_failure(run_cli, ["apply", model, "--method", method, "--sparsity", "0.2", "--stats", side], work, contains=K1)
    assert "invalid stats sidecar" in msg


@pytest.mark.parametrize("what", STATS_FAULTS)
def test_merge_refuses_impossible_statistics(run_cli, stats_workdir, what):
    work, stats = stats_workdir
    model = work / "tiny"
    good = R.write_sidecar(model, stats, work / "good.safetensors")
    bad = R.write_sidecar(model, bad_stats(stats, what), work / "bad.safetensors")
    run_expecting_failure(run_cli, ["stats", "merge", good, bad, "--out", work / "ab.safetensors"], work, contains=K1)


@pytest.mark.parametrize("spelling", ["same", "other-spelling"])
def test_merge_refuses_an_input_given_twice(run_cli, stats_workdir, spelling):
    work, stats = stats_workdir
    a = R.write_sidecar(work / "tiny", stats, work / "a.safetensors")
    again = a if spelling == "same" else work / "tiny" / ".." / "a.safetensors"
    run_expecting_failure(run_cli, ["stats", "merge", a, again, "--out", work / "ab.safetensors"], work, contains="twice")


@pytest.mark.parametrize("which", [0, 1])
def test_merge_refuses_writing_over_an_input(run_cli, tiny_models, stats_workdir, which):
    work, stats = stats_workdir
    model = work / "tiny"
    a = R.write_sidecar(model, stats, work / "a.safetensors")
    other = compute_other_half(model)
    b = R.write_sidecar(model, other, work / "b.safetensors")
    out = (a, b)[which]
    run_expecting_failure(run_cli, ["stats", "merge", a, b, "--out", out], work, contains="never writes over its input")


def compute_other_half(model: Path) -> dict[str, dict[str, Any]]:
    from conftest import compute_stats

    return compute_stats(model, seed=1, nsamples=2, seqlen=16)


# --------------------------------------------------------------------------------------------
# Arguments and the environment
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", ["0", "10000"])
def test_threads_out_of_range(run_cli, workdir, threads):
    model = workdir / "tiny"
    msg = run_expecting_failure(run_cli, ["apply", model, "--method", "magnitude", "--sparsity", "0.5", "--threads", threads], workdir)
    assert "1 to 1024" in msg or "at least 1" in msg


@pytest.mark.parametrize("value", ["abc", "100000"])
def test_thread_env_out_of_range(run_cli, workdir, value):
    model = workdir / "tiny"
    env = cli_env(LLMPRUNE_NUM_THREADS=value)
    run_expecting_failure(run_cli, ["apply", model, "--method", "magnitude", "--sparsity", "0.5"], workdir, env=env, contains="LLMPRUNE_NUM_THREADS")


def test_empty_out_path(run_cli, workdir):
    run_expecting_failure(run_cli, ["apply", workdir / "tiny", "--method", "magnitude", "--sparsity", "0.5", "--out", ""], workdir)


def test_existing_empty_out_is_used(run_cli, workdir):
    """An empty output directory is accepted up front and filled (it used to be refused only at the end)."""
    (workdir / "out").mkdir()
    code, out, err = run_cli(["apply", workdir / "tiny", "--method", "magnitude", "--sparsity", "0.5", "--out", workdir / "out"])
    assert code == 0, err
    assert sorted(p.name for p in workdir.iterdir()) == ["out", "tiny"]
    assert (workdir / "out" / "config.json").is_file()


# --------------------------------------------------------------------------------------------
# Symbolic links in the model directory
# --------------------------------------------------------------------------------------------


def test_link_cycle_is_not_followed(run_cli, workdir):
    model = workdir / "tiny"
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("kept")
    (model / "loop").symlink_to(".")
    (model / "extra" / "up").symlink_to("..")
    code, out, err = run_cli(["apply", model, "--method", "magnitude", "--sparsity", "0.5", "--out", workdir / "out"])
    assert code == 0, err
    assert (workdir / "out" / "extra" / "notes.txt").read_text() == "kept"
    assert not (workdir / "out" / "loop").exists() and not (workdir / "out" / "extra" / "up").exists()


def test_link_out_of_the_model_is_refused(run_cli, workdir):
    model = workdir / "tiny"
    big = workdir / "big"
    big.mkdir()
    (big / "blob.bin").write_bytes(b"\0" * 1024)
    (model / "cache").symlink_to("../big")
    run_expecting_failure(run_cli, ["apply", model, "--method", "magnitude", "--sparsity", "0.5"], workdir, contains="outside the model directory")


def test_hub_snapshot_links_are_followed(run_cli, tiny_models, tmp_path):
    """The hub cache layout: snapshots/<rev>/<file> are links into the repository's blobs/."""
    src = tiny_models("bfloat16", sharded=True, stats=False).path
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(src))):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes((src / f).read_bytes())
        (snap / f).symlink_to(os.path.relpath(blob, snap))
    code, out, err = run_cli(["apply", snap, "--method", "magnitude", "--sparsity", "0.5", "--out", tmp_path / "out"])
    assert code == 0, err
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A checkpoint big enough that pruning it takes a while (read-only: apply never writes into it)."""
    model = tmp_path_factory.mktemp("big") / "ck"
    gen = Path(__file__).resolve().parents[2] / "benches" / "make_checkpoint.py"
    subprocess.run([sys.executable, str(gen), str(model), "--shape", "1b", "--layers", "6"], check=True, capture_output=True)
    return model


def _start_apply(model: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmprune", "apply", str(model), "--method", "magnitude", "--sparsity", "0.5", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        # a shell without job control starts background jobs with SIGINT ignored; undo that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_staging(proc: subprocess.Popen, parent: Path) -> None:
    deadline = time.monotonic() + 120
    while not any(".llmprune-tmp-" in p.name for p in parent.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_signal_stops_the_cli(big_model, signum):
    """Ctrl-C, and SIGTERM (timeout, kill, schedulers) like it: exit 130 and nothing left behind."""
    model, tmp_path = big_model, big_model.parent
    proc = _start_apply(model)
    _wait_for_staging(proc, tmp_path)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("apply finished before the signal arrived")
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["error: interrupted; no output was written"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "no output or staging directory left"


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_by_the_next(run_cli, big_model):
    model, tmp_path = big_model, big_model.parent
    proc = _start_apply(model)
    _wait_for_staging(proc, tmp_path)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate(timeout=60)
    left = [p for p in tmp_path.iterdir() if ".llmprune-tmp-" in p.name]
    if not left:
        pytest.skip("the run ended before it was killed")
    code, out, err = run_cli(["apply", model, "--method", "magnitude", "--sparsity", "0.5"])
    assert code == 0, err
    assert "left by an interrupted run" in err and str(left[0]) in err
    assert not any(".llmprune-tmp-" in p.name for p in tmp_path.iterdir())
    for p in tmp_path.iterdir():  # the finished output; the module's other tests expect only the model
        if p.name != model.name:
            shutil.rmtree(p)
