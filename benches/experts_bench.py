"""Expert pruning speed and memory: `llmprune apply --method reap --sparsity 0.5` against `cp -r` on a
synthetic checkpoint with a real MoE model's layer shapes, random BF16 weights, as many layers as
--layers says, and a synthetic stats sidecar with routing statistics. Shapes (--shape):
- qwen3-30b-a3b: one tensor set per expert; hidden 2048, 32 query / 4 key-value heads of 128, 128
  routed experts of width 768 per MoE layer, top-8, vocabulary 151,936;
- gpt-oss-20b: experts fused on disk, [32, ...] tensors with biases (gate_up_proj [32, 2880, 5760]
  is 1.06 GB per layer), a biased router; hidden 2880, 64 query / 8 key-value heads of 64, top-4,
  vocabulary 201,088.

    python benches/experts_bench.py --workdir /tmp/experts-bench --layers 6 [--shape gpt-oss-20b] [--rounds 2] [--keep]

Each round runs `cp -r MODEL` and `llmprune apply` once, one after the other, both from the page cache
(the checkpoint is read once before timing); the table gives the medians, the ratio to `cp -r` and
the peak anonymous memory (sampled every 10 ms from /proc). Removing half the experts writes about
half the bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from make_checkpoint import write_shards
from measure import run

HIDDEN, HEADS, KV, HEAD_DIM, EXPERTS, TOP_K, MOE_INTER, VOCAB = 2048, 32, 4, 128, 128, 8, 768, 151936
OSS = dict(hidden=2880, heads=64, kv=8, head_dim=64, experts=32, top_k=4, inter=2880, vocab=201088)


def oss_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, e, i, q, kv = OSS["hidden"], OSS["experts"], OSS["inter"], OSS["heads"] * OSS["head_dim"], OSS["kv"] * OSS["head_dim"]
    out = [("model.embed_tokens.weight", (OSS["vocab"], h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.sinks", (OSS["heads"],))]
        for proj, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
            out += [(f"{p}self_attn.{proj}.weight", shape), (f"{p}self_attn.{proj}.bias", (shape[0],))]
        out += [(p + "mlp.router.weight", (e, h)), (p + "mlp.router.bias", (e,)),
                (p + "mlp.experts.gate_up_proj", (e, h, 2 * i)), (p + "mlp.experts.gate_up_proj_bias", (e, 2 * i)),
                (p + "mlp.experts.down_proj", (e, i, h)), (p + "mlp.experts.down_proj_bias", (e, h))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (OSS["vocab"], h))]
    return out


def tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV * HEAD_DIM, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (p + "self_attn.q_norm.weight", (HEAD_DIM,)),
            (p + "self_attn.k_norm.weight", (HEAD_DIM,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate.weight", (EXPERTS, HIDDEN)),
        ]
        for j in range(EXPERTS):
            e = f"{p}mlp.experts.{j}."
            out += [(e + "gate_proj.weight", (MOE_INTER, HIDDEN)), (e + "up_proj.weight", (MOE_INTER, HIDDEN)), (e + "down_proj.weight", (HIDDEN, MOE_INTER))]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def make_model(path: Path, layers: int, shape: str) -> None:
    from llmprune.calibration import sidecar

    path.mkdir(parents=True)
    if shape == "gpt-oss-20b":
        experts_n, top_k = OSS["experts"], OSS["top_k"]
        config = {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": OSS["hidden"], "intermediate_size": OSS["inter"],
            "num_hidden_layers": layers, "num_attention_heads": OSS["heads"], "num_key_value_heads": OSS["kv"], "head_dim": OSS["head_dim"],
            "num_local_experts": experts_n, "num_experts_per_tok": top_k, "vocab_size": OSS["vocab"], "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
            "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        }
        listing = oss_tensors(layers)
    else:
        experts_n, top_k = EXPERTS, TOP_K
        config = {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN, "intermediate_size": 6144,
            "moe_intermediate_size": MOE_INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV,
            "head_dim": HEAD_DIM, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": True, "vocab_size": VOCAB,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
            "tie_word_embeddings": False,
        }
        listing = tensors(layers)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(path, listing, 5 * 2**30, seed=0)
    rng = np.random.default_rng(1)
    experts = {}
    for i in range(layers):
        count = rng.integers(0, 4000, experts_n)
        gate = count * rng.uniform(0.05, 0.3, experts_n)
        experts[f"model.layers.{i}.mlp"] = {"count": count.tolist(), "gate_sum": gate.tolist(),
                                            "reap_sum": (gate * rng.uniform(0.5, 2.0, experts_n)).tolist(), "top_k": top_k}
    calibration = {"source": "synthetic", "nsamples": 8, "seqlen": 2048, "seed": 0, "tokens": 16384}
    sidecar.write(path / sidecar.SIDECAR_NAME, path, {}, calibration=calibration, experts=experts)


def warm(path: Path) -> int:
    total = 0
    for f in sorted(path.iterdir()):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--shape", choices=["qwen3-30b-a3b", "gpt-oss-20b"], default="qwen3-30b-a3b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()
    model = args.workdir / f"{args.shape}-shaped-{args.layers}"
    if not model.exists():
        make_model(model, args.layers, args.shape)
    size = warm(model)
    out = args.workdir / "out"
    cps, applies = [], []
    for _ in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        cps.append(run(["cp", "-r", str(model), str(out)]))
        shutil.rmtree(out)
        applies.append(run([sys.executable, "-m", "llmprune", "apply", str(model), "--method", "reap", "--sparsity", "0.5", "--out", str(out)]))
    written = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(model)
    cp_w, ap_w = statistics.median(m.wall for m in cps), statistics.median(m.wall for m in applies)
    cp_d, ap_d = statistics.median(m.durable for m in cps), statistics.median(m.durable for m in applies)
    print(f"checkpoint: {args.layers} {args.shape}-shaped layers, {size / 2**30:.2f} GiB; output {written / 2**30:.2f} GiB; {args.rounds} rounds")
    print("| command | wall s (median) | with sync s | vs cp -r (wall) | vs cp -r (with sync) | peak anon GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| cp -r | {cp_w:.2f} | {cp_d:.2f} | 1.00 | 1.00 | {max(m.peak_anon for m in cps) / 2**30:.3f} |")
    print(f"| llmprune apply --method reap --sparsity 0.5 | {ap_w:.2f} | {ap_d:.2f} | {ap_w / cp_w:.2f} | {ap_d / cp_d:.2f} | "
          f"{max(m.peak_anon for m in applies) / 2**30:.3f} |")


if __name__ == "__main__":
    main()
