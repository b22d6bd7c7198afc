"""Token windows cut from a text source (sources.py), by the protocols of Wanda's code.

- calibration: with ``random.Random(seed)`` (the same stream as ``random.seed(seed)``), pick a random
  document, tokenize it, keep it only if it has more than ``seqlen`` tokens, then take a random window of
  exactly ``seqlen`` tokens; repeat ``nsamples`` times. A source that is a single text (wikitext2, one
  .txt file) skips the document draw.
- evaluation: all documents joined (``"\\n\\n"``), tokenized once, optionally cut to ``max_tokens``.
  With ``max_tokens`` only a prefix of whole documents long enough to hold them is tokenized: a
  document ends where the joined text has a token boundary, so the ids are those of the whole text.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from llmprune.data.sources import CALIB, EVAL, Corpus, load_corpus
from llmprune.data.tokenizer import encode
from llmprune.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Tokens past --max-tokens that a prefix must give before the cut is trusted (the last few tokens of
# a prefix may merge differently than in the whole text; a document boundary makes that moot).
PREFIX_MARGIN = 16


def calibration_samples(src: str | None, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0) -> "torch.Tensor":
    """`nsamples` random windows of exactly `seqlen` tokens, as a LongTensor [nsamples, seqlen]."""
    import torch

    _check_positive("--nsamples", nsamples)
    _check_positive("--seqlen", seqlen)
    corpus = load_corpus(src, CALIB)
    windows = sample_windows(corpus, tokenizer, nsamples, seqlen, seed)
    return torch.tensor(windows, dtype=torch.long)


def eval_token_ids(src: str | None, tokenizer: Any, max_tokens: int | None = None) -> "torch.Tensor":
    """The evaluation text tokenized, as a LongTensor [1, N] (N <= max_tokens when given)."""
    import torch

    if max_tokens is not None:
        _check_positive("--max-tokens", max_tokens)
    corpus = load_corpus(src, EVAL)
    ids = join_and_tokenize(corpus, tokenizer, max_tokens)
    return torch.tensor([ids], dtype=torch.long)


def sample_windows(corpus: Corpus, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """Wanda's calibration sampling over `corpus` (see the module docstring); deterministic per seed."""
    _check_positive("--nsamples", nsamples)
    _check_positive("--seqlen", seqlen)
    docs = corpus.documents
    n = len(docs)
    if n == 0:
        raise UsageError(f"{corpus.description} contains no documents", hint="pass another --calib source")
    rng = random.Random(seed)
    long_docs: dict[int, list[int]] = {}
    short_docs: dict[int, int] = {}  # index -> token count, for documents of at most seqlen tokens
    windows: list[list[int]] = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, n - 1) if n > 1 else 0
            ids = long_docs.get(i)
            if ids is not None:
                break
            if i not in short_docs:
                ids = encode(tokenizer, docs[i])
                if len(ids) > seqlen:
                    long_docs[i] = ids
                    break
                short_docs[i] = len(ids)
            if len(short_docs) == n:
                longest = max(short_docs.values())
                if longest == 0:
                    raise UsageError(f"{corpus.description} contains no text", hint="pass another --calib source")
                raise UsageError(
                    f"no document of {corpus.description} is longer than --seqlen {seqlen} tokens; the longest document has {longest} tokens",
                    hint=f"use --seqlen {longest - 1} or less, or a source with longer documents",
                )
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return windows


def join_and_tokenize(corpus: Corpus, tokenizer: Any, max_tokens: int | None = None) -> list[int]:
    """Wanda's evaluation text: the documents joined and tokenized, cut to `max_tokens`. With a cut,
    only the first 1, 2, 4, ... documents are tokenized, until they give enough tokens."""
    docs = corpus.documents
    n = len(docs)
    count = n if max_tokens is None else 1
    while True:
        text = corpus.joiner.join(docs[i] for i in range(count))
        ids = encode(tokenizer, text) if text.strip() else []
        if count >= n or len(ids) >= max_tokens + PREFIX_MARGIN:  # type: ignore[operator]
            break
        count = min(n, count * 2)
    if not text.strip() and count >= n:
        raise UsageError(f"{corpus.description} contains no text", hint="pass another --data source")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise UsageError(f"{corpus.description} gave no tokens", hint="pass another --data source")
    return ids


def _check_positive(flag: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{flag} must be a positive integer, not {value!r}")
