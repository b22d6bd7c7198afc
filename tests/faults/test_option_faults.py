"""Bad option values across `apply`, `stats`, `eval` and `finetune`: numbers out of range (negative,
zero where a count starts at 1, beyond 64 bits, NaN and infinities), schedule files, options given
where they do nothing, empty paths, diverging fine-tuning and a structured checkpoint whose
config.json disagrees with its tensors.

Every failing case runs the real CLI in a subprocess on a private copy of a tiny checkpoint and
asserts the corpus contract: exit code 2, one `error:` line (naming the option) and at most one
`hint:`, no traceback, every input byte unchanged, nothing at the output path and no temporary
directory left. Every case expected to succeed loads its output and checks a forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_clean_error, copy_model, tree_hashes

import reference as R
import stats_helpers as H

HUGE = str(2**64 + 1)
MAG = ["--method", "magnitude", "--sparsity", "0.5"]


def slow_unless(fast: bool, *values: Any, id: str | None = None) -> Any:
    """A parameter set, marked slow unless `fast`: the commands that import torch take seconds
    each, and the fast lane keeps one case of each kind."""
    return pytest.param(*values, id=id, marks=() if fast else pytest.mark.slow)


@pytest.fixture
def workdir(tiny_models, tmp_path) -> Path:
    """tmp_path/w holding a private copy of the sharded tiny model with its stats sidecar and a
    tokenizer, at w/tiny; w/out is the output path every case names."""
    model = copy_model(tiny_models("bfloat16", sharded=True, stats=True), tmp_path / "w")
    H.add_tokenizer(model)
    return tmp_path / "w"


def fails(run_cli, workdir: Path, args: list[Any], **kw: Any) -> str:
    """The CLI fails cleanly, and nothing under workdir changed (the input intact, nothing at the
    output path, no temporary directory)."""
    before = tree_hashes(workdir)
    args = [str(a).format(m=workdir / "tiny", w=workdir) for a in args]
    code, out, err = run_cli(args)
    assert "Traceback" not in err, err
    msg = assert_clean_error(code, out, err, **kw)
    assert "internal error" not in msg, msg
    assert tree_hashes(workdir) == before, f"files changed under {workdir}:\n{err}"
    return msg


def forward_is_finite(model: torch.nn.Module) -> None:
    ids = R.random_samples(1, 16, vocab=int(model.config.vocab_size), seed=5)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


# --------------------------------------------------------------------------------------------
# Integers: every count reaches the core (Rust usize) only within range
# --------------------------------------------------------------------------------------------

APPLY_INTS: dict[str, list[str]] = {
    # option: the arguments it applies with
    "--blocksize": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "--threads": MAG,
    "--dsnot-iters": ["--method", "wanda", "--sparsity", "0.5", "--refine", "dsnot"],
    "--experts-keep": ["--method", "reap"],
    "--remove-blocks": ["--method", "block-influence"],
    "--skip-first": ["--method", "hywia", "--sparsity", "0.2"],
    "--skip-last": ["--method", "hywia", "--sparsity", "0.2"],
}
STARTS_AT_ZERO = {"--skip-first", "--skip-last"}

INT_CASES = [(flag, v) for flag in APPLY_INTS for v in ("-1", HUGE, *(() if flag in STARTS_AT_ZERO else ("0",)))]


@pytest.mark.parametrize("flag,value", INT_CASES, ids=[f"{f}={'huge' if v == HUGE else v}" for f, v in INT_CASES])
def test_apply_integer_out_of_range(run_cli, workdir, flag, value):
    msg = fails(run_cli, workdir, ["apply", "{m}", *APPLY_INTS[flag], flag, value, "--out", "{w}/out"], contains=flag)
    assert " to " in msg, f"the range is named: {msg}"


OTHER_INTS = [
    ("stats", "--nsamples", "0"),
    ("stats", "--nsamples", HUGE),
    ("stats", "--seqlen", "-1"),
    ("stats", "--seed", "-1"),
    ("stats", "--seed", str(2**64)),
    ("eval", "--seqlen", "1"),
    ("eval", "--seqlen", HUGE),
    ("eval", "--max-tokens", "-5"),
    ("finetune", "--nsamples", HUGE),
    ("finetune", "--batch-size", "0"),
    ("finetune", "--steps", HUGE),
    ("finetune", "--epochs", "-1"),
    ("finetune", "--rank", HUGE),
    ("finetune", "--seed", str(2**64)),
]


@pytest.mark.parametrize(
    "command,flag,value",
    [slow_unless(k < 2 or (c, f) == ("finetune", "--steps"), c, f, v, id=f"{c}{f}={'huge' if v == HUGE else v}") for k, (c, f, v) in enumerate(OTHER_INTS)],
)
def test_other_commands_integer_out_of_range(run_cli, workdir, command, flag, value):
    out = ["--out", "{w}/out"] if command != "eval" else []
    msg = fails(run_cli, workdir, [command, "{m}", "--device", "cpu", flag, value, *out], contains=flag)
    assert " to " in msg, msg


# --------------------------------------------------------------------------------------------
# Real numbers: finite and in range
# --------------------------------------------------------------------------------------------

FLOATS: dict[str, tuple[str, list[str]]] = {
    "--damp": ("apply", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    "--owl-m": ("apply", ["--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"]),
    "--owl-lambda": ("apply", ["--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"]),
    "--dsnot-threshold": ("apply", ["--method", "wanda", "--sparsity", "0.5", "--refine", "dsnot"]),
    "--fusion-temperature": ("apply", ["--method", "hywia", "--sparsity", "0.2"]),
    "--lr": ("finetune", ["--steps", "1", "--device", "cpu"]),
    "--alpha": ("finetune", ["--steps", "1", "--device", "cpu"]),
    "--dropout": ("finetune", ["--steps", "1", "--device", "cpu"]),
}
FLOAT_CASES = [(flag, v) for flag in FLOATS for v in ("nan", "inf", "-1")]


@pytest.mark.parametrize("flag,value", [slow_unless(FLOATS[f][0] == "apply" or (f, v) == ("--lr", "inf"), f, v, id=f"{f}={v}") for f, v in FLOAT_CASES])
def test_real_out_of_range(run_cli, workdir, flag, value):
    command, args = FLOATS[flag]
    fails(run_cli, workdir, [command, "{m}", *args, flag, value, "--out", "{w}/out"], contains=flag)


# --------------------------------------------------------------------------------------------
# Schedule files (--allocation FILE)
# --------------------------------------------------------------------------------------------

BAD_SCHEDULES: dict[str, tuple[bytes, str]] = {
    "401-digit": (b"[0.5, " + b"9" * 401 + b"]", "outside [0, 1)"),
    "above-one": (b"[0.5, 1.5]", "outside [0, 1)"),
    "negative": (b'{"block_sparsity": [0.5, -0.25]}', "outside [0, 1)"),
    "nan": (b"[0.5, NaN]", "outside [0, 1)"),
    "infinity": (b"[0.5, 1e400]", "outside [0, 1)"),
    "nested-list": (b"[[0.5, 0.5]]", "list of per-block sparsities"),
    "strings": (b'["0.5", "0.5"]', "list of per-block sparsities"),
    "bom-garbage": (b"\xef\xbb\xbfnot json", "not valid JSON"),
}


@pytest.mark.parametrize(
    "command,what", [slow_unless(c == "apply" or w == "401-digit", c, w, id=f"{c}-{w}") for c in ("apply", "stats") for w in BAD_SCHEDULES]
)
def test_bad_schedule_file(run_cli, workdir, tmp_path, command, what):
    data, expected = BAD_SCHEDULES[what]
    sched = tmp_path / "schedule.json"
    sched.write_bytes(data)
    if command == "apply":
        args = ["apply", "{m}", "--method", "wanda", "--sparsity", "0.5", "--allocation", sched, "--out", "{w}/out"]
    else:
        args = ["stats", "{m}", "--sequential", "--method", "wanda", "--sparsity", "0.5", "--allocation", sched, "--device", "cpu", "--out", "{w}/out"]
    fails(run_cli, workdir, args, contains=expected)


@pytest.mark.parametrize("form", ["list", "object"])
def test_schedule_file_with_byte_order_mark_works(run_cli, workdir, tmp_path, form):
    sched = tmp_path / "schedule.json"
    values = [0.4, 0.6]
    body = json.dumps(values if form == "list" else {"block_sparsity": values})
    sched.write_bytes(b"\xef\xbb\xbf" + body.encode())
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", workdir / "tiny", "--method", "wanda", "--sparsity", "0.5", "--allocation", sched, "--out", out, "--json"])
    assert code == 0, err
    assert json.loads(stdout)["block_sparsity"] == pytest.approx(values)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    q0 = model.model.layers[0].self_attn.q_proj.weight
    assert float((q0 == 0).float().mean()) == pytest.approx(0.4, abs=0.02)
    forward_is_finite(model)


# --------------------------------------------------------------------------------------------
# Options given where they do nothing are refused, naming the option and where it applies
# --------------------------------------------------------------------------------------------

INAPPLICABLE: dict[str, tuple[list[str], str]] = {
    "magnitude-damp": ([*MAG, "--damp", "0.05"], "--damp"),
    "magnitude-blocksize": ([*MAG, "--blocksize", "64"], "--blocksize"),
    "wanda-gram-without-update": (["--method", "wanda", "--sparsity", "0.5", "--gram", "{m}/model.safetensors.index.json"], "--gram"),
    "wanda-damp-blocksize": (["--method", "wanda", "--sparsity", "0.5", "--damp", "0.1", "--blocksize", "8"], "--damp, --blocksize"),
    "flap-blocksize": (["--method", "flap", "--sparsity", "0.2", "--blocksize", "64"], "--blocksize"),
    "flap-damp-without-reconstruct": (["--method", "flap", "--sparsity", "0.2", "--damp", "0.05"], "--reconstruct"),
    "block-influence-damp": (["--method", "block-influence", "--remove-blocks", "1", "--damp", "0.05"], "--damp"),
    "block-influence-blocksize": (["--method", "block-influence", "--remove-blocks", "1", "--blocksize", "8"], "--blocksize"),
    "dsnot-threshold-without-refine": ([*MAG, "--dsnot-threshold", "0.01"], "--refine dsnot"),
    "dsnot-same-sign-without-refine": ([*MAG, "--dsnot-same-sign"], "--refine dsnot"),
    "owl-lambda-without-owl": ([*MAG, "--owl-lambda", "0.1"], "--allocation owl"),
    # magnitude-sp reads statistics only to compensate
    "magnitude-sp-stats-without-compensate": (["--method", "magnitude-sp", "--sparsity", "0.2", "--stats", "{m}/llmprune-stats.safetensors"], "--stats"),
}


@pytest.mark.parametrize("case", list(INAPPLICABLE))
def test_inapplicable_option_is_refused(run_cli, workdir, case):
    args, expected = INAPPLICABLE[case]
    fails(run_cli, workdir, ["apply", "{m}", *args, "--out", "{w}/out"], contains=expected)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--dsnot-iters", "5"], "--refine dsnot"),
        pytest.param(["--dsnot-skip", "attn"], "--refine dsnot", marks=pytest.mark.slow),
        pytest.param(["--owl-m", "3"], "--allocation owl", marks=pytest.mark.slow),
    ],
    ids=["dsnot-iters", "dsnot-skip", "owl-m"],
)
def test_sequential_inapplicable_option_is_refused(run_cli, workdir, args, expected):
    """`stats --sequential` used to drop DSnoT's options silently when --refine was not given."""
    common = ["stats", "{m}", "--sequential", "--method", "wanda", "--sparsity", "0.5", "--device", "cpu", "--out", "{w}/out"]
    fails(run_cli, workdir, [*common, *args], contains=expected)


