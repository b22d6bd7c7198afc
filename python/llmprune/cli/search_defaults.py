"""`llmprune search`'s defaults, and the search to suggest for a model a schedule file was not searched
on (used by `apply --allocation FILE`'s refusal; kept apart from the command so that the options
module can name it without importing the command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_NSAMPLES = 16
DEFAULT_SEQLEN = 256
DEFAULT_TOPK = 512
DEFAULT_LEVELS = 8
# EvoPress's shape (offspring, survivors per selection step, tokens growing step by step), scaled so
# that a 135M model finishes in about half an hour on a 2-core CPU; see docs/search.md for EvoPress's
# own 7B settings
UNSTRUCTURED_DEFAULTS: dict[str, Any] = {"generations": 50, "offspring": 16, "survivors": "4,1", "tokens": "256,1024"}
DEPTH_DEFAULTS: dict[str, Any] = {"offspring": 16, "survivors": "2,1", "tokens": "256,1024", "initial": 32, "initial_tokens": 256}


def _ints(text: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(","))


def rerun_hint(model: Path, doc: dict[str, Any]) -> str:
    """The command that searches `model` as the schedule `doc` was searched on another model, with its
    time on this device under search's defaults."""
    import shlex

    from llmprune.calibration.estimate import duration, search_seconds
    from llmprune.model.devices import resolve_device
    from llmprune.model.skeleton import load_config

    method = str(doc.get("method"))
    command = ["llmprune", "search", str(model), "--method", method]
    if doc.get("kind") == "depth":
        command += ["--remove-blocks", str(len(doc.get("removed_blocks") or []))]
    else:
        command += ["--sparsity", f"{doc.get('sparsity')}"]
    hint = f"run `{shlex.join(command)}` for this model"
    if resolve_device("auto").type != "cpu":
        return hint
    try:
        config = load_config(model)
        nb = int(config.num_hidden_layers)
        seqlen = min(DEFAULT_SEQLEN, int(getattr(config, "max_position_embeddings", None) or DEFAULT_SEQLEN))
        k = len(doc.get("removed_blocks") or [])
        defaults = DEPTH_DEFAULTS if doc.get("kind") == "depth" else UNSTRUCTURED_DEFAULTS
        seconds = search_seconds(
            model,
            generations=max(1, round(k * (nb - k) / 1.5)) if doc.get("kind") == "depth" else int(defaults["generations"]),
            offspring=int(defaults["offspring"]),
            survivors=_ints(defaults["survivors"]),
            tokens=_ints(defaults["tokens"]),
            nsamples=DEFAULT_NSAMPLES,
            seqlen=seqlen,
            initial=int(defaults.get("initial", 0)),
            initial_tokens=int(defaults.get("initial_tokens", 0)),
            kept_blocks=(nb - k) / nb,
        )
    except Exception:  # noqa: BLE001 - a hint is never worth a second error
        return hint
    return f"{hint} (about {duration(seconds)} on this CPU; Ctrl-C keeps the best schedule so far)"
