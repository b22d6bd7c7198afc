"""`llmprune eval --tasks`: the layer-streamed lm-evaluation-harness backend (harness.py) against
lm-eval's own `hf` backend on the fully loaded model, and against plain torch on llmprune's
structured and expert-pruned outputs; the packaged offline tasks; the result cache; peak memory;
bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_clean_error, copy_model

import reference as R
import stats_helpers as H

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llmprune import cli, harness  # noqa: E402
from llmprune.harness import StreamedLM, run_tasks  # noqa: E402
from llmprune.model.pruned import load_pruned  # noqa: E402
from llmprune.tasks import OFFLINE_TASKS, TASKS_DIR  # noqa: E402

TOL = 1e-4  # absolute, float32


@pytest.fixture(scope="session")
def task_model(tmp_path_factory) -> Path:
    """A tiny float32 LLaMA with a tokenizer; a context of 256 tokens (about as many characters), so that some offline items are
    truncated on the left as lm-eval truncates them."""
    path = R.tiny_llama_dir(tmp_path_factory.mktemp("tasks") / "tiny", dtype="float32", max_position_embeddings=256)
    H.add_tokenizer(path)
    return path


def offline_requests(limit: int) -> list[Instance]:
    """The offline tasks' requests, as lm-eval builds them (100 loglikelihood requests per `limit` 20)."""
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out: list[Instance] = []
    for task in tm.load(list(OFFLINE_TASKS))["tasks"].values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out.extend(task.instances)
    return out


def rolling_requests(n: int) -> list[Instance]:
    from llmprune.tasks.build import paragraphs

    texts = [p for _, p in paragraphs()[:n]]
    return [Instance("loglikelihood_rolling", {}, (t,), k) for k, t in enumerate(texts)]


