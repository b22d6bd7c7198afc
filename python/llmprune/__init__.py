"""llmprune: prune large language models stored as safetensors checkpoints, streaming, in little memory."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmprune")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
