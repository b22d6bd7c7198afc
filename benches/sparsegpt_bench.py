"""Speed of the SparseGPT kernel: llmprune's Rust sweep (`_core.sparsegpt`, what `apply --method sparsegpt`
runs per matrix) against a plain-PyTorch implementation of the official algorithm, on the same CPU threads.

    python benches/sparsegpt_bench.py                      # LLaMA-7B shapes, 50% and 2:4
    python benches/sparsegpt_bench.py --small              # 1024-wide shapes, a smoke run
    python benches/sparsegpt_bench.py --shapes 4096x4096 --repeats 3

Shapes are W's [rows, cols] = [out, in]: a 7B attention projection [4096, 4096], gate/up [11008, 4096] and
down_proj [4096, 11008]. Every case gets the same W (values ~ N(0, 0.02)) and the same correlated Gram
matrix H = XᵀX of synthetic activations (X = Z·R + noise, rank-256 structure, per-channel scales
spread over two decades, 2048 tokens), built once per input width. Both sides start from W and H as
the official code holds them (H summed, float32 for PyTorch; float64 for the Rust binding, which rounds
it to float32 itself) and do everything: dead inputs, damping (1% of the mean diagonal), the Cholesky
factor of H⁻¹ (PyTorch: `linalg.cholesky`, `cholesky_inverse`, `linalg.cholesky(upper=True)`, as the
official code calls them), and the sweep in blocks of 128 columns. The two are timed interleaved
(Rust, PyTorch, Rust, PyTorch, ... per case), with `torch.set_num_threads(threads)` and
`threads=threads` for the Rust pool, after one untimed warm-up call of each on a small matrix; the
table gives the median of the repeats. PyTorch's OpenMP threads run with OMP_WAIT_POLICY=PASSIVE
(unless set otherwise): with the default busy-waiting, two torch threads on two cores that other
processes also use were 5-10x slower than one thread on this sweep of many small operations, which
would flatter the Rust side.

The "err ratio" column checks the two compute the same thing: the layer-output error ‖(W − Ŵ)X‖²
of the Rust result over the PyTorch result's (estimated on 256 random rows). It is ≈ 1, not exactly 1:
the unstructured masks differ by rule (the official code prunes every score ≤ the k-th smallest,
llmprune exactly floor(k)), float32 rounding differs, and ties in N:M are broken differently.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see the module doc)

BLOCKSIZE = 128
DAMP = 0.01
FULL_SHAPES = "4096x4096,11008x4096,4096x11008"
SMALL_SHAPES = "1024x1024,2048x1024,1024x2048"


def official_sparsegpt_torch(W, H, *, sparsity: float = 0.0, prunen: int = 0, prunem: int = 0,
                             blocksize: int = BLOCKSIZE, percdamp: float = DAMP):
    """The official SparseGPT sweep (Frantar & Alistarh 2023) in plain PyTorch, float32, as its
    reference implementation runs it: dead inputs, damping, Cholesky of H⁻¹, then blocks of
    `blocksize` columns with the mask chosen per block (unstructured, every score ≤ the k-th
    smallest) or per M columns inside the sweep (N:M), and the lazy update of later columns.
    W [rows, cols] and H [cols, cols] are float32 tensors (not modified); returns the new W."""
    import torch

    W = W.clone()
    H = H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols)
    H[idx, idx] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    del H

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if prunen == 0:
            score = W1 ** 2 / d1.reshape(1, -1) ** 2
            thresh = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            mask1 = score <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                score = W1[:, i:i + prunem] ** 2 / d1[i:i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def correlated_gram(cols: int, seed: int, tokens: int = 2048, rank: int = 256):
    """H = XᵀX (float32 torch) of synthetic activations with correlated channels of unequal scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, rank, generator=g)
    R = torch.randn(rank, cols, generator=g) / math.sqrt(rank)
    X = Z @ R + 0.3 * torch.randn(tokens, cols, generator=g)
    X *= torch.exp(torch.empty(cols).uniform_(-2.3, 2.3, generator=g)).reshape(1, -1)  # scales over 2 decades
    return X.T @ X


