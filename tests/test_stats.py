"""`llmprune stats`: the layer-streamed calibration pass against full-model references, the sidecar,
merging, sequential mode, data parallelism, memory, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reference as R
import stats_helpers as H
from conftest import assert_clean_error, cli_env

from llmprune.calibration import sidecar
from llmprune.errors import UsageError
from llmprune.calibration.activations import collect_stats
from llmprune.calibration.sequential import Sequential

BUILDERS = {
    "llama": R.tiny_llama_dir,
    "opt": H.tiny_opt_dir,
    "gpt2": H.tiny_gpt2_dir,
    "qwen2": H.tiny_qwen2_dir,
    "mistral": H.tiny_mistral_dir,
}


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory):
    """arch_dir(arch, sharded=False, tokenizer=False, **config) -> a tiny checkpoint (cached)."""
    cache: dict[tuple, Path] = {}

    def get(arch: str, sharded: bool = False, tokenizer: bool = False, **config: Any) -> Path:
        key = (arch, sharded, tokenizer, tuple(sorted(config.items())))
        if key not in cache:
            path = BUILDERS[arch](tmp_path_factory.mktemp(arch) / "tiny", sharded=sharded, **config)
            if tokenizer:
                H.add_tokenizer(path, vocab_size=int(H.read_config(path)["vocab_size"]))
            cache[key] = path
        return cache[key]

    return get


def assert_stats_close(ours: dict[str, sidecar.LayerStats], ref: dict[str, dict[str, Any]], rtol: float = 1e-6) -> None:
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        o = ours[name]
        assert o.act_count == r["act_count"], name
        assert o.input_axis == r["input_axis"], name
        for mine, theirs in ((o.act_sum, r["act_sum"]), (o.act_sqsum, r["act_sqsum"])):
            assert mine.dtype == np.float64 and mine.shape == theirs.shape, name
            scale = float(np.abs(theirs).max()) or 1.0
            np.testing.assert_allclose(mine, theirs, rtol=rtol, atol=rtol * scale, err_msg=name)


def as_ref_layout(layers: dict[str, sidecar.LayerStats]) -> dict[str, dict[str, Any]]:
    return {
        n: {"act_sum": s.act_sum, "act_sqsum": s.act_sqsum, "act_count": s.act_count, "input_axis": s.input_axis}
        for n, s in layers.items()
    }


# --------------------------------------------------------------------------------------------
# Statistics against the full-model reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,sharded", [("llama", True), ("opt", False), ("gpt2", False), ("qwen2", True), ("mistral", False)])
def test_stats_equal_full_model_reference(arch_dir, arch, sharded):
    path = arch_dir(arch, sharded=sharded)
    ids = R.random_samples(3, 24, vocab=256, seed=1)
    res = collect_stats(path, ids, device="cpu")
    assert res.dtype == "float32" and res.device == "cpu" and res.mode == "dense"
    assert res.tokens == 3 * 24 and res.blocks == 2
    ref = R.reference_stats(R.load_f32_model(path), ids)
    assert_stats_close(res.layers, ref)
    if arch == "gpt2":
        assert {s.input_axis for s in res.layers.values()} == {0}
        assert "transformer.h.0.attn.c_attn.weight" in res.layers


@pytest.mark.parametrize("arch,prefix", [("opt", "model."), ("gpt2", "transformer.")])
def test_checkpoint_names_without_base_prefix(arch_dir, tmp_path, arch, prefix):
    """Original OPT / GPT-2 repositories store names without the base-model prefix; the sidecar uses
    the checkpoint's own names."""
    import shutil

    path = tmp_path / "stripped"
    shutil.copytree(arch_dir(arch), path)
    H.strip_prefix(path, prefix)
    ids = R.random_samples(2, 16, seed=2)
    res = collect_stats(path, ids, device="cpu")
    ref = R.reference_stats(R.load_f32_model(arch_dir(arch)), ids)
    ref = {k[len(prefix) :]: v for k, v in ref.items()}
    assert_stats_close(res.layers, ref)


@pytest.mark.slow
def test_more_layers_and_bf16_compute(arch_dir):
    """A deeper model; and bf16 compute (allowed with --dtype) stays close to the float32 reference."""
    path = arch_dir("llama", num_hidden_layers=5)
    ids = R.random_samples(2, 16, seed=3)
    ref = R.reference_stats(R.load_f32_model(path), ids)
    assert_stats_close(collect_stats(path, ids, device="cpu").layers, ref)
    low = collect_stats(path, ids, device="cpu", dtype="bfloat16")
    assert low.dtype == "bfloat16"
    for name, r in ref.items():
        np.testing.assert_allclose(low.layers[name].act_sqsum, r["act_sqsum"], rtol=0.1)


