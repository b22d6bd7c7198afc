"""benches/demo.py: its --methods syntax and Markdown output, what it prints and leaves on disk (fast:
no model, `llmprune` faked), and, marked slow, whole runs on a tiny LLaMA through the real CLI, whose
"next, try" commands are then run as printed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("rich")


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("llmprune_demo_script", ROOT / "benches" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def specs(runs):
    return [r.spec for r in runs]


def test_default_methods_unchanged(demo):
    runs = demo.parse_methods(demo.DEFAULT_METHODS, 0.5)
    assert specs(runs) == ["dense", "magnitude@0.5", "wanda@0.5", "stade@0.5", "stade-w@0.5", "wanda@2:4"]
    assert all(r.scope == "row" and not r.sequential for r in runs)
    assert [r.label for r in runs] == ["dense", "magnitude-0.5", "wanda-0.5", "stade-0.5", "stade-w-0.5", "wanda-2_4"]


def test_layer_scope_and_sequential(demo):
    mag, seq, seq_nm, plain = demo.parse_methods("magnitude-layer@0.6,wanda~seq@0.6,stade-w~seq@4:8,stade-w", 0.5)
    assert (mag.method, mag.scope, mag.sequential, mag.sparsity) == ("magnitude", "layer", False, 0.6)
    assert (mag.label, mag.statistics, mag.spec) == ("magnitude-layer-0.6", "-", "magnitude-layer@0.6")
    assert (seq.method, seq.scope, seq.sequential, seq.sparsity, seq.pattern) == ("wanda", "row", True, 0.6, None)
    assert (seq.label, seq.statistics, seq.target) == ("wanda-seq-0.6", "sequential", "60%")
    assert (seq_nm.method, seq_nm.pattern, seq_nm.apply_target_args()) == ("stade-w", "4:8", ["--pattern", "4:8"])
    assert (plain.method, plain.sparsity, plain.statistics) == ("stade-w", 0.5, "dense")
    # one sequential sidecar per (method, target); all dense-statistics runs share one
    assert demo.Statistics.key(seq) == "wanda~seq@0.6"
    assert demo.Statistics.key(seq_nm) == "stade-w~seq@4:8"
    assert demo.Statistics.key(plain) == "dense"
    stats = demo.Statistics(Path("/m/smollm2"), Path("/w"), argparse.Namespace())
    assert stats.path_for(seq_nm) == Path("/w/smollm2.stats-seq-stade-w-4_8.safetensors")
    assert stats.path_for(plain) == Path("/m/smollm2/llmprune-stats.safetensors")  # where apply looks


def test_targets_cross_methods_target_by_target(demo):
    runs = demo.parse_methods("dense,magnitude,magnitude-layer,wanda,wanda~seq", 0.5, "0.5,2:4")
    assert specs(runs) == [
        "dense",
        "magnitude@0.5", "magnitude-layer@0.5", "wanda@0.5", "wanda~seq@0.5",
        "magnitude@2:4", "wanda@2:4", "wanda~seq@2:4",  # no --scope layer at N:M
    ]
    # explicit targets come after, without repeats
    runs = demo.parse_methods("wanda@2:4,dense,stade,dense", 0.5, "0.6")
    assert specs(runs) == ["dense", "stade@0.6", "wanda@2:4"]


@pytest.mark.parametrize(
    "spec",
    [
        "magnitude~seq@0.5",  # magnitude uses no statistics
        "magnitude-layer@2:4",  # --scope layer is for unstructured sparsity
        "wanda-layer~seq",  # sequential statistics are pruned per row
        "dense~seq",
        "dense@0.5",
        "wanda@3:2",
        "wanda@1.5",
        "wanda@half",
        "~seq",
        ",",
    ],
)
def test_bad_specs(demo, spec):
    with pytest.raises(SystemExit, match="error"):
        demo.parse_methods(spec, 0.5)


def test_bad_targets(demo):
    with pytest.raises(SystemExit, match="error"):
        demo.parse_methods("wanda", 0.5, "0.5,2-4")
    with pytest.raises(SystemExit, match="error"):
        demo.parse_methods("wanda", 0.5, " , ")


def test_markdown_replaces_only_between_markers(demo, tmp_path):
    path = tmp_path / "quality.md"
    demo.write_markdown(path, "| a |\n")
    assert path.read_text() == f"{demo.MD_BEGIN}\n| a |\n{demo.MD_END}\n"
    path.write_text(f"# Title\n\nintro\n\n{demo.MD_BEGIN}\nold table\n{demo.MD_END}\n\n## Reading\n\nprose\n")
    demo.write_markdown(path, "| b |\n")
    assert path.read_text() == f"# Title\n\nintro\n\n{demo.MD_BEGIN}\n| b |\n{demo.MD_END}\n## Reading\n\nprose\n"


def test_markdown_table_rows(demo):
    runs = demo.parse_methods("dense,magnitude-layer@0.5,wanda~seq@2:4", 0.5)
    for r, ppl, secs in zip(runs, (20.0, 50.0, 1234.5), (None, 0.5, 1.25)):
        r.perplexity, r.apply_seconds = ppl, secs
    args = argparse.Namespace(calib=None, data=None, nsamples=8, seqlen=256, max_tokens=4096, eval_seqlen=512,
                              device="cpu", model_dir=Path("/m/smollm2-135m"))
    text = demo.markdown_table(runs, args, {"dense": {"tokens": 2048, "seconds": 60.0}}, {"tokens": 4096, "windows": 8,
                               "device": "cpu", "dtype": "float32"}, 900.0, "python benches/demo.py --x")
    assert "Command: `python benches/demo.py --x`" in text
    assert "nsamples 8 x seqlen 256 = 2,048 tokens" in text and "4,096 tokens scored, eval seqlen 512, 8 windows" in text
    assert "| dense | - | - | 20.00 | 1.00 | - |" in text
    assert "| magnitude (`--scope layer`) | - | 50% | 50.00 | 2.50 | 0.5 |" in text
    assert "| wanda | sequential | 2:4 | 1,234 | 61.73 | 1.2 |" in text  # as printed after the command: one decimal
    assert text.endswith("\napply s: wall time of each `llmprune` command, as printed after it (process start, loading and writing included).\n")


# --------------------------------------------------------------------------------------------
# What a run prints and leaves: `llmprune` faked (no model, no subprocess)
# --------------------------------------------------------------------------------------------

PROTOCOL = ["--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "32", "--max-tokens", "128", "--device", "cpu"]
ECHO = re.compile(r"^\$ (llmprune .*)$", re.M)
DURATION = re.compile(r"^  \((stats|apply|eval): ([0-9.]+) s\)$", re.M)


def demo_model_dir(path: Path) -> Path:
    """A folder `ensure_demo_model` takes for a finished conversion (its files empty: `llmprune` is faked)."""
    from llmprune.model import demo as demo_model

    path.mkdir(parents=True)
    for name in demo_model.REQUIRED_FILES:
        (path / name).write_text("{}")
    (path / demo_model.MARKER).write_text(json.dumps({"recipe": demo_model.RECIPE}))
    return path


@pytest.fixture
def fake_llmprune(monkeypatch):
    """`python -m llmprune ... --json` answered without running: apply and stats write their output,
    each call takes its own small time; other commands (git) run."""
    real_run = subprocess.run
    calls: list[list[str]] = []

    def run(cmd, *a, **kw):
        if cmd[1:3] != ["-m", "llmprune"]:
            return real_run(cmd, *a, **kw)
        args = cmd[3:]
        calls.append(args)
        time.sleep(0.02 * len(calls))
        if args[0] == "apply":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_bytes(b"\0" * 1000)
            doc = {"out": str(out), "seconds": 0.001}
        elif args[0] == "stats":
            Path(args[1], "llmprune-stats.safetensors").write_bytes(b"")
            doc = {"tokens": 32, "seconds": 0.001, "device": "cpu"}
        else:
            doc = {"perplexity": 20.0 + len(calls), "tokens": 128, "windows": 4, "seconds": 0.001, "device": "cpu", "dtype": "float32"}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(doc))

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("COLUMNS", "200")
    return calls


def table_seconds(stdout: str) -> list[tuple[str, str]]:
    """The (apply s, eval s) cells of the printed table, row by row."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]
    return [(r[-2], r[-1]) for r in rows]


