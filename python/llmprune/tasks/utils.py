"""The offline tasks' datasets: the jsonl files beside this file, as one `test` split each.
lm-evaluation-harness calls these through the YAMLs' `custom_dataset: !function utils.NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


def _load(name: str) -> Any:
    import datasets

    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"the data file of task {name}, {path}, is missing")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def sotu_cloze(**_metadata: Any) -> Any:
    return _load("sotu_cloze")


def sotu_next(**_metadata: Any) -> Any:
    return _load("sotu_next")
