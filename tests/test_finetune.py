"""`llmprune finetune`: LoRA recovery fine-tuning on tiny checkpoints, merged into a checkpoint with the
input's exact layout; the loss goes down, only the targeted linears change, structured-pruned
checkpoints round-trip through load_pruned, and bad input fails cleanly without leaving output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import reference as R
import stats_helpers as H
from conftest import assert_clean_error, cli_env, copy_model, listing, tree_hashes

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A learning rate high enough that 40 steps reliably lower the loss of a random tiny model.
FAST = ["--seqlen", "32", "--nsamples", "16", "--batch-size", "4", "--lr", "3e-3", "--dropout", "0", "--device", "cpu"]


def with_tokenizer(src: Any, parent: Path) -> Path:
    model = copy_model(src, parent)
    H.add_tokenizer(model)
    return model


def text_file(folder: Path) -> Path:
    path = folder / "train.txt"
    path.write_text(H.TEXT * 3)
    return path


def finetune_json(run_cli, model: Path, *args: Any) -> dict[str, Any]:
    code, stdout, err = run_cli(["finetune", model, *args, "--json"])
    assert code == 0, err
    return json.loads(stdout)


def target_of(name: str) -> str | None:
    """The linear a tensor belongs to, if it is a block linear's weight."""
    parts = name.split(".")
    return parts[-2] if name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in ALL_TARGETS else None


def compare_checkpoints(before: Path, after: Path, targets: tuple[str, ...]) -> None:
    """Same shards, names, dtypes and shapes; targeted linears changed, every other tensor identical."""
    a, _ = R.read_checkpoint(before)
    b, metas = R.read_checkpoint(after)
    assert R.tensor_files(before) == R.tensor_files(after)
    assert {n: (t.file, t.dtype, t.shape) for n, t in a.items()} == {n: (t.file, t.dtype, t.shape) for n, t in b.items()}
    for name, t in a.items():
        if target_of(name) in targets:
            assert t.data != b[name].data, f"{name} was targeted but did not change"
        else:
            assert t.data == b[name].data, f"{name} changed but was not targeted"
    for f, meta in metas.items():
        assert json.loads(meta["llmprune"])["method"] == "lora", f
    for rel, digest in tree_hashes(before).items():
        if not rel.endswith(".safetensors") and rel != R.SIDECAR_NAME:
            assert tree_hashes(after)[rel] == digest, f"{rel} was not copied unchanged"


def mean_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.fixture(scope="module")
def trained(run_cli, tiny_models, tmp_path_factory) -> tuple[Path, Path, dict[str, Any]]:
    """(input, output, summary) of one run on the default tiny model (bf16, sharded, untied)."""
    root = tmp_path_factory.mktemp("finetune")
    model = with_tokenizer(tiny_models("bfloat16", sharded=True, stats=True), root / "m")
    summary = finetune_json(run_cli, model, "--data", text_file(root), "--steps", "40", *FAST)
    return model, Path(summary["out"]), summary


# --------------------------------------------------------------------------------------------
# Training and the output checkpoint
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_decreases_and_summary(trained):
    model, out, s = trained
    assert out == model.parent / "tiny-lora"
    assert s["loss_last"] < s["loss_first"] - 0.1, s
    assert s["steps"] == 40 and s["tokens"] == 40 * 4 * 32 and s["epochs"] == 10
    assert (s["device"], s["precision"], s["loader"], s["method"]) == ("cpu", "float32", "transformers", "lora")
    assert s["targets"] == list(ALL_TARGETS) and s["modules"] == 2 * len(ALL_TARGETS)
    assert s["data"].startswith("file:") and s["rank"] == 8 and s["alpha"] == 16
    assert s["trainable_params"] > 0 and s["seconds"] >= s["seconds_training"] > 0


@pytest.mark.slow
def test_output_has_the_input_layout_and_loads(trained):
    model, out, s = trained
    compare_checkpoints(model, out, ALL_TARGETS)
    assert not (out / R.SIDECAR_NAME).exists(), "the stats sidecar describes the weights before training"
    _, metas = R.read_checkpoint(out)
    prov = json.loads(next(iter(metas.values()))["llmprune"])
    assert {k: prov[k] for k in ("method", "rank", "alpha", "steps", "data")} == {
        "method": "lora", "rank": 8, "alpha": 16.0, "steps": 40, "data": s["data"],
    }
    assert prov["final_loss"] == pytest.approx(s["loss_last"])
    assert all(m.get("format") == "pt" for m in metas.values()), "the input's metadata is kept"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(out)(H.TEXT)["input_ids"][:64]])
    before = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    after = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert mean_loss(after, ids) < mean_loss(before, ids) - 0.05, "the merged weights should fit the text better"