def next_try(stdout: str) -> list[str]:
    """The commands under "next, try:", as printed."""
    tail = stdout.split("\nnext, try:\n", 1)[1]
    return [line.strip() for line in tail.splitlines() if line.startswith("    llmprune ")]


def test_run_keeps_outputs_and_echoes_commands_as_typed(demo, fake_llmprune, tmp_path, capsys):
    model = demo_model_dir(tmp_path / "demo out" / "smol")
    assert demo.main(["--model-dir", str(model), "--methods", "dense,magnitude,wanda@2:4", *PROTOCOL]) == 0
    out, err = capsys.readouterr()
    kept = [model.parent / "smol-magnitude-0.5", model.parent / "smol-wanda-2_4"]
    assert all(d.is_dir() for d in kept)
    assert all(args[-1] == "--json" for args in fake_llmprune)  # run with --json, to read the summary
    echoed = ECHO.findall(err)
    assert [shlex.split(c)[1] for c in echoed] == ["stats", "eval", "apply", "eval", "apply", "eval"]
    assert not any("--json" in c for c in echoed)
    # --force only where rerunning needs it: on the apply commands, whose outputs stay
    assert [c for c in echoed if "--force" in c] == [c for c in echoed if c.startswith("llmprune apply ")]
    assert shlex.split(echoed[2]) == ["llmprune", "apply", str(model), "--method", "magnitude", "--sparsity", "0.5", "--out", str(kept[0]),
                                      "--force"]
    # the table's seconds are the durations printed after the commands
    durations = DURATION.findall(err)
    printed = {"apply": [s for k, s in durations if k == "apply"], "eval": [s for k, s in durations if k == "eval"]}
    assert table_seconds(out) == [("-", printed["eval"][0]), *zip(printed["apply"], printed["eval"][1:])]
    assert "apply s, eval s: wall time of each `llmprune` command" in out
    # where things are, quoted to be pasted
    assert f"kept 2 pruned checkpoints (0.0 MB) in {shlex.quote(str(model.parent))}" in out
    assert all(f"\n  {shlex.quote(str(d))}\n" in out for d in kept)
    cmds = next_try(out)
    assert cmds == [
        shlex.join(["llmprune", "inspect", str(kept[1])]),
        # the lowest perplexity (the fake's grow call by call), on twice the text
        shlex.join(["llmprune", "eval", str(kept[0]), "--seqlen", "32", "--device", "cpu", "--max-tokens", "256"]),
        shlex.join(["llmprune", "apply", str(model), "--method", "flap", "--sparsity", "0.2",
                    "--out", str(model.parent / "smol-flap-0.2")]),
        shlex.join(["llmprune", "eval", str(model.parent / "smol-flap-0.2"), "--seqlen", "32", "--device", "cpu", "--max-tokens", "128"]),
    ]