# --------------------------------------------------------------------------------------------
# Paths: an empty value is named as "", a directory where a file is expected is named so
# --------------------------------------------------------------------------------------------

EMPTY = [
    ("apply-out", ["apply", "{m}", *MAG, "--out", ""], '--out ""'),
    ("apply-stats", ["apply", "{m}", "--method", "wanda", "--sparsity", "0.5", "--stats", "", "--out", "{w}/out"], '--stats ""'),
    ("apply-model", ["apply", "", *MAG, "--out", "{w}/out"], 'MODEL ""'),
    ("apply-allocation", ["apply", "{m}", *MAG, "--allocation", "", "--out", "{w}/out"], '--allocation ""'),
    ("stats-out", ["stats", "{m}", "--device", "cpu", "--out", ""], '--out ""'),
    ("finetune-out", ["finetune", "{m}", "--steps", "1", "--device", "cpu", "--out", ""], '--out ""'),
    ("merge-out", ["stats", "merge", "{m}/llmprune-stats.safetensors", "{m}/llmprune-stats.safetensors", "--out", ""], '--out ""'),
    ("eval-model", ["eval", "", "--device", "cpu"], 'MODEL ""'),
    ("reconstruct-dense", ["reconstruct", "{m}", "--dense", "", "--device", "cpu", "--out", "{w}/out"], '--dense ""'),
    ("finetune-distill", ["finetune", "{m}", "--distill", "", "--steps", "1", "--device", "cpu", "--out", "{w}/out"], '--distill ""'),
    ("demo-model-dir", ["demo-model", "", "--force"], 'DIR ""'),
]