@pytest.mark.slow
def test_targets_subset_tied_float32_reproducible(run_cli, tiny_models, tmp_path):
    model = with_tokenizer(tiny_models("float32", sharded=False, stats=False, tie_word_embeddings=True), tmp_path / "m")
    assert "lm_head.weight" not in R.read_checkpoint(model)[0]
    runs = []
    for out in (tmp_path / "tuned", tmp_path / "again"):
        s = finetune_json(run_cli, model, "--data", text_file(tmp_path), "--steps", "3", "--targets", "v_proj, down_proj", "--out", out, *FAST)
        assert s["targets"] == ["v_proj", "down_proj"] and s["modules"] == 4 and Path(s["out"]) == out.resolve()
        compare_checkpoints(model, out, ("v_proj", "down_proj"))
        runs.append((s, R.read_checkpoint(out)[0]))
    assert runs[0][1]["model.embed_tokens.weight"].dtype == "F32"
    # the same --seed: the same windows, initialization and order (multithreaded CPU sums may differ in the last bits)
    assert runs[0][0]["loss_last"] == pytest.approx(runs[1][0]["loss_last"], rel=1e-5)
    for name, t in runs[0][1].items():
        assert R.to_f32(t) == pytest.approx(R.to_f32(runs[1][1][name]), rel=1e-4, abs=1e-6), name


@pytest.mark.slow
def test_structured_non_uniform_round_trip(run_cli, tiny_models, tmp_path):
    import llmprune

    model = with_tokenizer(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "m")
    code, stdout, err = run_cli(["apply", model, "--method", "magnitude-sp", "--sparsity", "0.3", "--allocation", "global", "--json"])
    assert code == 0, err
    pruned = Path(json.loads(stdout)["out"])
    assert json.loads(stdout)["loader"] == "llmprune.load_pruned"
    s = finetune_json(run_cli, pruned, "--data", text_file(tmp_path), "--epochs", "2", *FAST)
    assert s["loader"] == "llmprune.load_pruned" and s["steps"] == 2 * 4
    out = Path(s["out"])
    assert out == pruned.parent / f"{pruned.name}-lora"
    compare_checkpoints(pruned, out, ALL_TARGETS)
    assert json.loads((out / "config.json").read_text()) == json.loads((pruned / "config.json").read_text())
    prov = json.loads(R.read_checkpoint(out)[1][R.tensor_files(out)[0]]["llmprune"])
    assert prov["input"]["method"] == "magnitude-sp", "the pruning provenance is kept under 'input'"
    before, after = llmprune.load_pruned(pruned), llmprune.load_pruned(out)
    assert [p.shape for p in before.parameters()] == [p.shape for p in after.parameters()]
    ids = R.random_samples(1, 20, seed=3)
    with torch.no_grad():
        assert torch.isfinite(after(ids).logits).all()


