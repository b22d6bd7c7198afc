"""`llmprune stats --grad`: gradient statistics for hywia against a whole-model PyTorch reference
(per-sample backward with hooks on the weights, estimates reduced in numpy float64), the streamed
backward against the whole-model one, the sidecar layout, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import reference as R
import stats_helpers as H
from conftest import assert_clean_error

from llmprune.calibration import sidecar
from llmprune.calibration.gradients import collect_grad_stats

BUILDERS = {"llama": R.tiny_llama_dir, "opt": H.tiny_opt_dir, "gpt2": H.tiny_gpt2_dir, "qwen2": H.tiny_qwen2_dir}


def reference_grad_stats(model_dir: Path, samples) -> dict[str, dict[str, np.ndarray]]:
    """Whole model in float32; for each sample a backward of its mean next-token loss, the weight
    gradients caught by tensor hooks; then the spec's sums in float64."""
    import torch
    from transformers.pytorch_utils import Conv1D

    model = R.load_f32_model(model_dir)
    weights = {}
    for blk in H._decoder_blocks(model):
        prefix = H._module_name(model, blk)
        for mname, mod in blk.named_modules():
            if isinstance(mod, (torch.nn.Linear, Conv1D)):
                weights[f"{prefix}.{mname}.weight"] = (mod.weight, 0 if isinstance(mod, Conv1D) else 1)
    for p in model.parameters():
        p.requires_grad_(False)
    caught: dict[str, np.ndarray] = {}
    handles = []
    for key, (w, _) in weights.items():
        w.requires_grad_(True)
        handles.append(w.register_hook(lambda g, key=key: caught.__setitem__(key, g.detach().double().numpy().copy())))
    per_sample: dict[str, list[np.ndarray]] = {k: [] for k in weights}
    for j in range(samples.shape[0]):
        ids = samples[j : j + 1]
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
        loss.backward()
        for k in weights:
            per_sample[k].append(caught[k])
    for h in handles:
        h.remove()
    out = {}
    for name, (w, axis) in weights.items():
        wd = w.detach().double().numpy()
        gs = np.stack(per_sample[name])
        rows, cols = [], []
        for idx in (np.arange(len(gs)), np.arange(0, len(gs), 2), np.arange(1, len(gs), 2)):
            g, f = gs[idx].mean(axis=0), (gs[idx] ** 2).mean(axis=0)
            s, h = wd * g, wd * wd * f
            q = np.stack([np.abs(s), s, h, np.abs(s - 0.5 * h)])
            in_axis = 1 + axis
            rows.append(q.sum(axis=in_axis))
            cols.append(q.sum(axis=3 - in_axis))
        out[name] = {"out": np.stack(rows), "inp": np.stack(cols), "count": np.array([len(gs), (len(gs) + 1) // 2, len(gs) // 2])}
    return out


def assert_grad_close(ours: dict[str, sidecar.GradStats], ref: dict[str, dict[str, np.ndarray]], rtol: float) -> None:
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        o = ours[name]
        np.testing.assert_array_equal(o.count, r["count"], err_msg=name)
        for mine, theirs, what in ((o.out, r["out"], "rows"), (o.inp, r["inp"], "columns")):
            assert mine.dtype == np.float64 and mine.shape == theirs.shape, (name, what)
            for q in range(4):
                scale = float(np.abs(theirs[:, q]).max()) or 1.0
                np.testing.assert_allclose(mine[:, q], theirs[:, q], rtol=rtol, atol=rtol * scale, err_msg=f"{name} {what} q={q}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str, **config) -> Path:
        key = arch + json.dumps(config, sort_keys=True)
        if key not in cache:
            cache[key] = BUILDERS[arch](tmp_path_factory.mktemp(arch) / "tiny", dtype="float32", **config)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
def test_streamed_gradients_equal_whole_model_reference(models, arch):
    path = models(arch)
    ids = R.random_samples(5, 16, vocab=256, seed=3)
    res = collect_grad_stats(path, ids, device="cpu")
    assert res.mode == "streamed" and res.nsamples == 5
    ref = reference_grad_stats(path, ids)
    assert_grad_close(res.layers, ref, rtol=2e-4)
    # the activation statistics come from the same forward pass
    assert_close_act = R.reference_stats(R.load_f32_model(path), ids)
    for name, s in res.stats.layers.items():
        np.testing.assert_allclose(s.act_sqsum, assert_close_act[name]["act_sqsum"], rtol=1e-6)


def test_streamed_equals_full_mode(models):
    path = models("llama", num_hidden_layers=3)
    ids = R.random_samples(4, 12, vocab=256, seed=4)
    streamed = collect_grad_stats(path, ids, device="cpu", mode="streamed")
    full = collect_grad_stats(path, ids, device="cpu", mode="full")
    assert full.mode == "full"
    assert abs(streamed.loss - full.loss) < 1e-5
    assert_grad_close(streamed.layers, {n: {"out": g.out, "inp": g.inp, "count": g.count} for n, g in full.layers.items()}, rtol=1e-4)


def test_estimates_are_consistent(models):
    """Internal identities of the sums: |Σ| ≤ Σ|.|, fisher ≥ 0, rows and columns add to the same total,
    and split A + B weigh into the whole by their sample counts for the signed first-order sum."""
    path = models("llama")
    ids = R.random_samples(5, 12, vocab=256, seed=5)
    res = collect_grad_stats(path, ids, device="cpu")
    for name, g in res.layers.items():
        assert np.all(np.abs(g.out[:, 1]) <= g.out[:, 0] + 1e-12)
        assert np.all(g.out[:, 2] >= 0)
        np.testing.assert_allclose(g.out.sum(axis=2), g.inp.sum(axis=2), rtol=1e-6, atol=1e-12)
        n_all, n_a, n_b = g.count
        np.testing.assert_allclose(g.out[0, 1] * n_all, g.out[1, 1] * n_a + g.out[2, 1] * n_b, rtol=1e-4, atol=1e-9)


@pytest.fixture
def cli_copy(tmp_path_factory, tmp_path) -> Path:
    """A writable bf16 sharded tiny LLaMA with a tokenizer."""
    import shutil

    src = R.tiny_llama_dir(tmp_path_factory.mktemp("gradcli") / "tiny", sharded=True)
    H.add_tokenizer(src)
    dest = tmp_path / "m" / "tiny"
    shutil.copytree(src, dest)
    return dest


@pytest.mark.slow
def test_cli_grad_sidecar_layout(run_cli, cli_copy, tmp_path):
    from transformers import AutoTokenizer

    from llmprune.data.windows import calibration_samples

    model = cli_copy
    code, out, err = run_cli(["stats", model, "--grad", "--nsamples", "4", "--seqlen", "16", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["grad"]["mode"] == "streamed" and summary["grad"]["nsamples"] == 4
    sc = sidecar.read(model / sidecar.SIDECAR_NAME)
    assert sc.meta["grad"] == {"nsamples": 4, "seqlen": 16, "tokens": 60, "loss": pytest.approx(summary["grad"]["loss"], abs=1e-5), "mode": "streamed", "dtype": "float32"}
    assert sc.grad is not None and sorted(sc.grad) == sorted(sc.layers)
    for name, g in sc.grad.items():
        shape = R.read_checkpoint(model)[0][name].shape
        assert g.out.shape == (3, 4, shape[0]) and g.inp.shape == (3, 4, shape[1])
        assert list(g.count) == [4, 2, 2]
    # the same windows through the reference (the checkpoint is bf16: compare at bf16-weight precision)
    ids = calibration_samples(None, AutoTokenizer.from_pretrained(str(model)), 4, 16, 0)
    assert_grad_close(sc.grad, reference_grad_stats(model, ids), rtol=2e-4)
    # activation-based methods still read the file; merging refuses it
    code, _, err = run_cli(["apply", model, "--method", "wanda", "--sparsity", "0.5", "--out", tmp_path / "w"])
    assert code == 0, err
    twin = tmp_path / "twin.safetensors"
    shutil.copyfile(model / sidecar.SIDECAR_NAME, twin)
    code, _, err = run_cli(["stats", "merge", model / sidecar.SIDECAR_NAME, twin, "--out", tmp_path / "m.safetensors"])
    assert code == 2 and "gradient statistics" in err and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    "args,contains",
    [
        pytest.param(["--grad", "--sequential", "--method", "wanda", "--sparsity", "0.5"], "cannot be combined", marks=pytest.mark.slow),
        (["--grad", "--grad-mode", "sideways"], "unknown --grad-mode"),
        pytest.param(["--grad-mode", "full"], "applies with --grad only", marks=pytest.mark.slow),
        pytest.param(["--grad", "--seqlen", "1"], "at least 2 tokens", marks=pytest.mark.slow),
    ],
)
def test_cli_grad_bad_input(run_cli, cli_copy, args, contains):
    before = sorted(p.name for p in cli_copy.iterdir())
    code, out, err = run_cli(["stats", cli_copy, "--nsamples", "2", *args])
    assert_clean_error(code, out, err, contains=contains)
    assert sorted(p.name for p in cli_copy.iterdir()) == before


@pytest.mark.slow
def test_spilled_block_inputs_give_the_same_estimates(models, monkeypatch):
    """With the kept block inputs in file-backed maps (as for a model whose activations exceed memory)."""
    import os
    import tempfile

    path = models("llama")
    ids = R.random_samples(3, 10, vocab=256, seed=6)
    in_memory = collect_grad_stats(path, ids, device="cpu")
    tmp = tempfile.mkdtemp()
    monkeypatch.setenv("LLMPRUNE_GRAD_SPILL", "1")
    monkeypatch.setenv("TMPDIR", tmp)
    tempfile.tempdir = None
    try:
        spilled = collect_grad_stats(path, ids, device="cpu")
    finally:
        tempfile.tempdir = None
    assert spilled.spilled and not in_memory.spilled
    assert os.listdir(tmp) == []  # removed afterwards
    for name, g in in_memory.layers.items():
        np.testing.assert_array_equal(spilled.layers[name].out, g.out)
        np.testing.assert_array_equal(spilled.layers[name].inp, g.inp)
