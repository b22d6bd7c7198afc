"""The output directory of a command that writes a checkpoint from Python (`llmprune finetune`).

The same rules as the Rust core's (rust/llmprune-core/src/output.rs): the target is never the input
directory, inside it, or above it; an existing non-empty target is replaced only with --force; files
are written into a hidden directory beside the target (`.NAME.llmprune-tmp-PID`) that is renamed into
place only when complete and removed on any failure, Ctrl-C included.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llmprune.errors import UsageError

OTHER_HINT = "choose another --out"
FORCE_HINT = f"{OTHER_HINT}, or pass --force to replace it"


def check_target(model_dir: Path, target: Path, force: bool) -> Path:
    """The absolute target after checking that it may receive output made from `model_dir`."""
    model = Path(model_dir).resolve()
    out = Path(target).expanduser().absolute()
    if not out.parent.is_dir():
        raise UsageError(f"output directory {target}: parent directory {out.parent} does not exist")
    out = out.parent.resolve() / out.name
    refuse = f"output directory {target}"
    if out == model:
        raise UsageError(f"{refuse} is the input model directory; llmprune never writes over its input", hint=OTHER_HINT)
    if out.is_relative_to(model):
        raise UsageError(f"{refuse} is inside the input model directory", hint=OTHER_HINT)
    if model.is_relative_to(out):
        raise UsageError(f"{refuse} contains the input model directory", hint=OTHER_HINT)
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{refuse} exists and is not a directory", hint=OTHER_HINT)
        if any(out.iterdir()) and not force:
            raise UsageError(f"{refuse} exists and is not empty", hint=FORCE_HINT)
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"cannot write {out}: directory {out.parent} is not writable", hint=OTHER_HINT)
    return out


class StagingDir:
    """`with StagingDir(model, target, force) as st:` write into `st.path`, then `st.commit()`.
    Leaving the block without a commit deletes everything written."""

    def __init__(self, model_dir: Path, target: Path, force: bool):
        self.target = check_target(model_dir, target, force)
        self.force = force
        self.path = self.target.parent / f".{self.target.name}.llmprune-tmp-{os.getpid()}"
        self._committed = False

    def __enter__(self) -> "StagingDir":
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        """Moves the finished output into place (an existing target goes only with --force)."""
        if self.target.exists():
            if not self.force and (not self.target.is_dir() or any(self.target.iterdir())):
                raise UsageError(f"output directory {self.target} appeared while writing; not replaced", hint=FORCE_HINT)
            trash = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, trash / self.target.name)
            os.replace(self.path, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        self._committed = True
        return self.target


def give_plain_mode(path: Path) -> None:
    """The mode a plain open() would give (safetensors' save_file leaves its files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
