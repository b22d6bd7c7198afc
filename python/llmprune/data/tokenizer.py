"""A checkpoint's tokenizer, and text to token ids, for every command that reads text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune.errors import UsageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(model: Path) -> Any:
    """The tokenizer saved in MODEL (transformers' AutoTokenizer), or a UsageError saying what is missing."""
    from transformers import AutoTokenizer

    hint = "MODEL needs its tokenizer files (tokenizer.json, tokenizer_config.json, ...) to tokenize text"
    if not any((model / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"{model} has no tokenizer files", hint=hint)
    try:
        return AutoTokenizer.from_pretrained(str(model))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load the tokenizer of {model}: {first}", hint=hint) from None


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's default special tokens (as `tokenizer(text)` gives)."""
    # verbose=False: no "sequence longer than the model's maximum" warning; we cut windows ourselves.
    enc = tokenizer(text, return_attention_mask=False, verbose=False)
    ids = enc["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return list(ids)
