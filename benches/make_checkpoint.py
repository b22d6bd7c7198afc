"""Write a LLaMA-shaped checkpoint of random bf16 weights, tensor by tensor (so it can exceed RAM).

    python benches/make_checkpoint.py OUT --shape 7b [--layers N] [--shard-gb 5] [--stats]

--stats also writes a synthetic stats sidecar (random positive statistics, format v1) so that
wanda/stade can run on it.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (256, 688, 2, 4, 4, 1024),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
}


def layer_tensors(i: int, h: int, inter: int, heads: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    hd = h // heads
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (h, h)),
        (p + "self_attn.k_proj.weight", (kv * hd, h)),
        (p + "self_attn.v_proj.weight", (kv * hd, h)),
        (p + "self_attn.o_proj.weight", (h, h)),
        (p + "post_attention_layernorm.weight", (h,)),
        (p + "mlp.gate_proj.weight", (inter, h)),
        (p + "mlp.up_proj.weight", (inter, h)),
        (p + "mlp.down_proj.weight", (h, inter)),
    ]


def all_tensors(shape: str, layers: int | None) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    h, inter, n_layers, heads, kv, vocab = SHAPES[shape]
    n_layers = layers or n_layers
    tensors = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        tensors += layer_tensors(i, h, inter, heads, kv)
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    return tensors, config


def random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """bf16 bit patterns of values roughly N(0, 0.02): sign, exponent near 2^-6, random mantissa."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    sign = bits & 0x8000
    exp = (0x3C00 + ((bits >> 7) & 0x3) * 0x80).astype(np.uint16)  # 2^-7 .. 2^-4
    mant = rng.integers(0, 128, size=n, dtype=np.uint16)
    return sign | exp | mant


def write_shards(out: Path, tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors:
        nbytes = int(np.prod(shp)) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += nbytes
    weight_map, total = {}, 0
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shp in group:
            n = int(np.prod(shp)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        total += off
        hjson = json.dumps(header).encode()
        hjson += b" " * (-len(hjson) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hjson)) + hjson)
            for name, shp in group:
                n = int(np.prod(shp))
                chunk = 1 << 26
                for start in range(0, n, chunk):
                    f.write(random_bf16(rng, min(chunk, n - start)).tobytes())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_synthetic_stats(out: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    from llmprune.calibration import sidecar

    rng = np.random.default_rng(seed + 1)
    n = 4096
    layers = {}
    for name, shp in tensors:
        if len(shp) == 2 and ".layers." in name:
            cols = shp[1]
            mu = rng.normal(0, 0.5, cols)
            var = rng.uniform(0.1, 4.0, cols)
            layers[name] = sidecar.LayerStats(act_sum=mu * n, act_sqsum=(var + mu * mu) * n, act_count=n)
    calibration = {"source": "synthetic", "nsamples": 2, "seqlen": 2048, "seed": seed, "tokens": n}
    sidecar.write(out / sidecar.SIDECAR_NAME, out, layers, calibration=calibration)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", action="store_true", help="also write a synthetic stats sidecar")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    tensors, config = all_tensors(args.shape, args.layers)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(args.out, tensors, int(args.shard_gb * 2**30), args.seed)
    if args.stats:
        write_synthetic_stats(args.out, tensors, args.seed)


if __name__ == "__main__":
    main()
