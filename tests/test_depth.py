"""Depth pruning (`apply --method block-influence`): the Block Influence sums of `stats` against a
whole-model hook reference, the pruned checkpoint against the original model with those blocks
skipped (stock transformers loads both), merge, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
import stats_helpers as H
from conftest import assert_clean_error, listing, tree_hashes
from test_stats import arch_dir  # noqa: F401 - fixture

from llmprune.calibration import sidecar
from llmprune.calibration.activations import collect_stats

BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}
LAYER_KEY = {"llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "opt": "num_hidden_layers", "gpt2": "n_layer"}


def block_cosines_reference(model, ids: torch.Tensor) -> np.ndarray:
    """Σ over tokens of cos(block input, block output) per decoder block, with hooks on the whole
    float32 model (float64 sums)."""
    blocks = H._decoder_blocks(model)
    sums = np.zeros(len(blocks))
    seen: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_mod, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def post(i):
        def hook(_mod, _args, _kwargs, out):
            o = (out[0] if isinstance(out, tuple) else out).detach().double()
            a = seen[i].double()
            cos = (a * o).sum(-1) / (a.norm(dim=-1) * o.norm(dim=-1))
            sums[i] += float(cos.sum())

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for j in range(ids.shape[0]):
                model(ids[j : j + 1])
    finally:
        for h in handles:
            h.remove()
    return sums


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
def test_block_influence_sums_equal_hook_reference(arch_dir, arch):
    path = arch_dir(arch, n_layer=4) if arch == "gpt2" else arch_dir(arch, num_hidden_layers=4)
    ids = R.random_samples(3, 24, vocab=256, seed=2)
    res = collect_stats(path, ids, device="cpu")
    want = block_cosines_reference(R.load_f32_model(path), ids)
    assert res.block_cos is not None and res.block_cos.count.tolist() == [72] * 4
    np.testing.assert_allclose(res.block_cos.cos_sum, want, rtol=1e-5, atol=1e-4)


def depth_model(arch_dir, arch: str, tmp_path: Path) -> Path:
    src = arch_dir(arch, tokenizer=True, n_layer=5) if arch == "gpt2" else arch_dir(arch, tokenizer=True, num_hidden_layers=5)
    model = tmp_path / "m" / "tiny"
    shutil.copytree(src, model)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.slow
def test_removed_blocks_equal_skipping_them(run_cli, arch_dir, tmp_path, arch):
    model = depth_model(arch_dir, arch, tmp_path)
    code, _, err = run_cli(["stats", model, "--nsamples", "3", "--seqlen", "24", "--device", "cpu"])
    assert code == 0, err
    blocks = sidecar.read(model / sidecar.SIDECAR_NAME).blocks
    influence = blocks.influence()
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", model, "--method", "block-influence", "--remove-blocks", "2", "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    want_removed = sorted(sorted(range(5), key=lambda b: (influence[b], b))[:2])
    assert s["removed_blocks"] == want_removed and s["blocks_after"] == 3
    np.testing.assert_allclose(s["block_influence"], influence, rtol=1e-12)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg[LAYER_KEY[arch]] == 3 and cfg["llmprune"]["depth"]["removed_blocks"] == want_removed
    if "layer_types" in H.read_config(model):
        assert len(cfg["layer_types"]) == 3
    # renumbered tensors, byte for byte
    before, _ = R.read_checkpoint(model)
    after, _ = R.read_checkpoint(out)
    kept = [b for b in range(5) if b not in want_removed]
    prefix = BLOCKS[arch]
    for name, t in after.items():
        if name.startswith(prefix + "."):
            rest = name[len(prefix) + 1 :]
            new, tail = rest.split(".", 1)
            name = f"{prefix}.{kept[int(new)]}.{tail}"
        assert R.bits(before[name]).tobytes() == R.bits(t).tobytes(), name
    per_block = sum(1 for n in before if n.startswith(f"{prefix}.0."))
    assert len(after) == len(before) - 2 * per_block

    # stock transformers loads it, and it computes what the original computes without those blocks
    ids = R.random_samples(2, 16, vocab=256, seed=4)
    ref = R.load_f32_model(model)
    blocks_list = H._decoder_blocks(ref)
    for b in reversed(want_removed):
        del blocks_list[b]
    for i, blk in enumerate(blocks_list):  # attention modules know their index (only caches use it)
        for mod in blk.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
    setattr(ref.config, LAYER_KEY[arch], 3)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [t for b, t in enumerate(ref.config.layer_types) if b not in want_removed]
    pruned = R.load_f32_model(out)
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits
        got = pruned(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_merge_adds_block_sums(arch_dir, tmp_path):
    path = arch_dir("llama", num_hidden_layers=4)
    ids = R.random_samples(4, 16, vocab=256, seed=6)
    parts = []
    for k, sl in enumerate((slice(0, 2), slice(2, 4))):
        r = collect_stats(path, ids[sl], device="cpu")
        p = tmp_path / f"{k}.safetensors"
        sidecar.write(p, path, r.layers, calibration={"source": "ids", "nsamples": 2, "seqlen": 16, "seed": 0, "tokens": 32}, blocks=r.block_cos)
        parts.append(r.block_cos)
    whole = collect_stats(path, ids, device="cpu").block_cos
    sidecar.merge([tmp_path / "0.safetensors", tmp_path / "1.safetensors"], tmp_path / "m.safetensors")
    merged = sidecar.read(tmp_path / "m.safetensors").blocks
    assert merged.count.tolist() == [64] * 4
    np.testing.assert_allclose(merged.cos_sum, whole.cos_sum, rtol=1e-9)


@pytest.mark.slow
def test_bad_input(run_cli, arch_dir, tmp_path):
    model = depth_model(arch_dir, "llama", tmp_path)
    code, _, err = run_cli(["stats", model, "--nsamples", "2", "--seqlen", "16", "--device", "cpu"])
    assert code == 0, err
    old = tmp_path / "old.safetensors"  # a sidecar without Block Influence sums (the reference writer)
    R.write_sidecar(model, R.read_sidecar_stats(model / sidecar.SIDECAR_NAME), path=old)
    before = tree_hashes(tmp_path)
    bi = ["--method", "block-influence"]
    cases = [
        (bi + ["--remove-blocks", "5"], "leave none", "remove at most 4"),
        (bi + ["--sparsity", "0.1"], "removes no block", None),
        (bi + ["--sparsity", "0.5", "--remove-blocks", "2"], "exactly one", None),
        (bi + ["--remove-blocks", "0"], "at least 1", None),
        (bi + ["--remove-blocks", "1", "--stats", old], "Block Influence", "rerun"),
        (bi + ["--remove-blocks", "1", "--pattern", "2:4"], "do not apply", None),
        (["--method", "wanda", "--sparsity", "0.5", "--remove-blocks", "1"], "--remove-blocks", None),
    ]
    for args, needle, hint in cases:
        code, stdout, stderr = run_cli(["apply", model, *args, "--out", tmp_path / "out"])
        assert_clean_error(code, stdout, stderr, contains=needle, hint_contains=hint)
        assert tree_hashes(tmp_path) == before, args
        assert "out" not in listing(tmp_path)