def output_error(W, W_new, H, rows_sample: np.ndarray) -> float:
    """‖(W − Ŵ)X‖² over the sampled rows: trace(D H Dᵀ), D = (W − Ŵ)[rows] (float64)."""
    D = (np.asarray(W, dtype=np.float64) - np.asarray(W_new, dtype=np.float64))[rows_sample]
    return float(np.einsum("ij,ij->", D @ H, D))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in (s.strip() for s in text.split(",")):
        if item:
            r, _, c = item.partition("x")
            out.append((int(r), int(c)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"ROWSxCOLS,... [{FULL_SHAPES}]")
    ap.add_argument("--small", action="store_true", help=f"smoke-test shapes {SMALL_SHAPES}")
    ap.add_argument("--targets", default="0.5,2:4", help="sparsities and N:M patterns [0.5,2:4]")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each side per case [1]")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both sides [all cores]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from llmprune import _core

    torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes or (SMALL_SHAPES if args.small else FULL_SHAPES))
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    warm_h = correlated_gram(256, args.seed)
    warm_w = torch.randn(256, 256, generator=torch.Generator().manual_seed(args.seed)) * 0.02
    _core.sparsegpt(warm_w.numpy(), warm_h.double().numpy(), sparsity=0.5, threads=args.threads)
    official_sparsegpt_torch(warm_w, warm_h, sparsity=0.5)
    print(f"threads {args.threads} (torch.get_num_threads() = {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), blocksize {BLOCKSIZE}, damp {DAMP}, "
          f"repeats {args.repeats}; torch {torch.__version__}; load average at start "
          f"{'/'.join(f'{x:.2f}' for x in load_start)}", flush=True)

    grams: dict[int, torch.Tensor] = {}
    rows_out = []
    rng = np.random.default_rng(args.seed)
    for rows, cols in shapes:
        if cols not in grams:
            grams[cols] = correlated_gram(cols, args.seed + cols)
        H32 = grams[cols]
        H64 = H32.double().numpy()
        W = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
        Wt = torch.from_numpy(W)
        sample = np.sort(rng.choice(rows, size=min(rows, 256), replace=False))
        for target in targets:
            if ":" in target:
                n, m = (int(x) for x in target.split(":"))
                rust_kw, torch_kw = {"pattern": (n, m)}, {"prunen": n, "prunem": m}
            else:
                rust_kw, torch_kw = {"sparsity": float(target)}, {"sparsity": float(target)}
            t_rust, t_torch = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                w_rust, mask, warnings = _core.sparsegpt(W, H64, damp=DAMP, blocksize=BLOCKSIZE, threads=args.threads, **rust_kw)
                t_rust.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                w_torch = official_sparsegpt_torch(Wt, H32, blocksize=BLOCKSIZE, percdamp=DAMP, **torch_kw)
                t_torch.append(time.perf_counter() - t0)
            err_ratio = output_error(W, w_rust, H64, sample) / output_error(W, w_torch.numpy(), H64, sample)
            sp_rust = float(mask.mean())
            sp_torch = float((w_torch == 0).float().mean())
            r, t = statistics.median(t_rust), statistics.median(t_torch)
            rows_out.append((f"{rows}x{cols}", target, r, t, t / r, err_ratio, sp_rust, sp_torch, warnings))
            print(f"  {rows}x{cols} {target}: rust {r:.2f} s, torch {t:.2f} s ({t / r:.2f}x), err ratio {err_ratio:.3f}, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        del H64

    load_end = os.getloadavg()
    print()
    print("| W [rows, cols] | target | Rust s | PyTorch s | Rust speed-up | err ratio | sparsity Rust / PyTorch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape, target, r, t, ratio, err_ratio, sp_r, sp_t, warnings in rows_out:
        print(f"| {shape} | {target} | {r:.2f} | {t:.2f} | {ratio:.2f}x | {err_ratio:.3f} | {sp_r:.4f} / {sp_t:.4f} |")
        if warnings:
            print(f"|   warnings: {'; '.join(warnings)} | | | | | | |")
    print()
    print(f"total {time.perf_counter() - t_start:.0f} s; load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_start)} "
          f"at the start, {'/'.join(f'{x:.2f}' for x in load_end)} at the end; {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
