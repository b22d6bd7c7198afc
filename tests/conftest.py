"""Shared fixtures: tiny checkpoints (cached per session), reference stats + sidecars, the real CLI."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

import reference as R  # noqa: E402

CLI_TIMEOUT = 300


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "NO_COLOR": "1",
            "TERM": "dumb",
            "COLUMNS": "200",
            "LLMPRUNE_NUM_THREADS": "2",
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.pop("LLMPRUNE_DEBUG", None)
    env.update(extra)
    return env


def run_cli_subprocess(args: list[Any], cwd: str | Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the real CLI (`python -m llmprune ARGS`); returns (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        cwd=str(cwd) if cwd is not None else None,
        env=env or cli_env(),
        timeout=CLI_TIMEOUT,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., tuple[int, str, str]]:
    """run_cli([args...], cwd=None, env=None) -> (code, stdout, stderr) through a real subprocess."""
    try:
        import llmprune._core  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extension is not built
        pytest.fail(f"llmprune._core is not built (run `make develop`): {exc}")
    return run_cli_subprocess


def slow_except(values: list[Any] | tuple[Any, ...], *fast: Any) -> list[Any]:
    """Parametrize values with every case but the FAST ones marked slow, so that the fast lane
    (`make test-fast`: -m "not slow") keeps a cheap case or two of a long list."""
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    """A pristine tiny checkpoint. Never write into `path`: copy it first (see copy_model)."""

    path: Path
    dtype: str
    sharded: bool
    stats: dict[str, dict[str, Any]] | None = None  # reference stats; sidecar at path/SIDECAR_NAME
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sidecar(self) -> Path | None:
        p = self.path / R.SIDECAR_NAME
        return p if p.exists() else None


def copy_model(src: Path | TinyModel, dest_parent: Path, name: str = "tiny", *, sidecar: bool = True) -> Path:
    """Copy a checkpoint dir into dest_parent/name (optionally without its default sidecar)."""
    src = src.path if isinstance(src, TinyModel) else Path(src)
    dest = Path(dest_parent) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    ignore = None if sidecar else shutil.ignore_patterns(R.SIDECAR_NAME)
    shutil.copytree(src, dest, ignore=ignore)
    return dest


def compute_stats(model_dir: Path, seed: int = 0, nsamples: int = 4, seqlen: int = 32) -> dict[str, dict[str, Any]]:
    """Reference stats of a checkpoint on random token ids (float32 CPU forward)."""
    model = R.load_f32_model(model_dir)
    vocab = int(model.config.vocab_size)
    return R.reference_stats(model, R.random_samples(nsamples, seqlen, vocab=vocab, seed=seed))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Callable[..., TinyModel]:
    """Factory: tiny_models(dtype="bfloat16", sharded=False, stats=True, seed=0, **config) -> TinyModel.

    Models are built once per session, each alone in its own parent dir, named `tiny`. With
    stats=True the reference stats (random ids, seed `seed`) are written as the default sidecar.
    """
    cache: dict[tuple, TinyModel] = {}

    def get(dtype: str = "bfloat16", sharded: bool = False, stats: bool = True, seed: int = 0, **config: Any) -> TinyModel:
        key = (dtype, sharded, stats, seed, tuple(sorted(config.items())))
        if key not in cache:
            parent = tmp_path_factory.mktemp(f"model-{dtype}-{'sh' if sharded else 'one'}-{'st' if stats else 'nost'}")
            path = R.tiny_llama_dir(parent / "tiny", dtype=dtype, sharded=sharded, seed=seed, **config)
            st = None
            if stats:
                st = compute_stats(path, seed=seed)
                R.write_sidecar(path, st)
            cache[key] = TinyModel(path=path, dtype=dtype, sharded=sharded, stats=st)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> TinyModel:
    """The default tiny model: bf16, sharded, with the reference sidecar at its default location."""
    return tiny_models("bfloat16", sharded=True, stats=True)


@pytest.fixture(scope="session")
def gram_model(tmp_path_factory) -> Path:
    """A tiny sharded LLaMA with a tokenizer and its stats and Gram sidecars, made by the real
    `llmprune stats --gram` (4 windows of 32 tokens). Read-only."""
    from stats_helpers import add_tokenizer

    model = R.tiny_llama_dir(tmp_path_factory.mktemp("gram") / "tiny", sharded=True)
    add_tokenizer(model)
    code, out, err = run_cli_subprocess(["stats", model, "--gram", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"])
    assert code == 0, err
    return model


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A private writable copy of tiny_model at tmp_path/m/tiny (with its sidecar)."""
    return copy_model(tiny_model, tmp_path / "m")


# --------------------------------------------------------------------------------------------
# Assertions shared by the CLI tests
# --------------------------------------------------------------------------------------------


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> hex), plus directories as 'dir'."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "other"
    return out


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if Path(d).is_dir() else []


# a line of console.LogProgress, the progress log of a run whose stderr is not a terminal
PROGRESS_LOG_LINE = re.compile(r"^(?!error:|hint:)\S.*; [\d,]+ s$")
# what `stats` and `eval` say they load before their slow start (cli.options.announce)
LOADING_LINE = re.compile(r"^reading .*: loading .* …$")


def assert_clean_error(
    code: int,
    stdout: str,
    stderr: str,
    *,
    contains: str | tuple[str, ...] | None = None,
    hint_contains: str | None = None,
) -> str:
    """Exit 2, nothing on stdout, and stderr is exactly one `error:` line plus at most one `hint:`.

    A run that has worked for a few seconds before failing (finetune's first step, a pass on a loaded
    machine) may have logged progress lines first (console.LogProgress: `TASK n/N ...; T s`, printed
    only once a run has lasted 5 s), and `stats` and `eval` say what they load before the seconds it
    takes (`reading MODEL (N blocks): loading ... …`): they are not part of the error report and are
    left out, so the contract does not depend on the machine's load."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not PROGRESS_LOG_LINE.match(ln) and not LOADING_LINE.match(ln)]
    assert code == 2, f"exit code {code}, stderr:\n{stderr}\nstdout:\n{stdout}"
    assert stdout.strip() == "", f"stdout should be empty on error, got:\n{stdout}"
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line, stderr:\n{stderr}"
    assert lines[0].startswith("error:"), f"stderr must start with the error line:\n{stderr}"
    assert len(lines) <= 2, f"only an error line and an optional hint line expected:\n{stderr}"
    if len(lines) == 2:
        assert lines[1].startswith("hint:"), f"second line must be a hint:\n{stderr}"
    if contains is not None:
        for c in (contains,) if isinstance(contains, str) else contains:
            assert c.lower() in errors[0].lower(), f"{c!r} not in error line: {errors[0]}"
    if hint_contains is not None:
        assert len(lines) == 2 and hint_contains in lines[1], f"a hint with {hint_contains!r} expected:\n{stderr}"
    return errors[0]