def whole_model(model_dir: Path) -> torch.nn.Module:
    """The fully loaded float32 model: llmprune's loader where layers differ in size, else transformers'."""
    from transformers import AutoModelForCausalLM

    from llmprune.model.pruned import needs_load_pruned

    if needs_load_pruned(model_dir):
        return load_pruned(model_dir, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hf_backend(model_dir: Path, tokenizer: Any, batch_size: int) -> HFLM:
    return HFLM(pretrained=whole_model(model_dir), tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def torch_scores(model: torch.nn.Module, lm: StreamedLM, requests: list[Instance]) -> list[tuple[float, bool]]:
    """Each request alone through the whole model in plain torch: lm-eval's tokens and truncation,
    then log_softmax over the continuation's positions."""
    pairs = []
    for req in requests:
        ctx, cont = req.args
        pairs.append(lm._encode_pair(ctx, cont))
    out = []
    with torch.no_grad():
        for ctx_ids, cont_ids in pairs:
            inp = (ctx_ids + cont_ids)[-(lm.max_length + 1) :][:-1]
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
            part = logp[len(inp) - len(cont_ids) :]
            cont = torch.tensor(cont_ids)
            out.append((float(part.gather(1, cont[:, None]).sum()), bool((part.argmax(-1) == cont).all())))
    return out


def assert_same(a: list[tuple[float, bool]], b: list[tuple[float, bool]], tol: float = TOL) -> None:
    assert len(a) == len(b)
    worst = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    assert worst <= tol, worst
    assert [x[1] for x in a] == [y[1] for y in b]


# --------------------------------------------------------------------------------------------
# Requests: the streamed backend against lm-eval's hf backend
# --------------------------------------------------------------------------------------------


def test_requests_equal_hf_backend(task_model, monkeypatch):
    reqs = offline_requests(limit=12)
    assert {r.request_type for r in reqs} == {"loglikelihood"} and len(reqs) == 12 * 5
    streamed = StreamedLM(task_model, device="cpu", dtype="float32", batch_size=4)
    hf = hf_backend(task_model, streamed.tokenizer, batch_size=4)
    got = streamed.loglikelihood(reqs)
    assert streamed.passes == 1  # one pass over the blocks for all the requests
    assert_same(got, hf.loglikelihood(reqs))
    # results do not depend on the batch, and spilled activations give the same numbers
    assert_same(StreamedLM(task_model, device="cpu", dtype="float32", batch_size=1).loglikelihood(reqs), got)
    monkeypatch.setenv("LLMPRUNE_SPILL", "1")
    assert_same(StreamedLM(task_model, device="cpu", dtype="float32", batch_size=7).loglikelihood(reqs), got)


def test_rolling_equals_hf_backend(task_model):
    reqs = rolling_requests(4)  # paragraphs of hundreds of tokens: several windows of 256 each
    streamed = StreamedLM(task_model, device="cpu", dtype="float32", batch_size=3)
    hf = hf_backend(task_model, streamed.tokenizer, batch_size=3)
    got = streamed.loglikelihood_rolling(reqs)
    ref = hf.loglikelihood_rolling(reqs)
    assert streamed.passes == 1
    assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL * 10, (got, ref)  # sums of several windows


def test_task_metrics_equal_hf_backend(task_model):
    streamed = run_tasks(task_model, ["offline"], limit=15, device="cpu", dtype="float32", use_cache=False)
    tok = StreamedLM(task_model, device="cpu", dtype="float32").tokenizer
    ref = run_tasks(task_model, ["offline"], limit=15, device="cpu", dtype="float32", lm=hf_backend(task_model, tok, 8))
    rows = {(r.task, r.metric): r for r in streamed.rows}
    assert (
        set(rows)
        == {(r.task, r.metric) for r in ref.rows}
        == {
            ("sotu_cloze", "perplexity"),
            ("sotu_cloze", "acc"),
            ("sotu_next", "acc"),
            ("sotu_next", "acc_norm"),
        }
    )
    for r in ref.rows:
        mine = rows[(r.task, r.metric)]
        assert math.isclose(mine.value, r.value, rel_tol=1e-4, abs_tol=1e-6), (r, mine)
        assert mine.n == r.n == 15
        assert mine.stderr is not None and math.isclose(mine.stderr, r.stderr or 0.0, rel_tol=1e-3, abs_tol=1e-6)


# --------------------------------------------------------------------------------------------
# llmprune's outputs: structured with per-layer sizes, expert-pruned MoE
# --------------------------------------------------------------------------------------------


def test_structured_non_uniform_output(run_cli, tiny_models, tmp_path):
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "m")
    H.add_tokenizer(model)
    code, out, err = run_cli(["apply", model, "--method", "flap", "--sparsity", "0.3", "--allocation", "global", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert len({(x["num_key_value_heads"], x["intermediate_size"]) for x in doc["per_layer"]}) > 1
    pruned = Path(doc["out"])
    reqs = offline_requests(limit=6)
    lm = StreamedLM(pruned, device="cpu", dtype="float32", batch_size=5)
    assert_same(lm.loglikelihood(reqs), torch_scores(load_pruned(pruned, dtype=torch.float32), lm, reqs))


def pruned_by_cli(run_cli, model: Path, tmp_path: Path, nsamples: int, seqlen: int, *apply_args: str) -> Path:
    """`llmprune stats` on a copy of MODEL, then `llmprune apply` with APPLY_ARGS into tmp_path/pruned."""
    copy = tmp_path / "m" / "tiny"
    shutil.copytree(model, copy)
    code, _, err = run_cli(["stats", copy, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu"])
    assert code == 0, err
    out = tmp_path / "pruned"
    code, _, err = run_cli(["apply", copy, *apply_args, "--out", out])
    assert code == 0, err
    return out


def assert_streamed_equals_torch(model: Path, limit: int, batch_size: int) -> StreamedLM:
    reqs = offline_requests(limit=limit)
    lm = StreamedLM(model, device="cpu", dtype="float32", batch_size=batch_size)
    assert_same(lm.loglikelihood(reqs), torch_scores(whole_model(model), lm, reqs))
    return lm


def test_depth_pruned_output(run_cli, task_model, tmp_path):
    out = pruned_by_cli(run_cli, task_model, tmp_path, 2, 16, "--method", "block-influence", "--remove-blocks", "1")
    assert assert_streamed_equals_torch(out, limit=4, batch_size=3).streamer.num_blocks == 1


def test_registered_as_an_lm_eval_model(task_model):
    import lm_eval

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    res = lm_eval.simple_evaluate(model="llmprune", model_args=f"pretrained={task_model},dtype=float32", tasks=["sotu_next"], limit=3, task_manager=tm)
    assert res is not None and res["results"]["sotu_next"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)


@pytest.fixture(scope="session")
def moe_model(tmp_path_factory) -> Path:
    return H.tiny_mixtral_dir(tmp_path_factory.mktemp("moe") / "tiny")


def test_expert_pruned_moe(run_cli, moe_model, tmp_path):
    out = pruned_by_cli(run_cli, moe_model, tmp_path, 4, 24, "--method", "frequency", "--experts-keep", "5")
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 5
    assert_streamed_equals_torch(out, limit=6, batch_size=4)


# --------------------------------------------------------------------------------------------
# The offline tasks, the cache, the command line
# --------------------------------------------------------------------------------------------


def test_offline_data_is_reproducible_and_held_out(tmp_path):
    from llmprune.data.sources import SOTU_CALIB_YEARS, SOTU_EVAL_FIRST_YEAR
    from llmprune.tasks import build

    written = build.build(tmp_path)
    for name, path in written.items():
        shipped = build.DATA_DIR / path.name
        assert path.read_bytes() == shipped.read_bytes(), f"{shipped} is not what build.py writes"
        items = [json.loads(line) for line in shipped.read_text().splitlines()]
        assert len(items) == build.ITEMS
        years = {int(d["source"][:4]) for d in items}
        assert max(years) < SOTU_CALIB_YEARS[0] < SOTU_EVAL_FIRST_YEAR, name  # neither calibration nor perplexity text
        if name == "sotu_next":
            assert all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in items)
            assert len({d["label"] for d in items}) == 4
    # shipped in the wheel: maturin packs what git does not ignore
    files = [str(p.relative_to(Path(__file__).resolve().parent.parent)) for p in TASKS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    ignored = subprocess.run(["git", "check-ignore", *files], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    assert ignored.strip() == ""


def test_cache_is_keyed_by_checkpoint_and_options(task_model, tmp_path):
    model = tmp_path / "m" / "tiny"
    shutil.copytree(task_model, model)
    first = run_tasks(model, ["sotu_next"], limit=4, device="cpu")
    assert first.evaluated == ["sotu_next"] and first.cache == str(tmp_path / "m" / "tiny.llmprune-tasks.json")
    again = run_tasks(model, ["sotu_next"], limit=4, device="cpu")
    assert again.cached == ["sotu_next"] and not again.evaluated
    assert [(r.metric, r.value, r.stderr) for r in again.rows] == [(r.metric, r.value, r.stderr) for r in first.rows]
    assert all(r.cached for r in again.rows)
    assert run_tasks(model, ["sotu_next"], limit=5, device="cpu").evaluated == ["sotu_next"]  # another limit
    assert run_tasks(model, ["sotu_next"], limit=4, num_fewshot=1, device="cpu").evaluated == ["sotu_next"]
    # another checkpoint with the same tensor names and shapes (the fingerprint), other values
    other = tmp_path / "o" / "tiny"
    shutil.copytree(model, other)
    shutil.copy(tmp_path / "m" / "tiny.llmprune-tasks.json", tmp_path / "o" / "tiny.llmprune-tasks.json")
    from safetensors.torch import load_file, save_file

    tensors = load_file(other / "model.safetensors")
    tensors = {k: v * 0.5 if "mlp" in k else v for k, v in tensors.items()}
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    assert run_tasks(other, ["sotu_next"], limit=4, device="cpu").evaluated == ["sotu_next"]


def test_cli_tasks_json_and_table(run_cli, task_model, tmp_path):
    model = tmp_path / "m" / "tiny"
    shutil.copytree(task_model, model)
    code, out, err = run_cli(["eval", model, "--tasks", "sotu_cloze", "--limit", "5", "--seqlen", "32", "--max-tokens", "200", "--device", "cpu", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert math.isfinite(doc["perplexity"])
    assert [(r["task"], r["metric"]) for r in doc["tasks"]["results"]] == [("sotu_cloze", "perplexity"), ("sotu_cloze", "acc")]
    assert doc["tasks"]["evaluated"] == ["sotu_cloze"] and doc["tasks"]["limit"] == 5
    code, out, err = run_cli(["eval", model, "--tasks", "sotu_cloze", "--limit", "5", "--tasks-only", "--device", "cpu"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"] and not out.startswith("perplexity")
    assert lines[1].split()[:2] == ["sotu_cloze", "perplexity"] and "from the cache" in lines[-1]


def test_cli_user_task_from_include_path(run_cli, task_model, tmp_path):
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps({"text": f"The nation is {w}"}) + "\n" for w in ("strong", "free", "young")))
    tasks = tmp_path / "mytasks"
    tasks.mkdir()
    (tasks / "words.yaml").write_text(
        textwrap.dedent(f"""\
            task: my_words
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            output_type: loglikelihood
            test_split: test
            doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
            doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """)
    )
    code, out, err = run_cli(["eval", task_model, "--tasks", "my_words", "--include-path", tasks, "--tasks-only", "--no-cache", "--device", "cpu", "--json"])
    assert code == 0, err
    [row] = json.loads(out)["tasks"]["results"]
    assert row["task"] == "my_words" and row["metric"] == "acc" and row["n"] == 3


def _generate_task(folder: Path) -> None:
    data = folder / "gen.jsonl"
    data.write_text(json.dumps({"q": "The nation", "a": "is"}) + "\n")
    (folder / "gen.yaml").write_text(
        textwrap.dedent(f"""\
            task: my_gen
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            output_type: generate_until
            test_split: test
            doc_to_text: "{{{{q}}}}"
            doc_to_target: "{{{{a}}}}"
            generation_kwargs:
              until: ["."]
              max_gen_toks: 4
              do_sample: false
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """)
    )


def test_generation_with_the_whole_model(task_model, tmp_path):
    _generate_task(tmp_path)
    run = run_tasks(task_model, ["my_gen"], include_paths=[tmp_path], device="cpu", use_cache=False)
    assert [r.metric for r in run.rows] == ["exact_match"] and run.rows[0].n == 1


def test_cli_bad_input(run_cli, task_model, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "broken"
    missing.mkdir()
    (missing / "broken.yaml").write_text(
        "task: broken_data\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nonexistent/llmprune/none.jsonl\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
    )
    gen = tmp_path / "gen"
    gen.mkdir()
    _generate_task(gen)
    # one through a real process (the whole model of lm-eval's index is read for an unknown name)
    code, out, err = run_cli(["eval", task_model, "--tasks", "no_such_task_xyz", "--tasks-only"])
    assert_clean_error(code, out, err, contains="unknown task 'no_such_task_xyz'", hint_contains="--include-path")
    cases = [
        (["--tasks", "sotu_next", "--num-fewshot", "-1"], "--num-fewshot must be 0 or more", "zero-shot"),
        (["--tasks", "sotu_next", "--limit", "0"], "--limit", None),
        (["--tasks", "sotu_next", "--batch-size", "0"], "--batch-size", None),
        (["--tasks", ",", "--tasks-only"], "names no task", "--tasks offline"),
        (["--num-fewshot", "2"], "--num-fewshot applies to --tasks", None),
        (["--tasks", "sotu_next", "--tasks-only", "--seqlen", "8"], "--tasks-only", None),
        (["--tasks", "sotu_next", "--include-path", tmp_path / "nope", "--tasks-only"], "--include-path", None),
        (["--tasks", "broken_data", "--include-path", missing, "--tasks-only"], "task broken_data cannot be loaded", "data files"),
        (["--tasks", tmp_path / "absent.yaml", "--tasks-only"], "not found", None),
    ]
    for args, contains, hint in cases:
        code = cli.main([str(a) for a in ["eval", task_model, *args]])
        out, err = capsys.readouterr()
        assert_clean_error(code, out, err, contains=contains, hint_contains=hint)
    # generation needs the whole model: refused, with its size, where it does not fit
    monkeypatch.setattr(harness, "free_bytes", lambda device: 1 << 10)
    code = cli.main([str(a) for a in ["eval", task_model, "--tasks", "my_gen", "--include-path", gen, "--tasks-only", "--device", "cpu"]])
    out, err = capsys.readouterr()
    assert_clean_error(code, out, err, contains="needs the whole model in memory", hint_contains="vLLM")


# --------------------------------------------------------------------------------------------
# Peak memory: one block, not the model
# --------------------------------------------------------------------------------------------

PEAK_SCRIPT = """
import json, sys, torch
from lm_eval.api.instance import Instance
from llmprune.harness import StreamedLM

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
lm = StreamedLM(sys.argv[1], device="cpu", dtype="float32", batch_size=8)
reqs = [Instance("loglikelihood", {}, ("The address of the year %d " % k * (1 + k % 4), " and so on" * (1 + k % 5)), k) for k in range(48)]
lm.loglikelihood(reqs[:2])  # warm: allocator pools, lazily imported modules
base = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
lm.loglikelihood(reqs)
print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
"""


@pytest.mark.slow
def test_peak_memory_is_one_block(tmp_path):
    """16 blocks of 16 MiB (float32, 257 MiB in all): the pass's peak stays within a few blocks above
    where it began (the loaded block, the pages read for it, the activations and one batch's
    intermediates). glibc keeps freed blocks' memory in its heap once its mmap threshold has grown;
    a fixed threshold measures what the pass holds, not what the allocator keeps."""
    model = R.tiny_llama_dir(
        tmp_path / "deep", dtype="float32", hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8
    )
    H.add_tokenizer(model)
    ckpt_bytes = (model / "model.safetensors").stat().st_size
    block_bytes = (4 * 512 * 512 + 3 * 512 * 2048) * 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = doc["peak"] - doc["base"]
    assert grew < 5 * block_bytes, (grew / 2**20, block_bytes / 2**20, ckpt_bytes / 2**20)
    assert grew < ckpt_bytes / 3


# --------------------------------------------------------------------------------------------
# SmolLM2-135M: the real model and the offline tasks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    from llmprune.model.demo import ensure_demo_model

    path = tmp_path_factory.mktemp("smol") / "smol"
    ensure_demo_model(path)
    return path


@pytest.mark.slow
def test_smollm2_requests_and_metrics_equal_hf_backend(smollm2):
    reqs = offline_requests(limit=8)
    streamed = StreamedLM(smollm2, device="cpu", dtype="float32", batch_size=8)
    hf = hf_backend(smollm2, streamed.tokenizer, batch_size=8)
    assert_same(streamed.loglikelihood(reqs), hf.loglikelihood(reqs))
    mine = run_tasks(smollm2, ["offline"], limit=8, device="cpu", dtype="float32", use_cache=False)
    ref = run_tasks(smollm2, ["offline"], limit=8, device="cpu", dtype="float32", lm=hf)
    assert [(r.task, r.metric) for r in mine.rows] == [(r.task, r.metric) for r in ref.rows]
    for a, b in zip(mine.rows, ref.rows):
        assert math.isclose(a.value, b.value, rel_tol=1e-4, abs_tol=1e-6), (a, b)


# --------------------------------------------------------------------------------------------
# The benches' tables (the benches themselves run for minutes on SmolLM2)
# --------------------------------------------------------------------------------------------


def test_bench_tables(tmp_path):
    import argparse

    import common as C
    import task_quality as Q
    import task_speed as S

    args = argparse.Namespace(model_dir=Path("smollm2-135m"), nsamples=8, seqlen=256, max_tokens=4096, eval_seqlen=512, device="cpu", limit=None, batch_size=8)
    session = argparse.Namespace(command="python benches/task_quality.py", provenance="git abc", elapsed=lambda: 60.0, load_start=(1.0, 1.0, 1.0))
    rows = [Q.Row("dense", ""), *C.parse_runs("wanda@0.5,sparsegpt@2:4", Q.parse_row)]
    rows[0].perplexity, rows[0].tasks = 18.5, {"sotu_cloze acc": {"value": 0.16, "stderr": 0.037}, "sotu_next acc": {"value": 0.37, "stderr": 0.048}}
    text = Q.markdown_table(rows, args, {"reused": True}, session)
    assert "| dense | - | " in text and "| 0.160 ± 0.037 | - | 0.370 ± 0.048 | - |" in text
    assert "| wanda | 50% |" in text and "| sparsegpt | 2:4 |" in text and "Not measured: wanda@0.5, sparsegpt@2:4." in text
    vs = {"requests": 10, "times": {"streamed": [2.0, 3.0], "hf": [4.0, 5.0]}, "max_abs_diff": 0.0, "greedy_equal": True}
    run = {"base": 0, "peak": 300 << 20, "peak_before": 100 << 20, "seconds": 2.0, "block_seconds": 1.5, "completed": True, "tokens": 100, "model_bytes": 4 << 30, "blocks": 12}
    syn = {"checkpoint_bytes": 2 << 30, "runs": {"fixed mmap threshold": run, "glibc default": run}}
    text = S.markdown(
        vs,
        syn,
        argparse.Namespace(**{**vars(args), "repeats": 2, "shape": "1b", "layers": 12, "synthetic_requests": 100, "context": 24, "continuation": 4}),
        session,
    )
    assert "| llmprune (layer-streamed) | 2.5 | 2.0 / 3.0 | 4.0 |" in text and "| fixed mmap threshold | 0 | 300 | 300 | 300 | 2.0 | 1.5 | 20 |" in text


def test_load_pruned_reads_an_expert_pruned_moe(run_cli, moe_model, tmp_path):
    """`load_pruned` loads any llmprune output, including an expert-pruned Mixtral whose experts
    transformers 5 holds fused in memory while the files keep one tensor set per expert."""
    from transformers import AutoModelForCausalLM

    out = pruned_by_cli(run_cli, moe_model, tmp_path, 4, 24, "--method", "frequency", "--experts-keep", "5")
    ours = load_pruned(out, dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, int(stock.config.vocab_size), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, stock(ids).logits)