# --------------------------------------------------------------------------------------------
# Sequential mode
# --------------------------------------------------------------------------------------------


def reference_mask_fn(w, method, *, sparsity=None, pattern=None, act_sum=None, act_sqsum=None, act_count=0, name=""):
    stats = {"act_sum": act_sum, "act_sqsum": act_sqsum, "act_count": act_count}
    return R.reference_mask(w, method, sparsity=sparsity, pattern=pattern, stats=stats, name=name)


@pytest.mark.parametrize(
    "arch,method,sparsity,pattern",
    [("llama", "wanda", 0.5, None), ("gpt2", "stade", None, (2, 4)), ("opt", "stade-w", 0.6, None)],
)
def test_sequential_equals_block_by_block_reference(arch_dir, arch, method, sparsity, pattern):
    path = arch_dir(arch)
    ids = R.random_samples(3, 20, seed=4)
    ref = H.sequential_reference(path, ids, method, sparsity=sparsity, pattern=pattern)
    seq = Sequential(method, sparsity, pattern)
    res = collect_stats(path, ids, device="cpu", sequential=seq, mask_fn=reference_mask_fn)
    assert res.mode == "sequential"
    assert_stats_close(res.layers, ref)
    # block 0 sees the dense model; later blocks see pruned ones, so they differ from dense stats
    dense = collect_stats(path, ids, device="cpu").layers
    late = [n for n in ref if ".1." in n]
    assert any(not np.allclose(dense[n].act_sqsum, res.layers[n].act_sqsum) for n in late)
    assert all(v > 0 for v in res.pruned.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequential_compensation_equals_reference(arch_dir, arch):
    """--compensate: each pruned linear's bias gains (W − W')μ before the next block (LLaMA: biases
    created; GPT-2: its Conv1D biases rewritten), as a whole-model reference does it."""
    pytest.importorskip("llmprune._core")
    path = arch_dir(arch)
    ids = R.random_samples(3, 20, seed=6)
    ref = H.sequential_reference(path, ids, "wanda", sparsity=0.5, compensate=True)
    res = collect_stats(path, ids, device="cpu", sequential=Sequential("wanda", 0.5, compensate=True))
    assert_stats_close(res.layers, ref)
    assert res.uncompensated == []
    plain = collect_stats(path, ids, device="cpu", sequential=Sequential("wanda", 0.5)).layers
    late = [n for n in ref if ".1." in n]
    assert any(not np.allclose(plain[n].act_sum, res.layers[n].act_sum, rtol=1e-4) for n in late)


@pytest.mark.slow
def test_sequential_with_core_masks(arch_dir):
    """The pass prunes with the core's compute_mask, the masks `apply` computes."""
    pytest.importorskip("llmprune._core")
    path = arch_dir("llama")
    ids = R.random_samples(3, 20, seed=5)
    ref = H.sequential_reference(path, ids, "wanda", sparsity=0.5)
    res = collect_stats(path, ids, device="cpu", sequential=Sequential("wanda", 0.5))
    assert_stats_close(res.layers, ref)


# --------------------------------------------------------------------------------------------
# The sidecar file and merging
# --------------------------------------------------------------------------------------------


def write_sidecar(path: Path, model: Path, res, nsamples: int, seqlen: int) -> Path:
    cal = {"source": "random-ids", "nsamples": nsamples, "seqlen": seqlen, "seed": 0, "tokens": res.tokens}
    return sidecar.write(path, model, res.layers, calibration=cal)


def test_sidecar_layout_matches_docs(arch_dir, tmp_path):
    path = arch_dir("gpt2")
    ids = R.random_samples(2, 16, seed=6)
    res = collect_stats(path, ids, device="cpu")
    out = write_sidecar(tmp_path / "s.safetensors", path, res, 2, 16)
    header, _ = R.read_header(out)
    meta = json.loads(header["__metadata__"]["llmprune"])
    fp, described = R.fingerprint_and_tensors(path)
    assert meta["format"] == "llmprune-stats" and meta["format_version"] == 1
    assert meta["model_fingerprint"] == fp and meta["model_tensors"] == described
    assert meta["mode"] == "dense" and meta["sequential"] is None
    assert meta["calibration"]["tokens"] == 32
    assert set(meta["layers"]) == set(res.layers)
    for name, info in meta["layers"].items():
        assert info == {"input_axis": 0}
        in_features = int(described[name].split("[")[1].rstrip("]").split(",")[0])  # Conv1D: [in, out]
        for key in ("act_sum", "act_sqsum"):
            assert header[f"{name}.{key}"]["dtype"] == "F64"
            assert header[f"{name}.{key}"]["shape"] == [in_features]
        assert header[f"{name}.act_count"]["dtype"] == "I64" and header[f"{name}.act_count"]["shape"] == [1]
    back = R.read_sidecar_stats(out)
    assert_stats_close(sidecar.read(out).layers, back, rtol=0)
    # no temporary file is left beside it
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]


