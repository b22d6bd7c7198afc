"""Searched allocations against the heuristics: perplexity of SmolLM2-135M pruned with the schedule
`llmprune search` finds (EvoPress) against uniform, OWL and the hand-made block-0 schedule
(unstructured), and against Block Influence (depth), on docs/quality.md's protocol.

A row is METHOD@S (unstructured or structured, mean sparsity S) or depth@N (N blocks removed).
Unstructured rows compare `uniform`, `owl`, `first:0.3` (block 0 at 0.3, the rest scaled to mean S;
70% only) and `search`; structured rows (flap, wanda-sp, magnitude-sp, hywia) compare `uniform` (its
default width multiple, 128), `uniform` with width multiple 1 (the search's), `global` and `search`;
depth rows compare Block Influence with `search`. Every search runs `llmprune search` with
its defaults (or --search-args) on the calibration statistics of the protocol, then `llmprune apply
--allocation FILE`; its wall time and the KL divergence it reports are in the table.

    python benches/search_quality.py --reuse-stats --runs wanda@0.7,stade@0.7,depth@3,depth@6 \\
        --work-dir /tmp/search --markdown docs/quality.md
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import common as C
from common import fmt_ppl, llmprune_timed, ratio

MD_BEGIN = "<!-- search_quality.py table: begin -->"
MD_END = "<!-- search_quality.py table: end -->"
HAND_FIRST = 0.3  # docs/quality.md's hand-made schedule: block 0 at 0.3 at 70%
STRUCTURED = ("flap", "wanda-sp", "magnitude-sp", "hywia")


def first_block(value: float, sparsity: float, blocks: int) -> list[float]:
    rest = (sparsity * blocks - value) / (blocks - 1)
    return [value] + [rest] * (blocks - 1)


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    C.add_model_options(ap, "schedules and pruned checkpoints", work_required=True)
    ap.add_argument("--runs", default="wanda@0.7,stade@0.7,depth@3,depth@6", help="rows, comma-separated [wanda@0.7,stade@0.7,depth@3,depth@6]")
    ap.add_argument("--search-args", default="", help="extra `llmprune search` options, e.g. '--generations 20'")
    C.add_protocol_options(ap)
    ap.add_argument("--reuse-stats", action="store_true", help="reuse the sidecars in --model-dir when their calibration matches")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON (after every row)")
    ap.add_argument("--markdown", type=Path, default=None, help="replace the table between the markers in this file")
    args = ap.parse_args(argv)
    session = C.Session(__file__, args, argv)
    model, work = session.model, session.work
    session.prepare_model()
    blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    C.ensure_statistics(model, args)
    dense = session.eval(model)["perplexity"]
    extra = shlex.split(args.search_args)
    calib = ["--device", args.device]
    rows: list[dict] = []
    specs = list(C.items(args.runs))
    for k, spec in enumerate(specs, 1):
        session.announce(k, len(specs), spec)
        head, _, target = spec.partition("@")
        out = work / f"pruned-{k}"
        schedule = work / f"schedule-{k}.json"
        if head == "depth":
            n = int(target)
            variants = [("block-influence", ["--method", "block-influence", "--remove-blocks", str(n)], None)]
            search = ["--method", "block-influence", "--remove-blocks", str(n)]
            variants.append(("search", ["--method", "block-influence", "--allocation", str(schedule)], search))
        elif head in STRUCTURED:
            base = ["--method", head, "--sparsity", target]
            variants = [
                ("uniform", base, None),
                ("uniform, width 1", [*base, "--width-multiple", "1"], None),
                ("global", [*base, "--allocation", "global"], None),
                ("search", ["--method", head, "--allocation", str(schedule)], base),
            ]
        else:
            s = float(target)
            base = ["--method", head, "--sparsity", target]
            variants = [("uniform", base, None), ("owl", [*base, "--allocation", "owl"], None)]
            if abs(s - 0.7) < 1e-9:
                hand = work / f"hand-{k}.json"
                hand.write_text(json.dumps(first_block(HAND_FIRST, s, blocks)) + "\n")
                variants.append((f"first:{HAND_FIRST}", [*base, "--allocation", str(hand)], None))
            variants.append(("search", [*base, "--allocation", str(schedule)], base))
        for label, apply_args, search_args in variants:
            row: dict = {"row": spec, "allocation": label}
            if search_args is not None:
                res, seconds = llmprune_timed(["search", str(model), *search_args, *calib, *extra, "--out", str(schedule), "--force"])
                row.update(
                    search_seconds=round(seconds, 1), search=res["search"], removed_blocks=res.get("removed_blocks"), block_sparsity=res.get("block_sparsity")
                )
            res = session.apply(str(model), *apply_args, "--out", str(out), "--force")
            row.setdefault("removed_blocks", res.get("removed_blocks"))
            row.setdefault("block_sparsity", res.get("block_sparsity"))
            if "achieved_sparsity" in res:  # structured: what was removed, and the layers' widths
                row.update(
                    achieved=res["achieved_sparsity"],
                    widths=[x["intermediate_size"] for x in res["per_layer"]],
                    kv_heads=[x["num_key_value_heads"] for x in res["per_layer"]],
                )
            row["perplexity"] = session.eval(out)["perplexity"]
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            session.save_json(dense=dense, rows=rows)
    table = markdown_table(rows, dense, args, session)
    print(table, end="")
    if args.markdown:
        C.write_markdown(args.markdown, table, MD_BEGIN, MD_END)
    return 0


def markdown_table(rows: list[dict], dense: float, args, session: C.Session) -> str:
    base = {r["row"]: r["perplexity"] for r in rows if r["allocation"] in ("uniform", "block-influence")}
    facts = [
        f"calibration: nsamples {args.nsamples} x seqlen {args.seqlen}, seed 0 (dense statistics); evaluation: the first "
        f"{args.max_tokens:,} tokens in {args.eval_seqlen}-token windows; device {args.device}, float32",
        f"search: `llmprune search` defaults{' with ' + args.search_args if args.search_args else ''} (its own calibration windows, "
        f"seed 0); KL: the searched schedule's KL divergence from the dense model on all of its windows, and the start's",
        f"{session.provenance}; wall time {session.elapsed() / 60:.1f} min; load average {C.loads(session.load_start, os.getloadavg())}",
    ]
    cells = []
    for r in rows:
        if r.get("removed_blocks"):
            shape = "blocks " + ", ".join(map(str, r["removed_blocks"]))
        elif r.get("block_sparsity"):
            b = r["block_sparsity"]
            shape = f"block 0 {b[0]:.3f}, others {min(b[1:]):.3f}-{max(b[1:]):.3f}"
        else:
            shape = "-"
        if r.get("widths"):
            w, kv = r["widths"], r["kv_heads"]
            shape = f"MLP {min(w)}-{max(w)}, kv heads {min(kv)}-{max(kv)} (removed {r['achieved']:.4f})"
        kl = "-"
        if r.get("search"):
            sd = r["search"]
            kl = f"{sd['start_fitness_all_windows']:.3f} -> {sd['best_fitness_all_windows']:.3f}"
        cells.append(
            [
                r["row"],
                f"`{r['allocation']}`",
                shape,
                fmt_ppl(r["perplexity"]),
                ratio(r["perplexity"], dense),
                ratio(r["perplexity"], base.get(r["row"])),
                kl,
                f"{r['search_seconds']:.0f}" if r.get("search_seconds") else "-",
            ]
        )
    columns = [
        "row",
        "allocation",
        "blocks",
        "perplexity",
        f"ratio to dense ({dense:.2f})",
        "ratio to uniform / Block Influence",
        "search KL (start -> found)",
        "search s",
    ]
    return C.markdown(session.command, facts, columns, "llrrrrrr", cells)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
