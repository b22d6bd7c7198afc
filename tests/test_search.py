"""`llmprune search` (EvoPress): level switches keep the target exactly, the search finds the best
allocation a brute force finds on a tiny model, a block built on the fly equals `apply`'s output bit
for bit, the top-K KL fitness equals the full KL computed here from the formula on the fully loaded
models, schedules round-trip through `apply --allocation FILE` (unstructured and depth), Ctrl-C keeps
the best schedule so far, and bad input is refused before anything is written."""

from __future__ import annotations

import itertools
import json
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, tree_hashes
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
import stats_helpers as H

WINDOWS = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
QUICK = ["--generations", "2", "--offspring", "4", "--survivors", "2,1", "--tokens", "32,64"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny float32 LLaMA (4 blocks) with a tokenizer and its stats sidecar. Read-only."""
    return H.dense_with_stats(tmp_path_factory.mktemp("dense") / "tiny", WINDOWS)


def _open(dense: Path, *, sparsity: float = 0.5, step: float = 0.2, topk: int = 256):
    from llmprune import search as sr
    from llmprune.calibration.sidecar import SIDECAR_NAME, read
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import calibration_samples
    from llmprune.model.stream import LayerStreamer

    streamer = LayerStreamer(dense, device="cpu", with_head=True)
    samples = calibration_samples(None, load_tokenizer(dense), 4, 32, 0)
    builder = sr.MaskLevels(streamer, "wanda", read(dense / SIDECAR_NAME).layers, lambda lv: sr.level_sparsity(sparsity, step, lv), 1 << 30)
    return streamer, samples, builder, sr.Evaluator(streamer, samples, builder, topk=topk)


def _apply_schedule(run_cli, dense: Path, values: list[float], tmp_path: Path, name: str) -> Path:
    schedule = tmp_path / f"{name}.json"
    schedule.write_text(json.dumps(values))
    out = tmp_path / name
    code, _, err = run_cli(["apply", dense, "--method", "wanda", "--sparsity", "0.5", "--allocation", schedule, "--out", out, "--json"])
    assert code == 0, err
    return out


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_level_switches_keep_the_target_and_the_bounds(blocks, below, above, seed, mutations):
    from llmprune.search import Space

    space = Space([-below] * blocks, [above] * blocks)
    rng = random.Random(seed)
    c = tuple([0] * blocks)
    for _ in range(50):
        c = space.mutate(c, rng, mutations)
        assert sum(c) == 0
        assert all(-below <= x <= above for x in c)
    depth = Space([0] * blocks, [1] * blocks)
    d = depth.random(1, rng)
    for _ in range(20):
        d = depth.mutate(d, rng, mutations)
        assert sum(d) == 1 and set(d) <= {0, 1}


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_a_packed_gram_unpacks_to_the_symmetric_matrix(n):
    import numpy as np

    from llmprune.calibration.gram import pack_lower
    from llmprune.search import unpack_lower

    a = np.random.default_rng(n).standard_normal((n, n))
    sym = a + a.T
    assert np.array_equal(unpack_lower(pack_lower(sym)), sym)


def test_a_block_built_on_the_fly_equals_apply_bit_for_bit(run_cli, dense, tmp_path):
    from llmprune import search as sr

    candidate = (1, -1, 2, -2)
    out = _apply_schedule(run_cli, dense, [sr.level_sparsity(0.5, 0.2, lv) for lv in candidate], tmp_path, "applied")
    written, _ = R.read_checkpoint(out)
    streamer, _, builder, _ = _open(dense)
    compared = 0
    for i, level in enumerate(candidate):
        streamer.load_block(i)
        builder.begin(i)
        builder.set(i, level)
        for name, mod, _axis in streamer.prunable(i):
            expected = torch.from_numpy(R.to_f32(written[name]))
            assert torch.equal(mod.weight.detach(), expected), name
            compared += 1
        builder.end(i)
        streamer.free_block(i)
    assert compared == 4 * 7
    assert builder.built == 4


@pytest.mark.parametrize("method,update", [("sparsegpt", False), ("wanda", True)])
def test_a_swept_block_equals_apply_bit_for_bit(run_cli, dense, tmp_path, method, update):
    """sparsegpt and --update levels come from the core's sweep on the Gram sidecar, as apply runs it."""
    import shutil

    from llmprune import search as sr
    from llmprune.calibration.sidecar import SIDECAR_NAME, read

    model = tmp_path / "m"
    shutil.copytree(dense, model)
    code, _, err = run_cli(["stats", model, *WINDOWS, "--gram"])
    assert code == 0, err
    candidate = (1, -1, 0, 0)
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps([sr.level_sparsity(0.5, 0.2, lv) for lv in candidate]))
    out = tmp_path / "applied"
    extra = ["--update"] if update else []
    code, _, err = run_cli(["apply", model, "--method", method, "--sparsity", "0.5", *extra, "--allocation", schedule, "--out", out, "--json"])
    assert code == 0, err
    written, _ = R.read_checkpoint(out)
    from llmprune.model.stream import LayerStreamer

    streamer = LayerStreamer(model, device="cpu", with_head=True)
    layers = read(model / SIDECAR_NAME).layers if method != "sparsegpt" else None
    builder = sr.SweepLevels(
        streamer, method, layers, lambda lv: sr.level_sparsity(0.5, 0.2, lv), model / "llmprune-gram.safetensors", damp=0.01, blocksize=128
    )
    for i, level in enumerate(candidate):
        streamer.load_block(i)
        builder.begin(i)
        builder.set(i, level)
        for name, mod, _axis in streamer.prunable(i):
            assert torch.equal(mod.weight.detach(), torch.from_numpy(R.to_f32(written[name]))), name
        builder.end(i)
        streamer.free_block(i)
    assert builder.built == 4 and builder.bytes_on_disk > 0
    tmp = builder.tmp
    builder.close()
    assert not tmp.exists()