def test_reference_fingerprint_matches_core(arch_dir):
    from llmprune import _core

    path = arch_dir("llama", sharded=True)
    doc = json.loads(_core.open_checkpoint(str(path)))
    assert R.fingerprint_and_tensors(path) == (doc["fingerprint"], doc["model_tensors"])


def test_merge_of_halves_equals_one_run(arch_dir, tmp_path):
    path = arch_dir("llama", sharded=True)
    ids = R.random_samples(4, 16, seed=7)
    full = collect_stats(path, ids, device="cpu")
    a = write_sidecar(tmp_path / "a.safetensors", path, collect_stats(path, ids[:2], device="cpu"), 2, 16)
    b = write_sidecar(tmp_path / "b.safetensors", path, collect_stats(path, ids[2:], device="cpu"), 2, 16)
    summary = sidecar.merge([a, b], tmp_path / "ab.safetensors")
    assert summary["tokens"] == 64 and summary["layers"] == len(full.layers)
    merged = sidecar.read(tmp_path / "ab.safetensors")
    assert_stats_close(merged.layers, as_ref_layout(full.layers), rtol=1e-12)
    assert merged.meta["calibration"]["nsamples"] == 4 and merged.meta["calibration"]["tokens"] == 64
    assert merged.meta["model_fingerprint"] == R.fingerprint_and_tensors(path)[0]


def test_merge_refuses_other_models(arch_dir, tmp_path):
    ids = R.random_samples(2, 16, seed=8)
    one, two = arch_dir("llama"), arch_dir("llama", num_hidden_layers=3)
    a = write_sidecar(tmp_path / "a.safetensors", one, collect_stats(one, ids, device="cpu"), 2, 16)
    b = write_sidecar(tmp_path / "b.safetensors", two, collect_stats(two, ids, device="cpu"), 2, 16)
    from llmprune import _core

    with pytest.raises(_core.LlmpruneError) as exc:
        sidecar.merge([a, b], tmp_path / "ab.safetensors")
    assert "a.safetensors" in str(exc.value) and "b.safetensors" in str(exc.value)
    assert "different models" in str(exc.value) and "same checkpoint" in exc.value.hint
    assert not (tmp_path / "ab.safetensors").exists()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cli_model(arch_dir) -> Path:
    """A tiny LLaMA with a tokenizer (so that the CLI can tokenize the built-in text). Read-only."""
    return arch_dir("llama", sharded=True, tokenizer=True)


@pytest.fixture
def model_copy(cli_model, tmp_path) -> Path:
    import shutil

    dest = tmp_path / "m" / "tiny"
    shutil.copytree(cli_model, dest)
    return dest


