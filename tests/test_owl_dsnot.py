"""OWL allocation, DSnoT refinement and unstructured bias compensation (`apply --allocation owl`,
`--refine dsnot`, `--compensate`; `stats --sequential` with the same options) against the numpy
transcriptions in owl_dsnot_reference.py, and their bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
from conftest import assert_clean_error, copy_model, listing, tree_hashes
from owl_dsnot_reference import compensated_bias, dsnot_nm_reference, dsnot_reference, outlier_ratios, owl_sparsities, wanda_scores

from llmprune import _core


def weights_of(model: Path) -> dict[str, np.ndarray]:
    """Every 2-D weight of a checkpoint as float32 [out, in]."""
    tensors, _ = R.read_checkpoint(model)
    return {k: R.to_f32(t) for k, t in tensors.items() if len(t.shape) == 2}


def apply_json(run_cli, model: Path, out: Path, *args) -> dict:
    code, stdout, stderr = run_cli(["apply", model, "--out", out, "--json", *args])
    assert code == 0, stderr
    return json.loads(stdout)


# --------------------------------------------------------------------------------------------
# OWL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,m,lam", [(0.7, 5.0, 0.08), (0.5, 3.0, 0.2)])
@pytest.mark.slow
def test_owl_block_sparsities_equal_the_formula(run_cli, gram_model, tmp_path, sparsity, m, lam):
    """On the sidecar of a real `llmprune stats` pass: the block sparsities equal the numpy
    transcription, average exactly S, and every row of a block keeps floor(cols * s_block) zeros."""
    stats = R.read_sidecar_stats(gram_model / R.SIDECAR_NAME)
    w = weights_of(gram_model)
    d = outlier_ratios({k: w[k] for k in stats}, stats, m)
    want = owl_sparsities(list(d.values()), sparsity, lam)
    s = apply_json(run_cli, gram_model, tmp_path / "o", "--method", "wanda", "--sparsity", str(sparsity),
                   "--allocation", "owl", "--owl-m", str(m), "--owl-lambda", str(lam))
    got = np.array(s["block_sparsity"])
    assert np.allclose(got, want, atol=1e-12, rtol=0)
    assert abs(got.mean() - sparsity) < 1e-12
    assert got.std() > 0.01  # the blocks differ: not a uniform allocation in disguise
    prov = json.loads(R.read_header(next((tmp_path / "o").glob("*.safetensors")))[0]["__metadata__"]["llmprune"])
    assert prov["allocation"] == "owl" and prov["block_sparsity"] == s["block_sparsity"]


@pytest.mark.slow
def test_owl_masks_are_wanda_masks_at_each_blocks_sparsity(run_cli, gram_model, tmp_path):
    stats = R.read_sidecar_stats(gram_model / R.SIDECAR_NAME)
    s = apply_json(run_cli, gram_model, tmp_path / "o", "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl")
    w, out = weights_of(gram_model), weights_of(tmp_path / "o")
    for name in stats:
        b = int(name.split(".layers.")[1].split(".")[0])
        want = R.reference_mask(w[name], "wanda", sparsity=s["block_sparsity"][b], stats=stats[name])
        assert (want.sum(1) == int(w[name].shape[1] * s["block_sparsity"][b])).all()
        assert ((out[name] == 0) == (want | (w[name] == 0))).all(), name


@pytest.mark.slow
def test_schedule_file(run_cli, gram_model, tmp_path):
    blocks = 2
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"block_sparsity": [0.25, 0.75][:blocks]}))
    s = apply_json(run_cli, gram_model, tmp_path / "o", "--method", "magnitude", "--sparsity", "0.5", "--allocation", sched)
    assert s["allocation"] == "schedule" and s["block_sparsity"] == [0.25, 0.75]
    assert s["warnings"] == []
    w, out = weights_of(gram_model), weights_of(tmp_path / "o")
    for name, x in out.items():
        if ".layers." in name and name.endswith("proj.weight"):
            b = int(name.split(".layers.")[1].split(".")[0])
            assert ((x == 0).sum(1) >= int(x.shape[1] * [0.25, 0.75][b])).all()
            assert np.array_equal(x == 0, R.reference_mask(w[name], "magnitude", sparsity=[0.25, 0.75][b]) | (w[name] == 0))


@pytest.mark.slow
def test_a_schedule_whose_mean_is_not_the_sparsity_is_pruned_as_it_says_with_a_warning(run_cli, gram_model, tmp_path):
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps([0.5, 0.7]))
    code, stdout, stderr = run_cli(["apply", gram_model, "--out", tmp_path / "o", "--json", "--method", "magnitude", "--sparsity", "0.5", "--allocation", sched])
    assert code == 0, stderr
    s = json.loads(stdout)
    assert s["block_sparsity"] == [0.5, 0.7] and s["sparsity"] == 0.5
    assert any("average 0.600, not --sparsity 0.5" in w for w in s["warnings"]), s["warnings"]
    assert "warning:" in stderr and "average 0.600" in stderr
    assert s["params_pruned"] > 0.55 * s["params_prunable"], "the schedule's sparsities were used"
    seq = tmp_path / "seq.safetensors"
    code, _, stderr = run_cli(["stats", copy_model(gram_model, tmp_path / "m"), "--sequential", "--method", "wanda", "--sparsity", "0.5",
                               "--allocation", sched, "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", seq])
    assert code == 0, stderr
    assert "warning:" in stderr and "average 0.600, not --sparsity 0.5" in stderr
    assert json.loads(R.read_header(seq)[0]["__metadata__"]["llmprune"])["sequential"]["block_sparsity"] == [0.5, 0.7]


# --------------------------------------------------------------------------------------------
# DSnoT
# --------------------------------------------------------------------------------------------


def layer_with_stats(rows: int, cols: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(500, cols)) * rng.uniform(0.2, 3.0, size=cols) + rng.normal(size=cols)
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    return w, {"act_sum": x.sum(0), "act_sqsum": (x * x).sum(0), "act_count": x.shape[0]}


@pytest.mark.parametrize("method,sparsity,iters,threshold,same_sign",
                         [("wanda", 0.5, 50, 0.1 / 2048, False), ("stade", 0.6, 20, 1e-3, False), ("magnitude", 0.5, 50, 0.0, False),
                          ("wanda", 0.7, 50, 0.1 / 2048, True), ("stade", 0.6, 50, 0.0, True)])
def test_dsnot_equals_reference(method, sparsity, iters, threshold, same_sign):
    w, st = layer_with_stats(24, 160, 7)
    n = st["act_count"]
    mu = st["act_sum"] / n
    var = (st["act_sqsum"] - st["act_sum"] ** 2 / n) / (n - 1)
    kw = dict(sparsity=sparsity, act_sum=st["act_sum"], act_sqsum=st["act_sqsum"], act_count=n, name="model.layers.0.mlp.up_proj.weight")
    base = _core.compute_mask(w, method, **kw)
    got = _core.compute_mask(w, method, **kw, refine="dsnot", dsnot_iters=iters, dsnot_threshold=threshold, dsnot_skip="none",
                             dsnot_same_sign=same_sign or None)
    assert np.array_equal(base, R.reference_mask(w, method, sparsity=sparsity, stats=st))
    score = wanda_scores(w, st) if method == "wanda" else R.reference_scores(w, method, st)
    want = dsnot_reference(w, score, base, mu, var, iters=iters, threshold=threshold, same_sign=same_sign)
    assert np.array_equal(got, want)
    assert (got.sum(1) == base.sum(1)).all()
    assert (got != base).any()
    if same_sign:
        sign = lambda mk: np.sign(np.where(mk, w * mu[None, :], 0).sum(1))  # noqa: E731
        assert (sign(got) == sign(base)).all()
    # the expected output error |sum of pruned w mu| shrinks over the rows (not in every row: as in
    # the official default, a swap may overshoot the sign of the error)
    err = lambda m: np.abs(np.where(m, w * mu[None, :], 0).sum(1))  # noqa: E731
    assert err(got).mean() < 0.5 * err(base).mean()


@pytest.mark.parametrize("method,n,m,iters,threshold", [("wanda", 2, 4, 50, 0.1 / 2048), ("stade", 4, 8, 30, 0.0), ("magnitude", 2, 4, 50, 1e-4)])
def test_dsnot_nm_equals_reference_and_keeps_the_pattern(method, n, m, iters, threshold):
    w, st = layer_with_stats(24, 160, 11)
    cnt = st["act_count"]
    mu = st["act_sum"] / cnt
    var = (st["act_sqsum"] - st["act_sum"] ** 2 / cnt) / (cnt - 1)
    kw = dict(pattern=(n, m), act_sum=st["act_sum"], act_sqsum=st["act_sqsum"], act_count=cnt, name="model.layers.0.self_attn.q_proj.weight")
    base = _core.compute_mask(w, method, **kw)
    got = _core.compute_mask(w, method, **kw, refine="dsnot", dsnot_iters=iters, dsnot_threshold=threshold)
    score = wanda_scores(w, st) if method == "wanda" else R.reference_scores(w, method, st)
    assert np.array_equal(got, dsnot_nm_reference(w, score, base, mu, var, m, iters=iters, threshold=threshold))
    assert (got.reshape(24, -1, m).sum(-1) == n).all()  # every group of m still has n pruned
    assert (got != base).any()
    err = lambda mk: np.abs(np.where(mk, w * mu[None, :], 0).sum(1))  # noqa: E731
    assert err(got).mean() < 0.7 * err(base).mean()  # the expected output error shrinks over the rows
    signs = lambda mk: np.sign(np.where(mk, w * mu[None, :], 0).sum(1))  # noqa: E731
    assert (signs(got) == signs(base)).all()  # no swap flips a row's error sign


def test_dsnot_skips_the_mlp_by_default():
    w, st = layer_with_stats(8, 64, 3)
    kw = dict(sparsity=0.5, act_sum=st["act_sum"], act_sqsum=st["act_sqsum"], act_count=st["act_count"])
    plain = _core.compute_mask(w, "wanda", **kw, name="model.layers.0.mlp.up_proj.weight")
    assert np.array_equal(_core.compute_mask(w, "wanda", **kw, name="model.layers.0.mlp.up_proj.weight", refine="dsnot"), plain)
    assert not np.array_equal(_core.compute_mask(w, "wanda", **kw, name="model.layers.0.self_attn.q_proj.weight", refine="dsnot"), plain)


@pytest.mark.slow
def test_apply_dsnot_keeps_row_counts(run_cli, gram_model, tmp_path):
    stats = R.read_sidecar_stats(gram_model / R.SIDECAR_NAME)
    plain = apply_json(run_cli, gram_model, tmp_path / "a", "--method", "wanda", "--sparsity", "0.5")
    s = apply_json(run_cli, gram_model, tmp_path / "b", "--method", "wanda", "--sparsity", "0.5", "--refine", "dsnot", "--dsnot-skip", "none")
    assert s["dsnot_swaps"] > 0 and s["params_pruned"] == plain["params_pruned"]
    a, b, w = weights_of(tmp_path / "a"), weights_of(tmp_path / "b"), weights_of(gram_model)
    for name, st in stats.items():
        assert ((a[name] == 0).sum(1) == (b[name] == 0).sum(1)).all(), name
        n = st["act_count"]
        mu, var = st["act_sum"] / n, (st["act_sqsum"] - st["act_sum"] ** 2 / n) / (n - 1)
        base = R.reference_mask(w[name], "wanda", sparsity=0.5, stats=st)
        want = dsnot_reference(w[name], wanda_scores(w[name], st), base, mu, var)
        assert np.array_equal(b[name] == 0, want | (w[name] == 0)), name


@pytest.mark.slow
def test_apply_dsnot_nm(run_cli, gram_model, tmp_path):
    """apply --pattern 2:4 --refine dsnot: every group of 4 inputs keeps 2 zeros, as the reference."""
    stats = R.read_sidecar_stats(gram_model / R.SIDECAR_NAME)
    s = apply_json(run_cli, gram_model, tmp_path / "b", "--method", "wanda", "--pattern", "2:4", "--refine", "dsnot", "--dsnot-skip", "none")
    assert s["dsnot_swaps"] > 0
    b, w = weights_of(tmp_path / "b"), weights_of(gram_model)
    for name, st in stats.items():
        n = st["act_count"]
        mu, var = st["act_sum"] / n, (st["act_sqsum"] - st["act_sum"] ** 2 / n) / (n - 1)
        base = R.reference_mask(w[name], "wanda", pattern=(2, 4), stats=st)
        want = dsnot_nm_reference(w[name], wanda_scores(w[name], st), base, mu, var, 4)
        assert np.array_equal(b[name] == 0, want | (w[name] == 0)), name
        assert ((b[name] == 0).reshape(b[name].shape[0], -1, 4).sum(-1) >= 2).all(), name


# --------------------------------------------------------------------------------------------
# Bias compensation
# --------------------------------------------------------------------------------------------


def test_compensation_equals_reference_and_helps(run_cli, tiny_models, tmp_path):
    tm = tiny_models("float32", sharded=False, stats=True)
    model = tm.path
    out_plain, out_comp = tmp_path / "plain", tmp_path / "comp"
    apply_json(run_cli, model, out_plain, "--method", "wanda", "--sparsity", "0.6")
    s = apply_json(run_cli, model, out_comp, "--method", "wanda", "--sparsity", "0.6", "--compensate")
    cfg = json.loads((out_comp / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    before, plain = weights_of(model), weights_of(out_plain)
    tensors, _ = R.read_checkpoint(out_comp)
    stats = tm.stats
    assert s["biases_compensated"] == len(stats)
    assert s["bias_params_added"] == sum(before[n].shape[0] for n in stats)
    for name, st in stats.items():
        w_after = R.to_f32(tensors[name])
        assert np.array_equal(w_after, plain[name]), name  # compensation leaves the weights alone
        mu = np.asarray(st["act_sum"]) / st["act_count"]
        want = compensated_bias(before[name], w_after, mu, None)
        got = R.to_f32(tensors[name.replace(".weight", ".bias")])
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6), name
    # the compensated model is closer to the dense one on the calibration inputs
    samples = R.random_samples(4, 32, vocab=int(R.load_f32_model(model).config.vocab_size), seed=0)
    with torch.no_grad():
        dense = R.load_f32_model(model)(samples).logits
        errs = {k: float(((R.load_f32_model(d)(samples).logits - dense) ** 2).mean()) for k, d in (("plain", out_plain), ("comp", out_comp))}
    assert errs["comp"] < errs["plain"], errs


def test_compensation_of_existing_biases_and_shards(run_cli, tiny_models, tmp_path):
    """A sharded model whose linears already have biases: each bias is rewritten in place (no
    config change), the index stays consistent, and the values equal the reference."""
    tm = tiny_models("float32", sharded=True, stats=True, attention_bias=True, mlp_bias=True)
    out = tmp_path / "o"
    s = apply_json(run_cli, tm.path, out, "--method", "stade", "--sparsity", "0.5", "--compensate")
    assert s["bias_params_added"] == 0 and s["biases_compensated"] == len(tm.stats)
    before, _ = R.read_checkpoint(tm.path)
    after, _ = R.read_checkpoint(out)
    assert sorted(before) == sorted(after)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    for name, st in tm.stats.items():
        mu = np.asarray(st["act_sum"]) / st["act_count"]
        bias = name.replace(".weight", ".bias")
        want = compensated_bias(R.to_f32(before[name]), R.to_f32(after[name]), mu, R.to_f32(before[bias]))
        assert np.allclose(R.to_f32(after[bias]), want, rtol=1e-5, atol=1e-6), bias


def test_compensation_of_conv1d_weights(run_cli, tmp_path):
    """GPT-2's Conv1D weights are stored [in, out]: each output's bias gains Σ_in (W − W')[in, out] μ[in]."""
    import stats_helpers as H

    from llmprune.calibration import sidecar
    from llmprune.calibration.activations import collect_stats

    model = H.tiny_gpt2_dir(tmp_path / "m" / "tiny", dtype="float32")
    res = collect_stats(model, R.random_samples(3, 16, vocab=256, seed=2), device="cpu")
    sidecar.write(model / sidecar.SIDECAR_NAME, model, res.layers, calibration={"source": "ids", "nsamples": 3, "seqlen": 16, "seed": 2, "tokens": 48})
    out = tmp_path / "o"
    s = apply_json(run_cli, model, out, "--method", "wanda", "--sparsity", "0.5", "--compensate")
    assert s["bias_params_added"] == 0 and s["biases_compensated"] == len(res.layers) > 0
    before, _ = R.read_checkpoint(model)
    after, _ = R.read_checkpoint(out)
    for name, st in res.layers.items():
        mu = np.asarray(st.act_sum) / st.act_count
        bias = name.replace(".weight", ".bias")
        want = compensated_bias(R.to_f32(before[name]).T, R.to_f32(after[name]).T, mu, R.to_f32(before[bias]))
        assert np.allclose(R.to_f32(after[bias]), want, rtol=1e-5, atol=1e-6), bias


# --------------------------------------------------------------------------------------------
# Sequential statistics with OWL / DSnoT
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sequential_compensation_is_recorded(run_cli, gram_model, tmp_path):
    """stats --sequential --compensate records it; apply with the same flags reproduces the
    algorithm (no warning), without --compensate it warns. (The statistics themselves are checked
    against a whole-model reference in test_stats.py.)"""
    model = copy_model(gram_model, tmp_path / "m")
    seq = tmp_path / "seq.safetensors"
    code, _, err = run_cli(["stats", model, "--sequential", "--method", "wanda", "--sparsity", "0.5", "--compensate",
                            "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", seq])
    assert code == 0 and "not compensated" not in err, err
    assert json.loads(R.read_header(seq)[0]["__metadata__"]["llmprune"])["sequential"]["compensate"] is True
    code, _, err = run_cli(["apply", model, "--method", "wanda", "--sparsity", "0.5", "--compensate", "--stats", seq, "--out", tmp_path / "a"])
    assert code == 0 and "does not reproduce" not in err, err
    code, _, err = run_cli(["apply", model, "--method", "wanda", "--sparsity", "0.5", "--stats", seq, "--out", tmp_path / "b"])
    assert code == 0 and "bias compensation; pruning with wanda at 0.5 does not reproduce" in err, err
    code, _, err = run_cli(["stats", model, "--compensate", "--out", tmp_path / "c.safetensors"])
    assert_clean_error(code, "", err, contains="only apply with --sequential")


@pytest.mark.slow
def test_sequential_dsnot_same_sign_is_recorded(run_cli, gram_model, tmp_path):
    model = copy_model(gram_model, tmp_path / "m")
    seq = tmp_path / "seq.safetensors"
    code, _, err = run_cli(["stats", model, "--sequential", "--method", "wanda", "--sparsity", "0.6", "--refine", "dsnot", "--dsnot-same-sign",
                            "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", seq])
    assert code == 0, err
    assert json.loads(R.read_header(seq)[0]["__metadata__"]["llmprune"])["sequential"]["dsnot"]["same_sign"] is True
    args = ["apply", model, "--method", "wanda", "--sparsity", "0.6", "--refine", "dsnot", "--stats", seq]
    code, _, err = run_cli([*args, "--dsnot-same-sign", "--out", tmp_path / "a"])
    assert code == 0 and "does not reproduce" not in err, err
    code, _, err = run_cli([*args, "--out", tmp_path / "b"])
    assert code == 0 and "does not reproduce" in err, err


@pytest.mark.slow
def test_sequential_owl_records_the_dense_allocation(run_cli, gram_model, tmp_path):
    model = copy_model(gram_model, tmp_path / "m")
    seq = tmp_path / "seq.safetensors"
    code, _, err = run_cli(["stats", model, "--sequential", "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl",
                            "--refine", "dsnot", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out", seq])
    assert code == 0, err
    meta = json.loads(R.read_header(seq)[0]["__metadata__"]["llmprune"])["sequential"]
    # the allocation of the sequential run is OWL on the dense statistics of the same windows
    dense = apply_json(run_cli, model, tmp_path / "d", "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl")
    assert meta["allocation"] == "owl" and meta["block_sparsity"] == dense["block_sparsity"]
    assert meta["refine"] == "dsnot" and meta["dsnot"]["skip"] == "mlp"
    code, stdout, err = run_cli(["apply", model, "--stats", seq, "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl",
                                 "--refine", "dsnot", "--out", tmp_path / "a", "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    assert s["block_sparsity"] == meta["block_sparsity"] and s["warnings"] == []
    code, stdout, err = run_cli(["apply", model, "--stats", seq, "--method", "wanda", "--sparsity", "0.6", "--out", tmp_path / "b", "--json"])
    assert code == 0 and "does not reproduce" in " ".join(json.loads(stdout)["warnings"])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def bad_cases(tmp_path: Path) -> list[tuple[list, str]]:
    (tmp_path / "short.json").write_text("[0.5]")
    (tmp_path / "range.json").write_text("[0.5, 1.0]")
    (tmp_path / "neg.json").write_text('{"block_sparsity": [-0.1, 0.5]}')
    (tmp_path / "text.json").write_text("not json")
    wanda = ["--method", "wanda"]
    return [
        (wanda + ["--pattern", "2:4", "--allocation", "owl"], "N:M"),
        (wanda + ["--sparsity", "0.5", "--allocation", "owl", "--owl-lambda", "0.5"], "--owl-lambda"),
        (wanda + ["--sparsity", "0.5", "--allocation", "owl", "--owl-lambda", "0"], "--owl-lambda"),
        (wanda + ["--sparsity", "0.5", "--allocation", "owl", "--owl-m", "-1"], "--owl-m"),
        (wanda + ["--sparsity", "0.5", "--owl-m", "3"], "--allocation owl"),
        (wanda + ["--sparsity", "0.5", "--allocation", tmp_path / "short.json"], "decoder blocks"),
        (wanda + ["--sparsity", "0.5", "--allocation", tmp_path / "range.json"], "[0, 1)"),
        (wanda + ["--sparsity", "0.5", "--allocation", tmp_path / "neg.json"], "[0, 1)"),
        (wanda + ["--sparsity", "0.5", "--allocation", tmp_path / "text.json"], "not valid JSON"),
        (wanda + ["--sparsity", "0.5", "--allocation", tmp_path / "missing.json"], "no such file"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--refine", "dsnot"], "sparsegpt"),
        (wanda + ["--sparsity", "0.5", "--refine", "other"], "--refine"),
        (wanda + ["--sparsity", "0.5", "--dsnot-iters", "5"], "--refine dsnot"),
        (wanda + ["--sparsity", "0.5", "--refine", "dsnot", "--dsnot-iters", "0"], "--dsnot-iters"),
        (wanda + ["--sparsity", "0.5", "--refine", "dsnot", "--dsnot-skip", "both"], "--dsnot-skip"),
        (["--method", "flap", "--sparsity", "0.2", "--refine", "dsnot"], "unstructured"),
        (["--method", "flap", "--sparsity", "0.2", "--allocation", "owl"], "allocation"),
    ]


@pytest.mark.slow
def test_bad_input_writes_nothing(run_cli, gram_model, tmp_path):
    model = copy_model(gram_model, tmp_path / "m")
    before = tree_hashes(tmp_path / "m")
    for args, needle in bad_cases(tmp_path):
        out = tmp_path / "out"
        code, stdout, stderr = run_cli(["apply", model, *args, "--out", out])
        assert_clean_error(code, stdout, stderr, contains=needle)
        assert not out.exists(), args
        assert tree_hashes(tmp_path / "m") == before, args
        assert listing(tmp_path) == sorted(["m", "short.json", "range.json", "neg.json", "text.json"]), args


@pytest.mark.slow
def test_sequential_bad_input(run_cli, gram_model, tmp_path):
    model = copy_model(gram_model, tmp_path / "m")
    before = tree_hashes(tmp_path / "m")
    (tmp_path / "short.json").write_text("[0.5]")
    common = ["stats", model, "--sequential", "--method", "wanda", "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", tmp_path / "s.safetensors"]
    for args, needle in [
        (["--pattern", "2:4", "--allocation", "owl"], "N:M"),
        (["--sparsity", "0.5", "--allocation", tmp_path / "short.json"], "decoder blocks"),
        (["--sparsity", "0.5", "--refine", "dsnot", "--dsnot-iters", "0"], "dsnot-iters"),
    ]:
        code, stdout, stderr = run_cli([*common, *args])
        assert_clean_error(code, stdout, stderr, contains=needle)
        assert not (tmp_path / "s.safetensors").exists()
        assert tree_hashes(tmp_path / "m") == before
    code, stdout, stderr = run_cli(["stats", model, "--allocation", "owl", "--device", "cpu"])
    assert_clean_error(code, stdout, stderr, contains="--sequential")