def test_the_fitness_is_the_full_kl_divergence_when_k_is_the_vocabulary(run_cli, dense, tmp_path):
    """The evaluator's layer-streamed top-K KL (K = vocabulary) equals KL(dense || pruned) computed
    here on the two fully loaded models, position by position, for the candidate `apply` writes."""
    from transformers import AutoModelForCausalLM

    from llmprune import search as sr

    candidate = (2, 0, -1, -1)
    out = _apply_schedule(run_cli, dense, [sr.level_sparsity(0.5, 0.2, lv) for lv in candidate], tmp_path, "applied")
    _, samples, _, evaluator = _open(dense, topk=256)
    got = evaluator.fitness([candidate, (0, 0, 0, 0)], [0, 1, 2, 3])
    with torch.no_grad():
        p = torch.log_softmax(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(input_ids=samples).logits.double(), -1)
        q = torch.log_softmax(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=samples).logits.double(), -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert got[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert got[1] > 0 and got[0] != got[1]
    # with a smaller K the remaining mass is one bucket: a lower bound of the full KL (log-sum inequality)
    _, _, _, top8 = _open(dense, topk=8)
    assert top8.fitness([candidate], [0, 1, 2, 3])[0] <= got[0] + 1e-6


def test_the_search_finds_the_allocation_a_brute_force_finds(dense):
    """Four blocks, levels -1..1 at 0.8 +- 0.15: all 19 allocations of mean 0.8 scored on every
    window; the search, whose last selection step scores on every window, ends at the best one."""
    from llmprune import search as sr

    _, _, _, evaluator = _open(dense, sparsity=0.8, step=0.15)
    every = [c for c in itertools.product((-1, 0, 1), repeat=4) if sum(c) == 0]
    assert len(every) == 19
    scores = evaluator.fitness(every, [0, 1, 2, 3])
    best = every[min(range(len(every)), key=lambda j: scores[j])]
    assert best != (0, 0, 0, 0), "a test where uniform is best would not show the search doing anything"
    space = sr.unstructured_levels(4, 0.8, 1, 0.15)
    settings_ = sr.Settings(generations=12, offspring=8, survivors=(3, 1), tokens=(32, 128), seed=1)
    result = sr.evolve(evaluator.fitness, space, settings_, nwindows=4, seqlen=32)
    assert result.best == best
    assert result.fitness == pytest.approx(min(scores), rel=1e-6)
    assert result.history == sorted(result.history, reverse=True), "elitism: the parent's fitness never rises"
    again = sr.evolve(evaluator.fitness, space, settings_, nwindows=4, seqlen=32)
    assert again.best == result.best and again.history == result.history, "deterministic for a seed"


def _provenance(model_dir: Path) -> dict:
    from safetensors import safe_open

    shard = sorted(model_dir.glob("*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as f:
        return json.loads(f.metadata()["llmprune"])


def test_an_unstructured_schedule_round_trips_through_apply(run_cli, dense, tmp_path):
    schedule = tmp_path / "s.json"
    code, stdout, err = run_cli(["search", dense, "--method", "wanda", "--sparsity", "0.6", *WINDOWS, *QUICK, "--levels", "2", "--out", schedule, "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    doc = json.loads(schedule.read_text())
    assert doc["kind"] == "unstructured" and doc["format"] == "llmprune-schedule"
    values = doc["block_sparsity"]
    assert len(values) == 4 and sum(values) / 4 == pytest.approx(0.6, abs=1e-12)
    assert summary["search"]["generations_done"] == 2 and len(doc["search"]["fitness_history"]) == 2
    assert summary["search"]["best_fitness_all_windows"] <= summary["search"]["start_fitness_all_windows"] + 1e-9
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(["apply", dense, "--method", "wanda", "--sparsity", "0.6", "--allocation", schedule, "--out", out, "--json"])
    assert code == 0, err
    assert json.loads(stdout)["block_sparsity"] == pytest.approx(values, abs=1e-12)
    prov = _provenance(out)
    assert json.loads(prov["search"])["seed"] == 0 and prov["schedule"] == str(schedule)
    # a schedule it wrote is replaced with --force
    code, _, err = run_cli(["search", dense, "--method", "wanda", "--sparsity", "0.6", *WINDOWS, *QUICK, "--seed", "1", "--out", schedule, "--force"])
    assert code == 0, err
    assert json.loads(schedule.read_text())["search"]["seed"] == 1


def test_a_depth_schedule_round_trips_through_apply(run_cli, dense, tmp_path):
    schedule = tmp_path / "d.json"
    code, stdout, err = run_cli(["search", dense, "--method", "block-influence", "--remove-blocks", "2", *WINDOWS, *QUICK, "--out", schedule, "--json"])
    assert code == 0, err
    doc = json.loads(schedule.read_text())
    assert doc["kind"] == "depth" and len(doc["removed_blocks"]) == 2
    out = tmp_path / "short"
    code, stdout, err = run_cli(["apply", dense, "--method", "block-influence", "--allocation", schedule, "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    assert s["removed_blocks"] == doc["removed_blocks"] and s["blocks_after"] == 2
    prov = _provenance(out)
    assert prov["removed_blocks"] == doc["removed_blocks"] and "search" in prov


def test_bad_input_is_refused_and_nothing_is_written(run_cli, dense, tmp_path):
    before = tree_hashes(dense)
    out = tmp_path / "s.json"
    cases = [
        (["--method", "wanda", "--sparsity", "0.5", "--generations", "0"], "--generations"),
        (["--method", "wanda", "--sparsity", "0.5", "--step", "0.6"], "no level besides 0.5"),
        (["--method", "wanda", "--sparsity", "0.5", "--survivors", "2,2"], "last selection step"),
        (["--method", "wanda", "--sparsity", "0.5", "--survivors", "2,1", "--tokens", "32"], "one value per selection step"),
        (["--method", "reap", "--sparsity", "0.2"], "does not cover reap"),
        (["--method", "wanda", "--sparsity", "0.5", "--width-multiple", "8"], "--width-multiple applies to the structured methods"),
        (["--method", "flap", "--sparsity", "0.3", "--step", "0.12"], "out of reach for block 0"),
        (["--method", "flap", "--sparsity", "0.3", "--update"], "--update applies to unstructured methods"),
        (["--method", "sparsegpt", "--sparsity", "0.5"], "needs input Gram statistics"),
        (["--method", "wanda", "--sparsity", "0.5", "--update"], "needs input Gram statistics"),
        (["--method", "wanda", "--sparsity", "0.5", "--damp", "0.02"], "apply to sparsegpt and --update"),
        (["--method", "wanda", "--sparsity", "0.5", "--topk", "257"], "exceeds the model's vocabulary"),
        (["--method", "nope", "--sparsity", "0.2"], "unknown --method"),
        (["--method", "block-influence", "--remove-blocks", "4"], "leaves none"),
        (["--method", "wanda", "--remove-blocks", "1"], "--remove-blocks applies"),
        (["--method", "wanda", "--sparsity", "0.5", "--stats", tmp_path / "none.safetensors"], "needs activation statistics"),
    ]
    for args, message in cases:
        code, stdout, err = run_cli(["search", dense, *args, *WINDOWS, "--out", out])
        assert_clean_error(code, stdout, err, contains=message)
        assert not out.exists()
    out.write_text("keep me")
    code, stdout, err = run_cli(["search", dense, "--method", "wanda", "--sparsity", "0.5", *WINDOWS, "--out", out])
    assert_clean_error(code, stdout, err, contains="exists", hint_contains="--force")
    code, stdout, err = run_cli(["search", dense, "--method", "wanda", "--sparsity", "0.5", *WINDOWS, "--out", out, "--force"])
    assert_clean_error(code, stdout, err, contains="not a schedule file")
    assert out.read_text() == "keep me"
    # a schedule searched on another model
    other = R.tiny_llama_dir(tmp_path / "other", dtype="float32", num_hidden_layers=4, seed=5)
    H.add_tokenizer(other)
    foreign = tmp_path / "foreign.json"
    code, _, err = run_cli(["search", dense, "--method", "magnitude", "--sparsity", "0.5", *WINDOWS, *QUICK, "--out", foreign])
    assert code == 0, err
    for method, extra in (("magnitude", ["--sparsity", "0.5"]), ("block-influence", [])):
        code, stdout, err = run_cli(["apply", other, "--method", method, *extra, "--allocation", foreign, "--out", tmp_path / "x"])
        if method == "magnitude":  # the hint is the search to run on this model, sized for this device
            hint = f"llmprune search {other} --method magnitude --sparsity 0.5"
            assert_clean_error(code, stdout, err, contains="searched on another model", hint_contains=hint)
            assert re.search(r"\(about [\d.]+ (s|min|h) on this CPU; Ctrl-C keeps the best schedule so far\)", err), err
        else:
            assert_clean_error(code, stdout, err, contains="per-block sparsities")
        assert not (tmp_path / "x").exists()
    assert tree_hashes(dense) == before


def _structured_schedule(dense: Path, path: Path, method: str, values: list[float], width_multiple: int = 1) -> Path:
    """A structured schedule document for `dense`, as search writes one (without its search record)."""
    from llmprune.model.checkpoint import Checkpoint

    ckpt = Checkpoint(dense)
    doc = {
        "format": "llmprune-schedule",
        "format_version": 1,
        "model_fingerprint": ckpt.fingerprint,
        "model_content_sha256": ckpt.content_digest(),
        "method": method,
        "kind": "structured",
        "sparsity": sum(values) / len(values),
        "block_sparsity": values,
        "width_multiple": width_multiple,
    }
    path.write_text(json.dumps(doc))
    return path


def _kept(t: torch.Tensor, cut: tuple | None) -> torch.Tensor:
    """The rows and columns of `t` a planner's (row ranges, column ranges) keep."""
    if cut is None:
        return t
    rows, cols = cut
    if rows is not None:
        t = t[torch.cat([torch.arange(a, b) for a, b in rows])]
    if cols is not None:
        t = t[:, torch.cat([torch.arange(a, b) for a, b in cols])]
    return t


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_a_structured_block_built_on_the_fly_equals_apply_bit_for_bit(run_cli, dense, tmp_path, method):
    """Each block at its level, as the search builds it (the dense weights with the removed groups
    zeroed, the compensated biases), holds exactly what `apply --allocation FILE` writes in its kept
    rows and columns, and computes what the physically smaller block of load_pruned computes."""
    from llmprune import _core
    from llmprune import search as sr
    from llmprune.model.pruned import load_pruned
    from llmprune.model.stream import LayerStreamer

    candidate = (2, -1, 1, -2)
    values = [sr.level_sparsity(0.3, 0.1, lv) for lv in candidate]
    schedule = _structured_schedule(dense, tmp_path / "s.json", method, values)
    out = tmp_path / "applied"
    code, stdout, err = run_cli(["apply", dense, "--method", method, "--allocation", schedule, "--out", out, "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["allocation"] == "schedule" and summary["loader"] == "llmprune.load_pruned"
    written, _ = R.read_checkpoint(out)
    streamer = LayerStreamer(dense, device="cpu", with_head=True)
    planner = _core.StructuredPlanner(str(dense), method, width_multiple=1)
    builder = sr.StructuredLevels(streamer, planner, lambda lv: sr.level_sparsity(0.3, 0.1, lv))
    pruned = load_pruned(out)
    samples = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    h = streamer.capture(samples)
    compared = 0
    for i, level in enumerate(candidate):
        plan = builder.plan(i, level)
        assert len(plan["attn_keep"]) == summary["per_layer"][i]["num_key_value_heads"]
        assert len(plan["mlp_keep"]) == summary["per_layer"][i]["intermediate_size"]
        streamer.load_block(i)
        builder.begin(i)
        builder.set(i, candidate[(i + 1) % 4])  # another level first: set() must undo it
        builder.set(i, level)
        for name, mod, _axis in streamer.prunable(i):
            assert torch.equal(_kept(mod.weight.detach(), plan["slices"].get(name)), torch.from_numpy(R.to_f32(written[name]))), name
            bias = name.removesuffix(".weight") + ".bias"
            if bias in written:
                assert mod.bias is not None, bias
                assert torch.equal(_kept(mod.bias.detach(), plan["slices"].get(name, (None, None))[:1] + (None,)), torch.from_numpy(R.to_f32(written[bias]))), (
                    bias
                )
            compared += 1
        ours = streamer.run_block(i, h)
        with torch.no_grad():
            layer = pruned.model.layers[i]
            pos = torch.arange(h.shape[1]).unsqueeze(0)
            theirs = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pruned.model.rotary_emb(h, pos))
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        h = ours
        builder.end(i)
        streamer.free_block(i)
    assert compared == 4 * 7


def test_a_structured_schedule_round_trips_through_apply(run_cli, dense, tmp_path):
    schedule = tmp_path / "w.json"
    args = ["search", dense, "--method", "flap", "--sparsity", "0.3", *WINDOWS, *QUICK, "--levels", "2", "--step", "0.1", "--out", schedule, "--json"]
    code, stdout, err = run_cli(args)
    assert code == 0, err
    summary = json.loads(stdout)
    doc = json.loads(schedule.read_text())
    assert doc["kind"] == "structured" and doc["width_multiple"] == 1 and doc["compensate"] is True
    values = doc["block_sparsity"]
    assert len(values) == 4 and sum(values) / 4 == pytest.approx(0.3, abs=1e-12)
    assert summary["search"]["best_fitness_all_windows"] <= summary["search"]["start_fitness_all_windows"] + 1e-9
    out = tmp_path / "narrow"
    code, stdout, err = run_cli(["apply", dense, "--method", "flap", "--allocation", schedule, "--out", out, "--json"])
    assert code == 0, err
    s = json.loads(stdout)
    assert s["allocation"] == "schedule" and s["sparsity"] == pytest.approx(0.3)
    assert abs(s["achieved_sparsity"] - 0.3) < 0.05
    prov = _provenance(out)
    assert prov["allocation"] == "schedule" and prov["layer_sparsity"] == pytest.approx(values) and "search" in prov
    # each layer as uniform allocation at its own sparsity would prune it
    for i, v in enumerate(values):
        code, stdout, err = run_cli(["apply", dense, "--method", "flap", "--sparsity", str(v), "--width-multiple", "1", "--out", tmp_path / f"u{i}", "--json"])
        if v == 0 or code != 0:
            continue
        assert json.loads(stdout)["per_layer"][i]["intermediate_size"] == s["per_layer"][i]["intermediate_size"]
    # refused: another method, another sparsity, another width multiple, an unstructured method
    for extra, message in (
        (["--method", "wanda-sp"], "searched for flap, not wanda-sp"),
        (["--method", "flap", "--sparsity", "0.2"], "searched for sparsity 0.3"),
        (["--method", "flap", "--width-multiple", "8"], "width multiple 1, not 8"),
        (["--method", "wanda", "--sparsity", "0.3"], "per-block widths (structured)"),
        (["--method", "flap", "--skip-first", "1"], "--skip-first"),
    ):
        code, stdout, err = run_cli(["apply", dense, *extra, "--allocation", schedule, "--out", tmp_path / "x"])
        assert_clean_error(code, stdout, err, contains=message)
        assert not (tmp_path / "x").exists()


def test_ctrl_c_writes_the_best_schedule_so_far(dense, tmp_path):
    from conftest import cli_env

    out = tmp_path / "s.json"
    seen: list[str] = []
    started = threading.Event()
    args = ["search", str(dense), "--method", "wanda", "--sparsity", "0.5", *WINDOWS, "--generations", "100000", "--out", str(out)]
    with subprocess.Popen(
        [sys.executable, "-m", "llmprune", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                seen.append(line)
                if "best KL" in line:  # a progress line: the search loop has begun
                    started.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert started.wait(300) or proc.poll() is not None, "".join(seen)
        assert proc.poll() is None, "".join(seen)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
        reader.join(timeout=10)
    assert proc.returncode == 130, "".join(seen)
    doc = json.loads(out.read_text())
    assert doc["search"]["interrupted"] is True and doc["search"]["generations_done"] >= 1
    assert sum(doc["block_sparsity"]) / 4 == pytest.approx(0.5, abs=1e-12)
    assert any("wrote the best schedule so far" in line for line in seen)
    assert not any(line.startswith("error:") for line in seen), "".join(seen)


def test_search_on_a_cpu_says_how_long_when_it_is_long(dense, capsys):
    """The decision, not the timing: a search whose estimate passes five minutes on this CPU warns
    with the estimate and what Ctrl-C does; a short one says nothing."""
    from llmprune import search as sr
    from llmprune.calibration.estimate import search_seconds
    from llmprune.cli.search import _warn_if_slow_on_cpu

    def settings(generations: int) -> sr.Settings:
        return sr.Settings(generations=generations, offspring=16, survivors=(4, 1), tokens=(256, 1024))

    one = search_seconds(dense, generations=1, offspring=16, survivors=(4, 1), tokens=(256, 1024), nsamples=16, seqlen=32)
    many = search_seconds(dense, generations=1001, offspring=16, survivors=(4, 1), tokens=(256, 1024), nsamples=16, seqlen=32)
    assert 0 < one < many
    long = max(2, int(300 / ((many - one) / 1000)) * 2)
    _warn_if_slow_on_cpu(dense, "cpu", settings(long), 16, 32, 1.0)
    err = capsys.readouterr().err
    assert f"{long} generations take about" in err and "Ctrl-C stops the search" in err, err
    _warn_if_slow_on_cpu(dense, "cpu", settings(1), 16, 32, 1.0)
    assert capsys.readouterr().err == ""
