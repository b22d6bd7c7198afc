"""Block reconstruction (`llmprune reconstruct PRUNED --dense MODEL`): every pruned weight stays zero
(N:M patterns kept), one block's fit equals a plain PyTorch loop written here from the formulas, zero
steps copy the input's tensors bit for bit, every block's loss goes down, structured and depth-pruned
checkpoints are reconstructed too, and bad input is refused before anything is written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
import stats_helpers as H
from conftest import assert_clean_error, tree_hashes

COMMON = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny float32 LLaMA (4 blocks) with a tokenizer and its stats sidecar. Read-only."""
    return H.dense_with_stats(tmp_path_factory.mktemp("dense") / "tiny", COMMON)


def prune(run_cli, dense: Path, out: Path, *args: str) -> Path:
    code, _, err = run_cli(["apply", dense, *args, "--out", out, "--json"])
    assert code == 0, err
    return out


def reconstruct(run_cli, pruned: Path, dense: Path, out: Path, *args: str) -> dict:
    code, stdout, err = run_cli(["reconstruct", pruned, "--dense", dense, *COMMON, "--out", out, "--json", *args])
    assert code == 0, err
    return json.loads(stdout)


def block_weights(model_dir: Path) -> dict[str, np.ndarray]:
    tensors, _ = R.read_checkpoint(model_dir)
    return {k: R.to_f32(t) for k, t in tensors.items() if ".layers." in k and k.endswith("proj.weight")}


def forward_is_finite(model_dir: Path) -> None:
    from llmprune import load_pruned

    model = load_pruned(model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=R.random_samples(1, 16, seed=3)).logits).all()


@pytest.mark.parametrize("target", [["--pattern", "2:4"], ["--sparsity", "0.6"]], ids=["2:4", "60%"])
def test_masks_and_nm_patterns_are_kept_and_every_loss_goes_down(run_cli, dense, tmp_path, target):
    pruned = prune(run_cli, dense, tmp_path / "p", "--method", "wanda", *target)
    s = reconstruct(run_cli, pruned, dense, tmp_path / "r", "--steps", "8", "--lr", "1e-3")
    before, after = block_weights(pruned), block_weights(tmp_path / "r")
    assert before.keys() == after.keys()
    changed = 0
    for name, w in before.items():
        assert np.array_equal(after[name][w == 0], w[w == 0]), f"{name}: a pruned weight moved"
        if target[0] == "--pattern":
            assert R.nm_compliant(after[name], 2, 4), name
        changed += int((after[name] != w).sum())
    assert changed > 0
    # attention, then MLP, for every block; each lowered its loss over the windows and was kept
    assert [(st["block"], st["stage"]) for st in s["stages"]] == [(b, st) for b in range(4) for st in ("attention", "mlp")]
    for st in s["stages"]:
        assert st["kept"] and st["loss_after"] < st["loss_before"], st
    assert s["tensors_rewritten"] == len(before) and s["tokens"] == 4 * 32 and s["peak_rss_mib"] > 0
    _, metas = R.read_checkpoint(tmp_path / "r")
    prov = json.loads(next(iter(metas.values()))["llmprune"])
    assert prov["method"] == "reconstruct" and prov["steps"] == 8 and prov["tokens"] == 128
    assert prov["input"]["method"] == "wanda", "the pruned model's provenance is kept under 'input'"
    forward_is_finite(tmp_path / "r")


