"""Expert pruning speed and memory: `llmprune apply --method reap --sparsity 0.5` against `cp -r` on a
synthetic checkpoint with Qwen3-30B-A3B's layer shapes (hidden 2048, 32 query / 4 key-value heads of
128, 128 routed experts of width 768 per MoE layer, top-8, vocabulary 151,936), random BF16 weights,
as many layers as --layers says, and a synthetic stats sidecar with routing statistics.

    python benches/experts_bench.py --workdir /tmp/experts-bench --layers 6 [--rounds 2] [--keep]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoint import write_shards  # noqa: E402
from measure import run  # noqa: E402

HIDDEN, HEADS, KV, HEAD_DIM, EXPERTS, TOP_K, MOE_INTER, VOCAB = 2048, 32, 4, 128, 128, 8, 768, 151936


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


def make_model(path: Path, layers: int) -> None:
    from llmprune import sidecar

    path.mkdir(parents=True)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN, "intermediate_size": 6144,
        "moe_intermediate_size": MOE_INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "head_dim": HEAD_DIM, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": True, "vocab_size": VOCAB,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(path, tensors(layers), 5 * 2**30, seed=0)
    rng = np.random.default_rng(1)
    experts = {}
    for i in range(layers):
        count = rng.integers(0, 4000, EXPERTS)
        gate = count * rng.uniform(0.05, 0.3, EXPERTS)
        experts[f"model.layers.{i}.mlp"] = {"count": count.tolist(), "gate_sum": gate.tolist(),
                                            "reap_sum": (gate * rng.uniform(0.5, 2.0, EXPERTS)).tolist(), "top_k": TOP_K}
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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()
    model = args.workdir / "qwen3-30b-a3b-shaped"
    if not model.exists():
        make_model(model, args.layers)
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
    print(f"checkpoint: {args.layers} Qwen3-30B-A3B-shaped layers, {size / 2**30:.2f} GiB; output {written / 2**30:.2f} GiB; {args.rounds} rounds")
    print("| command | wall s (median) | with sync s | vs cp -r (wall) | vs cp -r (with sync) | peak anon GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| cp -r | {cp_w:.2f} | {cp_d:.2f} | 1.00 | 1.00 | {max(m.peak_anon for m in cps) / 2**30:.3f} |")
    print(f"| llmprune apply --method reap --sparsity 0.5 | {ap_w:.2f} | {ap_d:.2f} | {ap_w / cp_w:.2f} | {ap_d / cp_d:.2f} | "
          f"{max(m.peak_anon for m in applies) / 2**30:.3f} |")


if __name__ == "__main__":
    main()
