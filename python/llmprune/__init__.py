"""llmprune: prune large language models stored as safetensors checkpoints, streaming, in little memory."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmprune")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

__all__ = ["__version__", "load_pruned"]


def __getattr__(name: str):
    # torch is imported only when the loader is used, so the CLI starts fast
    if name == "load_pruned":
        from llmprune.model.pruned import load_pruned

        return load_pruned
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
