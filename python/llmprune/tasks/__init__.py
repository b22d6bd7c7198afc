"""Task names and folders for `llmprune eval --tasks`: the offline smoke tasks shipped in this folder
(lm-evaluation-harness YAMLs with their data in data/, written by build.py) and the zero-shot
suite of the pruning literature."""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
OFFLINE_TASKS = ("sotu_cloze", "sotu_next")
# `--tasks paper`: the zero-shot tasks pruning papers report
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ALIASES = {"paper": PAPER_TASKS, "offline": OFFLINE_TASKS}
CACHE_SUFFIX = ".llmprune-tasks.json"


def cache_path(model_dir: Path) -> Path:
    """Where `llmprune eval --tasks` keeps a checkpoint's task results: beside its directory (never
    inside, where `apply` would copy it into pruned outputs)."""
    d = Path(model_dir).resolve()
    return d.parent / f"{d.name}{CACHE_SUFFIX}"


def expand(names: list[str]) -> list[str]:
    """Task names with the aliases (`paper`, `offline`) expanded, each name once, in order."""
    out: list[str] = []
    for name in names:
        for n in ALIASES.get(name, (name,)):
            if n not in out:
                out.append(n)
    return out