@pytest.mark.parametrize("args,expected", [(a, e) for _, a, e in EMPTY], ids=[i for i, _, _ in EMPTY])
def test_empty_value_is_named(run_cli, workdir, args, expected):
    msg = fails(run_cli, workdir, args, contains=expected)
    assert " . " not in msg and not msg.rstrip().endswith("."), msg


@pytest.mark.parametrize("flag", ["--stats", "--gram"])
def test_directory_as_sidecar(run_cli, workdir, flag):
    method = ["--method", "wanda", "--sparsity", "0.5"] + (["--update"] if flag == "--gram" else [])
    fails(run_cli, workdir, ["apply", "{m}", *method, flag, "{w}", "--out", "{w}/out"], contains=(flag, "directory"))


# --------------------------------------------------------------------------------------------
# finetune: a diverging run is an error, whatever step it diverges at, and writes nothing
# --------------------------------------------------------------------------------------------


def training_text(workdir: Path) -> Path:
    path = workdir / "train.txt"
    path.write_text(H.TEXT * 3)
    return path


@pytest.mark.parametrize("lr", [slow_unless(lr == "inf", lr, id=lr) for lr in ("inf", "1e30", "10")])
def test_finetune_divergence_writes_nothing(run_cli, workdir, lr):
    text = training_text(workdir)
    args = ["finetune", "{m}", "--data", text, "--steps", "1", "--lr", lr, "--seqlen", "32", "--nsamples", "8", "--device", "cpu", "--out", "{w}/out"]
    fails(run_cli, workdir, args, contains="--lr" if lr == "inf" else "diverged", hint_contains=None if lr == "inf" else "--lr")