def test_activations_spilled_to_files_give_the_same_result(run_cli, dense, tmp_path):
    from conftest import cli_env

    pruned = prune(run_cli, dense, tmp_path / "p", "--method", "wanda", "--pattern", "2:4")
    a = reconstruct(run_cli, pruned, dense, tmp_path / "a", "--steps", "3", "--lr", "1e-4")
    env = cli_env(LLMPRUNE_RECON_SPILL="1", TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    from conftest import run_cli_subprocess

    code, out, err = run_cli_subprocess(["reconstruct", pruned, "--dense", dense, *COMMON, "--steps", "3", "--lr", "1e-4", "--out", tmp_path / "b", "--json"], env=env)
    assert code == 0, err
    b = json.loads(out)
    assert a["activations"] == "device" and b["activations"] == "file"
    assert [st["loss_after"] for st in a["stages"]] == [st["loss_after"] for st in b["stages"]]
    wa, wb = block_weights(tmp_path / "a"), block_weights(tmp_path / "b")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert list((tmp_path / "tmp").iterdir()) == [], "the spill files are removed"


@pytest.mark.parametrize("variant", [["--inputs", "dense"], ["--granularity", "block"]], ids=["dense-inputs", "whole-block"])
def test_dense_inputs_and_whole_blocks(run_cli, dense, tmp_path, variant):
    pruned = prune(run_cli, dense, tmp_path / "p", "--method", "wanda", "--pattern", "2:4")
    s = reconstruct(run_cli, pruned, dense, tmp_path / "r", "--steps", "6", "--lr", "1e-3", *variant)
    stages = ["block"] if variant[0] == "--granularity" else ["attention", "mlp"]
    assert [(st["block"], st["stage"]) for st in s["stages"]] == [(b, st) for b in range(4) for st in stages]
    assert all(st["kept"] and st["loss_after"] < st["loss_before"] for st in s["stages"]), s["stages"]
    before, after = block_weights(pruned), block_weights(tmp_path / "r")
    for name, w in before.items():
        assert np.array_equal(after[name][w == 0], w[w == 0]) and R.nm_compliant(after[name], 2, 4), name
    if variant[0] == "--inputs":  # block 0's inputs are the same either way; later blocks' differ
        pruned_inputs = reconstruct(run_cli, pruned, dense, tmp_path / "q", "--steps", "6", "--lr", "1e-3")
        assert s["stages"][0] == pruned_inputs["stages"][0]
        assert s["stages"][-1]["loss_before"] != pruned_inputs["stages"][-1]["loss_before"]


def test_zero_steps_copy_the_tensors_bit_for_bit(run_cli, dense, tmp_path):
    pruned = prune(run_cli, dense, tmp_path / "p", "--method", "wanda", "--sparsity", "0.5")
    s = reconstruct(run_cli, pruned, dense, tmp_path / "r", "--steps", "0")
    assert s["stages"] == [] and s["tensors_rewritten"] == 0
    a, _ = R.read_checkpoint(pruned)
    b, _ = R.read_checkpoint(tmp_path / "r")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].data == b[k].data, k


def test_a_stage_that_does_not_improve_keeps_its_weights(run_cli, dense, tmp_path):
    pruned = prune(run_cli, dense, tmp_path / "p", "--method", "magnitude", "--sparsity", "0.5")
    code, stdout, err = run_cli(["reconstruct", pruned, "--dense", dense, *COMMON, "--out", tmp_path / "r", "--json", "--steps", "3", "--lr", "1e3"])
    assert code == 0, err
    s = json.loads(stdout)
    assert not all(st["kept"] for st in s["stages"]) and "did not lower their loss" in err
    before, after = block_weights(pruned), block_weights(tmp_path / "r")
    for st in s["stages"]:
        if not st["kept"]:
            part = "self_attn" if st["stage"] == "attention" else "mlp"
            for name in before:
                if f"layers.{st['block']}.{part}." in name:
                    assert np.array_equal(before[name], after[name]), name
    forward_is_finite(tmp_path / "r")


# --------------------------------------------------------------------------------------------
# One block against a plain PyTorch loop
# --------------------------------------------------------------------------------------------


