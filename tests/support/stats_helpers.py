"""Tiny checkpoints of several architectures, a tiny tokenizer, and full-model references for the
statistics and evaluation tests. Nothing here calls into llmprune."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

import reference as R  # noqa: E402

TEXT = (
    "It is the duty of the President to give to the Congress information of the state of the union, "
    "and to recommend to their consideration such measures as he shall judge necessary and expedient. "
    "The people of the United States have prospered in peace, and their industry and commerce have grown. "
    "We must keep faith with those who came before us and build for those who will come after. "
) * 4


def _save(model, path: Path, dtype: str, sharded: bool) -> Path:
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = model.to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if sharded:
        kwargs["max_shard_size"] = "200KB"
    model.save_pretrained(path, **kwargs)
    return path


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def tiny_opt_dir(path, dtype: str = "bfloat16", sharded: bool = False, seed: int = 0, **overrides: Any) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    kw: dict[str, Any] = dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    kw.update(overrides)
    _seeded(seed)
    model = OPTForCausalLM(OPTConfig(**kw))
    _perturb_norms(model, seed)
    return _save(model, path, dtype, sharded)


def tiny_gpt2_dir(path, dtype: str = "bfloat16", sharded: bool = False, seed: int = 0, **overrides: Any) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    kw: dict[str, Any] = dict(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        vocab_size=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    _seeded(seed)
    model = GPT2LMHeadModel(GPT2Config(**kw))
    _perturb_norms(model, seed)
    return _save(model, path, dtype, sharded)


def tiny_qwen2_dir(path, dtype: str = "bfloat16", sharded: bool = False, seed: int = 0, **overrides: Any) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    _seeded(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**kw))
    _perturb_norms(model, seed)
    return _save(model, path, dtype, sharded)


def tiny_mistral_dir(path, dtype: str = "bfloat16", sharded: bool = False, seed: int = 0, **overrides: Any) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    kw: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        sliding_window=8,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    _seeded(seed)
    model = MistralForCausalLM(MistralConfig(**kw))
    _perturb_norms(model, seed)
    return _save(model, path, dtype, sharded)


def tiny_mixtral_dir(path, seed: int = 0) -> Path:
    """A tiny float32 Mixtral (2 MoE layers of 8 experts, top-2) with routers far from uniform (so
    the experts' statistics differ) and a tokenizer."""
    import torch
    import transformers

    config = transformers.MixtralConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        intermediate_size=32,
        num_local_experts=8,
    )
    _seeded(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] == 8:
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return add_tokenizer(Path(path))


def _perturb_norms(model, seed: int) -> None:
    """Random norm weights and biases, so that every statistic differs from channel to channel."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def strip_prefix(model_dir: Path, prefix: str) -> None:
    """Rewrite a single-file checkpoint without `prefix` on its tensor names (as original OPT and
    GPT-2 repositories store them)."""
    tensors, metas = R.read_checkpoint(model_dir)
    out = []
    for name, t in tensors.items():
        new = name[len(prefix) :] if name.startswith(prefix) else name
        out.append(R.RawTensor(new, t.dtype, t.shape, t.data, t.file))
    R.write_safetensors(Path(model_dir) / R.SINGLE_NAME, out, metas.get(R.SINGLE_NAME) or None)


def add_tokenizer(model_dir: Path, vocab_size: int = 256) -> Path:
    """A small byte-level BPE tokenizer (trained on TEXT) saved into the model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.model_max_length = 1_000_000
    fast.save_pretrained(str(model_dir))
    return Path(model_dir)


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


# --------------------------------------------------------------------------------------------
# Full-model references
# --------------------------------------------------------------------------------------------


def sequential_reference(model_dir: Path, samples, method: str, sparsity=None, pattern=None, compensate: bool = False) -> dict[str, dict[str, Any]]:
    """Stats of block i taken with blocks 0..i-1 already pruned (whole model in memory, float32 CPU).

    Block by block: forward all samples through the full model with hooks on block i's linears,
    prune block i with reference_mask, go on. Masks are computed from the checkpoint's weights.
    With `compensate` (a LLaMA model, whose every linear may carry a bias), each pruned linear's
    bias gains (W − W')·μ, μ its input's mean over the samples, created at zero where missing.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    model = R.load_f32_model(model_dir)
    blocks = _decoder_blocks(model)
    result: dict[str, dict[str, Any]] = {}
    for i, blk in enumerate(blocks):
        prefix = _module_name(model, blk)
        stats = _stats_of(model, samples, lambda n: n.startswith(prefix + "."))
        result.update(stats)
        with torch.no_grad():
            for name, mod in blk.named_modules():
                if not isinstance(mod, (torch.nn.Linear, Conv1D)):
                    continue
                key = f"{prefix}.{name}.weight"
                w = mod.weight.detach().float().numpy()
                axis = 0 if isinstance(mod, Conv1D) else 1
                w2 = w.T if axis == 0 else w
                mask = R.reference_mask(np.ascontiguousarray(w2), method, sparsity=sparsity, pattern=pattern, stats=stats[key], name=key)
                if compensate:
                    mu = np.asarray(stats[key]["act_sum"]) / stats[key]["act_count"]
                    delta = torch.from_numpy(np.where(mask, w2.astype(np.float64), 0.0) @ mu).float()
                    if mod.bias is None:
                        mod.bias = torch.nn.Parameter(torch.zeros_like(delta))
                    mod.bias += delta
                if axis == 0:
                    mask = mask.T
                mod.weight[torch.from_numpy(np.ascontiguousarray(mask))] = 0.0
    return result


def _decoder_blocks(model):
    import torch

    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, mod)
    return best[1]


def _module_name(model, target) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise KeyError


def _stats_of(model, samples, keep) -> dict[str, dict[str, Any]]:
    stats = R.reference_stats(model, samples)
    return {k: v for k, v in stats.items() if keep(k)}


def reference_perplexity(model_dir: Path, ids, seqlen: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of seqlen (tail dropped), full float32 model."""
    import torch

    model = R.load_f32_model(model_dir)
    ids = ids.reshape(-1)
    windows = ids.numel() // seqlen
    total = 0.0
    count = 0
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            total += float(nll)
            count += seqlen - 1
    return math.exp(total / count), windows


def dense_with_stats(path: Path, windows: list[str]) -> Path:
    """A tiny float32 LLaMA (4 blocks) with a tokenizer and its stats sidecar taken by the CLI on
    `windows` (e.g. --nsamples 4 --seqlen 32 --device cpu)."""
    from conftest import run_cli_subprocess

    model = R.tiny_llama_dir(path, dtype="float32", num_hidden_layers=4)
    add_tokenizer(model)
    code, _, err = run_cli_subprocess(["stats", model, *windows])
    assert code == 0, err
    return model