def test_cli_stats_end_to_end(run_cli, model_copy):
    from transformers import AutoTokenizer

    from llmprune.data.sources import describe_source
    from llmprune.data.windows import calibration_samples

    code, out, err = run_cli(["stats", model_copy, "--nsamples", "3", "--seqlen", "32", "--seed", "5", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) >= {"out", "tokens", "blocks", "seconds", "tokens_per_s", "device"}
    sc = model_copy / R.SIDECAR_NAME
    assert Path(summary["out"]) == sc and sc.is_file()
    assert summary["tokens"] == 96 and summary["blocks"] == 2 and summary["device"] == "cpu"
    # the same windows through the full-model reference
    tok = AutoTokenizer.from_pretrained(str(model_copy))
    ids = calibration_samples(None, tok, 3, 32, 5)
    ref = R.reference_stats(R.load_f32_model(model_copy), ids)
    assert_stats_close(sidecar.read(sc).layers, ref)
    meta = sidecar.read(sc).meta
    assert meta["calibration"] == {"source": describe_source(None), "nsamples": 3, "seqlen": 32, "seed": 5, "tokens": 96}
    # `apply` accepts the sidecar
    code, out, err = run_cli(["apply", model_copy, "--method", "wanda", "--sparsity", "0.5", "--json"])
    assert code == 0, err


@pytest.mark.slow
def test_cli_stats_sequential_records_mode(run_cli, model_copy, tmp_path):
    out_path = tmp_path / "seq.safetensors"
    code, out, err = run_cli(
        ["stats", model_copy, "--nsamples", "2", "--seqlen", "16", "--out", out_path, "--sequential", "--method", "wanda", "--pattern", "2:4"]
    )
    assert code == 0, err
    assert out.startswith("wrote ")
    meta = sidecar.read(out_path).meta
    assert meta["mode"] == "sequential" and meta["sequential"] == {"method": "wanda", "pattern": "2:4"}
    assert not (model_copy / R.SIDECAR_NAME).exists()


@pytest.mark.slow
def test_cli_merge(run_cli, model_copy, tmp_path, arch_dir):
    a, b, ab = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "ab.safetensors"
    for path, seed in ((a, 1), (b, 2)):
        code, _, err = run_cli(["stats", model_copy, "--nsamples", "2", "--seqlen", "16", "--seed", seed, "--out", path])
        assert code == 0, err
    code, out, err = run_cli(["stats", "merge", a, b, "--out", ab, "--json"])
    assert code == 0, err
    assert json.loads(out)["tokens"] == 64
    sa, sb, sab = (sidecar.read(p) for p in (a, b, ab))
    for name, s in sab.layers.items():
        np.testing.assert_array_equal(s.act_sum, sa.layers[name].act_sum + sb.layers[name].act_sum)
        assert s.act_count == 64
    assert sab.meta["calibration"]["seed"] == [1, 2]
    # a sidecar of another model: refused, naming the files
    other = arch_dir("opt")
    ids = R.random_samples(2, 16)
    c = write_sidecar(tmp_path / "c.safetensors", other, collect_stats(other, ids, device="cpu"), 2, 16)
    code, out, err = run_cli(["stats", "merge", a, c, "--out", tmp_path / "ac.safetensors"])
    assert_clean_error(code, out, err, contains=("a.safetensors", "c.safetensors", "different models"))
    assert not (tmp_path / "ac.safetensors").exists()


def test_cli_help_of_both_forms(run_cli):
    code, out, err = run_cli(["stats", "--help"])
    assert code == 0 and "--nsamples" in out and "--sequential" in out and "stats merge" in out
    code, out, err = run_cli(["stats", "merge", "--help"])
    assert code == 0 and "--out" in out and "--nsamples" not in out


@pytest.mark.parametrize(
    "args,contains",
    [
        (["--nsamples", "0"], "--nsamples"),
        (["--nsamples", "-3"], "--nsamples"),
        (["--seqlen", "129"], "context"),
        (["--calib", "nosuchsource"], "unknown text source"),
        (["--calib", "{binary}"], "utf-8"),
        (["--calib", "{short}", "--seqlen", "64"], "longer than --seqlen"),
        (["--sequential"], "--method"),
        (["--method", "wanda", "--sparsity", "0.5"], "--sequential"),
        (["--sequential", "--method", "nope", "--sparsity", "0.5"], "unknown method"),
        (["--sequential", "--method", "wanda"], "--sparsity"),
        (["--device", "tpu"], "device"),
    ],
)
def test_cli_stats_bad_input(model_copy, tmp_path, args, contains, capsys):
    from llmprune import cli

    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text \xc3\x28")
    short = tmp_path / "short.txt"
    short.write_text("A short text.")
    args = [a.format(binary=binary, short=short) for a in args]
    before = sorted(os.listdir(model_copy))
    # the console script's entry point in this process: a process per case cost 5 s of imports
    # (test_cli_stats_missing_model goes through real processes)
    code = cli.main(["stats", str(model_copy), "--nsamples", "2", "--seqlen", "16", *args])  # the last value counts
    out, err = capsys.readouterr()
    assert_clean_error(code, out, err, contains=contains)
    assert sorted(os.listdir(model_copy)) == before


@pytest.mark.slow
def test_cli_stats_missing_model(run_cli, tmp_path):
    code, out, err = run_cli(["stats", tmp_path / "nope"])
    assert_clean_error(code, out, err, contains="not found")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(["stats", tmp_path / "empty"])
    assert_clean_error(code, out, err, contains="config.json")
    code, out, err = run_cli(["stats", "merge", tmp_path / "x.safetensors", tmp_path / "y.safetensors", "--out", tmp_path / "z.safetensors"])
    assert_clean_error(code, out, err, contains="not found")


def test_cli_stats_unwritable_model_dir(run_cli, model_copy):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root can write into read-only directories")
    os.chmod(model_copy, 0o555)
    try:
        code, out, err = run_cli(["stats", model_copy, "--nsamples", "1", "--seqlen", "8"])
    finally:
        os.chmod(model_copy, 0o755)
    assert_clean_error(code, out, err, contains="not writable", hint_contains="--out")


@pytest.mark.slow
def test_cli_stats_model_without_tokenizer(run_cli, arch_dir, tmp_path):
    import shutil

    shutil.copytree(arch_dir("gpt2"), tmp_path / "g")
    code, out, err = run_cli(["stats", tmp_path / "g", "--nsamples", "1", "--seqlen", "8"])
    assert_clean_error(code, out, err, contains="tokenizer")


# --------------------------------------------------------------------------------------------
# Data parallelism (torchrun, gloo on the CPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run_cli, model_copy, tmp_path):
    one = tmp_path / "one.safetensors"
    two = tmp_path / "two.safetensors"
    common = ["stats", str(model_copy), "--nsamples", "5", "--seqlen", "16", "--device", "cpu"]
    code, _, err = run_cli([*common, "--out", one])
    assert code == 0, err
    env = cli_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmprune", *common, "--out", str(two), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # rank 0 alone prints
    assert summary["world_size"] == 2 and summary["tokens"] == 80
    a, b = sidecar.read(one), sidecar.read(two)
    assert_stats_close(b.layers, as_ref_layout(a.layers), rtol=1e-12)
    assert a.meta["calibration"] == b.meta["calibration"]


GROUP_SHUTDOWN_SCRIPT = r"""
import os, sys
from llmprune.calibration.distributed import init_distributed, shutdown_distributed

def threads():
    return set(os.listdir("/proc/self/task"))

before = threads()
info = init_distributed("cpu")
gloo = threads() - before
import transformers.modeling_utils  # as the layer streamer does, after the group exists
info.barrier()
shutdown_distributed(info)
left = gloo & threads()
print(f"rank {info.rank}: {len(gloo)} threads of the group, {len(left)} left after shutdown", file=sys.stderr)
sys.exit(1 if not gloo or left else 0)
"""


@pytest.mark.slow
def test_torchrun_group_is_gone_after_shutdown(tmp_path):
    """Nothing imported after init keeps the process group alive: its gloo threads end at shutdown,
    not at interpreter exit, where they aborted rank 1 now and then (SIGABRT)."""
    script = tmp_path / "group_shutdown.py"
    script.write_text(GROUP_SHUTDOWN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        env=cli_env(OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(" 0 left after shutdown") == 2, proc.stderr


# --------------------------------------------------------------------------------------------
# Memory: one block at a time
# --------------------------------------------------------------------------------------------

PEAK_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
import transformers.models.llama.modeling_llama  # imports are not the pass's memory
from llmprune.calibration.activations import collect_stats

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
    f.write("5")
base = status("VmRSS")
collect_stats(sys.argv[1], ids, device="cpu")
print(base, status("VmHWM"))
"""


def peak_rss(model: Path) -> tuple[int, int]:
    """(RSS before the pass, RSS high-water mark during it) in bytes, in a fresh process."""
    # A fixed mmap threshold: freed blocks go back to the OS at once, so RSS follows live memory
    # rather than glibc's heap fragmentation (which otherwise adds ~1 MB per block here, and noise).
    env = cli_env(MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    base, peak = (int(x) for x in proc.stdout.split())
    return base, peak


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the RSS high-water mark")
def test_peak_memory_is_one_block(arch_dir):
    shape = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
    shallow = arch_dir("llama", num_hidden_layers=2, **shape)
    deep = arch_dir("llama", num_hidden_layers=16, **shape)
    block_f32 = 4 * (4 * 512 * 512 + 3 * 512 * 2048)  # 16.8 MB; the deep model holds 14 more blocks (235 MB)
    b_shallow, p_shallow = peak_rss(shallow)
    b_deep, p_deep = peak_rss(deep)
    grow_shallow, grow_deep = p_shallow - b_shallow, p_deep - b_deep
    print(f"peak RSS growth: 2 layers {grow_shallow / 1e6:.1f} MB, 16 layers {grow_deep / 1e6:.1f} MB, one block (f32) {block_f32 / 1e6:.1f} MB")
    assert grow_deep < grow_shallow + block_f32
    assert grow_deep < 4 * block_f32