def _layer_inputs(model, ids):
    """(hidden states, keyword arguments) with which the model calls its first decoder layer."""
    got = {}

    def hook(_m, args, kwargs):
        got["x"] = args[0] if args else kwargs["hidden_states"]
        got["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopIteration

    h = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except StopIteration:
        pass
    finally:
        h.remove()
    return got["x"], got["kw"]


def _reference_block0(pruned_dir: Path, dense_dir: Path, ids: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """LLaMA block 0 reconstructed by the formulas: h = x + attn(ln1(x)) fitted to the dense h with
    the attention's weights trainable, then y = h + mlp(ln2(h)) to the dense y with the MLP's; Adam,
    mean squared error, gradients of zero weights zeroed and zeros re-zeroed after each step."""
    dense, pruned = R.load_f32_model(dense_dir), R.load_f32_model(pruned_dir)
    dl, pl = dense.model.layers[0], pruned.model.layers[0]
    for p in [*dense.parameters(), *pruned.parameters()]:
        p.requires_grad_(False)
    xs, kws = [], None
    for j in range(ids.shape[0]):
        with torch.no_grad():
            x, kws = _layer_inputs(dense, ids[j : j + 1])
        xs.append(x)
    assert kws is not None
    kw = {k: v for k, v in kws.items() if k in ("attention_mask", "position_ids", "position_embeddings")}

    def attn(layer, x):
        return x + layer.self_attn(layer.input_layernorm(x), **kw)[0]

    def mlp(layer, h):
        return h + layer.mlp(layer.post_attention_layernorm(h))

    with torch.no_grad():
        h_d = [attn(dl, x) for x in xs]
        y_d = [mlp(dl, h) for h in h_d]
    n = len(xs)
    for stage, (mod, fn, targets) in enumerate(
        [(pl.self_attn, lambda x: attn(pl, x), h_d), (pl.mlp, lambda x: mlp(pl, attn(pl, x)), y_d)]
    ):
        params = [p for p in mod.parameters()]
        keep = [p.detach() != 0 for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed + 1000 * 0 + stage)
        for _ in range(steps):
            idx = torch.randperm(n, generator=gen)[: min(batch, n)]
            opt.zero_grad()
            for j in idx.tolist():
                loss = (fn(xs[j]) - targets[j]).pow(2).sum() / (len(idx) * targets[j].numel())
                loss.backward()
            with torch.no_grad():
                for p, k in zip(params, keep):
                    p.grad.mul_(k)
            opt.step()
            with torch.no_grad():
                for p, k in zip(params, keep):
                    p.mul_(k)
        for p in params:
            p.requires_grad_(False)
    return {f"model.layers.0.{name}": p.detach() for name, p in pl.named_parameters() if "proj" in name}


def test_one_block_equals_a_plain_pytorch_loop(run_cli, dense, tmp_path):
    from llmprune import reconstruct as rc
    from llmprune.calibration.distributed import DistInfo

    pruned = prune(run_cli, dense, tmp_path / "p", "--method", "wanda", "--pattern", "2:4")
    ids = R.random_samples(4, 32, seed=7)
    settings = rc.Settings(steps=6, lr=1e-3, batch_size=2, seed=5)
    expected = _reference_block0(pruned, dense, ids, settings.steps, settings.lr, settings.batch_size, settings.seed)

    pair = rc.open_pair(pruned, dense, device="cpu")
    with torch.no_grad():
        x = pair.dense.capture(ids).float()
        out, mid = rc.dense_targets(pair.dense, (0, 0), x.clone(), torch.empty_like(x))
        inputs = pair.pruned.capture(ids).float()
    pair.pruned.load_block(0)
    stages = rc.reconstruct_block(pair.pruned, 0, rc.BlockData(inputs, out, mid), settings, offset=0, n_global=4, dist=DistInfo())
    got = {name: p.detach() for _, tr in stages for name, p, _ in tr.items}
    assert [st.stage for st, _ in stages] == ["attention", "mlp"] and all(st.kept for st, _ in stages)
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------
# Structured and depth-pruned checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_structured_and_depth_pruned_outputs(run_cli, dense, tmp_path):
    flap = prune(run_cli, dense, tmp_path / "flap", "--method", "flap", "--sparsity", "0.2", "--allocation", "uniform")
    s = reconstruct(run_cli, flap, dense, tmp_path / "flap-r", "--steps", "4", "--lr", "1e-4")
    assert all(st["kept"] for st in s["stages"] if st["stage"] == "mlp")
    a, _ = R.read_checkpoint(flap)
    b, _ = R.read_checkpoint(tmp_path / "flap-r")
    assert {k: t.shape for k, t in a.items()} == {k: t.shape for k, t in b.items()}, "structured shapes unchanged"
    forward_is_finite(tmp_path / "flap-r")

    depth = prune(run_cli, dense, tmp_path / "depth", "--method", "block-influence", "--remove-blocks", "1")
    s = reconstruct(run_cli, depth, dense, tmp_path / "depth-r", "--steps", "4", "--lr", "1e-4")
    # the block before the removed one stands for two dense blocks: fitted whole
    whole = [st for st in s["stages"] if st["stage"] == "block"]
    assert len(whole) == 1 and whole[0]["kept"], s["stages"]
    assert len({st["block"] for st in s["stages"]}) == 3
    forward_is_finite(tmp_path / "depth-r")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _fails(run_cli, roots: list[Path], args: list, **kw) -> str:
    before = {r: tree_hashes(r) for r in roots}
    code, out, err = run_cli(args)
    msg = assert_clean_error(code, out, err, **kw)
    for r in roots:
        assert tree_hashes(r) == before[r], f"{r} changed"
    return msg


def test_bad_input_is_refused(run_cli, dense, tmp_path):
    (tmp_path / "w").mkdir()
    pruned = prune(run_cli, dense, tmp_path / "w" / "p", "--method", "wanda", "--sparsity", "0.5")
    out = tmp_path / "w" / "out"
    base = ["reconstruct", pruned, "--dense", dense, *COMMON, "--out", out]
    roots = [tmp_path / "w", dense]
    _fails(run_cli, roots, [*base, "--steps", "-1"], contains="--steps")
    _fails(run_cli, roots, [*base, "--lr", "0"], contains="--lr")
    _fails(run_cli, roots, [*base, "--granularity", "layer"], contains="--granularity", hint_contains="sublayer")
    _fails(run_cli, roots, ["reconstruct", pruned, "--dense", dense, *COMMON, "--out", dense / "sub"], contains="overlap")
    # another model of the same shapes (another seed): its embeddings differ
    other = R.tiny_llama_dir(tmp_path / "o" / "tiny", dtype="float32", num_hidden_layers=4, seed=3)
    H.add_tokenizer(other)
    _fails(run_cli, roots, ["reconstruct", pruned, "--dense", other, *COMMON, "--out", out], contains="not a pruned copy", hint_contains="--dense")
    # another architecture
    opt = H.tiny_opt_dir(tmp_path / "opt" / "tiny", dtype="float32")
    H.add_tokenizer(opt)
    _fails(run_cli, roots, ["reconstruct", pruned, "--dense", opt, *COMMON, "--out", out], contains="model_type", hint_contains="--dense")
    # another llmprune source (a pruned copy of a model with other shapes)
    small = R.tiny_llama_dir(tmp_path / "s" / "tiny", dtype="float32", num_hidden_layers=3)
    H.add_tokenizer(small)
    _fails(run_cli, roots, ["reconstruct", pruned, "--dense", small, *COMMON, "--out", out], contains="pruned from another checkpoint", hint_contains="--dense")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_it_and_leaves_nothing(run_cli, dense, tmp_path, signum):
    from conftest import cli_env

    (tmp_path / "w").mkdir()
    pruned = prune(run_cli, dense, tmp_path / "w" / "p", "--method", "wanda", "--sparsity", "0.5")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmprune", "reconstruct", str(pruned), "--dense", str(dense), *COMMON, "--steps", "100000", "--out", str(tmp_path / "w" / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not any(".llmprune-tmp-" in p.name for p in (tmp_path / "w").iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # into the fitting
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["p"], "no output or staging directory left"


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run_cli, dense, tmp_path):
    """Each rank holds half of the windows; the gradients are all-reduced, so both ranks take the
    steps one process takes (up to the order of the float32 sums)."""
    from conftest import cli_env

    pruned = prune(run_cli, dense, tmp_path / "p", "--method", "wanda", "--pattern", "2:4")
    one = reconstruct(run_cli, pruned, dense, tmp_path / "one", "--steps", "4", "--lr", "1e-4")
    args = ["reconstruct", str(pruned), "--dense", str(dense), *COMMON, "--steps", "4", "--lr", "1e-4", "--out", str(tmp_path / "two"), "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmprune", *args],
        capture_output=True,
        text=True,
        env=cli_env(OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    two = json.loads(proc.stdout)  # rank 0 alone prints
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["stages"], two["stages"]):
        assert a["kept"] == b["kept"] and a["loss_before"] == pytest.approx(b["loss_before"], rel=1e-5), (a, b)
    wa, wb = block_weights(tmp_path / "one"), block_weights(tmp_path / "two")
    for name in wa:
        assert np.abs(wa[name] - wb[name]).max() <= 2e-4, name
        assert np.array_equal(wa[name] == 0, wb[name] == 0), name