# --------------------------------------------------------------------------------------------
# eval of a structured checkpoint whose config.json disagrees with its tensors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def structured_out(run_cli, workdir) -> Path:
    """A structured output (layers of different sizes) inside workdir, at w/sp."""
    code, out, err = run_cli(
        ["apply", workdir / "tiny", "--method", "magnitude-sp", "--sparsity", "0.3", "--allocation", "global", "--out", workdir / "sp", "--json"]
    )
    assert code == 0, err
    assert json.loads(out)["loader"] == "llmprune.load_pruned"
    return workdir / "sp"


def alter_layers(model: Path, mutate) -> None:
    config = json.loads((model / "config.json").read_text())
    mutate(config["llmprune"]["structured"]["layers"])
    (model / "config.json").write_text(json.dumps(config))


ALTERATIONS = {
    "intermediate-size": (lambda layers: layers[0].update(intermediate_size=layers[0]["intermediate_size"] + 3), "model.layers.0.mlp.gate_proj.weight"),
    "heads": (lambda layers: layers[1].update(num_attention_heads=layers[1]["num_attention_heads"] * 2), "model.layers.1.self_attn.q_proj.weight"),
    "missing-size": (lambda layers: layers[1].pop("intermediate_size"), "intermediate_size"),
    "not-a-number": (lambda layers: layers[0].update(num_key_value_heads="two"), "num_key_value_heads"),
}


