"""Teacher logits (`llmprune stats MODEL --teacher-logits K`) and distillation (`llmprune finetune
PRUNED --distill TEACHER`): the sidecar's top K equals a full-model reference, the KD loss with K = the
vocabulary is the full KL divergence, distillation keeps masks and structured shapes, and bad input
is refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
import stats_helpers as H
from conftest import assert_clean_error, tree_hashes

COMMON = ["--nsamples", "3", "--seqlen", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny float32 LLaMA with a tokenizer, its stats sidecar and a top-8 teacher sidecar. Read-only."""
    from conftest import run_cli_subprocess

    model = R.tiny_llama_dir(tmp_path_factory.mktemp("kd") / "tiny", dtype="float32")
    H.add_tokenizer(model)
    code, out, err = run_cli_subprocess(["stats", model, *COMMON, "--teacher-logits", "8", "--json"])
    assert code == 0, err
    s = json.loads(out)
    assert s["teacher"]["k"] == 8 and Path(s["teacher"]["out"]) == model / "llmprune-teacher.safetensors"
    return model


def test_teacher_top_k_equals_a_full_model_reference(dense):
    from llmprune.calibration import teacher as T
    from llmprune.data.tokenizer import load_tokenizer
    from llmprune.data.windows import calibration_samples

    t = T.read(dense / "llmprune-teacher.safetensors")
    assert torch.equal(t.input_ids, calibration_samples(None, load_tokenizer(dense), 3, 16, 0)), "the stats pass's windows"
    model = R.load_f32_model(dense)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=t.input_ids).logits.double(), dim=-1)
    values, ids = torch.topk(logp, 8, dim=-1)
    torch.testing.assert_close(t.topk_logprobs, values.float(), rtol=0, atol=1e-5)
    # ids agree wherever the reference's neighbours are not (nearly) tied
    gaps = torch.cat([values[..., :-1] - values[..., 1:], torch.full_like(values[..., :1], 1.0)], -1)
    clear = gaps > 1e-4
    assert torch.equal(t.topk_ids[clear & torch.roll(clear, 1, -1)], ids[clear & torch.roll(clear, 1, -1)])
    rest = torch.log1p(-values.exp().sum(-1))
    torch.testing.assert_close(t.rest_logprob, rest.float(), rtol=0, atol=1e-5)
    assert t.meta["vocab_size"] == 256 and t.meta["k"] == 8


def test_kd_loss_with_the_whole_vocabulary_is_the_full_kl():
    from llmprune.calibration.teacher import kd_loss, top_k

    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 40, generator=gen) * 3
    student = torch.randn(2, 5, 40, generator=gen) * 3
    ids, lp, rest = top_k(teacher, 40)
    assert not torch.isfinite(rest).any(), "no mass outside the whole vocabulary"
    full = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(kd_loss(student, ids, lp, rest), full, rtol=1e-5, atol=1e-6)
    # K < vocabulary: the top K plus one bucket for the rest, by the formula in numpy
    ids, lp, rest = top_k(teacher, 6)
    p = torch.softmax(teacher.double(), -1).numpy()
    q = torch.softmax(student.double(), -1).numpy()
    want = []
    for a in range(2):
        for b in range(5):
            k = ids[a, b].numpy()
            pk, qk = p[a, b, k], q[a, b, k]
            want.append((pk * np.log(pk / qk)).sum() + (1 - pk.sum()) * np.log((1 - pk.sum()) / (1 - qk.sum())))
    assert abs(float(kd_loss(student, ids, lp, rest)) - float(np.mean(want))) < 1e-5


def _prune(run_cli, dense: Path, out: Path, *args: str) -> Path:
    code, _, err = run_cli(["apply", dense, *args, "--out", out, "--json"])
    assert code == 0, err
    return out


def _finetune(run_cli, model: Path, out: Path, *args: str) -> dict:
    code, stdout, err = run_cli(["finetune", model, "--device", "cpu", "--out", out, "--json", *args])
    assert code == 0, err
    return json.loads(stdout)


def _forward_is_finite(model_dir: Path) -> None:
    from llmprune import load_pruned

    model = load_pruned(model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=R.random_samples(1, 16, seed=3)).logits).all()


