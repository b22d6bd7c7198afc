"""Hints that name a `llmprune stats` command, sized for this machine: the core says "run `llmprune
stats MODEL --gram`" without knowing the model's path or the device, and run as given that is the
default protocol (128 x 2048 tokens: hours on a CPU). Before such a hint is printed, MODEL becomes the
model the failing command was given, a protocol that finishes in minutes on this device is added, and
the hint says what the command writes and about how big it is."""

from __future__ import annotations

import re
from pathlib import Path

from llmprune.calibration.estimate import BLOCK_RE, duration, pass_seconds

# `llmprune stats MODEL` with its flags, as the core's hints write it
STATS_HINT = re.compile(r"`?llmprune stats MODEL((?: --(?:gram|grad))*)`?")
# On a CPU, the first of these protocols (windows, tokens per window) estimated to take at most
# CPU_MINUTES; the smallest otherwise.
CPU_PROTOCOLS = ((128, 2048), (64, 512), (32, 512), (16, 256), (8, 256))
CPU_MINUTES = 10
# Linears that read one input between them: one Gram matrix (and one set of activation sums) for all.
SHARED_INPUT = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def input_sizes(model: Path) -> list[int]:
    """The width of every distinct input of the decoder blocks' linear layers."""
    from llmprune.model.checkpoint import Checkpoint

    ckpt = Checkpoint(model)
    inputs: dict[tuple[str, ...], int] = {}
    for name in ckpt.entries:
        shape = ckpt.shape(name)
        if not name.endswith(".weight") or len(shape) != 2 or BLOCK_RE.search(name) is None:
            continue
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        if "norm" in leaf or "embed" in leaf:
            continue
        inputs[(parent, "shared") if leaf in SHARED_INPUT else (parent, leaf)] = shape[1]
    return list(inputs.values())


def gram_bytes(model: Path, sizes: list[int] | None = None) -> int:
    """About the size of the Gram sidecar: one packed float64 lower triangle per distinct input
    (`sizes`: the model's input widths, when already read)."""
    return sum(8 * n * (n + 1) // 2 for n in (sizes if sizes is not None else input_sizes(model)))


# A pass with --grad runs a backward pass too: about three forward passes' work.
GRAD_FACTOR = 3.0


def protocol(model: Path, grad: bool = False) -> tuple[list[str], str]:
    """(--nsamples/--seqlen flags, "about T on this CPU" or "on the GPU") for a stats pass on this device."""
    import json

    from llmprune.model.devices import resolve_device

    if resolve_device("auto").type != "cpu":
        return [], "on the GPU"
    try:
        context = int(json.loads((model / "config.json").read_text()).get("max_position_embeddings") or 2048)
    except (OSError, ValueError):
        context = 2048
    factor = GRAD_FACTOR if grad else 1.0
    chosen = CPU_PROTOCOLS[-1]
    for n, seqlen in CPU_PROTOCOLS:
        if factor * pass_seconds(model, n, min(seqlen, context)) <= CPU_MINUTES * 60:
            chosen = (n, seqlen)
            break
    n, seqlen = chosen[0], min(chosen[1], context)
    seconds = factor * pass_seconds(model, n, seqlen)
    return ["--nsamples", str(n), "--seqlen", str(seqlen)], f"about {duration(seconds)} on this CPU" if seconds >= 1 else "seconds on this CPU"


def model_argument(argv: list[str]) -> Path | None:
    """The model directory a command line was given (the first argument after the command that is a
    directory with a config.json)."""
    for arg in argv[1:]:
        p = Path(arg)
        if not arg.startswith("-") and (p / "config.json").is_file():
            return p
    return None


def sized(hint: str | None, argv: list[str]) -> str | None:
    """`hint` with every `llmprune stats MODEL ...` in it made runnable as printed on this machine."""
    model = model_argument(argv) if hint is not None and STATS_HINT.search(hint) else None
    if hint is None or model is None:
        return hint
    try:
        sizes = input_sizes(model)
        return STATS_HINT.sub(lambda m: _sized_command(model, m.group(1).split(), sizes), hint)
    except Exception:  # noqa: BLE001 - a hint is never worth a second error
        return hint


def _sized_command(model: Path, wants: list[str], sizes: list[int]) -> str:
    """`llmprune stats MODEL` with `wants` (--gram, --grad), sized, and what it writes."""
    import shlex

    from llmprune.calibration.gram import gram_name
    from llmprune.calibration.sidecar import SIDECAR_NAME
    from llmprune.cli.stats import _size

    flags, when = protocol(model, grad="--grad" in wants)
    command = shlex.join(["llmprune", "stats", str(model), *wants, *flags])
    writes = f"writes {model / SIDECAR_NAME} (activation statistics, {_size(sum(16 * n for n in sizes))}; replaces one there)"
    if "--gram" in wants:
        writes += f" and {model / gram_name()} (Gram matrices, about {_size(gram_bytes(model, sizes))})"
    if "--grad" in wants:
        writes += " with gradient statistics"
    return f"`{command}` ({when}; {writes})"