@pytest.mark.parametrize(
    "command,what",
    [slow_unless(c == "eval" and w == "intermediate-size", c, w, id=f"{c}-{w}") for c in ("eval", "stats") for w in ALTERATIONS],
)
def test_structured_config_disagreeing_with_tensors(run_cli, workdir, structured_out, command, what):
    import llmprune

    forward_is_finite(llmprune.load_pruned(structured_out))
    mutate, expected = ALTERATIONS[what]
    alter_layers(structured_out, mutate)
    args = ["eval", "{w}/sp", "--max-tokens", "64", "--seqlen", "16", "--device", "cpu"]
    if command == "stats":
        args = ["stats", "{w}/sp", "--nsamples", "1", "--seqlen", "16", "--device", "cpu", "--out", "{w}/out"]
    fails(run_cli, workdir, args, contains=expected)


# --------------------------------------------------------------------------------------------
# The same options where they apply are accepted, and their outputs load and run
# --------------------------------------------------------------------------------------------

APPLICABLE: dict[str, list[str]] = {
    "sparsegpt-damp-blocksize": ["--method", "sparsegpt", "--sparsity", "0.5", "--damp", "0.05", "--blocksize", "16"],
    "wanda-update-gram-damp": ["--method", "wanda", "--sparsity", "0.5", "--update", "--gram", "{gram}", "--damp", "0.05", "--blocksize", "16"],
    "flap-reconstruct-damp": ["--method", "flap", "--sparsity", "0.2", "--reconstruct", "--gram", "{gram}", "--damp", "0.05"],
}


@pytest.mark.parametrize("case", [slow_unless(c == "wanda-update-gram-damp", c, id=c) for c in APPLICABLE])
def test_applicable_options_are_accepted(run_cli, gram_model, tmp_path, case):
    import llmprune

    args = APPLICABLE[case]
    gram = str(gram_model / "llmprune-gram.safetensors")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["apply", gram_model, *[a.format(gram=gram) for a in args], "--out", out, "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    if summary.get("loader", "transformers") == "transformers":
        from transformers import AutoModelForCausalLM

        forward_is_finite(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    else:
        forward_is_finite(llmprune.load_pruned(out))


@pytest.mark.parametrize("command", ["apply", "stats"])
def test_sparsity_given_as_a_percentage_is_named_so(run_cli, workdir, command):
    args = ["apply", "{m}", "--method", "wanda", "--sparsity", "50", "--out", "{w}/out"] if command == "apply" else [
        "stats", "{m}", "--sequential", "--method", "wanda", "--sparsity", "50", "--device", "cpu", "--out", "{w}/out"]
    msg = fails(run_cli, workdir, args, contains=("--sparsity 50", "percentage"), hint_contains="--sparsity 0.5")
    assert "internal error" not in msg