@pytest.mark.gpu
def test_cuda_bfloat16_autocast(run_cli, tiny_models, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = with_tokenizer(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "m")
    fast = [a if a != "cpu" else "cuda" for a in FAST]
    s = finetune_json(run_cli, model, "--data", text_file(tmp_path), "--steps", "40", *fast)
    assert (s["device"], s["precision"]) == ("cuda", "bfloat16-autocast")
    assert s["loss_last"] < s["loss_first"] - 0.1, s
    compare_checkpoints(model, Path(s["out"]), ALL_TARGETS)


@pytest.mark.slow
def test_force_replaces_and_text_summary(run_cli, tiny_models, tmp_path):
    model = with_tokenizer(tiny_models("bfloat16", sharded=False, stats=False), tmp_path / "m")
    out = tmp_path / "m" / "tiny-lora"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, stdout, err = run_cli(["finetune", model, "--data", text_file(tmp_path), "--steps", "2", "--force", *FAST])
    assert code == 0, err
    assert stdout.startswith("lora r=8 on 14 linears: 2 steps, 256 tokens of file:") and str(out) in stdout
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert listing(tmp_path / "m") == ["tiny", "tiny-lora"], "no temporary directory is left behind"


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bad_model(tiny_models, tmp_path) -> Path:
    return with_tokenizer(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "m")


def expect_failure(run_cli, model: Path, args: list[Any], env: dict[str, str] | None = None, **assert_kw) -> str:
    """`finetune MODEL ARGS` fails cleanly; MODEL and its parent directory are left as they were."""
    parent_before = listing(model.parent)
    model_before = tree_hashes(model) if model.is_dir() else None
    code, stdout, err = run_cli(["finetune", model, *args], env=env)
    msg = assert_clean_error(code, stdout, err, **assert_kw)
    assert listing(model.parent) == parent_before, f"something was left behind:\n{err}"
    if model_before is not None:
        assert tree_hashes(model) == model_before, "the input directory was modified"
    return msg


@pytest.mark.parametrize(
    "args, contains, hint",
    [
        pytest.param(["--targets", "q_proj,qkv_proj"], "qkv_proj", "q_proj", marks=pytest.mark.slow),
        pytest.param(["--targets", "c_attn"], "c_attn", "down_proj", marks=pytest.mark.slow),
        pytest.param(["--targets", " , "], "names no layer", None, marks=pytest.mark.slow),
        pytest.param(["--seqlen", "1000"], "exceeds the model's context of 128", "--seqlen 128", marks=pytest.mark.slow),
        (["--steps", "2", "--epochs", "1"], "not both", None),
        pytest.param(["--rank", "0"], "--rank", None, marks=pytest.mark.slow),
        pytest.param(["--dropout", "1"], "--dropout", None, marks=pytest.mark.slow),
        pytest.param(["--lr", "0"], "--lr", None, marks=pytest.mark.slow),
        pytest.param(["--data", "nope.txt"], "unknown text source", None, marks=pytest.mark.slow),
        pytest.param(["--device", "tpu"], "unknown device", None, marks=pytest.mark.slow),
    ],
)
def test_bad_arguments(run_cli, bad_model, tmp_path, args, contains, hint):
    expect_failure(run_cli, bad_model, ["--data", text_file(tmp_path), "--steps", "1", *FAST, *args], contains=contains, hint_contains=hint)


@pytest.mark.slow
def test_text_shorter_than_seqlen(run_cli, bad_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    expect_failure(run_cli, bad_model, [*FAST, "--data", short], contains="longer than --seqlen 32", hint_contains="--seqlen")


@pytest.mark.slow
def test_missing_model(run_cli, tmp_path):
    (tmp_path / "m").mkdir()
    expect_failure(run_cli, tmp_path / "m" / "nope", [], contains="not found")


@pytest.mark.slow
def test_model_without_tokenizer(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=False), tmp_path / "m")
    expect_failure(run_cli, model, ["--steps", "1"], contains="no tokenizer files", hint_contains="tokenizer")


@pytest.mark.slow
def test_output_exists(run_cli, bad_model, tmp_path):
    out = bad_model.parent / "tiny-lora"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_failure(run_cli, bad_model, ["--data", text_file(tmp_path), *FAST], contains="exists and is not empty", hint_contains="--force")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["input", "inside"])
@pytest.mark.slow
def test_output_is_the_input(run_cli, bad_model, tmp_path, where):
    out = bad_model if where == "input" else bad_model / "sub"
    expect_failure(run_cli, bad_model, ["--data", text_file(tmp_path), "--out", out, *FAST], contains="input model directory")


def test_missing_peft(run_cli, bad_model, tmp_path):
    fake = tmp_path / "no-peft" / "peft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'peft'\", name='peft')\n")
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH", "")) if p)
    expect_failure(
        run_cli, bad_model, ["--data", text_file(tmp_path), *FAST], env=cli_env(PYTHONPATH=path),
        contains="peft", hint_contains="pip install 'llmprune[finetune]'",
    )


@pytest.mark.parametrize(
    "losses, first, last",
    [([5.0], 5.0, 5.0), ([5.0, 4.0, 3.0], 5.0, 3.0), ([float(i) for i in range(8, 0, -1)], 6.5, 2.5), ([float(i) for i in range(30, 0, -1)], 25.5, 5.5)],
)
def test_first_and_last_loss_never_share_a_step(losses, first, last):
    from llmprune.finetune import TrainResult

    r = TrainResult(losses, 0, 0.0, "float32")
    assert (r.loss_first(), r.loss_last()) == (first, last)