@pytest.mark.parametrize("mode", [["--full"], []], ids=["full", "lora"])
def test_distillation_keeps_masks(run_cli, dense, tmp_path, mode):
    pruned = _prune(run_cli, dense, tmp_path / "p", "--method", "wanda", "--sparsity", "0.5")
    teacher = dense / "llmprune-teacher.safetensors"
    s = _finetune(run_cli, pruned, tmp_path / "d", "--distill", str(teacher), "--steps", "20", "--batch-size", "3", "--lr", "1e-3", *mode)
    assert s["loss"] == "distill" and s["method"] == ("full" if mode else "lora") and s["tokens"] == 20 * 3 * 16
    assert s["loss_last"] < s["loss_first"], s
    before, _ = R.read_checkpoint(pruned)
    after, metas = R.read_checkpoint(tmp_path / "d")
    moved = 0
    for k, t in before.items():
        if ".layers." in k and k.endswith("proj.weight"):
            w, v = R.to_f32(t), R.to_f32(after[k])
            if mode:  # LoRA merges a dense update; full training keeps the zeros
                assert np.array_equal(v[w == 0], w[w == 0]), k
            moved += int((v != w).sum())
    assert moved > 0
    prov = json.loads(next(iter(metas.values()))["llmprune"])
    assert prov["loss"] == "distill" and prov["teacher_k"] == 8
    _forward_is_finite(tmp_path / "d")


@pytest.mark.slow
def test_distillation_of_a_structured_output_keeps_its_shapes(run_cli, dense, tmp_path):
    flap = _prune(run_cli, dense, tmp_path / "f", "--method", "flap", "--sparsity", "0.2", "--allocation", "global")
    s = _finetune(run_cli, flap, tmp_path / "d", "--distill", str(dense / "llmprune-teacher.safetensors"), "--steps", "3", "--lr", "1e-3", "--full")
    assert s["loader"] == "llmprune.load_pruned"
    a, _ = R.read_checkpoint(flap)
    b, _ = R.read_checkpoint(tmp_path / "d")
    assert {k: t.shape for k, t in a.items()} == {k: t.shape for k, t in b.items()}
    _forward_is_finite(tmp_path / "d")


def test_bad_input_is_refused(run_cli, dense, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    pruned = _prune(run_cli, dense, work / "p", "--method", "wanda", "--sparsity", "0.5")
    teacher = dense / "llmprune-teacher.safetensors"
    out = work / "out"
    roots = [work, dense]

    def fails(args, **kw):
        before = {r: tree_hashes(r) for r in roots}
        code, o, err = run_cli(args)
        msg = assert_clean_error(code, o, err, **kw)
        assert {r: tree_hashes(r) for r in roots} == before
        return msg

    fails(["stats", dense, *COMMON, "--teacher-logits", "0", "--teacher-out", work / "t.safetensors"], contains="--teacher-logits")
    fails(["stats", dense, *COMMON, "--teacher-logits", "-3", "--teacher-out", work / "t.safetensors"], contains="--teacher-logits")
    fails(["stats", dense, *COMMON, "--teacher-logits", "9999", "--teacher-out", work / "t.safetensors"], contains="vocabulary")
    fails(["stats", dense, *COMMON, "--teacher-out", work / "t.safetensors"], contains="--teacher-out", hint_contains="--teacher-logits")
    fails(["stats", dense, *COMMON, "--teacher-logits", "4", "--teacher-out", dense / "model.safetensors"], contains="model.safetensors")
    ft = ["finetune", pruned, "--device", "cpu", "--out", out, "--steps", "1"]
    fails([*ft, "--distill", dense / "llmprune-stats.safetensors"], contains="not a valid teacher-logit sidecar", hint_contains="--teacher-logits")
    fails([*ft, "--distill", work / "missing.safetensors"], contains="not found")
    fails([*ft, "--distill", teacher, "--nsamples", "4"], contains="--nsamples")
    fails([*ft, "--distill", teacher, "--distill-alpha", "2"], contains="--distill-alpha")
    fails([*ft, "--distill-alpha", "0.5"], contains="--distill-alpha", hint_contains="--distill")
    fails([*ft, "--full", "--rank", "4"], contains="--full")
    # the teacher of another model (other shapes: another fingerprint)
    other = R.tiny_llama_dir(tmp_path / "o" / "tiny", dtype="float32", num_hidden_layers=3)
    H.add_tokenizer(other)
    code, _, err = run_cli(["stats", other, *COMMON, "--teacher-logits", "4"])
    assert code == 0, err
    fails([*ft, "--distill", other / "llmprune-teacher.safetensors"], contains="another model", hint_contains="--teacher-logits")
    assert not out.exists()
