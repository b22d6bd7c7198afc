"""benches/demo.py's --methods syntax and Markdown output (fast: no model, no llmprune subprocess)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

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
    for r, ppl, secs in zip(runs, (20.0, 50.0, 1234.5), (None, 0.5, 0.25)):
        r.perplexity, r.apply_seconds = ppl, secs
    args = argparse.Namespace(calib=None, data=None, nsamples=8, seqlen=256, max_tokens=4096, eval_seqlen=512,
                              device="cpu", model_dir=Path("/m/smollm2-135m"))
    text = demo.markdown_table(runs, args, {"dense": {"tokens": 2048, "seconds": 60.0}}, {"tokens": 4096, "windows": 8,
                               "device": "cpu", "dtype": "float32"}, 900.0, "python benches/demo.py --x")
    assert "Command: `python benches/demo.py --x`" in text
    assert "nsamples 8 x seqlen 256 = 2,048 tokens" in text and "4,096 tokens scored, eval seqlen 512, 8 windows" in text
    assert "| dense | - | - | 20.00 | 1.00 | - |" in text
    assert "| magnitude (`--scope layer`) | - | 50% | 50.00 | 2.50 | 0.50 |" in text
    assert "| wanda | sequential | 2:4 | 1,234 | 61.73 | 0.25 |" in text
