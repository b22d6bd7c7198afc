"""stderr when it is not a terminal: errors come first, and long runs print plain progress lines."""

from __future__ import annotations

from llmprune import cli, console


def test_error_is_the_first_line_even_after_a_progress_bar(tmp_path, capsys):
    # apply opens its progress display before the core finds that the model is missing
    assert cli.main(["apply", str(tmp_path / "missing"), "--method", "magnitude", "--sparsity", "0.5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: "), repr(err)


def test_log_progress_is_quiet_when_quick_and_talks_when_long(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])

    def run(seconds_per_window: float) -> list[str]:
        bar = console.BlockProgress(True, 30, "windows", 8)
        with bar:
            for block in range(30):
                bar.phase(f"block {block}", 8)
                for _ in range(8):
                    clock[0] += seconds_per_window
                    bar.step()
                bar.block_done(block)
        out, err = capsys.readouterr()
        assert out == ""
        return err.splitlines()

    assert run(0.01) == []  # 2.4 s in all
    lines = run(0.4)  # 96 s in all: a line at most every LOG_GAP seconds, none empty
    assert 5 <= len(lines) <= 96 / console.LogProgress.LOG_GAP + 1, lines
    assert lines[0].startswith("blocks 1/30, block 1 ") and lines[0].endswith("; 5 s"), lines[0]
    assert all(line.strip() for line in lines)


def test_stats_and_eval_say_what_they_load_first_on_stderr(model_copy, capsys):
    """Importing torch and reading the model take seconds in which nothing else would print: the first
    line on stderr says what is loading; stdout keeps the JSON alone."""
    import json

    import stats_helpers as H

    config = H.read_config(model_copy)
    H.add_tokenizer(model_copy, vocab_size=int(config["vocab_size"]))
    blocks = config["num_hidden_layers"]
    for args, text in (
        (["stats", str(model_copy), "--nsamples", "2", "--seqlen", "16", "--out", str(model_copy.parent / "s.safetensors")], "the calibration text"),
        (["eval", str(model_copy), "--max-tokens", "64", "--seqlen", "16"], "the evaluation text"),
    ):
        assert cli.main([*args, "--device", "cpu", "--json"]) == 0
        out, err = capsys.readouterr()
        json.loads(out)
        assert err.splitlines()[0] == f"reading {model_copy} ({blocks} blocks): loading torch and transformers, the tokenizer and {text} …", err


def test_no_loading_line_before_a_missing_model_or_an_argument_error(tmp_path, capsys):
    for args in (["stats", str(tmp_path / "missing")], ["eval", str(tmp_path / "missing")], ["stats", str(tmp_path), "--nsamples", "0"]):
        assert cli.main(args) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and "reading " not in err, (args, err)


def test_loading_line_on_rank_0_only(model_copy, monkeypatch, capsys):
    from llmprune.cli.options import announce

    monkeypatch.setenv("RANK", "1")
    announce(model_copy, "x")
    assert capsys.readouterr() == ("", "")


def test_finetune_and_reconstruct_say_what_they_load_first(model_copy, tmp_path, capsys):
    """The same first line for the two recovery commands, which load torch and a model before their
    first progress line."""
    import json

    import stats_helpers as H

    config = H.read_config(model_copy)
    H.add_tokenizer(model_copy, vocab_size=int(config["vocab_size"]))
    pruned = tmp_path / "pruned"
    assert cli.main(["apply", str(model_copy), "--method", "magnitude", "--sparsity", "0.5", "--out", str(pruned), "--json"]) == 0
    capsys.readouterr()
    for args, what in (
        (["finetune", str(pruned), "--steps", "1", "--nsamples", "2", "--seqlen", "16", "--batch-size", "1", "--out", str(tmp_path / "ft")],
         "torch and transformers, the whole model and the training text"),
        (["reconstruct", str(pruned), "--dense", str(model_copy), "--steps", "0", "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "rec")],
         "torch and transformers, the tokenizer and the calibration text, then the two models block by block"),
    ):
        assert cli.main([*args, "--device", "cpu", "--json"]) == 0
        out, err = capsys.readouterr()
        json.loads(out)
        assert err.splitlines()[0] == f"reading {pruned} ({config['num_hidden_layers']} blocks): loading {what} …", err