def test_no_keep_deletes_outputs(demo, fake_llmprune, tmp_path, capsys):
    model = demo_model_dir(tmp_path / "smol")
    assert demo.main(["--model-dir", str(model), "--methods", "magnitude", "--no-keep", *PROTOCOL]) == 0
    out, err = capsys.readouterr()
    assert not (tmp_path / "smol-magnitude-0.5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]
    echoed = ECHO.findall(err)
    assert [shlex.split(c)[1] for c in echoed] == ["apply", "eval"]
    assert not any("--json" in c or "--force" in c for c in echoed)  # the output is gone: no --force to repeat it
    assert "pruned checkpoints: deleted after their evaluation (--no-keep)" in out and "kept" not in out
    # no statistics on disk (magnitude needs none): compute them first, then FLAP and its evaluation
    assert [shlex.split(c)[1] for c in next_try(out)] == ["stats", "apply", "eval"]
    assert str(tmp_path / "smol-magnitude-0.5") not in out.split("next, try:")[1]


def test_next_commands_replace_only_what_is_there(demo, tmp_path):
    model = tmp_path / "smol"
    model.mkdir()
    (model / "llmprune-stats.safetensors").write_bytes(b"")
    runs = demo.parse_methods("dense,magnitude", 0.5)
    args = argparse.Namespace(max_tokens=0, eval_seqlen=512, device="auto", data="notes.txt", nsamples=8, seqlen=256, calib=None)
    cmds = [argv for _, argv in demo.next_commands(runs, args, model, tmp_path)]
    assert [c[0] for c in cmds] == ["apply", "eval"]  # nothing kept, the statistics there: FLAP and its evaluation
    assert cmds[1] == ["eval", str(tmp_path / "smol-flap-0.2"), "--seqlen", "512", "--device", "auto", "--data", "notes.txt"]
    (tmp_path / "smol-flap-0.2").mkdir()  # from an earlier paste: replaced
    assert demo.next_commands(runs, args, model, tmp_path)[0][1][-1] == "--force"


# --------------------------------------------------------------------------------------------
# Whole runs on a tiny LLaMA, through the real CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_demo_model(tmp_path_factory) -> Path:
    """A tiny LLaMA with a tokenizer, marked as a finished demo conversion (so the demo takes it)."""
    import reference as R
    import stats_helpers as H
    from llmprune.model import demo as demo_model

    path = R.tiny_llama_dir(tmp_path_factory.mktemp("tiny-demo") / "tiny")
    H.add_tokenizer(path)
    (path / demo_model.MARKER).write_text(json.dumps({"recipe": demo_model.RECIPE}))
    assert demo_model.is_complete(path)
    return path


def run_demo(model: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benches" / "demo.py"), "--model-dir", str(model), *PROTOCOL, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def run_as_printed(command: str) -> subprocess.CompletedProcess:
    """A printed `llmprune ...` line, run as a shell would split it (with this interpreter's llmprune)."""
    argv = shlex.split(command)
    assert argv[0] == "llmprune"
    return subprocess.run([sys.executable, "-m", "llmprune", *argv[1:]], capture_output=True, text=True, env=cli_env(), timeout=300)


@pytest.mark.slow
def test_tiny_demo_keeps_outputs_and_its_next_commands_work(tiny_demo_model, tmp_path):
    model = tmp_path / "demo out" / "tiny"
    shutil.copytree(tiny_demo_model, model)
    proc = run_demo(model, "--methods", "dense,magnitude,wanda@2:4")
    kept = [model.parent / "tiny-magnitude-0.5", model.parent / "tiny-wanda-2_4"]
    assert all((d / "config.json").is_file() for d in kept), proc.stdout
    echoed = ECHO.findall(proc.stderr)
    assert len(echoed) == 6 and not any("--json" in c for c in echoed), proc.stderr
    durations = DURATION.findall(proc.stderr)
    printed = {k: [s for kk, s in durations if kk == k] for k in ("apply", "eval")}
    assert table_seconds(proc.stdout) == [("-", printed["eval"][0]), *zip(printed["apply"], printed["eval"][1:])]
    # the next commands, in order, as printed: inspect and eval a kept checkpoint, FLAP and its evaluation
    cmds = next_try(proc.stdout)
    assert [shlex.split(c)[1] for c in cmds] == ["inspect", "eval", "apply", "eval"], proc.stdout
    for command in cmds:
        res = run_as_printed(command)
        assert res.returncode == 0, f"{command}\n{res.stderr}"
    assert "2:4" in run_as_printed(cmds[0]).stdout
    assert (model.parent / "tiny-flap-0.2" / "config.json").is_file()


@pytest.mark.slow
def test_tiny_demo_no_keep(tiny_demo_model, tmp_path):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_demo_model, model)
    proc = run_demo(model, "--methods", "magnitude", "--no-keep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"], proc.stdout
    assert "deleted after their evaluation (--no-keep)" in proc.stdout
    assert [shlex.split(c)[1] for c in ECHO.findall(proc.stderr)] == ["apply", "eval"]
