"""Depth pruning against FLAP at equal parameters removed: perplexity and forward time of SmolLM2-135M
with whole decoder blocks removed (`llmprune apply --method block-influence --remove-blocks N`) and
with FLAP removing the same share of the decoder blocks' parameters (`--method flap --sparsity N/30`),
on docs/quality.md's protocol.

Steps, each through the `llmprune` command line except the timing:

1. `llmprune demo-model` (cached in demo-out/smollm2-135m, as `make demo` converts it);
2. `llmprune stats MODEL` into --work-dir (the Block Influence sums come with every stats pass);
3. per row, `llmprune apply` and `llmprune eval`;
4. forward time: every checkpoint loaded in this process (`llmprune.load_pruned`, float32, CPU) and
   timed on the same batch, the models taking turns round after round so that machine load hits all
   of them alike; the median per model is reported.

Calibration 8 x 256 tokens of the 1900-1949 addresses (seed 0); evaluation the first 4,096 tokens of
the 1950+ addresses in 512-token windows, float32 on the CPU:

    python benches/depth_quality.py --work-dir /tmp/depth --markdown docs/quality.md
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import common as C
from common import fmt_ppl, llmprune

MD_BEGIN = "<!-- depth_quality.py table: begin -->"
MD_END = "<!-- depth_quality.py table: end -->"


def forward_times(models: dict[str, Path], rounds: int, batch: int, seqlen: int) -> dict[str, float]:
    """Median seconds of one no-grad forward of a [batch, seqlen] batch, per model, interleaved."""
    import torch

    from llmprune import load_pruned

    torch.manual_seed(0)
    loaded = {k: load_pruned(str(p), dtype=torch.float32).eval() for k, p in models.items()}
    ids = torch.randint(0, 1000, (batch, seqlen))
    times: dict[str, list[float]] = {k: [] for k in loaded}
    with torch.no_grad():
        for m in loaded.values():
            m(ids)  # warm-up
        for _ in range(rounds):
            for k, m in loaded.items():
                t0 = time.perf_counter()
                m(ids)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "statistics and pruned checkpoints", work_required=True)
    ap.add_argument("--blocks", default="3,6", help="blocks removed per row pair, comma-separated [3,6]")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7, help="forward-time rounds [7]")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    stats = work / "stats.safetensors"
    stats_res = llmprune("stats", str(model), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "--out", str(stats))
    eval_args = ["--seqlen", str(args.eval_seqlen), "--device", "cpu", "--max-tokens", str(args.max_tokens)]
    rows = [{"label": "dense", "path": model, **{k: v for k, v in llmprune("eval", str(model), *eval_args).items() if k in ("perplexity",)}}]
    total_blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    for n in (int(x) for x in args.blocks.split(",")):
        s = n / total_blocks
        for label, apply_args in (
            (f"block-influence, {n} blocks", ["--method", "block-influence", "--remove-blocks", str(n)]),
            (f"flap {s:.1%}", ["--method", "flap", "--sparsity", repr(s)]),
        ):
            out = work / label.replace(" ", "_").replace(",", "").replace("%", "pct")
            res = llmprune("apply", str(model), *apply_args, "--stats", str(stats), "--out", str(out), "--force")
            removed = res.get("params_before", 0) - res.get("params_after", 0) if "removed_blocks" in res else res.get("params_removed")
            ppl = llmprune("eval", str(out), *eval_args)["perplexity"]
            rows.append({"label": label, "path": out, "perplexity": ppl, "params_removed": removed, "removed_blocks": res.get("removed_blocks")})
    times = forward_times({r["label"]: r["path"] for r in rows}, args.rounds, 4, args.eval_seqlen)
    for r in rows:
        r["forward_s"] = times[r["label"]]
        r["path"] = str(r["path"])
    total, load_start, load_end = session.elapsed(), session.load_start, os.getloadavg()
    facts = [
        f"statistics: `llmprune stats` with {args.nsamples} x {args.seqlen} calibration tokens (seed 0), {stats_res.get('seconds', 0):.0f} s; "
        f"evaluation: the first {args.max_tokens:,} tokens in {args.eval_seqlen}-token windows, float32, CPU",
        f"forward time: median of {args.rounds} interleaved no-grad forwards of a [4, {args.eval_seqlen}] batch per model, float32, "
        f"{os.cpu_count()} CPU threads; {session.provenance}; wall time {total / 60:.1f} min; load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end",
    ]
    dense_t = times["dense"]
    cells = []
    for r in rows:
        removed = "-" if r.get("params_removed") is None else f"{r['params_removed']:,}"
        if r.get("removed_blocks"):
            removed += f" (blocks {', '.join(map(str, r['removed_blocks']))})"
        cells.append([r["label"], removed, fmt_ppl(r["perplexity"]), f"{r['forward_s']:.3f}", f"{r['forward_s'] / dense_t:.2f}"])
    columns = ["model", "decoder-block parameters removed", "perplexity", "forward s", "forward vs dense"]
    table = C.markdown(session.command, facts, columns, "lrrrr", cells)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"command": session.command, "rows": rows, "seconds": total}, indent=2) + "\n")
    if args.markdown:
        C.write_markdown(args.markdown, table, MD_BEGIN, MD_END)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
