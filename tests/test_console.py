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
